"""The `parallel` suite: long answers on which parallel decoding visibly costs quality.

The `tiny` suite (answers of 8-19 tokens) turned out easy: a 4.5M model is
certain of almost every position, so every sampler scores ~1.0. This suite
follows ParallelBench's task families (Kim et al., arXiv 2510.04767, §3:
waiting line, puzzles) at the lengths the dLLM papers decode (gen 64-128,
block 32), adds carry arithmetic, and adds a task with many valid answers
whose tokens constrain each other. Answers are 16-89 tokens, one word per
token of the suite's word-level tokenizer (`dllm.tasks.synthetic.vocab`).

Tasks (deterministic ones scored by exact match, the others by validity):

* waiting line over 16-48 people drawn from `NAMES` (64 names): `copy`,
  `reverse`, `sort`, `insert_index`, `remove_index`, `replace_index` (exact);
  `shuffle` (validity: a permutation of the line that differs from it).
  Same prompts as the tiny suite's (`dllm.tasks.synthetic.waiting_line`), longer lines.
* `addition`: two 24-40-digit numbers of the same length n, most
  significant digit first, each written zero-padded to `ADDITION_WIDTH` (40)
  digits; the answer is the sum written with exactly 41 digits (leading zeros
  kept). Every answer digit then sits at the same distance from its two
  operand digits whatever n is (and the prompt, left-padded to the decoding's
  prompt width, puts every digit at a fixed column). Exact. The first format
  wrote the operands with n digits and the sum with n + 1: those distances then
  moved with n, and tasks-base learned neither sum (0.000 after 16000 steps,
  `experiments/results/models/README.md`) while it learned the one-operand product.
* `multiplication`: a 24-40-digit number times one digit 2-9, the product
  written with n + 1 digits (a leading 0 is required when the product has n
  digits, as for the sum). Every product digit depends
  on the carry from the digits to its right. Exact.
* `latin_square`: a 6x6 latin square with 14-22 of its 36 cells blank;
  validity (rows and columns hold 1-6 once, givens kept).
* `sudoku`: a 9x9 sudoku with 30-45 blanks; validity (rows, columns and
  3x3 boxes hold 1-9 once, givens kept). 81 cells + 8 row separators = 89
  answer tokens.
* `distinct_names`: "name 20 others : <8-24 names> =>" -> 16-32 names, all
  different, none in the prompt (validity). The reference is a random such
  set in alphabetical order, so each position's marginal is spread over a
  few names: committing two positions from their marginals in one step can
  write one name twice, the failure ParallelBench measures.

Training curriculum (not in ParallelBench): a quarter of the train split's
examples (`EASY_SHARE`) are smaller instances of the same task, drawn below the
test split's sizes: lines of 4-15 people, 2-23 digits (addition still written with 40), 2-13 / 5-29 blanks, 2-15
names asked. The test split keeps the sizes above. A 14M model trained on the
test sizes alone learned positional copies but never the content lookups
(the newcomer of insert/replace, membership for sort/shuffle/distinct_names)
or the two-operand sum, whose digit carries no signal from one operand alone;
short instances are where those circuits can form (`dllm.tasks.base.curriculum`).

Grids are written as in the tiny suite: cells row by row, rows separated by
"/", a blank cell "_". Puzzles are drawn as a random relabelling of one
solved grid (rows, columns and symbols permuted within the moves that keep
it valid), so the suite does not need a solver; a puzzle may have several
completions, which is why it is scored by validity.
"""

from __future__ import annotations

import functools

import numpy as np

from dllm.tasks.base import (ANSWER_DELIMITER, Task, curriculum, exact_match, grid_pattern, prompt_payload,
                             words_pattern)
from dllm.tasks.synthetic.puzzles import BLANK, ROW_SEPARATOR, grid_to_words
from dllm.tasks.synthetic.waiting_line import LineShape, line_tasks

SUITE = "parallel"

