"""CreditDecoding: trace credit fused into the logits, then a threshold commit.

Wang et al. 2025, "CreditDecoding: Accelerating Parallel Decoding in Diffusion
Large Language Models with Trace Credits" (arXiv 2510.06133, ACL 2026), §4
and Algorithm 1. The authors published no code. The formulas below follow the
paper as quoted in a third-party note on it (quoting the final paper, §4,
§5.1, Algorithm 1); they were not checked against the PDF.

For each masked position i at step t, with the raw distribution
p_t = softmax(l_t) and its top-1 token v*:

    credit update (before fusion):  C_t[i, v] = beta * C_{t-1}[i, v] + 1[v = v*] * p_t[i, v*]^gamma
    fusion:                         l~_t = l_t + alpha * log(1 + C_t)
                                    q_t = softmax(l~_t) = p (1 + C)^alpha / sum_u p_u (1 + C_u)^alpha
    commit:                         x0 = argmax q_t (Gumbel-max on l~ when temperature > 0);
                                    every masked window position with q_t[x0] >= tau, plus the most
                                    confident one (Fast-dLLM's threshold rule, ties: lower position).

Only the top-1 token gains credit; the credit of the others decays but
persists, so a token that was top-1 earlier can win again. Adaptive
("tuning-free") variant: gamma = 1 and alpha = beta = 1 - mask_ratio, where
mask_ratio is the fraction of the row's generation still masked at this step.

Ambiguities and what we chose:
* Algorithm 1's ScatterAdd can be read as adding the decayed credit twice
  (C + (beta C + gain)). We implement the equation above: one decay, one add.
* Credit kept per block or per sequence: both, by `reset`. "block" zeroes a
  row's credit at the first step of each of its blocks (state.step_in_block
  == 0); "sequence" keeps it for the whole decode.
* Which positions gain credit: every still-masked generation position whose
  logits this step computed (`state.has_logits`), also those outside the
  active window (the model predicts them each step). With reset="block"
  their credit is discarded when the row's next block starts; with
  reset="sequence" a position reaches its block with credit gathered while
  earlier blocks were decoded. A cached step that computes only some
  positions (a dual window narrower than the block, Elastic-Cache's window,
  a block-causal model's active block) leaves the others' credit as it was:
  neither decayed nor fed from logits that were not computed.
* Committed positions keep their (now unused) credit; it no longer changes.

Representation (exact, independent of the vocabulary): the carry is the
history of top-1 predictions, one slot per step of the row (slot = state.row_step):
the token v*_s and its decayed gain beta^(t-s) p_s^gamma. Summing the slots
by token gives exactly the dense C [B, G, V] of the recursion (up to float
rounding order). Memory: B * G * max_steps * 8 bytes, against
B * G * V * 4 bytes for a dense carry; the dense C is formed per step as a
temporary of the same size as the logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from dllm.decoding.state import DecodeState
from samplers import base

RESETS = ("block", "sequence")


@struct.dataclass
class CreditHistory:
    """The credit carry: tokens int32 [B, G, K] (v* recorded at each step
    slot) and values float32 [B, G, K] (its decayed gain; 0 for an unused
    slot). K = max_steps."""

    tokens: jax.Array
    values: jax.Array

    @classmethod
    def zeros(cls, batch: int, gen_length: int, slots: int) -> "CreditHistory":
        return cls(tokens=jnp.zeros((batch, gen_length, slots), jnp.int32),
                   values=jnp.zeros((batch, gen_length, slots), jnp.float32))

    def dense(self, vocab_size: int) -> jax.Array:
        """C float32 [B, G, V]: the credit of every token at every position."""
        b, g, _ = self.tokens.shape
        rows = jnp.arange(b)[:, None, None]
        cols = jnp.arange(g)[None, :, None]
        return jnp.zeros((b, g, vocab_size), jnp.float32).at[rows, cols, self.tokens].add(self.values)


def _per_row(value, ndim: int = 3):
    """A scalar, or [B] broadcast against [B, G, ...]."""
    value = jnp.asarray(value)
    return value.reshape(value.shape + (1,) * (ndim - value.ndim)) if value.ndim == 1 else value


def update_credit(history: CreditHistory, probs: jax.Array, update: jax.Array, slot, beta, gamma) -> CreditHistory:
    """C <- beta * C + onehot(v*) * p[v*]^gamma at the positions where `update`.

    probs: [B, G, V] raw softmax; update: bool [B, G]; slot: int32 [B], each
    row's history slot for this step (its `row_step`, unused so far; a slot past
    the history writes nothing); beta: scalar or [B]; gamma: scalar or [B].
    """
    top = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    gain = (jnp.max(probs, axis=-1) ** _per_row(gamma, 2)).astype(jnp.float32)
    decayed = history.values * _per_row(beta).astype(jnp.float32)
    values = jnp.where(update[..., None], decayed, history.values)
    rows = jnp.arange(top.shape[0])
    slot = jnp.broadcast_to(jnp.asarray(slot, jnp.int32), rows.shape)
    values = values.at[rows, :, slot].set(jnp.where(update, gain, 0.0), mode="drop")
    tokens = history.tokens.at[rows, :, slot].set(jnp.where(update, top, 0), mode="drop")
    return CreditHistory(tokens=tokens, values=values)


def credit_fused_logits(logits: jax.Array, credit, alpha) -> jax.Array:
    """l~ = l + alpha * log(1 + C) (CreditDecoding's fusion).

    credit: dense C [B, G, V] or a `CreditHistory`; alpha: scalar or [B].
    """
    if isinstance(credit, CreditHistory):
        credit = credit.dense(logits.shape[-1])
    return logits + (_per_row(alpha) * jnp.log1p(credit)).astype(logits.dtype)


@dataclasses.dataclass(frozen=True)
class Credit(base.Sampler):
    """CreditDecoding with a threshold commit on the credit-fused probability.

    Attributes:
      alpha: fusion strength, >= 0 (paper §5.1: 0.65); 0 is plain threshold
        decoding.
      beta: credit decay per step, in [0, 1] (paper: 0.7); 0 keeps only the
        current step's gain.
      gamma: concave exponent on the top-1 probability, > 0 (paper: 0.2).
      tau: commit bar on the fused probability q[x0], in (0, 1] (paper's
        Table 3 combination: 0.95).
      reset: "block" (credit zeroed when a row starts a new block) or
        "sequence" (kept for the whole decode).
      adaptive: the tuning-free variant: gamma = 1 and alpha = beta =
        1 - mask_ratio per row; alpha, beta and gamma above are then unused.
    """

    alpha: float = 0.65
    beta: float = 0.7
    gamma: float = 0.2
    tau: float = 0.95
    reset: str = "block"
    adaptive: bool = False
    name = "credit"  # registry name: configs/sampler/credit.yaml

    def __post_init__(self):
        base.check_number("Credit", "alpha", self.alpha, 0)
        base.check_number("Credit", "beta", self.beta, 0, 1)
        base.check_number("Credit", "gamma", self.gamma, 0, low_open=True)
        base.check_number("Credit", "tau", self.tau, 0, 1, low_open=True)
        if self.reset not in RESETS:
            raise ValueError(f"Credit.reset={self.reset!r}: allowed {RESETS}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"Credit.adaptive={self.adaptive!r}: allowed True or False")

    def init(self, state: DecodeState) -> CreditHistory:
        return CreditHistory.zeros(state.tokens.shape[0], state.config.gen_length, state.config.max_steps)

    def coefficients(self, state: DecodeState):
        """(alpha, beta, gamma) for this step: floats, or [B] when adaptive."""
        if not self.adaptive:
            return self.alpha, self.beta, self.gamma
        unmasked = 1.0 - state.is_masked.mean(axis=-1, dtype=jnp.float32)  # 1 - mask_ratio
        return unmasked, unmasked, 1.0

    def fuse(self, logits: jax.Array, state: DecodeState, history: CreditHistory):
        """Resets, updates the credit from `logits`, and returns (fused logits, new credit).

        Composable: a sampler may call this and apply its own commit rule to
        the fused logits. `logits` should already carry the EOS policy.
        """
        alpha, beta, gamma = self.coefficients(state)
        if self.reset == "block":
            fresh = (state.step_in_block == 0)[:, None, None]
            history = history.replace(values=jnp.where(fresh, 0.0, history.values))
        probs = base.probabilities(logits, state)
        # a cached step computes some positions only (`state.has_logits`): the others keep their credit
        history = update_credit(history, probs, state.is_masked & state.has_logits, state.row_step, beta,
                                gamma)
        return credit_fused_logits(logits, history, alpha), history

    def step(self, logits, state: DecodeState, history: CreditHistory):
        logits = base.apply_eos_policy(logits, state)
        fused, history = self.fuse(logits, state, history)
        tokens = base.sample_tokens(fused, state)
        confidence = base.max_prob_confidence(base.probabilities(fused, state), tokens)
        confidence = base.deprioritize_eos(confidence, tokens, state)
        commit = base.threshold_commit(confidence, base.masked_in_window(state), self.tau)
        return base.Commit(tokens=tokens, commit=commit, confidence=confidence.astype(jnp.float32)), history
