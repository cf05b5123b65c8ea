"""Synthetic tasks with exact scorers, for training a tiny masked-diffusion model
and measuring parallel-decoding samplers on held-out prompts.

In the spirit of ParallelBench (arXiv 2510.04767): answers of 8 to 19 tokens
whose tokens depend on each other, so that committing several tokens per step
can break them. Every task is small enough for a ~5M-parameter model to learn.

    from dllm.tasks import TASKS, get_task, suite_examples
    task = get_task("reverse")
    example = task.examples("test")[0]
    task.score(example, decoded_answer_text)   # 1.0 or 0.0

Tasks (see each module's docstring for its format and scorer):

* waiting line (`waiting_line.py`): copy, reverse, sort, insert_index,
  remove_index, replace_index (exact match); shuffle (validity);
* `addition` (`arithmetic.py`): 8-digit + 8-digit, exact match;
* puzzles (`puzzles.py`): latin_square and sudoku on 4x4 grids, validity.

The word-level tokenizer over all these words is in `dllm.tasks.vocab`.
"""

from __future__ import annotations

from collections.abc import Sequence

from dllm.tasks.arithmetic import ADDITION
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
from dllm.tasks.puzzles import LATIN_SQUARE, SUDOKU
from dllm.tasks.waiting_line import COPY, INSERT_INDEX, REMOVE_INDEX, REPLACE_INDEX, REVERSE, SHUFFLE, SORT

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


def get_task(name: str) -> Task:
    """The suite task or real benchmark (`dllm.tasks.benchmarks`) called `name`; ValueError naming the allowed names."""
    if name in TASKS:
        return TASKS[name]
    from dllm.tasks.benchmarks import BENCHMARKS

    if name in BENCHMARKS:
        return BENCHMARKS[name]
    raise ValueError(f"unknown task {name!r}; allowed tasks: {', '.join(TASKS)}; benchmarks: {', '.join(BENCHMARKS)}")


def suite_examples(split: str, n_per_task: int | None, tasks: Sequence[str] | None = None) -> list[Example]:
    """The first `n_per_task` examples of `split` from each task, task after task.

    Args:
      split: "train" or "test".
      n_per_task: examples per task; None gives the split's default size.
      tasks: task names, in the order their examples are concatenated; None
        means every task of `TASKS`. The caller shuffles if it needs a mix.
    """
    check_split(split)
    names = list(TASKS) if tasks is None else list(tasks)
    return [example for name in names for example in get_task(name).examples(split, n_per_task)]


__all__ = [
    "ANSWER_DELIMITER",
    "DEFAULT_SPLIT_SIZES",
    "MAX_ANSWER_TOKENS",
    "MAX_PROMPT_TOKENS",
    "MIN_ANSWER_TOKENS",
    "SPLITS",
    "TASKS",
    "Example",
    "Task",
    "get_task",
    "suite_examples",
]
