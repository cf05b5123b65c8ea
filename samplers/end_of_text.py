"""End-of-text prediction (EoTP): stop a row at a predicted EOS, for any sampler.

Learn2PD (Bao et al. 2025, arXiv 2509.25188, §3.3 "End-of-Text
Prediction"), as implemented in ims-kdks/Learning-to-Parallel-Decoding
`llada/generate.py` (`generate_predict_eot`, the "EoT" baseline, and
`generate_l2p_eot`, "L2P+EoT"): after each step's
commit, look at the masked positions of the whole generation (every block,
not only the active one) whose proposal x0 is EOS;

* if the step itself accepted an EOS (the filter, for L2P+EoT), take the
  first such position;
* otherwise the masked position whose EOS proposal is the most confident
  (softmax(logits)[x0], without temperature);

and cut the canvas after it (`x = x[:, :pos + 1]`): later positions are
never decoded. The position itself stays in the generation (committed now
if the step accepted it, else decoded later like any other position).

Here the cut is `Commit.truncate_at`: the engine fills every still-masked
position after it with EOS at this step (their commit step is this step)
and never decodes them. Deviations:

* The canvas keeps its length: the cut positions hold EOS instead of being
  dropped, so later forwards see them (an SFT model padded with EOS, like
  LLaDA-Instruct and our task model, was trained on exactly that).
* Commits the inner sampler made past the cut at this same step are dropped
  (the reference drops them with the slice).
* A position counts as an EOS proposal only where this step computed its
  logits (`state.has_logits`): with a KV cache a window step has none outside
  the recomputed range.
* Batches: the decision is per row (the reference handles one row).

`EndOfText(inner=...)` adds EoTP to any sampler; "accepted" then means
committed by the inner sampler at this step. `LearnedFilter` has its own
`eot_prediction` flag, where "accepted" means accepted by the filter, as in
L2P+EoT.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dllm.decoding.state import DecodeConfig, DecodeState
from samplers import base
from samplers.low_confidence import LowConfidence


def truncation_point(tokens: jax.Array, confidence: jax.Array, accepted_eos: jax.Array,
                     state: DecodeState) -> jax.Array:
    """int32 [B]: the EoTP cut of each row (gen_length: no cut).

    Args:
      tokens: int32 [B, G] proposals x0.
      confidence: [B, G] softmax(logits)[x0] (not lowered by the EOS policy).
      accepted_eos: bool [B, G] masked positions where this step accepted an
        EOS; the first one wins over every other EOS proposal.
    """
    g = state.config.gen_length
    eos = (tokens == state.special.eos) & state.is_masked & state.has_logits
    accepted_eos = accepted_eos & state.is_masked
    first_accepted = jnp.argmax(accepted_eos, axis=-1)
    most_confident = jnp.argmax(jnp.where(eos, confidence, -jnp.inf), axis=-1)
    cut = jnp.where(jnp.any(accepted_eos, -1), first_accepted, jnp.where(jnp.any(eos, -1), most_confident, g))
    return cut.astype(jnp.int32)


def apply_truncation(commit: base.Commit, cut: jax.Array) -> base.Commit:
    """The commit with the cut merged (the earlier of two cuts wins) and commits past it dropped."""
    if commit.truncate_at is not None:
        cut = jnp.minimum(cut, commit.truncate_at)
    before = jnp.arange(commit.commit.shape[-1])[None, :] <= cut[:, None]
    return commit.replace(commit=commit.commit & before, truncate_at=cut)


@dataclasses.dataclass(frozen=True)
class EndOfText(base.Sampler):
    """Any sampler plus Learn2PD's end-of-text prediction.

    Attributes:
      inner: the sampler that commits (default LLaDA's one token per step:
        with it this is Learn2PD's "EoT" baseline, `generate_predict_eot`).
        An EOS it commits this step is the "accepted" EOS; otherwise the most
        confident masked EOS proposal decides the cut.

    The EOS proposals are x0 of the raw logits after the engine's EOS policy
    (with "logits_eos_inf" EOS is never proposed, so nothing is ever cut),
    whatever the inner sampler does to its own logits.
    """

    inner: base.Sampler = dataclasses.field(default_factory=LowConfidence)
    writes_end_of_text = True
    name = "end_of_text"  # registry name: configs/sampler/end_of_text.yaml

    def __post_init__(self):
        if not isinstance(self.inner, base.Sampler):
            raise ValueError(f"EndOfText.inner={self.inner!r}: must be a samplers.base.Sampler")

    def bind(self, tokenizer) -> "EndOfText":
        return dataclasses.replace(self, inner=base.bind_inner(self.inner, tokenizer))

    def validate(self, config: DecodeConfig) -> None:
        self.inner.validate(config)

    def init(self, state: DecodeState):
        return self.inner.init(state)

    def step(self, logits, state: DecodeState, carry):
        commit, carry = self.inner.step(logits, state, carry)
        logits = base.apply_eos_policy(logits, state)
        tokens = base.sample_tokens(logits, state)
        confidence = base.max_prob_confidence(base.probabilities(logits, state), tokens)
        accepted = commit.commit & state.is_masked & (commit.tokens == state.special.eos)
        cut = truncation_point(tokens, confidence, accepted, state)
        return apply_truncation(commit, cut), carry
