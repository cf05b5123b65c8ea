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

import dataclasses
import functools

import numpy as np

from dllm.tasks.base import ANSWER_DELIMITER, Task, curriculum, exact_match, prompt_payload, words_pattern

NAMES = (
    "Ann", "Bob", "Cid", "Dan", "Eve", "Fay", "Gus", "Hal",
    "Ivy", "Jon", "Kim", "Lou", "Max", "Ned", "Oli", "Pam",
    "Quin", "Ray", "Sam", "Tom", "Uma", "Val", "Wes", "Zoe",
)  # fmt: skip
MIN_LINE, MAX_LINE = 8, 10  # people in a line, for every task but remove_index
# Line positions, 1-based, one word each; a line of 10 has 11 insertion points.
POSITIONS = tuple(str(p) for p in range(1, MAX_LINE + 2))


def draw_people(rng: np.random.Generator, count: int, names: tuple[str, ...] = NAMES) -> list[str]:
    """`count` distinct names of `names` in random order."""
    return [names[i] for i in rng.permutation(len(names))[:count]]


def draw_length(rng: np.random.Generator, low: int = MIN_LINE, high: int = MAX_LINE) -> int:
    """A line length in [low, high], uniform."""
    return int(rng.integers(low, high + 1))


def make_prompt(instruction: str, line: list[str]) -> str:
    """ "<instruction> : <names> =>"."""
    return f"{instruction} : {' '.join(line)} {ANSWER_DELIMITER}"


@dataclasses.dataclass(frozen=True)
class LineShape:
    """Which names a suite's lines use and how long they are.

    `remove_index` draws lines one longer (low + 1 to high + 1), so its
    answer keeps at least `low` names.
    """

    names: tuple[str, ...] = NAMES
    low: int = MIN_LINE
    high: int = MAX_LINE

    def people(self, rng: np.random.Generator, extra: int = 0, longer: int = 0) -> list[str]:
        return draw_people(rng, draw_length(rng, self.low + longer, self.high + longer) + extra, self.names)


def sample_copy(rng: np.random.Generator, shape: LineShape = LineShape()) -> tuple[str, str]:
    """copy : Ann Bob ... => Ann Bob ..."""
    line = shape.people(rng)
    return make_prompt("copy", line), " ".join(line)


def sample_reverse(rng: np.random.Generator, shape: LineShape = LineShape()) -> tuple[str, str]:
    """reverse : Ann Bob ... Hal => Hal ... Bob Ann"""
    line = shape.people(rng)
    return make_prompt("reverse", line), " ".join(reversed(line))


def sample_sort(rng: np.random.Generator, shape: LineShape = LineShape()) -> tuple[str, str]:
    """sort : Hal Ann Eve ... => Ann Eve Hal ... (alphabetical)"""
    line = shape.people(rng)
    return make_prompt("sort", line), " ".join(sorted(line))


def sample_insert_index(rng: np.random.Generator, shape: LineShape = LineShape()) -> tuple[str, str]:
    """insert Zoe at 3 : Ann Bob Cid ... => Ann Bob Zoe Cid ..."""
    *line, newcomer = shape.people(rng, extra=1)
    position = int(rng.integers(1, len(line) + 2))
    answer = line[: position - 1] + [newcomer] + line[position - 1 :]
    return make_prompt(f"insert {newcomer} at {position}", line), " ".join(answer)


def sample_remove_index(rng: np.random.Generator, shape: LineShape = LineShape()) -> tuple[str, str]:
    """remove at 3 : Ann Bob Cid Dan ... => Ann Bob Dan ..."""
    line = shape.people(rng, longer=1)
    position = int(rng.integers(1, len(line) + 1))
    answer = line[: position - 1] + line[position:]
    return make_prompt(f"remove at {position}", line), " ".join(answer)


def sample_replace_index(rng: np.random.Generator, shape: LineShape = LineShape()) -> tuple[str, str]:
    """replace at 3 with Zoe : Ann Bob Cid Dan ... => Ann Bob Zoe Dan ..."""
    *line, newcomer = shape.people(rng, extra=1)
    position = int(rng.integers(1, len(line) + 1))
    answer = line[: position - 1] + [newcomer] + line[position:]
    return make_prompt(f"replace at {position} with {newcomer}", line), " ".join(answer)


def sample_shuffle(rng: np.random.Generator, shape: LineShape = LineShape()) -> tuple[str, str]:
    """shuffle : Ann Bob Cid ... => any other order of the same names, e.g. Cid Ann Bob ..."""
    line = shape.people(rng)
    while True:
        shuffled = [line[i] for i in rng.permutation(len(line))]
        if shuffled != line:
            return make_prompt("shuffle", line), " ".join(shuffled)


def is_valid_shuffle(prompt_words: list[str], answer_words: list[str], output_words: list[str]) -> bool:
    """The output holds exactly the input's names, each once, in a different order."""
    del answer_words
    line = prompt_payload(prompt_words)
    return sorted(output_words) == sorted(line) and output_words != line


def line_task_words(*instruction_words: str, positions: tuple[str, ...] = (),
                    names: tuple[str, ...] = NAMES) -> tuple[str, ...]:
    """Every word a waiting-line task writes: its instruction, ":", "=>", positions and names."""
    return (*instruction_words, ":", ANSWER_DELIMITER, *positions, *names)


def line_tasks(shape: LineShape = LineShape(), suite: str = "tiny", easy_shape: LineShape | None = None,
               easy_share: float = 0.0) -> tuple[Task, ...]:
    """The seven waiting-line tasks over lines of `shape` (copy ... shuffle), in that order.

    With `easy_shape`, a share `easy_share` of the train split's lines come
    from it instead (`dllm.tasks.base.curriculum`); the test split keeps `shape`.
    """
    positions = tuple(str(p) for p in range(1, shape.high + 2))  # a line has high + 1 insertion points
    words = functools.partial(line_task_words, names=shape.names)

    def task(name, deterministic, sample, checker, task_words, longest=shape.high):
        train_sample = None
        if easy_shape is not None:
            train_sample = curriculum(functools.partial(sample, shape=easy_shape),
                                      functools.partial(sample, shape=shape), easy_share)
        return Task(name, deterministic, functools.partial(sample, shape=shape), checker, task_words, suite=suite,
                    max_answer_tokens=longest, train_sample=train_sample,
                    answer_pattern=words_pattern(shape.names))  # counts unbounded: a bounded count multiplies the DFA

    return (
        task("copy", True, sample_copy, exact_match, words("copy")),
        task("reverse", True, sample_reverse, exact_match, words("reverse")),
        task("sort", True, sample_sort, exact_match, words("sort")),
        task("insert_index", True, sample_insert_index, exact_match, words("insert", "at", positions=positions),
             longest=shape.high + 1),
        task("remove_index", True, sample_remove_index, exact_match, words("remove", "at", positions=positions)),
        task("replace_index", True, sample_replace_index, exact_match,
             words("replace", "at", "with", positions=positions[:-1])),
        task("shuffle", False, sample_shuffle, is_valid_shuffle, words("shuffle")),
    )


COPY, REVERSE, SORT, INSERT_INDEX, REMOVE_INDEX, REPLACE_INDEX, SHUFFLE = line_tasks()
