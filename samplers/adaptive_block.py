"""AdaBlock-dLLM's adaptive block size, wrapped around any inner sampler.

"AdaBlock-dLLM: Semantic-Aware Diffusion LLM Inference via Adaptive Block
Size" (Lu et al., arXiv 2509.26432, ICLR 2026), as implemented in
lgxi24/AdaBlock-dLLM `llada/generate_adablock.py` (`compute_block_length`
and `generate_adablock`, HEAD 491b205). At the
first step of every block (the first block included), the forward of that
step sizes the block:

    window = min(int(lookahead * gen_length), gen_length - block_start)
    candidates = positions j in [block_start, block_start + window)
                 whose proposal x0[j] is a delimiter id
    if no candidate: L = min(default_block_length, gen_length - block_start)
    else: j* = the candidate with the highest softmax(logits[j])[x0[j]]
          L = j* - block_start + 1 if its confidence >= delimiter_threshold
              else min(default_block_length, gen_length - block_start)

so a confident delimiter ends the block (and belongs to it). The same
forward then commits with the inner sampler inside [block_start,
block_start + L) (fused, as AdaBlock does; Fast-dLLM's threshold 0.9 by
default), and the later steps of the block keep that window. The next block
starts where this one ended: the engine's `next_window` moves a finished
window [s, e) to [e, e + block_length) when position e is still masked,
which is this rule's next block_start whatever L was; we then resize it at
its first step.

Our choices where the reference is silent or single-row:

* Batches: every row sizes its own block (the reference asserts batch 1).
* x0 and the confidence come from the logits after the engine's EOS policy,
  with `base.sample_tokens` (Gumbel argmax, the same draw the inner sampler
  makes) and softmax without temperature, as in the reference.
* Candidates must still be masked. In the reference every position from
  block_start on is masked at a block start, so this changes nothing there;
  in our engine (e.g. after an inner early commit) it keeps a block from
  ending on an already decoded position.
* Ties between candidates: the lower position (torch.max returns the first).
* The inner sampler's commit is clipped to the new window, except for rows
  the inner stops (an inner early commit fills every block on purpose).
* A KV cache bounds the window to what its steps recompute (the dual cache:
  `cache_window`); we clip L with the engine's own rule
  (`dllm.decoding.cache.clip_window`), so the inner commits inside the window
  that is kept.
* Delimiter ids come from the tokenizer (`bind`), never from literals; the
  reference hard-codes LLaDA's newline 198 (and Qwen's 24 newline tokens for
  Dream).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dllm.decoding.cache import clip_window
from dllm.decoding.state import DecodeConfig, DecodeState
from samplers import base


def fast_dllm_threshold():
    """The default inner sampler: Fast-dLLM's threshold rule at 0.9 (imported lazily)."""
    from samplers.threshold import Threshold

    return Threshold(tau=0.9)


