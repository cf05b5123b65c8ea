"""Fast-dLLM v2's hierarchical decoding: sub-blocks decoded left to right inside each block.

Wu et al. 2025, "Fast-dLLM v2: Efficient Block-Diffusion LLM" (arXiv 2509.26328), §3.3, as in
NVlabs/Fast-dLLM `v2/generation_functions.py` (`batch_sample`, `small_block_size`): every step
forwards the whole block (block 32) over the cache of the blocks before it, but commits only inside
the first sub-block (8 positions) that still holds a mask, with Fast-dLLM's threshold rule: every
masked position of the sub-block with confidence > tau (0.9), and always the most confident one.
Its shipped eval script sets tau = 1, i.e. one token per step.

Here the rule is a wrapper: the inner sampler (default Threshold(tau=0.9, strict=True), v2's `>`)
commits inside the sub-block, as AdaptiveBlock's inner commits inside its window; the engine's
block, and so what the cache recomputes, stays the whole block. Sub-blocks are cut from the start
of the window's model block, so in the first block (which holds the prompt's tail) the sub-blocks
the prompt fills are skipped, as in v2.

v2's `use_block_cache` option (a partial forward of the current sub-block over the active block's
K/V from its last whole-block forward, approximate; off in every shipped script) is the engine's
`DecodeConfig.sub_block_cache` (= `size`), over the exact block cache (`dllm.decoding.cache`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dllm.decoding.cache import current_sub_block
from dllm.decoding.state import DecodeConfig, DecodeState
from samplers import base


def fast_dllm_v2_threshold():
    from samplers.threshold import Threshold

    return Threshold(tau=0.9, strict=True)


@dataclasses.dataclass(frozen=True)
class SubBlocks(base.Sampler):
    """Commit only inside the first sub-block of the window that still holds a mask.

    Attributes:
      inner: the rule inside the sub-block (default Threshold(tau=0.9, strict=True), Fast-dLLM v2).
      size: sub-block length; must divide DecodeConfig.block_length (Fast-dLLM v2: 8 in blocks of 32).
    """

    inner: base.Sampler = dataclasses.field(default_factory=fast_dllm_v2_threshold)
    size: int = 8
    name = "sub_blocks"  # registry name: configs/sampler/sub_blocks.yaml

    def __post_init__(self):
        if not isinstance(self.inner, base.Sampler):
            raise ValueError(f"SubBlocks.inner={self.inner!r}: must be a samplers.base.Sampler")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"SubBlocks.size={self.size!r}: must be a positive int")

    @property
    def reads_only_window(self) -> bool:
        return self.inner.reads_only_window

    @property
    def sub_block_size(self) -> int:
        """What `DecodeConfig.sub_block_cache` must equal for this rule (the engine checks it)."""
        return self.size

    def bind(self, tokenizer) -> SubBlocks:
        return dataclasses.replace(self, inner=base.bind_inner(self.inner, tokenizer))

    def validate(self, config: DecodeConfig) -> None:
        self.inner.validate(config)
        if config.block_length % self.size:
            raise ValueError(f"SubBlocks.size={self.size} does not divide block_length={config.block_length}; "
                             f"allowed: a divisor of {config.block_length}")

    def init(self, state: DecodeState):
        return self.inner.init(state)

    def sub_block_end(self, state: DecodeState) -> jnp.ndarray:
        """int32 [B]: the end of each row's first sub-block (cut from the window's model-block start)
        that holds a mask, in generation coordinates."""
        # Sub-blocks are cut on the engine's block grid (blocks end where p % block_length ==
        # block_phase; `size` divides block_length), so in a block-causal model's first block they
        # start before position 0, where the prompt's tail is.
        return current_sub_block(state, self.size)[1]

    def step(self, logits, state: DecodeState, carry):
        sub_state = state.replace(block_end=self.sub_block_end(state))
        commit, carry = self.inner.step(logits, sub_state, carry)
        keep = sub_state.in_window
        if commit.stop is not None:
            keep = keep | commit.stop[:, None]
        return commit.replace(commit=commit.commit & keep), carry