NAMES = (
    "Abe", "Ada", "Ann", "Bea", "Ben", "Bob", "Cal", "Cid", "Cy", "Dan", "Dee", "Dot", "Ed", "Eli", "Eve",
    "Fay", "Fin", "Flo", "Gia", "Gil", "Gus", "Hal", "Hana", "Hugo", "Ida", "Ike", "Ivy", "Jay", "Jo",
    "Jon", "Kai", "Kim", "Kit", "Leo", "Lia", "Lou", "Max", "Mia", "Mo", "Nat", "Ned", "Nia", "Oli",
    "Ora", "Otto", "Pam", "Pia", "Quin", "Ray", "Rex", "Sam", "Sky", "Tia", "Tom", "Ugo", "Uma", "Val",
    "Vic", "Wes", "Wyn", "Xena", "Yuri", "Zed", "Zoe",
)  # fmt: skip
LINE = LineShape(names=NAMES, low=16, high=48)
EASY_LINE = LineShape(names=NAMES, low=4, high=15)  # the train split's smaller lines
EASY_SHARE = 0.25  # share of the train split drawn from the smaller instances

DIGITS = tuple(str(d) for d in range(10))
MIN_DIGITS, MAX_DIGITS = 24, 40
ADDITION_WIDTH = MAX_DIGITS  # addition's operands are written with this many digits, zero-padded
EASY_DIGITS = (2, 23)
LATIN_SIZE, LATIN_BLANKS, EASY_LATIN_BLANKS = 6, (14, 22), (2, 13)
SUDOKU_SIZE, SUDOKU_BOX, SUDOKU_BLANKS, EASY_SUDOKU_BLANKS = 9, 3, (30, 45), (5, 29)
DISTINCT_GIVEN, DISTINCT_ASKED = (8, 24), (16, 32)
EASY_DISTINCT_GIVEN, EASY_DISTINCT_ASKED = (2, 24), (2, 15)
NUMBERS = tuple(str(n) for n in range(0, LINE.high + 2))  # every number word the suite writes: 0 ... 49


def spell(number: int, width: int) -> str:
    """`number` as `width` digit words, zero-padded: spell(12, 4) -> "0 0 1 2"."""
    return " ".join(str(number).zfill(width))


def draw_operand(rng: np.random.Generator, digits: int) -> int:
    """A uniform `digits`-digit number (leading digit 1-9) from per-digit draws (no int64 overflow)."""
    first = int(rng.integers(1, 10))
    rest = rng.integers(0, 10, size=digits - 1)
    return int(str(first) + "".join(str(d) for d in rest))


def sample_addition(rng: np.random.Generator, digits: tuple[int, int] = (MIN_DIGITS, MAX_DIGITS),
                    width: int = ADDITION_WIDTH) -> tuple[str, str]:
    """add : <width digits> + <width digits> => <width + 1 digits of the sum>, both operands n-digit
    numbers zero-padded to `width`, n in `digits` (inclusive)"""
    low, high = digits
    if not 1 <= low <= high <= width:
        raise ValueError(f"addition: operand digits {digits} must satisfy 1 <= low <= high <= width {width}")
    n = int(rng.integers(low, high + 1))
    left, right = draw_operand(rng, n), draw_operand(rng, n)
    return f"add : {spell(left, width)} + {spell(right, width)} {ANSWER_DELIMITER}", spell(left + right, width + 1)


def sample_multiplication(rng: np.random.Generator,
                          digits: tuple[int, int] = (MIN_DIGITS, MAX_DIGITS)) -> tuple[str, str]:
    """multiply : <n digits> * <one digit> => <n + 1 digits of the product>, n in `digits` (inclusive)"""
    n = int(rng.integers(digits[0], digits[1] + 1))
    left, right = draw_operand(rng, n), int(rng.integers(2, 10))
    return f"multiply : {spell(left, n)} * {right} {ANSWER_DELIMITER}", spell(left * right, n + 1)


# ------------------------------------------------------------------ grids

Grid = list[list[int]]


def random_latin_square(rng: np.random.Generator, size: int) -> Grid:
    """The cyclic square (r + c) mod size with rows, columns and symbols permuted."""
    rows, columns, symbols = rng.permutation(size), rng.permutation(size), rng.permutation(size)
    return [[int(symbols[(rows[r] + columns[c]) % size]) + 1 for c in range(size)] for r in range(size)]


