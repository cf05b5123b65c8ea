"""Shared pieces of the synthetic task suite: examples, tasks and splits.

A task is two pure functions plus a word list:

* `sample(rng) -> (prompt, answer)` draws one example from a numpy generator;
* `is_correct(prompt_words, answer_words, output_words) -> bool` says whether a
  decoded answer is right (exact match, or a validity check for tasks with
  many right answers);
* `words` is every word the task can write, which fixes the vocabulary.

`Task` wraps them with what every task shares:

* the random seed derives from (task name, split), so the same call always
  gives the same examples, and a shorter call is a prefix of a longer one;
* a prompt belongs to the test split if and only if a stable hash of its text
  falls in one bucket out of `TEST_BUCKETS`; train draws skip those prompts and
  test draws keep only them, so the two splits are disjoint by construction
  whatever sizes are asked for. Test prompts are also unique within the split.

Text is whitespace-separated words, one word per token of the word-level
tokenizer in `dllm.tasks.synthetic.vocab`. Every prompt ends with `ANSWER_DELIMITER`; the
answer span starts right after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Sequence

import numpy as np

ANSWER_DELIMITER = "=>"
# Upper bounds, in tokens, that hold for every example of every task of the tiny
# suite (tested). Actual maxima are lower (22 prompt tokens and 19 answer tokens,
# the puzzles); these are the budgets a model's sequence length is sized against.
# Each task also declares its own exact answer bound (`Task.max_answer_tokens`).
MAX_PROMPT_TOKENS = 40
MAX_ANSWER_TOKENS = 24
MIN_ANSWER_TOKENS = 8

SPLITS = ("train", "test")
DEFAULT_SPLIT_SIZES = {"train": 20_000, "test": 200}
# One prompt in TEST_BUCKETS (by hash of its text) is reserved for the test split.
TEST_BUCKETS = 10


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt and its reference answer.

    Attributes:
      task: name of the task that made it (a key of `dllm.tasks.TASKS`).
      prompt: the question, ending with `ANSWER_DELIMITER`,
        e.g. "reverse : Ann Bob Cid Dan Eve Fay Gus Hal =>".
      answer: one correct answer, e.g. "Hal Gus Fay Eve Dan Cid Bob Ann". For
        tasks scored by validity it is one of several correct answers.
      suite: the suite of the task ("tiny" or "parallel", keys of
        `dllm.tasks.SUITES`); a task name is unique within its suite.
    """

    task: str
    prompt: str
    answer: str
    suite: str = "tiny"


Sampler = Callable[[np.random.Generator], tuple[str, str]]
Checker = Callable[[list[str], list[str], list[str]], bool]


def exact_match(prompt_words: list[str], answer_words: list[str], output_words: list[str]) -> bool:
    """The checker of deterministic tasks: the output is the reference answer, word for word."""
    del prompt_words
    return output_words == answer_words


