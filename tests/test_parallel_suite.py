"""The `parallel` task suite: splits, lengths, vocabulary, scorers (hand-worked) and bad input.

Golden answers come from an independent route: Python integers for the
arithmetic, hand-written grids and name lists for the validity scorers.
"""

from __future__ import annotations

import numpy as np
import pytest

from dllm.data import task_tokenizer
from dllm.tasks import SUITES, check_fits, get_task, suite_examples
from dllm.tasks.base import Example
from dllm.tasks.synthetic.parallel import NAMES, PARALLEL_TASKS, random_latin_square, random_sudoku

PARALLEL = SUITES["parallel"]
N = 60  # examples per task and split drawn here (the suite's default sizes are larger)


@pytest.fixture(scope="module")
def examples():
    return {name: {split: task.examples(split, N) for split in ("train", "test")} for name, task in PARALLEL.items()}


def test_registry_and_families():
    assert set(PARALLEL) == {
        "copy", "reverse", "sort", "insert_index", "remove_index", "replace_index", "shuffle",
        "addition", "multiplication", "latin_square", "sudoku", "distinct_names",
    }  # fmt: skip
    assert {n for n, t in PARALLEL.items() if not t.deterministic} == {"shuffle", "latin_square", "sudoku",
                                                                       "distinct_names"}
    assert all(t.suite == "parallel" for t in PARALLEL.values())
    assert get_task("copy", "parallel") is PARALLEL["copy"] and get_task("copy") is not PARALLEL["copy"]
    assert len(NAMES) == len(set(NAMES)) == 64


