"""The sampler contract the decoding engine calls (`Commit`, `Sampler`) and the sampler registry.

Samplers live in the `samplers` package, which builds on this one
(`samplers.base` re-exports both names); the engine and the rest of `dllm`
only ever see this contract.

The registry is configs/sampler/*.yaml: one YAML per sampler, with its
defaults, read by Hydra (`sampler=<name>`), by `build_sampler` (and
`samplers.get_sampler`), by the lm-eval adapter and by the tests. A sampler
class without a YAML, or a YAML that builds nothing, fails a test.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
from flax import struct
from hydra.utils import instantiate
from omegaconf import OmegaConf

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
    # True for a rule that reads or fills positions outside the active block (Prophet's all-in fill):
    # a block-causal decode has logits for the active block only, so the engine refuses it there.
    needs_whole_canvas = False
    # True for a rule whose Commit.truncate_at writes EOS over the masked tail (Learn2PD's EoTP): an
    # infilling template's fixed tokens after the cut would be cut off, so the engine refuses the pair.
    writes_end_of_text = False
    name = "sampler"  # the registry name (configs/sampler/<name>.yaml); each rule sets its own

    def validate(self, config: DecodeConfig) -> None:
        """Raises ValueError when this sampler cannot run with `config`."""

    def init(self, state: DecodeState) -> Any:
        return ()

    def step(self, logits: jax.Array, state: DecodeState, carry: Any) -> tuple[Commit, Any]:
        raise NotImplementedError

    def draft_canvases(self, state: DecodeState, carry: Any) -> jax.Array | None:
        """None (the step forwards the canvas), or int32 [B, n, G]: n generation canvases per row that
        this step's one forward runs instead (batched; self-speculative verification), and `step`
        then receives their logits, float32 [B, n, G, V]: full forwards, every position's logits (also
        for a block-causal model; `has_logits` is all True). Such a sampler runs uncached, as the
        outermost sampler (the engine refuses one wrapped by another)."""
        return None

    def bind(self, tokenizer) -> "Sampler":
        """A copy with token texts (delimiters) resolved to ids of `tokenizer`."""
        return self

    def settings(self) -> dict:
        """All fields, nested for wrapped samplers: what a results row records."""
        out = {"name": self.name}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = value.settings() if isinstance(value, Sampler) else value
        return out


SAMPLER_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "sampler"


def sampler_names() -> list[str]:
    """Every registered sampler: the stems of configs/sampler/*.yaml."""
    return sorted(path.stem for path in SAMPLER_CONFIGS.glob("*.yaml"))


def sampler_spec(name: str) -> dict:
    """configs/sampler/<name>.yaml as a plain dict (`_target_` and the defaults)."""
    path = SAMPLER_CONFIGS / f"{name}.yaml"
    if not isinstance(name, str) or not path.is_file():
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(sampler_names())}")
    return OmegaConf.to_container(OmegaConf.load(path))


def build_sampler(sampler: str | dict | Sampler, **overrides) -> Sampler:
    """A sampler from its registry name (or a spec dict with `_target_`), with field overrides:

        build_sampler("threshold", tau=0.7)
        build_sampler("early_commit", **{"inner.tau": 0.9})   # dotted keys reach wrapped samplers

    A `Sampler` passes through (overrides then are an error)."""
    if isinstance(sampler, Sampler):
        if overrides:
            raise ValueError(f"sampler overrides {sorted(overrides)} need a sampler name, not a Sampler object")
        return sampler
    spec = OmegaConf.create(sampler_spec(sampler) if isinstance(sampler, str) else sampler)
    objects = {key: value for key, value in overrides.items() if isinstance(value, Sampler)}  # e.g. inner=...
    for key, value in overrides.items():
        if key in objects:
            spec.pop(key, None)
        else:
            OmegaConf.update(spec, key, value, merge=True)
    built = instantiate(spec, _convert_="all")
    if not isinstance(built, Sampler):
        raise TypeError(f"sampler {sampler!r} built {type(built).__name__}, not a Sampler")
    return dataclasses.replace(built, **objects) if objects else built
