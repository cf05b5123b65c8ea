"""Fast-dLLM's confidence-threshold and factor rules (and dParallel's entropy bound).

Wu et al. 2025, "Fast-dLLM: Training-free Acceleration of Diffusion LLM by
Enabling KV Cache and Parallel Decoding" (arXiv 2505.22618), §3.3 and
Theorem 1, as implemented in NVlabs/Fast-dLLM `llada/generate.py`
(`get_transfer_index` with `threshold`, and `get_transfer_index_dynamic`
with `factor`, @ f6b35ec). The entropy bound is
dParallel's decoding rule (Chen et al., czg1225/dParallel `generate.py`
`get_transfer_index_entropy` @ 2ca4d14).

Both rules look only at the masked positions of the active window (the
semi-AR block; outside it the reference sets the confidence to -inf), always
commit the single most confident one (so every step makes progress; ties:
lower position first, where torch.topk's order is unspecified), and never
re-mask. The proposal x0 is argmax of the Gumbel-perturbed logits and the
confidence comes from softmax of the raw logits, without temperature (as in
LLaDA / Fast-dLLM); both go through the shared EOS policy helpers exactly as
`low_confidence` does. The number of forward passes is adaptive: the engine
runs until every position is committed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from dllm.decoding.state import DecodeState
from samplers import base

CONFIDENCES = (*base.CONFIDENCES, "entropy_bound")  # the shared table, plus dParallel's bar on the entropy


def _proposals(logits: jax.Array, state: DecodeState) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits after the EOS policy, proposed tokens x0, softmax of the raw logits)."""
    logits = base.apply_eos_policy(logits, state)
    return logits, base.sample_tokens(logits, state), base.probabilities(logits, state)


@dataclasses.dataclass(frozen=True)
class Threshold(base.Sampler):
    """Commit every masked window position whose confidence clears a bar.

    Fast-dLLM v1 `get_transfer_index(threshold=tau)`: among the masked
    positions of the active window, commit the most confident one, plus every
    other with confidence >= tau (`>=`, as the v1 code; `strict=True` gives
    v2's `>`, `v2/generation_functions.py`).

    Attributes:
      tau: the bar, in (0, 1]. Fast-dLLM's default is 0.9. tau = 1 commits
        only the forced most-confident position unless a confidence is
        exactly 1. Ignored by confidence="entropy_bound".
      confidence: how a position is scored.
        "max_prob" (default): softmax(logits)[x0], Fast-dLLM's confidence.
        "margin": top-1 minus top-2 probability (Dream `margin_confidence`);
          it scores the distribution, so with temperature > 0 it does not
          depend on which token was sampled.
        "neg_entropy": -H(p) in nats (Dream `alg=entropy`). Dream uses it
          only to rank under a top-k schedule; to threshold it we commit
          positions with -H >= log(tau), i.e. exp(-H) >= tau (exp(-H) is 1
          for a one-hot prediction and 1/V for a uniform one). This mapping
          is ours.
        "entropy_bound": dParallel's rule: commit the lowest-entropy position
          plus every one with H(p) <= entropy_bound (dParallel compares with
          `>` to reject, so equality commits, as here).
      entropy_bound: the dParallel bound in nats, >= 0 (0.5 in the paper;
        0.45 for MBPP). Used only by confidence="entropy_bound"; it is not a
        probability, hence its own field.
      strict: compare with `>` instead of `>=` (Fast-dLLM v2); default False (v1).

    Deviation: dParallel adds 1e-12 inside its log; we clip p at 1e-30
    (shared `neg_entropy_confidence`), which differs by < 1e-10 nats per term.
    """

    tau: float = 0.9
    confidence: str = "max_prob"
    entropy_bound: float = 0.5
    strict: bool = False
    reads_only_window = True  # not a field: see base.Sampler
    name = "threshold"  # registry name: configs/sampler/threshold.yaml

    def __post_init__(self):
        base.check_number("Threshold", "tau", self.tau, 0, 1, low_open=True)
        base.check_confidence("Threshold", self.confidence, CONFIDENCES)
        base.check_number("Threshold", "entropy_bound", self.entropy_bound, 0, unit=" nats")
        if not isinstance(self.strict, bool):
            raise ValueError(f"Threshold.strict={self.strict!r}: allowed True or False")

    def scores(self, probs: jax.Array, tokens: jax.Array) -> tuple[jax.Array, float]:
        """(score at the logits' positions, [B, G] or [B, block_length]; the bar it
        must reach): higher is more confident."""
        if self.confidence == "entropy_bound":
            return base.neg_entropy_confidence(probs), -self.entropy_bound
        bar = math.log(self.tau) if self.confidence == "neg_entropy" else self.tau
        return base.CONFIDENCES[self.confidence](probs, tokens), bar

    def step(self, logits, state: DecodeState, carry):
        _, tokens, probs = _proposals(logits, state)
        score, bar = self.scores(probs, tokens)
        tokens, score = base.on_generation(tokens, state, state.special.mask), base.on_generation(score, state, -jnp.inf)
        score = base.deprioritize_eos(score, tokens, state)
        commit = base.threshold_commit(score, base.masked_in_window(state), bar, self.strict)
        return base.Commit(tokens=tokens, commit=commit, confidence=score.astype(jnp.float32)), carry


