"""Waiting-line tasks: edit a line of people, after ParallelBench (arXiv 2510.04767).

ParallelBench's "Waiting Line" tasks give a list of names and ask for the list
after one operation. Their answers are short and fully determined by the
prompt, yet a parallel decoder that commits several names in one step picks
each from its own marginal and can write one name twice or drop one: the
failure these tasks expose.

Our versions keep the operations and change the surface, so that a tiny model
trained from scratch can learn them:

* one word per name, from `NAMES` (24 single-token names), all names in a line
  distinct;
* 8 to 10 people in a line (ParallelBench uses 3 to 6), so that every answer is
  at least 8 tokens; `remove_index` uses 9 to 11 so its answer keeps 8 or more;
* a terse prompt "<instruction> : <names> =>" instead of a chat instruction;
* positions are 1-based and written as one word "1" ... "11".

The tasks and how they are scored:

* `copy`: the line unchanged. Exact match.
* `reverse`: the line back to front. Exact match.
* `sort`: the line in alphabetical order. Exact match.
* `insert_index`: "insert Zoe at 3 : ..." -> the line with Zoe as its 3rd person
  (a name not already in the line). Exact match.
* `remove_index`: "remove at 3 : ..." -> the line without its 3rd person.
  Exact match.
* `replace_index`: "replace at 3 with Zoe : ..." -> the line with its 3rd person
  replaced by Zoe (a name not already in the line). Exact match.
* `shuffle`: any reordering of the line that differs from it. Scored by
  validity, as in ParallelBench: the output must be a permutation of the input
  names and must not equal the input order. The reference answer is one random
  such permutation.
"""

from __future__ import annotations

import numpy as np

from dllm.tasks.base import ANSWER_DELIMITER, Task, exact_match, prompt_payload

NAMES = (
    "Ann", "Bob", "Cid", "Dan", "Eve", "Fay", "Gus", "Hal",
    "Ivy", "Jon", "Kim", "Lou", "Max", "Ned", "Oli", "Pam",
    "Quin", "Ray", "Sam", "Tom", "Uma", "Val", "Wes", "Zoe",
)  # fmt: skip
MIN_LINE, MAX_LINE = 8, 10  # people in a line, for every task but remove_index
# Line positions, 1-based, one word each; a line of 10 has 11 insertion points.
POSITIONS = tuple(str(p) for p in range(1, MAX_LINE + 2))


def draw_people(rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct names in random order."""
    return [NAMES[i] for i in rng.permutation(len(NAMES))[:count]]


def draw_length(rng: np.random.Generator, low: int = MIN_LINE, high: int = MAX_LINE) -> int:
    """A line length in [low, high], uniform."""
    return int(rng.integers(low, high + 1))


def make_prompt(instruction: str, line: list[str]) -> str:
    """ "<instruction> : <names> =>"."""
    return f"{instruction} : {' '.join(line)} {ANSWER_DELIMITER}"


def sample_copy(rng: np.random.Generator) -> tuple[str, str]:
    """copy : Ann Bob ... => Ann Bob ..."""
    line = draw_people(rng, draw_length(rng))
    return make_prompt("copy", line), " ".join(line)


def sample_reverse(rng: np.random.Generator) -> tuple[str, str]:
    """reverse : Ann Bob ... Hal => Hal ... Bob Ann"""
    line = draw_people(rng, draw_length(rng))
    return make_prompt("reverse", line), " ".join(reversed(line))


def sample_sort(rng: np.random.Generator) -> tuple[str, str]:
    """sort : Hal Ann Eve ... => Ann Eve Hal ... (alphabetical)"""
    line = draw_people(rng, draw_length(rng))
    return make_prompt("sort", line), " ".join(sorted(line))


def sample_insert_index(rng: np.random.Generator) -> tuple[str, str]:
    """insert Zoe at 3 : Ann Bob Cid ... => Ann Bob Zoe Cid ..."""
    length = draw_length(rng)
    *line, newcomer = draw_people(rng, length + 1)
    position = int(rng.integers(1, length + 2))
    answer = line[: position - 1] + [newcomer] + line[position - 1 :]
    return make_prompt(f"insert {newcomer} at {position}", line), " ".join(answer)


def sample_remove_index(rng: np.random.Generator) -> tuple[str, str]:
    """remove at 3 : Ann Bob Cid Dan ... => Ann Bob Dan ..."""
    length = draw_length(rng, MIN_LINE + 1, MAX_LINE + 1)
    line = draw_people(rng, length)
    position = int(rng.integers(1, length + 1))
    answer = line[: position - 1] + line[position:]
    return make_prompt(f"remove at {position}", line), " ".join(answer)


def sample_replace_index(rng: np.random.Generator) -> tuple[str, str]:
    """replace at 3 with Zoe : Ann Bob Cid Dan ... => Ann Bob Zoe Dan ..."""
    length = draw_length(rng)
    *line, newcomer = draw_people(rng, length + 1)
    position = int(rng.integers(1, length + 1))
    answer = line[: position - 1] + [newcomer] + line[position:]
    return make_prompt(f"replace at {position} with {newcomer}", line), " ".join(answer)


def sample_shuffle(rng: np.random.Generator) -> tuple[str, str]:
    """shuffle : Ann Bob Cid ... => any other order of the same names, e.g. Cid Ann Bob ..."""
    line = draw_people(rng, draw_length(rng))
    while True:
        shuffled = [line[i] for i in rng.permutation(len(line))]
        if shuffled != line:
            return make_prompt("shuffle", line), " ".join(shuffled)


def is_valid_shuffle(prompt_words: list[str], answer_words: list[str], output_words: list[str]) -> bool:
    """The output holds exactly the input's names, each once, in a different order."""
    del answer_words
    line = prompt_payload(prompt_words)
    return sorted(output_words) == sorted(line) and output_words != line


def line_task_words(*instruction_words: str, positions: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Every word a waiting-line task writes: its instruction, ":", "=>", positions and names."""
    return (*instruction_words, ":", ANSWER_DELIMITER, *positions, *NAMES)


COPY = Task("copy", True, sample_copy, exact_match, line_task_words("copy"))
REVERSE = Task("reverse", True, sample_reverse, exact_match, line_task_words("reverse"))
SORT = Task("sort", True, sample_sort, exact_match, line_task_words("sort"))
INSERT_INDEX = Task(
    "insert_index", True, sample_insert_index, exact_match,
    line_task_words("insert", "at", positions=POSITIONS),
)  # fmt: skip
REMOVE_INDEX = Task(
    "remove_index", True, sample_remove_index, exact_match,
    line_task_words("remove", "at", positions=POSITIONS),
)  # fmt: skip
REPLACE_INDEX = Task(
    "replace_index", True, sample_replace_index, exact_match,
    line_task_words("replace", "at", "with", positions=POSITIONS[:-1]),
)  # fmt: skip
SHUFFLE = Task("shuffle", False, sample_shuffle, is_valid_shuffle, line_task_words("shuffle"))
