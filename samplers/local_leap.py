"""LocalLeap: anchors of high confidence, and their neighbours at a relaxed bar.

Kong et al. 2025, "Accelerating Diffusion LLM Inference via Local Determinism Propagation"
(arXiv 2510.07081), the rule as reference/samplers.md gives it (from a third-party copy of the
authors' `generate`; github.com/friedrichor/LocalLeap could not be read here). Among the masked
positions of the active block, with c the max-prob confidence:

    anchors   = positions with c >= tau                                (tau = 0.9)
    neighbours = every position within `radius` (4) of an anchor, |i - a| <= radius
    commit: the most confident position always; every other one whose c reaches its bar,
            tau_relaxed (0.75) inside the neighbourhood, tau outside

Without an anchor the neighbourhood is empty and the rule is Fast-dLLM's threshold (>=). Distances
count generation positions, committed or not.

Not here: LocalLeap's optional EOS early stop (fill the rest with EOS once a finished block holds
one); `end_of_text` / the EOS policies are this framework's handles for that.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dllm.decoding.state import DecodeState
from samplers import base


@dataclasses.dataclass(frozen=True)
class LocalLeap(base.Sampler):
    """Commit anchors (confidence >= tau) and their neighbours within `radius` at >= tau_relaxed.

    Attributes:
      tau: the anchor bar, in (0, 1] (LocalLeap: 0.9).
      tau_relaxed: the bar inside an anchor's neighbourhood, in (0, tau] (LocalLeap: 0.75).
      radius: the neighbourhood's half-width in positions, >= 0 (LocalLeap: 4).
    """

    tau: float = 0.9
    tau_relaxed: float = 0.75
    radius: int = 4
    reads_only_window = True  # not a field: see base.Sampler
    name = "local_leap"  # registry name: configs/sampler/local_leap.yaml

    def __post_init__(self):
        base.check_number("LocalLeap", "tau", self.tau, 0, 1, low_open=True)
        base.check_number("LocalLeap", "tau_relaxed", self.tau_relaxed, 0, self.tau, low_open=True)
        if isinstance(self.radius, bool) or not isinstance(self.radius, int) or self.radius < 0:
            raise ValueError(f"LocalLeap.radius={self.radius!r}: must be an int >= 0")

    def step(self, logits, state: DecodeState, carry):
        logits = base.apply_eos_policy(logits, state)
        proposed = base.sample_tokens(logits, state)
        tokens = base.on_generation(proposed, state, state.special.mask)
        confidence = base.max_prob_confidence(base.probabilities(logits, state), proposed)
        confidence = base.deprioritize_eos(base.on_generation(confidence, state, base.NEG_INF), tokens, state)
        eligible = base.masked_in_window(state)
        anchors = eligible & (confidence >= self.tau)
        j = jnp.arange(anchors.shape[-1])
        near = (jnp.abs(j[:, None] - j[None, :]) <= self.radius)  # [G, G]: |i - a| <= radius
        neighbourhood = jnp.any(anchors[:, None, :] & near[None], axis=-1)
        bar = jnp.where(neighbourhood, self.tau_relaxed, self.tau)
        best = base.rank_desc(confidence, eligible) == 0
        commit = eligible & ((confidence >= bar) | best)
        return base.Commit(tokens=tokens, commit=commit, confidence=confidence.astype(jnp.float32)), carry