def test_splits_disjoint_deterministic_and_seeded_apart_from_the_tiny_suite(examples):
    for name, by_split in examples.items():
        train = {e.prompt for e in by_split["train"]}
        test = [e.prompt for e in by_split["test"]]
        assert not train & set(test) and len(set(test)) == len(test), name
        assert PARALLEL[name].examples("test", N // 2) == by_split["test"][: N // 2], name
        assert all(e.suite == "parallel" and e.task == name for e in by_split["test"])
    tiny_copy = {e.prompt for e in get_task("copy").examples("test", 20)}
    assert not tiny_copy & {e.prompt for e in examples["copy"]["test"]}


def test_lengths_fit_the_decoding_geometry_and_every_word_is_in_the_vocabulary(examples):
    tokenizer = task_tokenizer("parallel")
    unk = tokenizer.backend.token_to_id("<|unk|>")
    for name, by_split in examples.items():
        for e in by_split["train"] + by_split["test"]:
            prompt, answer = tokenizer.encode(e.prompt), tokenizer.encode(e.answer)
            assert len(prompt) <= 96, (name, e.prompt)
            assert 1 <= len(answer) <= PARALLEL[name].max_answer_tokens <= 127, (name, e.answer)
            assert unk not in prompt + answer, (name, e)
            assert len(answer) == len(e.answer.split())  # one token per word
    for name, task in PARALLEL.items():  # the declared bound is reached: it is exact, not loose
        longest = max(len(e.answer.split()) for e in task.examples("train", 2000))
        assert longest == task.max_answer_tokens, name


def test_the_test_split_keeps_the_long_sizes_and_the_train_split_adds_smaller_instances(examples):
    def size(e):  # line length, digits, blanks or names asked: what the curriculum varies
        words = e.prompt.split()
        if e.task == "addition":  # significant digits of the zero-padded operand
            return len(str(int("".join(words[2:words.index("+")]))))
        if e.task == "multiplication":
            return words.index("*") - 2
        if e.task in ("latin_square", "sudoku"):
            return words.count("_")
        if e.task == "distinct_names":
            return int(words[1])
        return len(words) - words.index(":") - 2 - (e.task == "remove_index")

    smallest_test = {"addition": 24, "multiplication": 24, "latin_square": 14, "sudoku": 30, "distinct_names": 16}
    for name, by_split in examples.items():
        test_sizes = [size(e) for e in by_split["test"]]
        assert min(test_sizes) >= smallest_test.get(name, 16), name
        for e in by_split["test"]:
            assert len(e.answer.split()) >= 16, (name, e.answer)
        small = [s for s in map(size, PARALLEL[name].examples("train", 400)) if s < smallest_test.get(name, 16)]
        assert 0.15 < len(small) / 400 < 0.35, (name, len(small))  # EASY_SHARE = 0.25 of the train split


def test_curriculum_rejects_a_share_outside_zero_to_one():
    from dllm.tasks.base import curriculum

    with pytest.raises(ValueError, match="easy_share must be in \\[0, 1\\], got 1.5"):
        curriculum(lambda rng: ("a", "b"), lambda rng: ("c", "d"), 1.5)


def test_every_reference_answer_scores_one(examples):
    for name, by_split in examples.items():
        for e in by_split["test"]:
            assert PARALLEL[name].score(e, e.answer) == 1.0, (name, e)


def test_arithmetic_answers_by_python_integers(examples):
    for e in examples["addition"]["test"]:
        words = e.prompt.split()
        plus = words.index("+")
        left, right = int("".join(words[2:plus])), int("".join(words[plus + 1:-1]))
        assert plus - 2 == len(words) - 2 - plus, "operands of one length"
        assert e.answer == " ".join(str(left + right).zfill(plus - 1))
    for e in examples["multiplication"]["test"]:
        words = e.prompt.split()
        star = words.index("*")
        number, digit = int("".join(words[2:star])), int(words[star + 1])
        assert 2 <= digit <= 9 and e.answer == " ".join(str(number * digit).zfill(star - 1))


def test_addition_writes_every_operand_and_sum_at_one_width(examples):
    # constant offsets between an answer digit and its two operand digits, whatever the operands' size
    train = PARALLEL["addition"].examples("train", 400)
    assert min(len(str(int("".join(e.prompt.split()[2:42])))) for e in train) < 24  # the curriculum's small ones
    for e in [*examples["addition"]["test"], *train]:
        words = e.prompt.split()
        assert words[:2] == ["add", ":"] and words[42] == "+" and words[-1] == "=>" and len(words) == 84, e.prompt
        left, right = int("".join(words[2:42])), int("".join(words[43:83]))
        assert len(str(left)) == len(str(right)), e.prompt  # both operands have n significant digits
        assert e.answer.split() == list(str(left + right).zfill(41)), e


def test_hand_worked_arithmetic():
    task = PARALLEL["addition"]  # 99 + 99 = 198, operands at 40 digits and the sum at 41
    prompt = "add : " + " ".join("0" * 38 + "99") + " + " + " ".join("0" * 38 + "99") + " =>"
    answer = " ".join("0" * 38 + "198")
    example = Example("addition", prompt, answer, suite="parallel")
    assert task.score(example, answer) == 1.0 and task.score(example, "1 9 8") == 0.0
    assert task.format_valid(answer) and not task.format_valid("1 9 8")  # the sum's width is fixed
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"operand digits \(24, 41\).*width 40"):
        PARALLEL["addition"].sample(rng, digits=(24, 41))  # rejected whatever n is drawn
    with pytest.raises(ValueError, match="operand digits"):
        PARALLEL["addition"].sample(rng, digits=(5, 3))
    example = Example("multiplication", "multiply : 5 5 * 3 =>", "1 6 5", suite="parallel")
    assert PARALLEL["multiplication"].score(example, "1 6 5") == 1.0
    assert PARALLEL["multiplication"].score(example, "1 6 4") == 0.0


def test_generated_grids_are_valid():
    rng = np.random.default_rng(0)
    for _ in range(20):
        latin = random_latin_square(rng, 6)
        assert all(sorted(row) == list(range(1, 7)) for row in [*latin, *zip(*latin)])
        sudoku = random_sudoku(rng)
        lines = [*sudoku, *zip(*sudoku)]
        boxes = [[sudoku[r][c] for r in range(top, top + 3) for c in range(left, left + 3)]
                 for top in (0, 3, 6) for left in (0, 3, 6)]
        assert all(sorted(line) == list(range(1, 10)) for line in [*lines, *boxes])


