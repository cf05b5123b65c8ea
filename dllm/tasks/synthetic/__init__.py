"""The synthetic task suites (ParallelBench-style, arXiv 2510.04767): `tiny` and `parallel`.

Each module holds one family's samplers and scorers: `waiting_line` (copy, reverse, sort, index
edits, shuffle), `arithmetic` (the tiny suite's addition), `puzzles` (latin squares, sudoku),
`parallel` (the long-answer suite), `vocab` (the suites' word-level tokenizer).
"""