def check_split(split: str) -> None:
    """Raises ValueError naming `split` and the allowed splits if it is not one of them."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed splits: {', '.join(SPLITS)}")


def split_seed(task_name: str, split: str, suite: str = "tiny") -> int:
    """The numpy seed of one (suite, task, split): a stable hash, the same on every machine and run.

    Tasks of the "tiny" suite hash "<task>/<split>" (the seeds they were
    trained with); every other suite hashes "<suite>/<task>/<split>".
    """
    text = f"{task_name}/{split}" if suite == "tiny" else f"{suite}/{task_name}/{split}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def is_test_prompt(prompt: str) -> bool:
    """Whether `prompt` is reserved for the test split (one prompt in `TEST_BUCKETS`, by hash)."""
    digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % TEST_BUCKETS == 0


@dataclasses.dataclass(frozen=True)
class Task:
    """A named task: how to draw examples and how to score an answer.

    Attributes:
      name: the task's key in `dllm.tasks.TASKS`.
      deterministic: True if each prompt has exactly one correct answer (scored
        by exact match); False if several answers are correct (shuffle, latin
        square, sudoku) and the scorer checks validity instead.
      sample: draws one (prompt, answer) pair from a numpy generator.
      is_correct: (prompt words, reference answer words, output words) -> bool.
      words: every word the task can write in a prompt or an answer.
      suite: the suite it belongs to (a key of `dllm.tasks.SUITES`).
      max_answer_tokens: the longest answer it can draw, in words (= tokens of
        the suite's word-level tokenizer; tested); decoding needs gen_length >= this.
      train_sample: draws the train split's examples when set (a training
        curriculum that also holds smaller instances, as the `parallel` suite
        does); None: the train split draws from `sample`, as the test split
        always does.
      answer_pattern: a regular expression every correct answer matches in
        whole (its format, words joined by single spaces), or None: the
        format-validity figure of evaluation and the constraint of DINGO
        decoding (`samplers.dingo`, `sampler.pattern`).
    """

    name: str
    deterministic: bool
    sample: Sampler
    is_correct: Checker
    words: tuple[str, ...]
    suite: str = "tiny"
    max_answer_tokens: int = MAX_ANSWER_TOKENS
    train_sample: Sampler | None = None
    answer_pattern: str | None = None

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        """The first `n` examples of `split` ("train" or "test"); the same on every call.

        `n=None` gives the split's default size (`DEFAULT_SPLIT_SIZES`).
        Examples of a shorter call are a prefix of those of a longer call.
        """
        check_split(split)
        if n is None:
            n = DEFAULT_SPLIT_SIZES[split]
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be a non-negative integer or None, got {n!r}")
        rng = np.random.default_rng(split_seed(self.name, split, self.suite))
        want_test = split == "test"
        sample = self.sample if want_test or self.train_sample is None else self.train_sample
        # Guards against an endless loop if a task's prompt space is too small.
        max_draws = 1000 + 100 * TEST_BUCKETS * n
        seen_test_prompts: set[str] = set()
        examples: list[Example] = []
        draws = 0
        while len(examples) < n:
            if draws == max_draws:
                raise RuntimeError(
                    f"task {self.name!r} found only {len(examples)} distinct {split} prompts "
                    f"of {n} asked in {max_draws} draws"
                )
            draws += 1
            prompt, answer = sample(rng)
            if is_test_prompt(prompt) != want_test:
                continue
            if want_test:
                if prompt in seen_test_prompts:
                    continue
                seen_test_prompts.add(prompt)
            examples.append(Example(task=self.name, prompt=prompt, answer=answer, suite=self.suite))
        return examples

    def score(self, example: Example, output: str) -> float:
        """1.0 if `output` (the decoded answer text, already cut at the answer's end) is correct, else 0.0.

        Whitespace is not significant: the output is compared word by word.
        """
        if example.task != self.name or example.suite != self.suite:
            raise ValueError(f"task {self.name!r} of suite {self.suite!r} cannot score an example of task "
                             f"{example.task!r} of suite {example.suite!r}")
        if not isinstance(output, str):
            raise TypeError(f"task {self.name!r} of suite {self.suite!r}: the output to score must be a str, "
                            f"got {type(output).__name__}")
        try:
            correct = self.is_correct(example.prompt.split(), example.answer.split(), output.split())
        except ValueError as error:
            raise ValueError(f"task {self.name!r} of suite {self.suite!r}: {error}") from None
        return 1.0 if correct else 0.0

    def format_valid(self, output: str) -> bool | None:
        """Whether `output` matches `answer_pattern` (whitespace normalised), None without a pattern."""
        if self.answer_pattern is None:
            return None
        return re.fullmatch(self.answer_pattern, " ".join(output.split())) is not None

    def score_many(self, examples: Sequence[Example], outputs: Sequence[str]) -> list[float]:
        """`score` of each (example, output) pair: the protocol every task set shares (a code
        benchmark runs its sandboxes in parallel here)."""
        return [self.score(e, o) for e, o in zip(examples, outputs)]


def words_pattern(words: Sequence[str], low: int = 1, high: int | None = None) -> str:
    """A regular expression for `low` to `high` (None: any number of) space-separated `words`."""
    word = "(" + "|".join(re.escape(w) for w in sorted(words, key=lambda w: (-len(w), w))) + ")"
    more = f"{{{low - 1},{'' if high is None else high - 1}}}"
    return f"{word}( {word}){more}"


def grid_pattern(size: int, symbols: Sequence[str], separator: str) -> str:
    """A regular expression for a size x size grid of `symbols`, rows split by `separator`."""
    cell = "(" + "|".join(re.escape(s) for s in symbols) + ")"
    row = f"{cell}( {cell}){{{size - 1}}}"
    return f"{row}( {re.escape(separator)} {row}){{{size - 1}}}"


def curriculum(easy: Sampler, hard: Sampler, easy_share: float) -> Sampler:
    """A sampler that draws from `easy` with probability `easy_share`, else from `hard`.

    Used as a task's `train_sample`: smaller instances of the same task in the
    training data let a small model form the circuit (content lookup, carries,
    membership) on short inputs and extend it to the test's long ones.
    """
    if not 0.0 <= easy_share <= 1.0:
        raise ValueError(f"easy_share must be in [0, 1], got {easy_share!r}")

    def sample(rng: np.random.Generator) -> tuple[str, str]:
        return easy(rng) if rng.random() < easy_share else hard(rng)

    return sample


def prompt_payload(prompt_words: Sequence[str]) -> list[str]:
    """The words of a prompt between its first ":" and the final `ANSWER_DELIMITER`.

    Every prompt reads "<instruction words> : <payload words> =>". Raises
    ValueError naming the prompt when it does not (a scorer must not score an
    unparsable prompt as a wrong answer).
    """
    words = list(prompt_words)
    if ":" not in words or not words or words[-1] != ANSWER_DELIMITER:
        raise ValueError(f"prompt {' '.join(words)!r} does not parse: expected "
                         f"'<instruction> : <payload> {ANSWER_DELIMITER}'")
    return words[words.index(":") + 1 : -1]