def random_sudoku(rng: np.random.Generator, box: int = SUDOKU_BOX) -> Grid:
    """A solved sudoku: the pattern (box * (r % box) + r // box + c) mod n, relabelled.

    Rows are permuted within bands and bands among themselves (columns within
    stacks and stacks likewise), symbols are permuted, and the grid is
    transposed with probability 1/2: each move keeps every row, column and
    box a permutation of 1..n.
    """
    n = box * box

    def lines():
        bands = rng.permutation(box)
        return [int(band) * box + int(i) for band in bands for i in rng.permutation(box)]

    rows, columns, symbols = lines(), lines(), rng.permutation(n)
    grid = [[int(symbols[(box * (r % box) + r // box + c) % n]) + 1 for c in columns] for r in rows]
    if rng.integers(2):
        grid = [list(column) for column in zip(*grid)]
    return grid


def draw_puzzle(rng: np.random.Generator, keyword: str, grid: Grid, blanks: tuple[int, int]) -> tuple[str, str]:
    """Blank a random number of cells in [blanks[0], blanks[1]]: ("<keyword> : <puzzle> =>", "<grid>")."""
    size = len(grid)
    n_blank = int(rng.integers(blanks[0], blanks[1] + 1))
    hidden = {int(i) for i in rng.permutation(size * size)[:n_blank]}
    solved = [[str(v) for v in row] for row in grid]
    puzzle = [[BLANK if r * size + c in hidden else solved[r][c] for c in range(size)] for r in range(size)]
    return f"{keyword} : {' '.join(grid_to_words(puzzle))} {ANSWER_DELIMITER}", " ".join(grid_to_words(solved))


def sample_latin_square(rng: np.random.Generator, blanks: tuple[int, int] = LATIN_BLANKS) -> tuple[str, str]:
    """latin : <6x6 grid with 14-22 blanks (`blanks`)> => <a completed latin square>"""
    return draw_puzzle(rng, "latin", random_latin_square(rng, LATIN_SIZE), blanks)


def sample_sudoku(rng: np.random.Generator, blanks: tuple[int, int] = SUDOKU_BLANKS) -> tuple[str, str]:
    """sudoku : <9x9 grid with 30-45 blanks (`blanks`)> => <a completed sudoku>"""
    return draw_puzzle(rng, "sudoku", random_sudoku(rng), blanks)


def parse_grid(words: list[str], size: int, cells: tuple[str, ...]) -> list[list[str]] | None:
    """The size x size grid written by `words` (cells from `cells`), or None if they are not one."""
    if len(words) != size * size + size - 1:
        return None
    if words[size :: size + 1] != [ROW_SEPARATOR] * (size - 1):
        return None
    rows = [words[r * (size + 1) : r * (size + 1) + size] for r in range(size)]
    if any(cell not in cells for row in rows for cell in row):
        return None
    return rows


def is_complete_latin(grid: list[list[str]], symbols: tuple[str, ...]) -> bool:
    """Every row and every column holds each symbol once."""
    return all(sorted(line) == sorted(symbols) for line in [*grid, *map(list, zip(*grid))])


def boxes_hold_all(grid: list[list[str]], box: int) -> bool:
    """Every box x box box holds box * box different cells."""
    return all(
        len({grid[r][c] for r in range(top, top + box) for c in range(left, left + box)}) == box * box
        for top in range(0, len(grid), box)
        for left in range(0, len(grid), box)
    )


def puzzle_checker(size: int, box: int | None):
    """The validity checker of size x size puzzles (with box x box boxes when `box` is set)."""
    symbols = tuple(str(s) for s in range(1, size + 1))

    def is_valid(prompt_words: list[str], answer_words: list[str], output_words: list[str]) -> bool:
        del answer_words
        puzzle = parse_grid(prompt_payload(prompt_words), size, symbols + (BLANK,))
        if puzzle is None:
            raise ValueError(f"prompt {' '.join(prompt_words)!r} does not parse: expected a {size}x{size} grid "
                             f"of {symbols[0]}..{symbols[-1]} and {BLANK!r}, rows separated by {ROW_SEPARATOR!r}")
        grid = parse_grid(output_words, size, symbols)
        if grid is None:
            return False
        keeps_givens = all(given in (BLANK, cell) for p_row, row in zip(puzzle, grid) for given, cell in zip(p_row, row))
        return keeps_givens and is_complete_latin(grid, symbols) and (box is None or boxes_hold_all(grid, box))

    return is_valid


# ------------------------------------------------------------ distinct names


def sample_distinct_names(rng: np.random.Generator, given_range: tuple[int, int] = DISTINCT_GIVEN,
                          asked_range: tuple[int, int] = DISTINCT_ASKED) -> tuple[str, str]:
    """name <N> others : <K names> => <N other names, alphabetical>, K and N in the ranges (inclusive)"""
    given = int(rng.integers(given_range[0], given_range[1] + 1))
    asked = int(rng.integers(asked_range[0], asked_range[1] + 1))
    order = rng.permutation(len(NAMES))
    shown = [NAMES[i] for i in order[:given]]
    others = sorted(NAMES[i] for i in rng.choice(order[given:], size=asked, replace=False))
    return f"name {asked} others : {' '.join(shown)} {ANSWER_DELIMITER}", " ".join(others)


def is_valid_distinct_names(prompt_words: list[str], answer_words: list[str], output_words: list[str]) -> bool:
    """Exactly N names (N from the prompt), all different, none shown in the prompt."""
    del answer_words
    shown = prompt_payload(prompt_words)
    if len(prompt_words) < 3 or prompt_words[0] != "name" or not prompt_words[1].isdigit():
        raise ValueError(f"prompt {' '.join(prompt_words)!r} does not parse: expected 'name <N> others : ...'")
    asked = int(prompt_words[1])
    return (len(output_words) == asked and len(set(output_words)) == asked
            and all(word in NAMES and word not in shown for word in output_words))


# ------------------------------------------------------------------ the suite

GRID_WORDS = (":", ANSWER_DELIMITER, ROW_SEPARATOR, BLANK)
ARITHMETIC_WORDS = (":", ANSWER_DELIMITER, *DIGITS)



def with_easy(sample, **easy_sizes):
    """The train-split sampler of `sample`: `EASY_SHARE` of its draws at `easy_sizes`, the rest at the test's."""
    return curriculum(functools.partial(sample, **easy_sizes), sample, EASY_SHARE)


PARALLEL_TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        *line_tasks(LINE, suite=SUITE, easy_shape=EASY_LINE, easy_share=EASY_SHARE),
        Task("addition", True, sample_addition, exact_match, ("add", "+", *ARITHMETIC_WORDS),
             suite=SUITE, max_answer_tokens=ADDITION_WIDTH + 1,
             train_sample=with_easy(sample_addition, digits=EASY_DIGITS),
             answer_pattern=words_pattern(DIGITS, ADDITION_WIDTH + 1, ADDITION_WIDTH + 1)),
        Task("multiplication", True, sample_multiplication, exact_match, ("multiply", "*", *ARITHMETIC_WORDS),
             suite=SUITE, max_answer_tokens=MAX_DIGITS + 1,
             train_sample=with_easy(sample_multiplication, digits=EASY_DIGITS),
             answer_pattern=words_pattern(DIGITS, MIN_DIGITS + 1, MAX_DIGITS + 1)),
        Task("latin_square", False, sample_latin_square, puzzle_checker(LATIN_SIZE, None),
             ("latin", *GRID_WORDS, *(str(s) for s in range(1, LATIN_SIZE + 1))),
             suite=SUITE, max_answer_tokens=LATIN_SIZE * LATIN_SIZE + LATIN_SIZE - 1,
             train_sample=with_easy(sample_latin_square, blanks=EASY_LATIN_BLANKS),
             answer_pattern=grid_pattern(LATIN_SIZE, [str(s) for s in range(1, LATIN_SIZE + 1)], ROW_SEPARATOR)),
        Task("sudoku", False, sample_sudoku, puzzle_checker(SUDOKU_SIZE, SUDOKU_BOX),
             ("sudoku", *GRID_WORDS, *(str(s) for s in range(1, SUDOKU_SIZE + 1))),
             suite=SUITE, max_answer_tokens=SUDOKU_SIZE * SUDOKU_SIZE + SUDOKU_SIZE - 1,
             train_sample=with_easy(sample_sudoku, blanks=EASY_SUDOKU_BLANKS),
             answer_pattern=grid_pattern(SUDOKU_SIZE, [str(s) for s in range(1, SUDOKU_SIZE + 1)], ROW_SEPARATOR)),
        Task("distinct_names", False, sample_distinct_names, is_valid_distinct_names,
             ("name", "others", ":", ANSWER_DELIMITER, *NUMBERS, *NAMES),
             suite=SUITE, max_answer_tokens=DISTINCT_ASKED[1],
             train_sample=with_easy(sample_distinct_names, given_range=EASY_DISTINCT_GIVEN,
                                    asked_range=EASY_DISTINCT_ASKED),
             answer_pattern=words_pattern(NAMES)),  # the count is the checker's (a bounded count multiplies the DFA)
    )
}
