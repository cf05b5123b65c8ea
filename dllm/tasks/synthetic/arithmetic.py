"""Multi-digit addition, one digit per token.

    add : 4 5 7 1 2 0 3 9 + 1 9 3 0 8 4 4 1 => 6 5 0 2 0 4 8 0

Both operands have exactly 8 digits, most significant first, drawn uniformly
from [10_000_000, 50_000_000), so the sum always has exactly 8 digits
(it is below 100_000_000) and the answer is always 8 tokens: answer digit i
lines up with operand digit i. Each answer digit depends on every less
significant digit through the carry chain, which is what makes parallel
decoding of this task hard. Deterministic, scored by exact match.

Not a ParallelBench task; a standard probe of digit-level arithmetic.
"""

from __future__ import annotations

import numpy as np

from dllm.tasks.base import ANSWER_DELIMITER, Task, exact_match, words_pattern

OPERAND_DIGITS = 8
OPERAND_LOW, OPERAND_HIGH = 10_000_000, 50_000_000  # half-open; sum < 10**OPERAND_DIGITS
DIGITS = tuple(str(d) for d in range(10))


def spell_digits(number: int) -> str:
    """12 -> "1 2"."""
    return " ".join(str(number))


def sample_addition(rng: np.random.Generator) -> tuple[str, str]:
    """add : <8 digits> + <8 digits> => <8 digits of the sum>"""
    left, right = (int(x) for x in rng.integers(OPERAND_LOW, OPERAND_HIGH, size=2))
    prompt = f"add : {spell_digits(left)} + {spell_digits(right)} {ANSWER_DELIMITER}"
    return prompt, spell_digits(left + right)


ADDITION = Task(
    "addition", True, sample_addition, exact_match,
    ("add", ":", "+", ANSWER_DELIMITER, *DIGITS), max_answer_tokens=OPERAND_DIGITS,
    answer_pattern=words_pattern(DIGITS, OPERAND_DIGITS, OPERAND_DIGITS),
)  # fmt: skip