SUDOKU = [  # a hand-written valid 9x9 sudoku (rows)
    "5 3 4 6 7 8 9 1 2", "6 7 2 1 9 5 3 4 8", "1 9 8 3 4 2 5 6 7",
    "8 5 9 7 6 1 4 2 3", "4 2 6 8 5 3 7 9 1", "7 1 3 9 2 4 8 5 6",
    "9 6 1 5 3 7 2 8 4", "2 8 7 4 1 9 6 3 5", "3 4 5 2 8 6 1 7 9",
]  # fmt: skip


def grid_text(rows):
    return " / ".join(rows)


def test_sudoku_scorer_by_hand():
    task = PARALLEL["sudoku"]
    puzzle = [row.split() for row in SUDOKU]
    puzzle[0][0] = puzzle[4][4] = "_"
    example = Example("sudoku", f"sudoku : {grid_text([' '.join(r) for r in puzzle])} =>", grid_text(SUDOKU),
                      suite="parallel")
    assert task.score(example, grid_text(SUDOKU)) == 1.0
    swapped = [" ".join(r.split()[3:6] + r.split()[0:3] + r.split()[6:]) for r in SUDOKU]  # stacks swapped
    given = Example("sudoku", f"sudoku : {grid_text(swapped)} =>", grid_text(swapped), suite="parallel")
    assert task.score(given, grid_text(swapped)) == 1.0  # still a sudoku
    assert task.score(example, grid_text(swapped)) == 0.0  # breaks the givens of `example`
    columns_swapped = [" ".join([r.split()[1], r.split()[0], *r.split()[2:]]) for r in SUDOKU]
    latin_not_sudoku = [" ".join(r.split()[1:] + r.split()[:1]) for r in SUDOKU]  # rows rotated: boxes break
    blank = Example("sudoku", f"sudoku : {grid_text(['_ ' * 8 + '_'] * 9)} =>", grid_text(SUDOKU), suite="parallel")
    assert task.score(blank, grid_text(columns_swapped)) == 1.0
    assert task.score(blank, grid_text(latin_not_sudoku)) == 0.0
    assert task.score(blank, grid_text(SUDOKU[:8])) == 0.0  # 8 rows: not a grid
    assert task.score(blank, grid_text(SUDOKU).replace("/", "|", 1)) == 0.0


def test_latin_square_scorer_by_hand():
    task = PARALLEL["latin_square"]
    rows = [" ".join(str((r + c) % 6 + 1) for c in range(6)) for r in range(6)]
    blank = Example("latin_square", f"latin : {grid_text(['_ _ _ _ _ _'] * 6)} =>", grid_text(rows),
                    suite="parallel")
    assert task.score(blank, grid_text(rows)) == 1.0
    assert task.score(blank, grid_text(rows[1:] + rows[:1])) == 1.0  # another completion
    assert task.score(blank, grid_text([rows[0]] * 6)) == 0.0  # columns repeat


def test_shuffle_and_distinct_names_scorers_by_hand():
    line = NAMES[:16]
    shuffle = Example("shuffle", f"shuffle : {' '.join(line)} =>", " ".join(reversed(line)), suite="parallel")
    task = PARALLEL["shuffle"]
    assert task.score(shuffle, " ".join(reversed(line))) == 1.0
    assert task.score(shuffle, " ".join(line)) == 0.0  # the same order
    assert task.score(shuffle, " ".join([line[1], *line[1:]])) == 0.0  # a duplicate, one name dropped
    task = PARALLEL["distinct_names"]
    shown, others = NAMES[:8], NAMES[8:24]
    example = Example("distinct_names", f"name 16 others : {' '.join(shown)} =>", " ".join(others), suite="parallel")
    assert task.score(example, " ".join(reversed(others))) == 1.0  # any order
    assert task.score(example, " ".join([*others[:15], others[0]])) == 0.0  # a duplicate
    assert task.score(example, " ".join([*others[:15], shown[0]])) == 0.0  # a name from the prompt
    assert task.score(example, " ".join(others[:15])) == 0.0  # 15, not 16
    assert task.score(example, " ".join([*others[:15], "7"])) == 0.0  # not a name


