"""SDAR's and LLaDA2's dynamic low-confidence rule, the block-diffusion models' own sampler.

Cheng et al. 2025, "SDAR: A Synergistic Diffusion-AutoRegression Paradigm" (arXiv 2510.06303), as
implemented in JetAstra/SDAR `generate.py` and JetEngine (`remasking_strategy=
"low_confidence_dynamic"`); LLaDA2's `generate` (inclusionAI) uses the same rule. Inside the
active block, with k the step's scheduled count (LLaDA's `get_num_transfer_tokens`: the block's
masked positions at its first step split over its steps, remainder first):

    high = masked positions with confidence > tau       (strict, as SDAR)
    if |high| >= k: commit every position of high
    else:           commit the k most confident masked positions (top-k)

so a step commits at least its scheduled k and the block finishes within its steps. Defaults by
author: SDAR block 4, 4 steps per block (k = 1), tau 0.85 in `generate.py` and 0.9 in its README
and JetEngine; LLaDA2 block 32, 32 steps (k = 1), tau 0.95. With k = 1 the rule is Fast-dLLM's
threshold with its top-1 fallback, but at a strict bar.

Deviation: the confidence is softmax of the raw logits at the proposed token (LLaDA's and every
other sampler's here); SDAR takes the probability after its temperature / top-k / top-p
filtering, which is the same at temperature 0 without filtering.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from samplers import base
from samplers.low_confidence import LowConfidence


@dataclasses.dataclass(frozen=True)
class DynamicLowConfidence(LowConfidence):
    """Commit every masked block position above `tau` if there are at least the step's k of them,
    else the top k (SDAR / LLaDA2 `low_confidence_dynamic`).

    Attributes:
      tau: the bar, in (0, 1]; strict (`>`).
      steps: total forward passes planned over the generation, split equally over the blocks
        (LowConfidence's schedule, which sets k); None: one token per step (k = 1).
      confidence: the score ranked and compared with tau (`samplers.base.CONFIDENCES`).
    """

    tau: float = 0.9
    name = "low_confidence_dynamic"  # registry name: configs/sampler/low_confidence_dynamic.yaml

    def __post_init__(self):
        super().__post_init__()
        if self.remasking != "low_confidence":
            raise ValueError(f"DynamicLowConfidence.remasking={self.remasking!r}: allowed 'low_confidence'")
        base.check_number("DynamicLowConfidence", "tau", self.tau, 0, 1, low_open=True)

    def select(self, confidence, eligible, k):
        """Every eligible position above tau if there are at least k of them, else the top k."""
        high = eligible & (confidence > self.tau)
        enough = high.sum(-1) >= k
        return jnp.where(enough[:, None], high, base.top_k_commit(confidence, eligible, k))
