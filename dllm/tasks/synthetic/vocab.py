"""The word-level tokenizers of the task suites: one token per word.

A suite's vocabulary is exactly the words that its tasks (`dllm.tasks.SUITES`)
can write (their `words`), sorted, after four special tokens:

    0 <|pad|>   1 <|endoftext|>   2 <|mask|>   3 <|unk|>

Ids are fixed by that order, so every build gives the same tokenizer. Text is
split on whitespace and decoded by joining tokens with single spaces, so
`decode(encode(text))` gives back `text` for any single-spaced text of task
words.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from dllm.tasks import check_suite

PAD, END_OF_TEXT, MASK, UNK = "<|pad|>", "<|endoftext|>", "<|mask|>", "<|unk|>"
SPECIAL_TOKENS = (PAD, END_OF_TEXT, MASK, UNK)  # ids 0, 1, 2, 3


def task_words(suite: str = "tiny") -> list[str]:
    """Every word any task of `suite` can write, sorted (by code point)."""
    return sorted({word for task in check_suite(suite).values() for word in task.words})


def build_task_tokenizer(suite: str = "tiny") -> Tokenizer:
    """The word-level tokenizer of `suite`: special tokens at ids 0-3, then `task_words(suite)` in order."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *task_words(suite)])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # The WordPiece decoder joins tokens with single spaces, except those that
    # start with its prefix "##"; no task word does. (A tokenizer without a
    # decoder also joins with spaces, but some loaders require a decoder.)
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return tokenizer


def save_task_tokenizer(folder: str | Path, suite: str = "tiny") -> Path:
    """Writes the tokenizer of `suite` to `folder/tokenizer.json` (creating `folder`); returns that path."""
    path = Path(folder) / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    build_task_tokenizer(suite).save(str(path))
    return path
