"""Tasks: synthetic suites with exact scorers (`dllm.tasks.synthetic`) and real benchmarks
(`dllm.tasks.benchmarks`), behind one protocol and one registry.

Every task set (`TASK_SETS`, keyed by the `name` of its configs/task/*.yaml) has
`examples(split, n)`, `examples_of_config(settings, tokenizer)` (what a task config
asks for), `score(example, output)` and `score_many(examples, outputs)`; every single
task (a suite's `Task`, or a benchmark) has `examples`, `score` and `score_many`.

Two suites (`SUITES`), in the spirit of ParallelBench (arXiv 2510.04767):

* `tiny` (`TASKS`): answers of 8 to 19 tokens, small enough for a
  ~5M-parameter model trained on a CPU-sized budget (the CPU test model);
* `parallel` (`dllm.tasks.synthetic.parallel`): answers of 16 to 89 tokens, decoded at
  gen 128 / block 32, on which committing several tokens per step visibly
  costs accuracy.

    from dllm.tasks import get_task, suite_examples
    task = get_task("reverse", suite="parallel")
    example = task.examples("test")[0]
    task.score(example, decoded_answer_text)   # 1.0 or 0.0

Tiny-suite tasks (see each module's docstring for its format and scorer):

* waiting line (`waiting_line.py`): copy, reverse, sort, insert_index,
  remove_index, replace_index (exact match); shuffle (validity);
* `addition` (`arithmetic.py`): 8-digit + 8-digit, exact match;
* puzzles (`puzzles.py`): latin_square and sudoku on 4x4 grids, validity.

The word-level tokenizer over all these words is in `dllm.tasks.synthetic.vocab`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from dllm.tasks.synthetic.arithmetic import ADDITION
from dllm.tasks.base import (
    ANSWER_DELIMITER,
    DEFAULT_SPLIT_SIZES,
    MAX_ANSWER_TOKENS,
    MAX_PROMPT_TOKENS,
    MIN_ANSWER_TOKENS,
    SPLITS,
    Example,
    Task,
    check_split,
)
from dllm.tasks.synthetic.parallel import PARALLEL_TASKS
from dllm.tasks.synthetic.puzzles import LATIN_SQUARE, SUDOKU
from dllm.tasks.synthetic.waiting_line import COPY, INSERT_INDEX, REMOVE_INDEX, REPLACE_INDEX, REVERSE, SHUFFLE, SORT

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        COPY,
        REVERSE,
        SORT,
        INSERT_INDEX,
        REMOVE_INDEX,
        REPLACE_INDEX,
        SHUFFLE,
        ADDITION,
        LATIN_SQUARE,
        SUDOKU,
    )
}


SUITES: dict[str, dict[str, Task]] = {"tiny": TASKS, "parallel": PARALLEL_TASKS}


TINY_TASK_CONFIG = "suite"  # configs/task/suite.yaml names the tiny suite; other suites' configs use their name


def suite_of_task_config(name: str) -> str:
    """The suite a task config's `name` selects ("suite" -> "tiny", "parallel" -> "parallel")."""
    return "tiny" if name == TINY_TASK_CONFIG else name


def task_config_of_suite(suite: str) -> str:
    """The task config `name` of `suite`, as experiments.evaluate records it in results."""
    return TINY_TASK_CONFIG if suite == "tiny" else suite


@dataclasses.dataclass(frozen=True)
class Suite:
    """A synthetic suite as one task set: examples of its tasks, task after task, scored by each task."""

    name: str  # the suite: a key of SUITES
    tasks: Mapping[str, Task]

    def examples(self, split: str = "test", n: int | None = None, *, tasks: Sequence[str] | None = None
                 ) -> list[Example]:
        """The first `n` examples of `split` from each task (`suite_examples`)."""
        return suite_examples(split, n, tasks=tasks, suite=self.name)

    def examples_of_config(self, settings: Mapping, tokenizer=None) -> list[Example]:
        """Examples of a task config (configs/task/suite.yaml or parallel.yaml: split, n_per_task, tasks)."""
        del tokenizer  # the suites' prompts are plain text
        tasks = list(settings["tasks"]) if settings.get("tasks") else None
        return self.examples(settings.get("split", "test"), settings.get("n_per_task"), tasks=tasks)

    def score(self, example: Example, output: str) -> float:
        return get_task(example.task, self.name).score(example, output)

    def score_many(self, examples: Sequence[Example], outputs: Sequence[str]) -> list[float]:
        return [self.score(e, o) for e, o in zip(examples, outputs)]


def task_sets() -> dict:
    """The one registry of task sets, keyed by configs/task/*.yaml's `name`: the synthetic suites
    ("suite" is the tiny one, "parallel") and the benchmarks (gsm8k, humaneval, mbpp)."""
    from dllm.tasks.benchmarks import BENCHMARKS

    return {task_config_of_suite(suite): Suite(suite, tasks) for suite, tasks in SUITES.items()} | dict(BENCHMARKS)


