"""Self speculative decoding: the model drafts its own next commits and verifies them in one forward.

Gao et al. 2025, "Self Speculative Decoding for Diffusion Large Language Models" (arXiv
2510.04147): the dLLM is both drafter and verifier, and the output is identical to stepwise
decoding, i.e. one token per step with LLaDA's low-confidence rule (`LowConfidence(steps=None)`,
the reference this sampler is tested against token for token). No code of the authors was
available (the paper says it "will be released"); the rule here is built from the paper's
description, reference/samplers.md §SSD:

    stepwise rule s(C): in canvas C, the most confident masked position of the active block
        (ties: lower position) and its proposed token
    drafts d_1..d_k: the positions ranked 2..k+1 by the same scores in the canvas whose logits the
        previous forward computed, with their proposed tokens (none at the first step of a decode)
    one forward over k + 1 canvases C_0 = C, C_i = C + d_1 + ... + d_i     (a verification chain)
    accept a = the number of leading i with s(C_{i-1}) == d_i (position and token)
    commit s(C_0), ..., s(C_a): a + 1 tokens; C_{a+1} = C_a + s(C_a) is exactly the canvas stepwise
        decoding reaches after a + 1 steps, and L(C_a) gives the next drafts

So every committed token is the one stepwise decoding commits, in the same order; the forward
costs k + 1 canvases of compute, which is nearly free while a step is bound by reading the weights
(batch 1). With temperature > 0 the canvas C_i draws its Gumbel noise from the key stepwise
decoding uses when it reaches C_i (its step = the positions committed so far, as
`LowConfidence(steps=None)` commits one per step), so sampled decodes are identical too.

Deviations from the paper, by construction:
* The verification tree is a single chain (one draft per depth), not the paper's hierarchical
  tree with several candidates per depth; the chain is what the tree reduces to with one branch.
* Drafts stay inside the active block: the first step of each block verifies nothing and commits
  one token (stepwise decoding's window for the next block is not known until the block is done).
* Uncached only (cache "none"): the paper's cached variant (its Dream results) is not built here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dllm.decoding.state import DecodeConfig, DecodeState
from samplers import base


@dataclasses.dataclass(frozen=True)
class SelfSpeculative(base.Sampler):
    """Commit the longest run of self-drafted tokens that stepwise decoding would commit.

    Attributes:
      draft_length: k, the drafted positions verified per forward (the forward runs k + 1 canvases
        and commits 1 to k + 1 tokens), an int >= 1. The paper's default is not known (no code).
      confidence: the score of the stepwise rule, a name of `samplers.base.CONFIDENCES`
        (default "max_prob", LLaDA's low-confidence remasking).
    """

    draft_length: int = 4
    confidence: str = "max_prob"
    name = "self_speculative"  # registry name: configs/sampler/self_speculative.yaml

    def __post_init__(self):
        base.check_number("SelfSpeculative", "draft_length", self.draft_length, 1, integer=True)
        base.check_confidence("SelfSpeculative", self.confidence)

    def validate(self, config: DecodeConfig) -> None:
        if config.cache not in ("none", "auto"):  # "auto" is refused here once it resolves to "block"
            raise ValueError(f"SelfSpeculative with cache={config.cache!r}: its forward verifies several canvases, "
                             "which this engine runs uncached only; allowed: cache='none' (or 'auto' with a "
                             "full-attention model)")
        if config.sliding_window:
            raise ValueError(f"SelfSpeculative with sliding_window={config.sliding_window}: it verifies against "
                             "block-wise stepwise decoding; allowed: sliding_window=0")
        if config.pipeline_blocks > 1:
            raise ValueError(f"SelfSpeculative with pipeline_blocks={config.pipeline_blocks}: it verifies against "
                             "one-block-at-a-time stepwise decoding; allowed: pipeline_blocks=1")

    def init(self, state: DecodeState):
        """The drafts: positions int32 [B, k] (-1: none) and their tokens int32 [B, k]."""
        empty = jnp.full((state.tokens.shape[0], self.draft_length), -1, jnp.int32)
        return empty, empty

    def draft_canvases(self, state: DecodeState, carry) -> jax.Array:
        """int32 [B, k + 1, G]: C_0 = the canvas, C_i = C_{i-1} with draft i written (an absent draft
        writes nothing, and its canvas can then verify nothing)."""
        positions, tokens = carry
        canvases = [state.gen_tokens]
        j = jnp.arange(state.config.gen_length)
        for i in range(self.draft_length):
            at = j[None, :] == positions[:, i:i + 1]
            canvases.append(jnp.where(at, tokens[:, i:i + 1], canvases[-1]))
        return jnp.stack(canvases, axis=1)

    def step(self, logits, state: DecodeState, carry):
        """`logits`: float32 [B, k + 1, G, V], those of `draft_canvases`."""
        batch, width, g, vocab = logits.shape
        canvases = self.draft_canvases(state, carry)
        logits = base.apply_eos_policy(logits, state).reshape(batch * width, g, vocab)
        # stepwise decoding's step at C_0: the tokens this decode committed (a template's fixed ones not)
        done_so_far = jnp.sum(state.commit_step >= 0, axis=-1, dtype=jnp.int32)
        keys = jax.vmap(lambda key, s: jax.vmap(lambda i: jax.random.fold_in(key, s + i))(jnp.arange(width)))(
            state.key, done_so_far).reshape(batch * width)
        proposed = base.sample_tokens(logits, state, step_keys=keys)
        confidence = base.CONFIDENCES[self.confidence](base.probabilities(logits, state), proposed)
        proposed, confidence = proposed.reshape(batch, width, g), confidence.reshape(batch, width, g)
        confidence = base.deprioritize_eos(confidence, proposed, state)
        eligible = (canvases == state.special.mask) & state.in_window[:, None, :]
        rank = base.rank_desc(confidence.reshape(batch * width, g), eligible.reshape(batch * width, g))
        rank = rank.reshape(batch, width, g)
        # s(C_i): position and token of the stepwise commit in each canvas
        choice = jnp.argmax(rank == 0, axis=-1).astype(jnp.int32)  # [B, k + 1]
        has_choice = jnp.any(eligible, axis=-1)
        choice_token = jnp.take_along_axis(proposed, choice[..., None], axis=-1)[..., 0]
        positions, tokens = carry
        agrees = has_choice[:, :-1] & (choice[:, :-1] == positions) & (choice_token[:, :-1] == tokens)
        accepted = jnp.sum(jnp.cumprod(agrees.astype(jnp.int32), axis=-1), axis=-1)  # a, in [0, k]
        j = jnp.arange(g)
        chosen = (j[None, None, :] == choice[..., None]) & has_choice[..., None] & \
            (jnp.arange(width)[None, :, None] <= accepted[:, None, None])  # [B, k + 1, G]
        commit = jnp.any(chosen, axis=1)
        out_tokens = jnp.where(commit, jnp.max(jnp.where(chosen, choice_token[..., None], -1), axis=1),
                               proposed[:, 0])
        # next drafts: the positions ranked 2..k+1 in C_a, whose first-ranked one is committed now
        rank_a = jnp.take_along_axis(rank, accepted[:, None, None], axis=1)[:, 0]  # [B, G]
        proposed_a = jnp.take_along_axis(proposed, accepted[:, None, None], axis=1)[:, 0]
        wanted = rank_a[:, None, :] == jnp.arange(1, width)[None, :, None]  # [B, k, G]
        found = jnp.any(wanted, axis=-1)
        next_positions = jnp.where(found, jnp.argmax(wanted, axis=-1), -1).astype(jnp.int32)
        next_tokens = jnp.where(found, jnp.take_along_axis(proposed_a, jnp.maximum(next_positions, 0), axis=-1), -1)
        commit_out = base.Commit(tokens=out_tokens.astype(jnp.int32), commit=commit,
                                 confidence=jnp.where(eligible[:, 0], confidence[:, 0], base.NEG_INF).astype(jnp.float32))
        return commit_out, (next_positions, next_tokens.astype(jnp.int32))
