"""LLaDA's fixed-step sampler: low-confidence (or random) remasking.

Nie et al. 2025, "Large Language Diffusion Models" (arXiv 2502.09992),
Algorithm 5 (low-confidence remasking) and Algorithm 4 (random remasking),
as implemented in ML-GSAI/LLaDA `generate.py`:

* `steps` are split equally across the gen_length / block_length blocks
  (steps must be a multiple of the number of blocks).
* Inside a block with n masked positions at its start and S steps per block,
  step i commits `n // S + (1 if i < n % S else 0)` positions: the remainder is
  front-loaded (`get_num_transfer_tokens`).
* Low confidence: commit the k masked positions of the block whose proposed
  token has the highest probability softmax(logits)[x0] (no temperature, no
  noise: LLaDA issue #37). Random: the k positions with the highest U(0, 1)
  score. Committed tokens are never re-masked.

`confidence` picks the score from the shared table (`samplers.base.CONFIDENCES`):
"max_prob" is LLaDA's; "margin" (top-1 minus top-2 probability) and
"neg_entropy" give Dream's `alg="topk_margin"` / `alg="entropy"` orderings at
LLaDA's fixed schedule (Dream's own schedule differs: it is not LLaDA's
per-block split).

NFE is exactly `steps` (unless DecodeConfig.max_steps cuts the decode short, or an infilling template
leaves fewer masks in a block than its steps: a block then takes one step per mask). Ties are broken by lower position first (torch.topk's
order is unspecified). We require steps_per_block <= block_length, so every
step commits at least one token; LLaDA would allow idle steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dllm.decoding.state import DecodeConfig, DecodeState
from samplers import base

REMASKING = ("low_confidence", "random")


@dataclasses.dataclass(frozen=True)
class LowConfidence(base.Sampler):
    """Fixed number of commits per step (LLaDA baseline).

    Attributes:
      steps: total forward passes over the whole generation (LLaDA `steps`);
        None means one token per step (steps = gen_length).
      remasking: "low_confidence" (default) or "random".
      confidence: the score "low_confidence" ranks by, a name of
        `samplers.base.CONFIDENCES` (default "max_prob", LLaDA's).
    """

    steps: int | None = None
    remasking: str = "low_confidence"
    confidence: str = "max_prob"
    reads_only_window = True  # not a field: see base.Sampler
    name = "low_confidence"  # registry name: configs/sampler/low_confidence.yaml

    def __post_init__(self):
        if self.remasking not in REMASKING:
            raise ValueError(f"LowConfidence.remasking={self.remasking!r}: allowed {REMASKING}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps <= 0):
            raise ValueError(f"LowConfidence.steps={self.steps!r}: must be a positive int or None")
        base.check_confidence("LowConfidence", self.confidence)

    def steps_per_block(self, config: DecodeConfig) -> int:
        steps = config.gen_length if self.steps is None else self.steps
        return steps // config.num_blocks

    def validate(self, config: DecodeConfig) -> None:
        if config.sliding_window:
            raise ValueError(f"{type(self).__name__} with sliding_window={config.sliding_window}: its schedule "
                             "plans a number of commits per block, which a window that slides each step breaks; "
                             "allowed: sliding_window=0, or a threshold-style rule (threshold, factor, ...)")
        if config.pipeline_blocks > 1:
            raise ValueError(f"{type(self).__name__} with pipeline_blocks={config.pipeline_blocks}: its schedule "
                             "plans a number of commits per block, which a window of several blocks breaks; "
                             "allowed: pipeline_blocks=1, or a threshold-style rule (threshold, factor, ...)")
        steps = config.gen_length if self.steps is None else self.steps
        if steps % config.num_blocks:
            raise ValueError(
                f"steps={steps} does not divide over {config.num_blocks} blocks "
                f"(gen_length={config.gen_length} / block_length={config.block_length}); "
                f"allowed: a multiple of {config.num_blocks}"
            )
        if steps // config.num_blocks > config.block_length:
            raise ValueError(
                f"steps={steps} gives {steps // config.num_blocks} steps per block of "
                f"{config.block_length} positions; allowed: at most block_length steps per block "
                f"(steps <= {config.block_length * config.num_blocks})"
            )

    def init(self, state: DecodeState):
        # Masked positions of the current block at its first step.
        return jnp.zeros(state.block_start.shape, jnp.int32)

    def commit_count(self, state: DecodeState, masked_at_start: jax.Array) -> jax.Array:
        """k for this step: LLaDA's `get_num_transfer_tokens`, remainder first."""
        steps = self.steps_per_block(state.config)
        base_count, remainder = masked_at_start // steps, masked_at_start % steps
        return base_count + (state.step_in_block < remainder).astype(jnp.int32)

    def step(self, logits, state: DecodeState, masked_at_start):
        logits = base.apply_eos_policy(logits, state)
        proposed = base.sample_tokens(logits, state)  # at the logits' positions (G, or the blocks)
        tokens = base.on_generation(proposed, state, state.special.mask)
        eligible = base.masked_in_window(state)
        if self.remasking == "low_confidence":
            confidence = base.CONFIDENCES[self.confidence](base.probabilities(logits, state), proposed)
            confidence = base.on_generation(confidence, state, base.NEG_INF)
        else:
            draw = lambda key: jax.random.uniform(jax.random.fold_in(key, 1), tokens.shape[1:], base.noise_dtype(state))
            confidence = jax.vmap(draw)(state.step_key)
        confidence = base.deprioritize_eos(confidence, tokens, state)
        masked_at_start = jnp.where(state.step_in_block == 0, eligible.sum(-1, dtype=jnp.int32), masked_at_start)  # int32 carry under x64 too
        k = self.commit_count(state, masked_at_start)
        commit = self.select(confidence, eligible, k)
        return base.Commit(tokens=tokens, commit=commit, confidence=confidence.astype(jnp.float32)), masked_at_start

    def select(self, confidence: jax.Array, eligible: jax.Array, k: jax.Array) -> jax.Array:
        """bool [B, G]: this step's commits given the step's count k [B]: the top k (LLaDA)."""
        return base.top_k_commit(confidence, eligible, k)
