"""Tests of the synthetic task suite (`dllm.tasks`) and its word-level tokenizer.

Reference answers are re-derived here by an independent route (plain Python on
the prompt words), and the validity scorers are checked against grids and
permutations built by hand.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from dllm.tasks import (
    ANSWER_DELIMITER,
    MAX_ANSWER_TOKENS,
    MAX_PROMPT_TOKENS,
    TASKS,
    Example,
    get_task,
    suite_examples,
)
from dllm.tasks.synthetic.vocab import SPECIAL_TOKENS, build_task_tokenizer, save_task_tokenizer

DETERMINISTIC = [name for name, task in TASKS.items() if task.deterministic]
VALIDITY_SCORED = [name for name, task in TASKS.items() if not task.deterministic]


@pytest.fixture(scope="module")
def all_examples() -> dict[str, dict[str, list[Example]]]:
    """Every task's full default train and test splits, generated once."""
    return {name: {split: task.examples(split) for split in ("train", "test")} for name, task in TASKS.items()}


def payload(prompt: str) -> list[str]:
    """Words between ":" and "=>"."""
    words = prompt.split()
    return words[words.index(":") + 1 : -1]


def expected_answer(task: str, prompt: str) -> list[str]:
    """The one correct answer of a deterministic task, computed from the prompt text alone."""
    line = payload(prompt)
    head = prompt.split(" : ")[0].split()
    if task == "copy":
        return line
    if task == "reverse":
        return line[::-1]
    if task == "sort":
        return sorted(line)
    if task == "insert_index":  # insert NAME at POSITION
        name, position = head[1], int(head[3])
        return line[: position - 1] + [name] + line[position - 1 :]
    if task == "remove_index":  # remove at POSITION
        position = int(head[2])
        return [person for i, person in enumerate(line, start=1) if i != position]
    if task == "replace_index":  # replace at POSITION with NAME
        position, name = int(head[2]), head[4]
        return [name if i == position else person for i, person in enumerate(line, start=1)]
    if task == "addition":
        plus = line.index("+")
        total = int("".join(line[:plus])) + int("".join(line[plus + 1 :]))
        return list(str(total))
    raise AssertionError(f"no independent reference for {task}")


# ---------------------------------------------------------------- registry and errors


def test_registry_holds_the_suite():
    assert set(TASKS) == {
        "copy", "reverse", "sort", "insert_index", "remove_index", "replace_index",
        "shuffle", "addition", "latin_square", "sudoku",
    }  # fmt: skip
    assert set(VALIDITY_SCORED) == {"shuffle", "latin_square", "sudoku"}
    for name, task in TASKS.items():
        assert task.name == name
        assert get_task(name) is task


def test_unknown_task_names_the_value_and_the_allowed_ones():
    with pytest.raises(ValueError) as error:
        get_task("revers")
    message = str(error.value)
    assert "'revers'" in message
    assert all(name in message for name in TASKS)


def test_unknown_split_names_the_value_and_the_allowed_ones():
    for call in (lambda: get_task("copy").examples("validation"), lambda: suite_examples("validation", 2)):
        with pytest.raises(ValueError, match=r"'validation'.*train.*test"):
            call()


def test_suite_rejects_unknown_task():
    with pytest.raises(ValueError, match=r"'nope'.*copy"):
        suite_examples("test", 2, tasks=["copy", "nope"])


def test_bad_n_is_rejected():
    with pytest.raises(ValueError, match="n must be"):
        get_task("copy").examples("test", -1)


def test_score_refuses_an_example_of_another_task():
    example = get_task("copy").examples("test", 1)[0]
    with pytest.raises(ValueError, match="'reverse'.*'copy'"):
        get_task("reverse").score(example, example.answer)


# ---------------------------------------------------------------- deterministic tasks


@pytest.mark.parametrize("task_name", DETERMINISTIC)
def test_reference_answers_match_an_independent_derivation(task_name, all_examples):
    for split in ("train", "test"):
        for example in all_examples[task_name][split][:2000]:
            assert example.answer.split() == expected_answer(task_name, example.prompt), example


def another_word_of_the_same_kind(word: str) -> str:
    """A different digit for a digit, a different name for a name."""
    if word.isdigit():
        return str((int(word) + 1) % 10)
    return "Bob" if word == "Ann" else "Ann"


