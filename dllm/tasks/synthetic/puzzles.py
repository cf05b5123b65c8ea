"""4x4 grid puzzles scored by validity, after ParallelBench (arXiv 2510.04767).

ParallelBench's "Puzzle" tasks (`latin_square_n4`, `sudoku_n4_12`) have many
correct answers, or answers whose cells constrain each other, so a decoder that
fills several cells in one step from independent marginals can write a grid
that breaks a row or column rule even when each cell alone looks likely.

A grid is written row by row, cells as the words "1" to "4", rows separated by
"/"; a blank cell in a prompt is "_":

    latin : 1 _ 3 4 / _ 1 _ 3 / 3 4 1 _ / 4 3 _ 1 => 1 2 3 4 / 2 1 4 3 / 3 4 1 2 / 4 3 2 1

The answer is the full grid in the same format (16 cells + 3 separators =
19 tokens).

* `latin_square`: each row and each column holds 1, 2, 3 and 4 once.
* `sudoku`: a latin square whose four 2x2 boxes also hold 1, 2, 3 and 4 once.

The hidden grid is drawn uniformly from all 576 latin squares (288 sudokus) of
order 4, then 4 to 8 of its cells are blanked. A puzzle may have more than one
completion, so both tasks are scored by validity: the output must be a grid in
the format above that obeys the rules and keeps every given cell. The reference
answer is the hidden grid.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

from dllm.tasks.base import ANSWER_DELIMITER, Task, grid_pattern, prompt_payload

SIZE = 4
SYMBOLS = tuple(str(s) for s in range(1, SIZE + 1))
ROW_SEPARATOR = "/"
BLANK = "_"
MIN_BLANKS, MAX_BLANKS = 4, 8
GRID_TOKENS = SIZE * SIZE + SIZE - 1

Grid = tuple[tuple[str, ...], ...]


@functools.cache
def all_latin_squares() -> tuple[Grid, ...]:
    """Every 4x4 latin square over "1".."4" (576 of them), in a fixed order."""
    rows = list(itertools.permutations(SYMBOLS))
    squares: list[Grid] = [()]
    for _ in range(SIZE):
        squares = [
            square + (row,)
            for square in squares
            for row in rows
            if all(row[c] != above[c] for above in square for c in range(SIZE))
        ]
    return tuple(squares)


@functools.cache
def all_sudokus() -> tuple[Grid, ...]:
    """Every 4x4 sudoku (latin square with valid 2x2 boxes; 288 of them), in a fixed order."""
    return tuple(square for square in all_latin_squares() if boxes_are_valid(square))


def boxes_are_valid(grid: Grid) -> bool:
    """Each 2x2 box of a 4x4 grid holds four different symbols."""
    return all(
        len({grid[r][c] for r in (top, top + 1) for c in (left, left + 1)}) == SIZE
        for top in (0, 2)
        for left in (0, 2)
    )


def is_latin(grid: Grid) -> bool:
    """Each row and each column holds every symbol exactly once."""
    columns = list(zip(*grid))
    return all(sorted(line) == list(SYMBOLS) for line in [*grid, *columns])


def grid_to_words(grid: Grid) -> list[str]:
    """Rows of cells joined by "/" words."""
    words: list[str] = []
    for r, row in enumerate(grid):
        if r:
            words.append(ROW_SEPARATOR)
        words.extend(row)
    return words


def words_to_grid(words: list[str], cell_words: tuple[str, ...] = SYMBOLS) -> Grid | None:
    """The grid written by `words`, or None if they are not a 4x4 grid of `cell_words`."""
    if len(words) != GRID_TOKENS:
        return None
    rows = [words[r * (SIZE + 1) : r * (SIZE + 1) + SIZE] for r in range(SIZE)]
    separators = words[SIZE :: SIZE + 1]
    if separators != [ROW_SEPARATOR] * (SIZE - 1):
        return None
    if any(cell not in cell_words for row in rows for cell in row):
        return None
    return tuple(tuple(row) for row in rows)


def draw_puzzle(rng: np.random.Generator, keyword: str, grids: tuple[Grid, ...]) -> tuple[str, str]:
    """Blank 4 to 8 random cells of a random grid: ("<keyword> : <puzzle> =>", "<grid>")."""
    grid = grids[int(rng.integers(len(grids)))]
    num_blanks = int(rng.integers(MIN_BLANKS, MAX_BLANKS + 1))
    blanks = {int(i) for i in rng.permutation(SIZE * SIZE)[:num_blanks]}
    puzzle = tuple(
        tuple(BLANK if r * SIZE + c in blanks else grid[r][c] for c in range(SIZE)) for r in range(SIZE)
    )
    prompt = f"{keyword} : {' '.join(grid_to_words(puzzle))} {ANSWER_DELIMITER}"
    return prompt, " ".join(grid_to_words(grid))


def sample_latin_square(rng: np.random.Generator) -> tuple[str, str]:
    """latin : <grid with 4-8 blanks> => <a completed latin square>"""
    return draw_puzzle(rng, "latin", all_latin_squares())


def sample_sudoku(rng: np.random.Generator) -> tuple[str, str]:
    """sudoku : <grid with 4-8 blanks> => <a completed sudoku>"""
    return draw_puzzle(rng, "sudoku", all_sudokus())


def keeps_givens(puzzle: Grid, grid: Grid) -> bool:
    """Every non-blank cell of `puzzle` has the same symbol in `grid`."""
    return all(
        given in (BLANK, cell) for puzzle_row, row in zip(puzzle, grid) for given, cell in zip(puzzle_row, row)
    )


def solves_puzzle(prompt_words: list[str], output_words: list[str], with_boxes: bool) -> bool:
    """The output is a well-formed grid that is latin (and box-valid) and keeps the prompt's givens."""
    puzzle = words_to_grid(prompt_payload(prompt_words), SYMBOLS + (BLANK,))
    grid = words_to_grid(output_words)
    if puzzle is None or grid is None:
        return False
    return is_latin(grid) and (not with_boxes or boxes_are_valid(grid)) and keeps_givens(puzzle, grid)


def is_valid_latin_square(prompt_words: list[str], answer_words: list[str], output_words: list[str]) -> bool:
    """The output completes the prompt's puzzle into a latin square."""
    del answer_words
    return solves_puzzle(prompt_words, output_words, with_boxes=False)


def is_valid_sudoku(prompt_words: list[str], answer_words: list[str], output_words: list[str]) -> bool:
    """The output completes the prompt's puzzle into a sudoku."""
    del answer_words
    return solves_puzzle(prompt_words, output_words, with_boxes=True)


GRID_WORDS = (":", ANSWER_DELIMITER, ROW_SEPARATOR, BLANK, *SYMBOLS)
GRID_FORMAT = grid_pattern(SIZE, SYMBOLS, ROW_SEPARATOR)
LATIN_SQUARE = Task("latin_square", False, sample_latin_square, is_valid_latin_square, ("latin", *GRID_WORDS),
                    max_answer_tokens=GRID_TOKENS, answer_pattern=GRID_FORMAT)
SUDOKU = Task("sudoku", False, sample_sudoku, is_valid_sudoku, ("sudoku", *GRID_WORDS), max_answer_tokens=GRID_TOKENS,
              answer_pattern=GRID_FORMAT)