def factor_commit_count(confidence: jax.Array, eligible: jax.Array, factor: float) -> jax.Array:
    """int32 [B]: how many of the most confident eligible positions to commit.

    Sort the eligible confidences c(1) >= c(2) >= ... >= c(N); walk n = 1..N
    and stop at the first n with c(n) < 1 - factor / (n + 1); commit the n - 1
    before it (all N if none fails). n = 1 always passes. N = 0 gives 0.
    """
    n_eligible = eligible.sum(-1)
    ordered = -jnp.sort(-jnp.where(eligible, confidence, -jnp.inf), axis=-1)
    n = jnp.arange(1, confidence.shape[-1] + 1)
    bar = 1.0 - factor / (n + 1.0)
    passes = (ordered >= bar) | (n == 1)
    passes = passes & (n <= n_eligible[:, None])
    return jnp.cumprod(passes.astype(jnp.int32), axis=-1).sum(-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Factor(base.Sampler):
    """Fast-dLLM's factor rule: commit as many as Theorem 1 allows.

    Theorem 1 (Fast-dLLM §3.3): greedy parallel decoding of n tokens equals
    greedy sequential decoding when (n + 1) * eps <= 1, with eps = 1 - c the
    error of the n-th most confident token. `get_transfer_index_dynamic`
    turns this into: sort the masked window confidences (max_prob)
    c(1) >= c(2) >= ... >= c(N); the bar for the n-th is 1 - factor / (n + 1),
    except n = 1 whose bar is -1 (always accepted); walk n = 1..N, stop at
    the first failure and commit the tokens before it. Because c falls and
    the bar rises with n, this is the largest n with c(n) >= 1 - f/(n + 1).

    Attributes:
      factor: f > 0 (Fast-dLLM scripts use 1.0). Larger is more permissive:
        with f = 1 the bars are 1/2 (forced), 2/3, 3/4, 4/5, ...

    Deviations:
    * Code quirk not reproduced: the reference does `if top_i == 0 or
      top_i == N - 1: top_i += 1`, so when the first failure is the LAST
      candidate it still commits all N. We follow the rule and commit N - 1.
    * The paper writes the condition strictly, (n + 1)(1 - c(n)) < f; we use
      the code's c(n) >= 1 - f / (n + 1) (equality commits).
    * Rows with no masked position in the window commit nothing instead of
      crashing (Fast-dLLM PR #33).
    """

    factor: float = 1.0
    reads_only_window = True  # not a field: see base.Sampler
    name = "factor"  # registry name: configs/sampler/factor.yaml

    def __post_init__(self):
        base.check_number("Factor", "factor", self.factor, 0, low_open=True)

    def step(self, logits, state: DecodeState, carry):
        _, tokens, probs = _proposals(logits, state)
        confidence = base.max_prob_confidence(probs, tokens)
        tokens = base.on_generation(tokens, state, state.special.mask)
        confidence = base.deprioritize_eos(base.on_generation(confidence, state, -jnp.inf), tokens, state)
        eligible = base.masked_in_window(state)
        count = factor_commit_count(confidence, eligible, self.factor)
        commit = base.top_k_commit(confidence, eligible, count)
        return base.Commit(tokens=tokens, commit=commit, confidence=confidence.astype(jnp.float32)), carry