def get_task_set(name: str):
    """The task set a task config names; ValueError naming the allowed names."""
    sets = task_sets()
    if name not in sets:
        raise ValueError(f"unknown task config name {name!r}; allowed: {', '.join(sets)}")
    return sets[name]


def check_suite(suite: str) -> dict[str, Task]:
    """The tasks of `suite`; ValueError naming the allowed suites if there is none."""
    if suite not in SUITES:
        raise ValueError(f"unknown task suite {suite!r}; allowed suites: {', '.join(SUITES)}")
    return SUITES[suite]


def get_task(name: str, suite: str = "tiny") -> Task:
    """The task `name` of `suite`, or a real benchmark (`dllm.tasks.benchmarks`); ValueError naming the allowed names."""
    tasks = check_suite(suite)
    if name in tasks:
        return tasks[name]
    from dllm.tasks.benchmarks import BENCHMARKS

    if name in BENCHMARKS:
        return BENCHMARKS[name]
    raise ValueError(f"unknown task {name!r} in suite {suite!r}; allowed tasks: {', '.join(tasks)}; "
                     f"benchmarks: {', '.join(BENCHMARKS)}")


def suite_examples(split: str, n_per_task: int | None, tasks: Sequence[str] | None = None,
                   suite: str = "tiny") -> list[Example]:
    """The first `n_per_task` examples of `split` from each task, task after task.

    Args:
      split: "train" or "test".
      n_per_task: examples per task; None gives the split's default size.
      tasks: task names, in the order their examples are concatenated; None
        means every task of the suite. The caller shuffles if it needs a mix.
      suite: a key of `SUITES` ("tiny" or "parallel").
    """
    check_split(split)
    suite_tasks = check_suite(suite)
    names = list(suite_tasks) if tasks is None else list(tasks)
    unknown = [name for name in names if name not in suite_tasks]
    if unknown:
        raise ValueError(f"unknown task {', '.join(map(repr, unknown))} in suite {suite!r}; "
                         f"allowed tasks: {', '.join(suite_tasks)}")
    return [example for name in names for example in suite_tasks[name].examples(split, n_per_task)]


UNKNOWN_TOKENS = ("<|unk|>", "<unk>", "[UNK]")


def check_fits(examples: Sequence[Example], gen_length: int, tokenizer) -> None:
    """Raises ValueError naming the task when a decode of `examples` could only score 0 silently:

    * `tokenizer` turns words the task writes into its unknown token (a model
      trained on another suite: the prompts would lose their content);
    * `gen_length` is shorter than the task's longest answer: with the suite's
      word-level tokenizer, the task's declared bound (`Task.max_answer_tokens`,
      whatever examples were drawn, so a small run fails as a full one would);
      with any other tokenizer (say a BPE one), the longest drawn answer.
    """
    vocabulary = tokenizer.backend.get_vocab()
    unknown = {vocabulary[t] for t in UNKNOWN_TOKENS if t in vocabulary}
    tasks = {(e.suite, e.task): get_task(e.task, e.suite) for e in examples}
    too_long: dict[str, int] = {}
    for (suite, name), task in sorted(tasks.items()):
        words = sorted(task.words)
        if unknown:
            lost = [w for w, ids in zip(words, tokenizer.backend.encode_batch(words, add_special_tokens=False))
                    if unknown & set(ids.ids)]
            if lost:
                raise ValueError(f"task {name!r} of suite {suite!r} writes {len(lost)} word(s) the tokenizer "
                                 f"({tokenizer.source}) does not know, e.g. {lost[:5]}; allowed: a tokenizer that "
                                 f"knows them, e.g. the {suite!r} suite's (a model trained on that suite)")
        if all(w in vocabulary for w in words):  # one token per word
            longest = task.max_answer_tokens
        else:
            longest = max(len(tokenizer.encode(e.answer)) for e in examples if e.task == name and e.suite == suite)
        if longest > gen_length:
            too_long[name] = longest
    if too_long:
        raise ValueError(f"gen_length={gen_length} is shorter than the answers of task(s) "
                         + ", ".join(f"{name!r} (up to {n} tokens)" for name, n in sorted(too_long.items()))
                         + f"; allowed: gen_length >= {max(too_long.values())}")


__all__ = [
    "ANSWER_DELIMITER",
    "DEFAULT_SPLIT_SIZES",
    "MAX_ANSWER_TOKENS",
    "MAX_PROMPT_TOKENS",
    "MIN_ANSWER_TOKENS",
    "SPLITS",
    "SUITES",
    "TASKS",
    "check_fits",
    "Example",
    "Task",
    "Suite",
    "get_task",
    "get_task_set",
    "task_sets",
    "suite_examples",
]