@pytest.mark.parametrize("task_name", DETERMINISTIC)
def test_exact_scorer_accepts_reference_and_rejects_corruptions(task_name, all_examples):
    task = get_task(task_name)
    for example in all_examples[task_name]["test"][:50]:
        words = example.answer.split()
        assert task.score(example, example.answer) == 1.0
        assert task.score(example, "  " + example.answer.replace(" ", "   ") + "\n") == 1.0  # whitespace only
        # One token changed, in the middle and at the end.
        for i in (len(words) // 2, len(words) - 1):
            changed = words[:i] + [another_word_of_the_same_kind(words[i])] + words[i + 1 :]
            assert task.score(example, " ".join(changed)) == 0.0
        # One token dropped, from the middle and from the end.
        assert task.score(example, " ".join(words[:3] + words[4:])) == 0.0
        assert task.score(example, " ".join(words[:-1])) == 0.0
        # Two neighbours swapped (same multiset, wrong order).
        swapped = words[:]
        i = next(i for i in range(len(words) - 1) if words[i] != words[i + 1])
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        assert task.score(example, " ".join(swapped)) == 0.0
        assert task.score(example, "") == 0.0


def test_hand_worked_examples():
    cases = [
        ("reverse", "reverse : Ann Bob Cid Dan Eve Fay Gus Hal =>", "Hal Gus Fay Eve Dan Cid Bob Ann"),
        ("sort", "sort : Zoe Ann Max Bob Quin Cid Eve Dan =>", "Ann Bob Cid Dan Eve Max Quin Zoe"),
        ("insert_index", "insert Zoe at 3 : Ann Bob Cid Dan Eve Fay Gus Hal =>", "Ann Bob Zoe Cid Dan Eve Fay Gus Hal"),
        ("insert_index", "insert Zoe at 9 : Ann Bob Cid Dan Eve Fay Gus Hal =>", "Ann Bob Cid Dan Eve Fay Gus Hal Zoe"),
        ("remove_index", "remove at 1 : Ann Bob Cid Dan Eve Fay Gus Hal Ivy =>", "Bob Cid Dan Eve Fay Gus Hal Ivy"),
        (
            "replace_index",
            "replace at 8 with Zoe : Ann Bob Cid Dan Eve Fay Gus Hal =>",
            "Ann Bob Cid Dan Eve Fay Gus Zoe",
        ),
        ("addition", "add : 4 5 7 1 2 0 3 9 + 1 9 3 0 8 4 4 1 =>", "6 5 0 2 0 4 8 0"),
    ]
    for task_name, prompt, answer in cases:
        example = Example(task_name, prompt, answer)
        assert get_task(task_name).score(example, answer) == 1.0
        assert expected_answer(task_name, prompt) == answer.split()


def test_addition_operands_and_sums_have_eight_digits(all_examples):
    for example in all_examples["addition"]["train"][:2000]:
        line = payload(example.prompt)
        assert line.index("+") == 8 and len(line) == 17
        assert line[0] != "0" and line[9] != "0" and len(example.answer.split()) == 8


# ---------------------------------------------------------------- validity-scored tasks


def test_shuffle_scorer():
    task = get_task("shuffle")
    prompt = "shuffle : Ann Bob Cid Dan Eve Fay Gus Hal =>"
    example = Example("shuffle", prompt, "Hal Gus Fay Eve Dan Cid Bob Ann")
    assert task.score(example, "Hal Gus Fay Eve Dan Cid Bob Ann") == 1.0
    assert task.score(example, "Bob Ann Cid Dan Eve Fay Gus Hal") == 1.0  # another valid shuffle
    assert task.score(example, "Ann Bob Cid Dan Eve Fay Gus Hal") == 0.0  # equal to the input
    assert task.score(example, "Hal Hal Fay Eve Dan Cid Bob Ann") == 0.0  # duplicate, Gus missing
    assert task.score(example, "Hal Fay Eve Dan Cid Bob Ann") == 0.0  # Gus missing
    assert task.score(example, "Hal Gus Fay Eve Dan Cid Bob Ann Ivy") == 0.0  # extra name
    assert task.score(example, "Hal Gus Fay Eve Dan Cid Bob Zoe") == 0.0  # Ann replaced


def test_shuffle_references_are_valid_and_differ_from_input(all_examples):
    for split in ("train", "test"):
        for example in all_examples["shuffle"][split][:2000]:
            line, answer = payload(example.prompt), example.answer.split()
            assert sorted(answer) == sorted(line) and answer != line and len(set(line)) == len(line)


def grid_text(rows: list[str]) -> str:
    """["1234", "2143", ...] -> "1 2 3 4 / 2 1 4 3 / ..."."""
    return " / ".join(" ".join(row) for row in rows)


def test_latin_square_scorer_accepts_another_completion_and_rejects_invalid_grids():
    task = get_task("latin_square")
    # The top-left 2x2 block is an intercalate (1 2 / 2 1): flipping it gives a second completion.
    reference = ["1234", "2143", "3412", "4321"]
    alternative = ["2134", "1243", "3412", "4321"]
    puzzle = ["__34", "__43", "3412", "4321"]
    example = Example("latin_square", f"latin : {grid_text(puzzle)} =>", grid_text(reference))
    assert task.score(example, grid_text(reference)) == 1.0
    assert task.score(example, grid_text(alternative)) == 1.0
    assert task.score(example, grid_text(["1234", "2143", "3421", "4312"])) == 0.0  # duplicates in columns 3, 4
    assert task.score(example, grid_text(["1234", "2134", "3412", "4321"])) == 0.0  # row 2 breaks columns 1-2
    assert task.score(example, grid_text(["2143", "1234", "4321", "3412"])) == 0.0  # latin, ignores the givens
    assert task.score(example, grid_text(["1234", "2143", "3412"])) == 0.0  # a row missing
    assert task.score(example, grid_text(reference).replace(" / ", " ", 1)) == 0.0  # a separator missing
    assert task.score(example, grid_text(["1234", "2143", "3412", "432_"])) == 0.0  # a blank left
    assert task.score(example, grid_text(reference) + " 1") == 0.0  # an extra cell


def test_sudoku_scorer_checks_boxes_and_accepts_another_completion():
    task = get_task("sudoku")
    reference = ["1234", "3412", "2143", "4321"]
    alternative = ["2134", "3412", "1243", "4321"]  # swap the blanks of rows 1 and 3
    puzzle = ["__34", "3412", "__43", "4321"]
    example = Example("sudoku", f"sudoku : {grid_text(puzzle)} =>", grid_text(reference))
    assert task.score(example, grid_text(reference)) == 1.0
    assert task.score(example, grid_text(alternative)) == 1.0
    assert task.score(example, grid_text(["1234", "3412", "2143", "4312"])) == 0.0  # column duplicates
    # A latin square that keeps the givens of this puzzle but breaks the 2x2 boxes.
    open_rows = Example("sudoku", f"sudoku : {grid_text(['1234', '____', '____', '4321'])} =>", grid_text(reference))
    latin_not_sudoku = grid_text(["1234", "2143", "3412", "4321"])
    assert task.score(open_rows, grid_text(reference)) == 1.0
    assert task.score(open_rows, latin_not_sudoku) == 0.0
    latin_example = Example("latin_square", open_rows.prompt.replace("sudoku", "latin"), grid_text(reference))
    assert get_task("latin_square").score(latin_example, latin_not_sudoku) == 1.0


@pytest.mark.parametrize("task_name", ["latin_square", "sudoku"])
def test_puzzle_references_solve_their_puzzles(task_name, all_examples):
    task = get_task(task_name)
    for example in all_examples[task_name]["test"]:
        puzzle, grid = payload(example.prompt), example.answer.split()
        assert 4 <= puzzle.count("_") <= 8
        assert all(given in ("_", cell) for given, cell in zip(puzzle, grid, strict=True))
        rows = [grid[r * 5 : r * 5 + 4] for r in range(4)]
        assert all(sorted(line) == ["1", "2", "3", "4"] for line in rows + [list(c) for c in zip(*rows)])
        if task_name == "sudoku":
            corners = [(0, 0), (0, 2), (2, 0), (2, 2)]
            boxes = [[rows[r][c] for r in (top, top + 1) for c in (left, left + 1)] for top, left in corners]
            assert all(sorted(box) == ["1", "2", "3", "4"] for box in boxes)
        assert task.score(example, example.answer) == 1.0


@pytest.mark.parametrize("task_name", VALIDITY_SCORED)
def test_validity_scorers_accept_every_reference(task_name, all_examples):
    task = get_task(task_name)
    for split in ("train", "test"):
        assert all(task.score(e, e.answer) == 1.0 for e in all_examples[task_name][split][:2000])


# ---------------------------------------------------------------- shapes, splits, determinism


FIRST_PROMPT_WORD = {
    "copy": "copy", "reverse": "reverse", "sort": "sort", "insert_index": "insert",
    "remove_index": "remove", "replace_index": "replace", "shuffle": "shuffle",
    "addition": "add", "latin_square": "latin", "sudoku": "sudoku",
}  # fmt: skip


@pytest.mark.parametrize("task_name", list(TASKS))
def test_lengths_and_delimiter(task_name, all_examples):
    for split in ("train", "test"):
        for example in all_examples[task_name][split]:
            prompt, answer = example.prompt.split(), example.answer.split()
            assert example.task == task_name
            assert prompt[-1] == ANSWER_DELIMITER and prompt.count(ANSWER_DELIMITER) == 1
            assert ANSWER_DELIMITER not in answer
            assert prompt[0] == FIRST_PROMPT_WORD[task_name]
            assert len(prompt) <= MAX_PROMPT_TOKENS
            assert 8 <= len(answer) <= MAX_ANSWER_TOKENS


@pytest.mark.parametrize("task_name", list(TASKS))
def test_splits_have_default_sizes_and_are_disjoint(task_name, all_examples):
    train, test = all_examples[task_name]["train"], all_examples[task_name]["test"]
    assert len(train) == 20_000 and len(test) == 200
    test_prompts = {e.prompt for e in test}
    assert len(test_prompts) == len(test)
    assert test_prompts.isdisjoint(e.prompt for e in train)


@pytest.mark.parametrize("task_name", list(TASKS))
def test_examples_are_deterministic(task_name, all_examples):
    task = get_task(task_name)
    assert task.examples("test") == all_examples[task_name]["test"]
    assert task.examples("train", 100) == all_examples[task_name]["train"][:100]  # a prefix of the full split
    assert task.examples("test", 0) == []


def test_suite_examples():
    examples = suite_examples("test", 3)
    assert [e.task for e in examples] == [name for name in TASKS for _ in range(3)]
    assert examples[:3] == get_task("copy").examples("test", 3)
    chosen = suite_examples("train", 2, tasks=["sudoku", "copy"])
    assert [e.task for e in chosen] == ["sudoku", "sudoku", "copy", "copy"]


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_vocabulary():
    tokenizer = build_task_tokenizer()
    vocab = tokenizer.get_vocab()
    assert [vocab[token] for token in ("<|pad|>", "<|endoftext|>", "<|mask|>", "<|unk|>")] == [0, 1, 2, 3]
    assert len(vocab) == tokenizer.get_vocab_size() < 128
    words = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])][len(SPECIAL_TOKENS) :]
    assert words == sorted(words)
    assert tokenizer.get_vocab() == build_task_tokenizer().get_vocab()  # ids do not depend on the build
    assert tokenizer.encode("<|mask|> Ann <|pad|>").ids == [2, vocab["Ann"], 0]
    assert tokenizer.encode("Ann Beyonce").ids == [vocab["Ann"], 3]


