"""Tokenizer wrapper: text <-> ids, and the one home of special token ids.

No algorithm in dllm hard-codes a token id (LLaDA's [MASK] and end-of-text,
Dream's <|mask|> ...): they are read here, from the checkpoint's `config.json`,
`tokenizer_config.json`, `special_tokens_map.json` and `tokenizer.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers

from dllm.models.config import read_json

# Token strings that mark each special role in the checkpoints we know.
MASK_TOKENS = ("<|mdm_mask|>", "<|mask|>", "|<MASK>|", "[MASK]", "<mask>")  # |<MASK>|: Fast-dLLM v2
EOS_TOKENS = ("<|endoftext|>", "</s>", "<|eos|>")
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>")
PAD_TOKENS = ("<|pad|>", "<pad>", "[PAD]")


def _read_json(path: Path) -> dict:
    """The JSON object in `path` ({} when absent), or one ValueError line naming the file (`read_json`)."""
    return read_json(path) if path.is_file() else {}


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<|eot_id|>", ...}
        return value.get("content")
    return value


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids decoding needs.

    Attributes:
      mask_id: the [MASK] token every masked position holds.
      eos_id: end of text; generation past it is padding.
      eot_id: end of turn for chat models (equals eos_id when absent).
      pad_id: left padding of batched prompts (never the mask id).
      vocab_size: size of the tokenizer vocabulary (may be below the model's).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, mask_id: int, eos_id: int,
                 eot_id: int | None = None, pad_id: int | None = None,
                 chat_template: str | None = None, source: str = "<memory>"):
        self.backend = tokenizer
        self.mask_id = int(mask_id)
        self.eos_id = int(eos_id)
        self.eot_id = int(eot_id) if eot_id is not None else self.eos_id
        self.pad_id = int(pad_id) if pad_id is not None else self.eos_id
        if self.pad_id == self.mask_id:
            raise ValueError(f"{source}: pad id {self.pad_id} equals the mask id; padding must not look masked")
        self.chat_template = chat_template
        self.source = source
        unk = json.loads(tokenizer.to_str()).get("model", {}).get("unk_token")
        self.unk_id = tokenizer.token_to_id(unk) if unk else None
        self.allow_unk = False  # True: words outside the vocabulary become the unknown token silently

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> dict[str, int]:
        return {"mask": self.mask_id, "eos": self.eos_id, "eot": self.eot_id, "pad": self.pad_id}

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. A word outside the vocabulary of a tokenizer with an unknown token
        (the task suites' word-level ones) is an error naming it, unless `allow_unk` is set."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        if self.unk_id is not None and not self.allow_unk and self.unk_id in encoding.ids:
            unknown = [text[a:b] for (a, b), i in zip(encoding.offsets, encoding.ids) if i == self.unk_id]
            raise ValueError(f"{self.source}: {unknown} not in the tokenizer's vocabulary of {self.vocab_size} "
                             f"tokens (in {text!r}); they would all read as "
                             f"{self.backend.id_to_token(self.unk_id)!r}. Fix the text, or allow it "
                             "(tokenizer.allow_unk = True; Hydra: allow_unk=true)")
        return encoding.ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, folder: Path | str) -> None:
        """Writes tokenizer.json and a tokenizer_config.json naming the specials."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {
            "mask_token": self.backend.id_to_token(self.mask_id),
            "eos_token": self.backend.id_to_token(self.eos_id),
            "eot_token": self.backend.id_to_token(self.eot_id),
            "pad_token": self.backend.id_to_token(self.pad_id),
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    @classmethod
    def from_folder(cls, folder: Path | str) -> "Tokenizer":
        """Reads tokenizer.json and resolves special ids from the folder's configs."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json in the checkpoint folder")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises its own exception type
            raise ValueError(f"{path}: not a readable tokenizer.json ({str(error).splitlines()[0][:200]})") from None
        model_config = _read_json(folder / "config.json")
        tok_config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")

        def resolve(role: str, config_field: str, known: tuple[str, ...]) -> int | None:
            value = model_config.get(config_field)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
            for source in (tok_config, special_map):
                text = _token_text(source.get(f"{role}_token"))
                if text is not None and backend.token_to_id(text) is not None:
                    return backend.token_to_id(text)
            for text in known:
                if backend.token_to_id(text) is not None:
                    return backend.token_to_id(text)
            return None

        mask_id = resolve("mask", "mask_token_id", MASK_TOKENS)
        if mask_id is None:
            raise ValueError(
                f"{folder}: tokenizer has no mask token: config.json has no 'mask_token_id', "
                f"tokenizer_config.json/special_tokens_map.json name no 'mask_token', and tokenizer.json "
                f"holds none of {MASK_TOKENS}"
            )
        eos_id = resolve("eos", "eos_token_id", EOS_TOKENS)
        if eos_id is None:
            raise ValueError(f"{folder}: tokenizer has no EOS token (looked for 'eos_token_id' and {EOS_TOKENS})")
        eot_id = resolve("eot", "eot_token_id", END_OF_TURN_TOKENS)
        pad_id = resolve("pad", "pad_token_id", PAD_TOKENS)
        if pad_id == mask_id:
            pad_id = None
        return cls(backend, mask_id=mask_id, eos_id=eos_id, eot_id=eot_id, pad_id=pad_id,
                   chat_template=tok_config.get("chat_template"), source=str(folder))
