"""The sampler contract the decoding engine calls: `Commit` (one step's decision) and `Sampler`.

Samplers live in the `samplers` package, which builds on this one
(`samplers.base` re-exports both names); the engine and the rest of `dllm`
only ever see this contract.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import struct

from dllm.decoding.state import DecodeConfig, DecodeState


@struct.dataclass
class Commit:
    """One step's decision.

    tokens: int32 [B, G], proposed token for every generation position.
    commit: bool [B, G], positions to fill now.
    stop: bool [B] or None, the row is finished after this step (early exit).
    truncate_at: int32 [B] or None, end-of-text prediction: positions after
      this one become EOS and are never decoded (G means no truncation).
    block_end: int32 [B] or None, the end of the active window from now on
      (adaptive block size).
    confidence: float32 [B, G] or None, recorded in the trace when asked.
    """

    tokens: jax.Array
    commit: jax.Array
    stop: jax.Array | None = None
    truncate_at: jax.Array | None = None
    block_end: jax.Array | None = None
    confidence: jax.Array | None = None


class Sampler:
    """Base class of every sampler: subclasses are frozen dataclasses.

    `reads_only_window`: True for rules that look at nothing outside each
    row's active block [block_start, block_end) (LLaDA's low-confidence and
    Fast-dLLM's threshold/factor). The engine then computes the output head
    for the blocks only and passes their logits alone, [B, block_length, V]
    at `state.window_offsets`, so the softmax and argmax run there only
    (except with `record_confidence`, whose trace shows every position, and
    a cache window shorter than a block: then [B, G, V] with zeros where no
    logits were computed). Such a sampler takes either shape: `on_generation`
    brings its per-position results to [B, G], and `sample_tokens` draws the
    same noise for a position either way (with temperature > 0 it still
    draws that noise over all of G). It must keep the fixed blocks (no
    `Commit.block_end`): a cached window step's logits start at the block
    start, which is `state.window_offsets` only for blocks at multiples of
    block_length.
    """

    reads_only_window = False

    def validate(self, config: DecodeConfig) -> None:
        """Raises ValueError when this sampler cannot run with `config`."""

    def init(self, state: DecodeState) -> Any:
        return ()

    def step(self, logits: jax.Array, state: DecodeState, carry: Any) -> tuple[Commit, Any]:
        raise NotImplementedError

    def bind(self, tokenizer) -> "Sampler":
        """A copy with token texts (delimiters) resolved to ids of `tokenizer`."""
        return self

    def settings(self) -> dict:
        """All fields, nested for wrapped samplers: what a results row records."""
        out = {"name": getattr(self, "name", type(self).__name__)}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = value.settings() if isinstance(value, Sampler) else value
        return out