def test_tokenizer_round_trips_examples_and_every_word_is_used(all_examples):
    """Encode -> decode gives the text back, with no <|unk|>, for every test example and 2000
    train examples per task; every word of every train example is in the vocabulary (with a
    word-level tokenizer this is what makes the rest round-trip too; encoding all 200k
    train examples would take ~5 s)."""
    tokenizer = build_task_tokenizer()
    unk = tokenizer.token_to_id("<|unk|>")
    texts = [
        f"{e.prompt} {e.answer}"
        for splits in all_examples.values()
        for examples in (splits["test"], splits["train"][:2000])
        for e in examples
    ]
    encodings = tokenizer.encode_batch(texts)
    assert tokenizer.decode_batch([encoding.ids for encoding in encodings]) == texts
    for encoding, text in zip(encodings, texts):
        assert unk not in encoding.ids and len(encoding.ids) == len(text.split())
    # The vocabulary is exactly the words the tasks write: none missing, none unused.
    used = {
        word
        for splits in all_examples.values()
        for examples in splits.values()
        for e in examples
        for word in f"{e.prompt} {e.answer}".split()
    }
    assert used == set(tokenizer.get_vocab()) - set(SPECIAL_TOKENS)


def test_saved_tokenizer_loads_back(tmp_path):
    path = save_task_tokenizer(tmp_path / "tiny-tasks")
    assert path.name == "tokenizer.json" and path.exists()
    loaded = Tokenizer.from_file(str(path))
    assert loaded.get_vocab() == build_task_tokenizer().get_vocab()
    text = "latin : 1 _ 3 4 / _ 1 _ 3 / 3 4 1 _ / 4 3 _ 1 => 1 2 3 4 / 2 1 4 3 / 3 4 1 2 / 4 3 2 1"
    assert loaded.decode(loaded.encode(text).ids) == text
    assert loaded.decode([0, 1, 2] + loaded.encode("Ann Bob").ids + [1, 0]) == "Ann Bob"  # specials skipped