def test_bad_input_names_the_task_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"unknown task suite 'big'.*tiny, parallel"):
        suite_examples("test", 1, suite="big")
    with pytest.raises(ValueError, match=r"'sudoku9'.*'parallel'.*sudoku"):
        get_task("sudoku9", "parallel")
    with pytest.raises(ValueError, match=r"'multiply'.*'parallel'.*multiplication"):
        suite_examples("test", 1, tasks=["copy", "multiply"], suite="parallel")
    with pytest.raises(ValueError, match="n must be"):
        PARALLEL["sort"].examples("test", 0.5)
    # A prompt that does not parse is an error, not a silent 0.
    broken = Example("sudoku", "sudoku 1 2 3", "1 2 3", suite="parallel")
    with pytest.raises(ValueError, match="task 'sudoku' of suite 'parallel': prompt .* does not parse"):
        PARALLEL["sudoku"].score(broken, "1 2 3")
    short_grid = Example("sudoku", "sudoku : 1 2 3 =>", "1 2 3", suite="parallel")
    with pytest.raises(ValueError, match="'sudoku' of suite 'parallel': .*does not parse.*9x9 grid"):
        PARALLEL["sudoku"].score(short_grid, "1 2 3")
    with pytest.raises(ValueError, match="does not parse.*name <N> others"):
        PARALLEL["distinct_names"].score(Example("distinct_names", "name some : Ann =>", "Bob", suite="parallel"),
                                         "Bob")
    with pytest.raises(TypeError, match="must be a str"):
        PARALLEL["copy"].score(PARALLEL["copy"].examples("test", 1)[0], ["Ann"])
    tiny_example = get_task("copy").examples("test", 1)[0]
    with pytest.raises(ValueError, match="'copy' of suite 'parallel' cannot score.*suite 'tiny'"):
        PARALLEL["copy"].score(tiny_example, tiny_example.answer)


def test_gen_length_shorter_than_the_answers_is_refused_by_name():
    tokenizer = task_tokenizer("parallel")
    sudoku = PARALLEL["sudoku"].examples("test", 2)
    with pytest.raises(ValueError, match=r"gen_length=64 .*'sudoku' \(up to 89 tokens\).*gen_length >= 89"):
        check_fits(sudoku, 64, tokenizer)
    check_fits(sudoku, 89, tokenizer)
    with pytest.raises(ValueError, match=r"'sort' of suite 'parallel' writes .* the tokenizer .*tiny suite"):
        check_fits(PARALLEL["sort"].examples("test", 1), 128, task_tokenizer("tiny"))


def test_evaluation_refuses_a_too_short_generation_before_decoding():
    from dllm import evaluation
    from dllm.decoding import DecodeConfig

    examples = PARALLEL["sort"].examples("test", 2)
    with pytest.raises(ValueError, match="gen_length=24 is shorter than the answers of task\\(s\\) 'sort'"):
        evaluation.evaluate_examples(None, task_tokenizer("parallel"), None, examples,
                                     DecodeConfig(gen_length=24, block_length=8))


def test_the_tiny_suite_is_the_one_its_bundled_model_was_trained_on():
    """The refactor into `line_tasks` keeps every tiny example: sha256 of the first 300 train and test
    examples of each task, computed at commit d7826fb (before the parallel suite existed)."""
    import hashlib

    digest = hashlib.sha256()
    for task in SUITES["tiny"].values():
        for split in ("train", "test"):
            for e in task.examples(split, 300):
                digest.update(f"{e.prompt}|{e.answer}".encode())
                assert len(e.answer.split()) <= task.max_answer_tokens
    assert digest.hexdigest() == "5380b7e421b021efa5684421184f162947aa413b3506e9611b83c8a3e404f897"
