"""A model given only as a function from tokens to logits, for the decoding engine.

`generate(fn, ...)` wraps a plain callable `fn(tokens int32 [B, L], attention_mask [B, L] or None)
-> logits [B, L, V]` in `LogitsFunction`; it decodes uncached (it has no K/V to cache) on one device,
with every sampler. Special ids come from `tokenizer=` or `special=`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from flax import nnx

from dllm.models.transformer import take_positions


@dataclasses.dataclass(frozen=True)
class FunctionConfig:
    """What the engine reads of a model's config, for a function: its vocabulary and context."""

    vocab_size: int
    max_seq_len: int = 1 << 30
    attention: str = "bidirectional"
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None


class LogitsFunction(nnx.Module):
    """`fn(tokens, attention_mask) -> logits [B, L, V]` with the call signature of `dllm.Transformer`."""

    def __init__(self, fn: Callable, vocab_size: int, max_seq_len: int | None = None):
        if not callable(fn):
            raise TypeError(f"LogitsFunction needs a callable tokens -> logits, got {type(fn).__name__}")
        self.fn = fn
        self.config = FunctionConfig(vocab_size=int(vocab_size), **({} if max_seq_len is None else
                                                                    {"max_seq_len": int(max_seq_len)}))

    @classmethod
    def of(cls, fn: Callable, example_tokens) -> LogitsFunction:
        """Wraps `fn`, its vocabulary read from the logits it returns for `example_tokens` (shapes only)."""
        shape = jax.eval_shape(fn, jax.ShapeDtypeStruct(example_tokens.shape, example_tokens.dtype), None).shape
        if len(shape) != 3 or shape[:2] != tuple(example_tokens.shape):
            raise ValueError(f"a function model must map tokens {tuple(example_tokens.shape)} to logits [B, L, V]; "
                             f"it returned shape {tuple(shape)}")
        return cls(fn, vocab_size=shape[-1])

    def __call__(self, tokens, attention_mask=None, positions=None, *, logits_start: int = 0,
                 logits_length: int | None = None, logits_offsets=None):
        logits = self.fn(tokens, attention_mask)
        length = tokens.shape[1] - logits_start if logits_length is None else logits_length
        return take_positions(logits, logits_start, length, logits_offsets)