@dataclasses.dataclass(frozen=True)
class AdaptiveBlock(base.Sampler):
    """Size each block at its start from the most confident predicted delimiter.

    Attributes:
      inner: the sampler that commits inside each window (default
        Threshold(0.9), as AdaBlock); its carry is ours.
      delimiters: texts of the delimiter tokens, resolved by
        `bind(tokenizer)`; every text must be one token of the vocabulary.
        Default newline, as AdaBlock for LLaDA (the task-suite tokenizer has
        none: use its separators, e.g. ("/",)).
      delimiter_ids: the ids given directly; when non-empty they win over
        `delimiters` (bind only checks they lie in the vocabulary).
      delimiter_threshold: the confidence a delimiter needs to end the block,
        in [0, 1] (AdaBlock: 0.3 for LLaDA, 0.5 for Dream).
      lookahead: the look-ahead window as a fraction of gen_length, in
        (0, 1] (AdaBlock: 0.25).
      default_block_length: the block size when no delimiter qualifies; None
        means DecodeConfig.block_length (AdaBlock: 32).
    """

    inner: base.Sampler = dataclasses.field(default_factory=fast_dllm_threshold)
    delimiters: tuple[str, ...] = ("\n",)
    delimiter_ids: tuple[int, ...] = ()
    delimiter_threshold: float = 0.3
    lookahead: float = 0.25
    default_block_length: int | None = None
    name = "adaptive_block"  # registry name: configs/sampler/adaptive_block.yaml

    def __post_init__(self):
        if not isinstance(self.inner, base.Sampler):
            raise ValueError(f"AdaptiveBlock.inner={self.inner!r}: must be a samplers.base.Sampler")
        texts = (self.delimiters,) if isinstance(self.delimiters, str) else tuple(self.delimiters or ())
        if any(not isinstance(t, str) or not t for t in texts):
            raise ValueError(f"AdaptiveBlock.delimiters={self.delimiters!r}: must be non-empty token texts")
        ids = tuple(self.delimiter_ids or ())
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(f"AdaptiveBlock.delimiter_ids={self.delimiter_ids!r}: must be ints >= 0")
        object.__setattr__(self, "delimiters", texts)
        object.__setattr__(self, "delimiter_ids", ids)
        if not texts and not ids:
            raise ValueError("AdaptiveBlock: no delimiter (delimiters=() and delimiter_ids=()); "
                             "set delimiters (token texts, e.g. ['/']) or delimiter_ids")
        base.check_number("AdaptiveBlock", "delimiter_threshold", self.delimiter_threshold, 0, 1)
        base.check_number("AdaptiveBlock", "lookahead", self.lookahead, 0, 1, low_open=True,
                          unit=" (a fraction of gen_length)")
        length = self.default_block_length
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length <= 0):
            raise ValueError(f"AdaptiveBlock.default_block_length={length!r}: must be a positive int or None")

    # ------------------------------------------------------------ config time

    def bind(self, tokenizer) -> AdaptiveBlock:
        """A copy with delimiter_ids filled from `tokenizer` (and the inner bound)."""
        inner = base.bind_inner(self.inner, tokenizer)
        size = base.vocabulary_size(tokenizer)
        if self.delimiter_ids:
            for token_id in self.delimiter_ids:
                base.check_id_in_vocabulary(token_id, size, "AdaptiveBlock.delimiter_ids")
            ids = self.delimiter_ids
        else:
            ids = tuple(base.text_to_id(tokenizer, text, "AdaptiveBlock.delimiters") for text in self.delimiters)
        return dataclasses.replace(self, inner=inner, delimiter_ids=ids)

    def validate(self, config: DecodeConfig) -> None:
        self.inner.validate(config)
        if not self.delimiter_ids:
            raise ValueError(f"AdaptiveBlock(delimiters={self.delimiters!r}) is not bound to a tokenizer: "
                             "call sampler.bind(tokenizer) or set delimiter_ids")
        if config.sliding_window:
            raise ValueError(f"AdaptiveBlock with sliding_window={config.sliding_window}: the sliding window sets "
                             "where its window ends; allowed: sliding_window=0")
        if config.pipeline_blocks > 1:
            raise ValueError(f"AdaptiveBlock with pipeline_blocks={config.pipeline_blocks}: it sizes one window "
                             "at a time; allowed: pipeline_blocks=1")
        if config.cache == "block":
            raise ValueError("AdaptiveBlock with cache='block': its windows end at delimiters, and the exact "
                             "block cache needs windows that end on the model's blocks; allowed: cache='none' "
                             "(a block-causal model) or a bidirectional model with any cache")

    # ------------------------------------------------------------ the rule

    def init(self, state: DecodeState):
        return self.inner.init(state)

    def block_end(self, logits: jax.Array, state: DecodeState) -> jax.Array:
        """int32 [B]: each row's window end; resized at the row's block start."""
        config, g = state.config, state.config.gen_length
        logits = base.apply_eos_policy(logits, state)
        tokens = base.sample_tokens(logits, state)
        confidence = base.max_prob_confidence(base.probabilities(logits, state), tokens)
        start = state.block_start
        remaining = g - start
        window = jnp.minimum(int(self.lookahead * g), remaining)
        j = jnp.arange(g)[None, :]
        in_lookahead = (j >= start[:, None]) & (j < (start + window)[:, None])
        is_delimiter = jnp.isin(tokens, jnp.asarray(self.delimiter_ids, jnp.int32))
        candidate = in_lookahead & is_delimiter & state.is_masked
        scores = jnp.where(candidate, confidence, -jnp.inf)
        best = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        best_confidence = jnp.max(scores, axis=-1)
        default = self.default_block_length or config.block_length
        length = jnp.where(best_confidence >= self.delimiter_threshold,  # -inf when no candidate
                           best - start + 1, jnp.minimum(default, remaining))
        resized = clip_window(state, start + length).astype(jnp.int32)  # within the cache's recomputed range
        return jnp.where(state.step_in_block == 0, resized, state.block_end).astype(jnp.int32)

    def step(self, logits, state: DecodeState, carry):
        if not self.delimiter_ids:
            self.validate(state.config)
        for token_id in self.delimiter_ids:
            base.check_id_in_vocabulary(token_id, logits.shape[-1], "AdaptiveBlock.delimiter_ids")
        block_end = self.block_end(logits, state)
        window_state = state.replace(block_end=block_end)
        commit, carry = self.inner.step(logits, window_state, carry)
        keep = window_state.in_window
        if commit.stop is not None:
            keep = keep | commit.stop[:, None]
        return commit.replace(commit=commit.commit & keep, block_end=block_end), carry
