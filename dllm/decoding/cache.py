"""KV-cache policies: what one decoding step runs, what it keeps, and which positions get logits.

One policy object per `DecodeConfig.cache` mode (`CACHE_POLICIES`). A policy
owns its buffer (`init`), its length, when a row refreshes, what a step
recomputes, and how far a window may reach (`max_window`). The engine calls
only `step_logits(model, state, ...) -> StepLogits` and `max_window`; a new
cache (Elastic-Cache, say) is one more policy here.

* "none": every step is a full forward over the canvas (LLaDA's loop), with
  LLaDA's unsupervised classifier-free guidance when `cfg_scale` > 0.
* "prefix" and "dual": Fast-dLLM's caches (Wu et al. 2025, arXiv 2505.22618,
  §3.2 and Fig. 3). A *refresh* runs the full forward, stores the K/V (after
  RoPE) of every position and also decodes (it counts as an NFE). A row
  refreshes at the first step of each of its blocks, and every
  `cache_refresh_every` steps if set; the decision is per row, so a row
  decodes as it does alone (when only some rows refresh, the step runs both
  forwards and each row keeps its own). Between refreshes a *window* step
  recomputes, per row, generation positions
    - "prefix": [block_start, block_start + gen_length) (the active block and
      everything after it, padded to a static length, so the query count does
      not shrink in later blocks as Fast-dLLM's does), or
    - "dual": [block_start, block_start + cache_window),
  against the cache, writing the recomputed K/V in place (DualCache's
  `replace_position`). Both are approximate: K/V outside the recomputed range
  are stale until the next refresh (with a one-layer model they are exact,
  which the tests use). Only the recomputed positions have logits
  (`StepLogits.has_logits`); the engine drops commits elsewhere and ignores
  `stop` until the next refresh. Every window (adaptive blocks included) must
  fit in the recomputed range (`max_window`).
* "dkv": dKV-Cache-Decode (`DKVCache`): a decoded token's K/V are cached from the step after it is
  decoded; every other step recomputes only the masked and the just-decoded positions.
* "elastic": Elastic-Cache (`ElasticCache`): over a sliding window, a step recomputes the window,
  the tokens decoded at the previous step and the most-attended tokens; when the latter's attention
  drifts at a layer, every position is recomputed from the next layer on.
* "block": the exact cache of a block-causal model (`BlockCache`): prefill,
  then each step forwards the active block alone over the cached K/V of the
  blocks before it; a finished block's K/V are written by the forward that
  starts the next block. The same tokens as "none".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import struct

from dllm.models.transformer import CACHE_AXES, ElasticBuffer, KVCache, positions_from_mask

if TYPE_CHECKING:  # the state module imports this one
    from dllm.decoding.state import DecodeConfig, DecodeState


@struct.dataclass
class StepLogits:
    """What one step's forward gives the sampler and the engine.

    logits: float32 [B, G, V] of the generation region, or [B, block_length, V]
      of each row's block (`window_only`); the [MASK] token's logit is -inf.
    cache: the policy's buffer after the step (None without a cache).
    has_logits: bool [B, G], positions whose logits were computed this step;
      elsewhere the logits are zeros, carry no information, and no commit lands.
    """

    logits: jax.Array
    cache: Any
    has_logits: jax.Array


def place_logits(values: jax.Array, starts: jax.Array, gen_length: int, fill=0) -> jax.Array:
    """[B, L, ...] values of generation positions starts[b] + [0, L) -> [B, G, ...],
    `fill` elsewhere; positions past G are dropped. One write per row into a
    G-sized buffer (no larger buffer sliced back down)."""
    length = values.shape[1]
    at = jnp.minimum(starts, gen_length - length)  # where a row's slab fits
    shift = starts - at  # > 0 only when the window runs past G: roll its tail out

    def place(row, start, k):
        kept = (jnp.arange(length) >= k).reshape((length,) + (1,) * (row.ndim - 1))
        row = jnp.where(kept, jnp.roll(row, k, axis=0), fill)
        return jax.lax.dynamic_update_slice_in_dim(jnp.full((gen_length, *row.shape[1:]), fill, row.dtype), row,
                                                   start, 0)

    return jax.vmap(place)(values, at, shift)


def head_request(state: DecodeState, window_only: bool) -> tuple[int, jax.Array | None]:
    """(positions per row, per-row offsets or None) the output head computes:
    each row's block (`DecodeState.window_offsets`) when `window_only`, else all of G."""
    if window_only:
        return state.config.block_length, state.window_offsets
    return state.config.gen_length, None


def attention_mask_of(state: DecodeState, padded: bool):
    """The canvas mask for the model, or None when no prompt is padded (the
    attention then runs unmasked; `generate` knows this on the host)."""
    return state.attention_mask if padded else None


def without_mask_token(logits: jax.Array, state: DecodeState) -> jax.Array:
    """The [MASK] token itself is never a valid proposal: its logit is -inf.
    (LLaDA relies on training for this; an untrained or under-trained model
    could otherwise "commit" [MASK] and make no progress.)"""
    return logits.at[..., state.special.mask].set(-jnp.inf)


def guided_logits(model, state: DecodeState, window_only: bool, padded: bool) -> jax.Array:
    """Full-forward logits of the generation region, with LLaDA's unsupervised
    classifier-free guidance when `cfg_scale` > 0 (Nie et al. 2025, arXiv
    2502.09992, Appendix B.3): l_uncond + (cfg_scale + 1) (l - l_uncond), the
    unconditional canvas having every prompt token replaced by [MASK].

    `window_only`: each row's block alone, [B, block_length, V] at
    `state.window_offsets`, so the output head and the sampler's softmax run
    there only (at LLaDA-8B size the head over all of G = 256 positions is 0.27
    TFLOP and its logits 129 MB of float32 per row)."""
    config, width = state.config, state.prompt_width
    length, offsets = head_request(state, window_only)
    if window_only:
        call = lambda t, m, o: model(t, m, logits_start=width, logits_length=length, logits_offsets=o)
    else:  # no logits_offsets argument: a stand-in model need not know it
        call = lambda t, m, o: model(t, m, logits_start=width, logits_length=length)
    mask = attention_mask_of(state, padded)
    if config.cfg_scale == 0:
        return call(state.tokens, mask, offsets)
    is_prompt = (jnp.arange(state.tokens.shape[1]) < width)[None, :] & (state.attention_mask == 1)
    unconditional = jnp.where(is_prompt, state.special.mask, state.tokens)
    both = call(jnp.concatenate([state.tokens, unconditional]), None if mask is None else jnp.concatenate([mask] * 2),
                None if offsets is None else jnp.concatenate([offsets] * 2))
    cond, uncond = jnp.split(both, 2)
    return uncond + (config.cfg_scale + 1.0) * (cond - uncond)


@dataclasses.dataclass(frozen=True)
class NoCache:
    """Every step a full forward (LLaDA, arXiv 2502.09992, Algorithm 5); nothing is kept."""

    name: str = "none"

    def max_window(self, config: DecodeConfig) -> int:
        """The longest window a step can decode: all of the generation."""
        return config.gen_length

    def init(self, model, batch: int, canvas_width: int, config: DecodeConfig):
        return None

    def step_logits(self, model, state: DecodeState, window_only: bool = False, padded: bool = True) -> StepLogits:
        """Under a block-causal model the active block alone has logits (`active_block_only`)."""
        out = StepLogits(guided_logits(model, state, window_only, padded), state.cache,
                         jnp.ones(state.gen_tokens.shape, bool))
        if getattr(getattr(model, "config", None), "attention", None) == "block_causal":
            out = active_block_only(out, state, window_only)
        return out.replace(logits=without_mask_token(out.logits, state))


@dataclasses.dataclass(frozen=True)
class FastDLLMCache:
    """Fast-dLLM's prefix ("prefix") and dual ("dual") KV caches; see the module docstring."""

    name: str
    dual: bool

    def max_window(self, config: DecodeConfig) -> int:
        """Generation positions a window step recomputes from the block start, the longest window
        it can decode: gen_length (prefix) or `cache_window` (dual)."""
        return config.cache_window if self.dual else config.gen_length

    def length(self, canvas_width: int, config: DecodeConfig) -> int:
        """Cache positions: the canvas plus a tail so every window slice stays in bounds."""
        return canvas_width + self.max_window(config) + 1

    def init(self, model, batch: int, canvas_width: int, config: DecodeConfig) -> KVCache:
        """The empty buffer of `model` (its config and layout), one K/V slot per cache position."""
        return KVCache.zeros(model.config, model.layout, batch, self.length(canvas_width, config))

    def rows_to_refresh(self, state: DecodeState) -> jax.Array:
        """bool [B]: the unfinished rows whose step is a refresh (first step of their block, or every
        `cache_refresh_every` steps)."""
        refresh = state.step_in_block == 0
        if state.config.cache_refresh_every:
            refresh = refresh | (state.row_step % state.config.cache_refresh_every == 0)
        return refresh & ~state.done

    def refresh(self, model, state: DecodeState, window_only: bool, padded: bool) -> StepLogits:
        return refresh_forward(model, state, window_only, padded)

    def window(self, model, state: DecodeState, window_only: bool, padded: bool) -> StepLogits:
        """Recomputes each row's window against the cache. Without prompt padding the only hidden keys
        are the cache's tail, given to the attention as a key length rather than a mask.

        Logits: [B, G, V] with the window's placed (zeros elsewhere); `window_only`
        (`uses_window_logits`): those of each row's block alone, [B, block_length, V].
        Window-only samplers run fixed blocks, whose starts are multiples of block_length,
        so an unfinished row's block starts its window and sits at `state.window_offsets`
        (a finished row's step is ignored)."""
        config, width = state.config, state.prompt_width
        canvas = state.tokens.shape[1]
        queries = self.max_window(config)
        tail = self.length(canvas, config) - canvas
        tokens = jnp.pad(state.tokens, ((0, 0), (0, tail)), constant_values=state.special.mask)
        key_mask = jnp.pad(state.attention_mask, ((0, 0), (0, tail)))
        positions = positions_from_mask(state.attention_mask)
        positions = jnp.concatenate([positions, positions[:, -1:] + 1 + jnp.arange(tail)[None, :]], axis=1)
        logits, cache = model.forward_window(tokens, positions, state.cache, key_mask if padded else None,
                                             start=width + state.block_start, queries=queries,
                                             logits_count=config.block_length if window_only else queries,
                                             key_length=canvas)
        j = jnp.arange(config.gen_length)[None, :]
        has_logits = (j >= state.block_start[:, None]) & (j < state.block_start[:, None] + queries)
        if not window_only:
            logits = place_logits(logits, state.block_start, config.gen_length)
        return StepLogits(logits, cache, has_logits)

    def step_logits(self, model, state: DecodeState, window_only: bool = False, padded: bool = True) -> StepLogits:
        """The refresh is decided per row (`rows_to_refresh`), so a row decodes as it would alone: when
        every unfinished row refreshes, one full forward; when none does, one window step; when some
        do, both, each row taking its own."""
        refresh = self.rows_to_refresh(state)
        full = lambda s: self.refresh(model, s, window_only, padded)
        window = lambda s: self.window(model, s, window_only, padded)
        mixed = lambda s: select_rows(refresh, full(s), window(s))
        branch = jnp.where(jnp.all(refresh | state.done), 0, jnp.where(jnp.any(refresh), 2, 1))
        out = jax.lax.switch(branch, (full, window, mixed), state)
        return out.replace(logits=without_mask_token(out.logits, state))


def refresh_forward(model, state: DecodeState, window_only: bool, padded: bool) -> StepLogits:
    """Full forward: logits of the whole generation (or of each row's block, see
    `guided_logits`) and the canvas's K/V, written into the carried cache from column 0."""
    length, offsets = head_request(state, window_only)
    logits, cache = model.forward(state.tokens, attention_mask_of(state, padded), logits_start=state.prompt_width,
                                  logits_length=length, logits_offsets=offsets, cache=state.cache)
    return StepLogits(logits, cache, jnp.ones(state.gen_tokens.shape, bool))


def select_rows(refresh: jax.Array, fresh: StepLogits, windowed: StepLogits) -> StepLogits:
    """Per row: the refresh forward's output where `refresh`, else the window step's (arrays with the
    batch on axis 0, or on the "batch" axis of `CACHE_AXES` for the cache)."""
    def pick(a, b, batch_axis=0):
        shape = [1] * a.ndim
        shape[batch_axis] = refresh.shape[0]
        return jnp.where(refresh.reshape(shape), a, b)

    cache = jax.tree.map(lambda a, b: pick(a, b, CACHE_AXES[-a.ndim:].index("batch")), fresh.cache, windowed.cache)
    return StepLogits(pick(fresh.logits, windowed.logits), cache, pick(fresh.has_logits, windowed.has_logits))


def active_block_only(out: StepLogits, state: DecodeState, window_only: bool) -> StepLogits:
    """A block-causal decode sees its active block only (SDAR, Fast-dLLM v2 and BD3-LM forward the
    block alone): logits and `has_logits` outside each row's window are zeroed / False, so a sampler
    reads the same with or without the exact block cache."""
    inside = state.in_window & out.has_logits
    if window_only:
        j = state.window_offsets[:, None] + jnp.arange(state.config.block_length)[None, :]
        keep = (j >= state.block_start[:, None]) & (j < state.block_end[:, None])
    else:
        keep = inside
    return out.replace(logits=jnp.where(keep[..., None], out.logits, 0.0), has_logits=inside)


@dataclasses.dataclass(frozen=True)
class BlockCache:
    """The exact KV cache of a block-causal model ("block"; BD3-LM, Arriola et al. 2025, arXiv
    2503.09573, §3.2; SDAR and Fast-dLLM v2 decode so).

    A block's K/V depend only on it and the blocks before it, so once a block is finished its cached
    K/V are exact. Per row:
    * first step (prefill): one full forward over the canvas writes every position's K/V; the
      prompt's complete blocks are final from then on (the masked positions after it are rewritten
      before any query may see them), and the first window's logits come from it;
    * later steps of a block: the window's queries alone, over the cache
      (`Transformer.forward_window` with block-causal pairs), writing the window's K/V in place;
      the window starts at its model block's first position, so in the first block the prompt's
      tail is recomputed with the generation it shares a block with;
    * first step of each later block: the queries are the finished block and the new one, so the
      finished block's K/V are written from its final tokens in the forward that starts the next
      block (folded in: no extra forward, no extra NFE), where SDAR (`store_kv=True`) and Fast-dLLM
      v2 (`update_past_key_values=True`) run one more forward.
    With D2F's pipelining (`DecodeConfig.pipeline_blocks` = n) the queries are the n blocks that
    end where the window ends (n + 1 when its first block moves), covering every open block.
    With token shift each window also recomputes the position before it, whose hidden state
    predicts the window's first token (the previous block's last position seeds the next block).
    When only some rows start a block, both window forwards run and each row keeps its own
    (`select_rows`), so a row decodes as it does alone. The decode equals the uncached one
    (`NoCache` under a block-causal model, every step a full forward) token for token; tested
    for every sampler. The canvas sits behind one hidden column (never attended) so a shifted
    window never starts before column 0.
    """

    name: str = "block"

    def max_window(self, config: DecodeConfig) -> int:
        """A window is one engine block (its end on a model block's), or `pipeline_blocks` of them."""
        return config.block_length * config.pipeline_blocks

    def length(self, canvas_width: int, config: DecodeConfig) -> int:
        """Cache columns: the hidden column, the canvas, and a tail that fits a fold step's queries."""
        return 1 + max(canvas_width, self.max_window(config) + config.block_length)

    def init(self, model, batch: int, canvas_width: int, config: DecodeConfig) -> KVCache:
        return KVCache.zeros(model.config, model.layout, batch, self.length(canvas_width, config))

    def cache_canvas(self, state: DecodeState):
        """(tokens, key mask, positions) [B, S]: the canvas behind the hidden column, with the tail."""
        canvas = state.tokens.shape[1]
        pad = ((0, 0), (1, self.length(canvas, state.config) - 1 - canvas))
        tokens = jnp.pad(state.tokens, pad, constant_values=state.special.mask)
        key_mask = jnp.pad(state.attention_mask, pad)
        return tokens, key_mask, positions_from_mask(key_mask)

    def prefill(self, model, state: DecodeState, window_only: bool) -> StepLogits:
        tokens, key_mask, positions = self.cache_canvas(state)
        length, offsets = head_request(state, window_only)
        logits, cache = model.forward(tokens, key_mask, positions, logits_start=1 + state.prompt_width,
                                      logits_length=length, logits_offsets=offsets, cache=state.cache)
        return StepLogits(logits, cache, jnp.ones(state.gen_tokens.shape, bool))

    def window(self, model, state: DecodeState, window_only: bool, blocks: int) -> StepLogits:
        """Queries: the `blocks` engine blocks that end where each row's window ends."""
        queries = blocks * state.config.block_length
        shift = 1 if model.config.token_shift else 0
        columns = self.length(state.tokens.shape[1], state.config)
        # canvas column (with the hidden one) of query 0; near the canvas start a longer window than
        # the canvas so far starts at the first column instead (it then covers more finished positions)
        start = jnp.clip(1 + state.prompt_width + state.block_end - queries, shift, columns - queries)
        placed, cache = self.forward_queries(model, state, start, queries, window_only)
        return StepLogits(placed, cache, state.in_window)

    def forward_queries(self, model, state: DecodeState, start: jax.Array, queries: int, window_only: bool):
        """(logits, cache): `queries` positions from cache column `start` (int32 [B], the hidden column
        counted) forwarded over the cache, their K/V written in place; logits placed at their
        generation positions ([B, G, V], or each row's block when `window_only`), zeros elsewhere."""
        config, width = state.config, state.prompt_width
        tokens, key_mask, positions = self.cache_canvas(state)
        logits, cache = model.forward_window(tokens, positions, state.cache, key_mask, start=start,
                                             queries=queries, logits_count=queries)
        if window_only:
            j = state.window_offsets[:, None] + jnp.arange(config.block_length)[None, :]
        else:
            j = jnp.arange(config.gen_length)[None, :]
        i = 1 + width + j - start[:, None]  # query index of generation position j
        placed = jnp.take_along_axis(logits, jnp.clip(i, 0, queries - 1)[:, :, None], axis=1)
        return jnp.where(((i >= 0) & (i < queries))[..., None], placed, 0.0), cache

    def step_logits(self, model, state: DecodeState, window_only: bool = False, padded: bool = True) -> StepLogits:
        """Prefill at the first step; then per row `pipeline_blocks` + 1 blocks of queries when its
        window has just moved, `pipeline_blocks` at its other steps (both forwards when the rows
        disagree). `padded` is not used: the hidden column always needs the key mask."""
        starts = (state.step_in_block == 0) & ~state.done
        prefill = lambda s: self.prefill(model, s, window_only)
        open_blocks = state.config.pipeline_blocks  # the window's blocks at most (D2F pipelining)
        fold = lambda s: self.window(model, s, window_only, blocks=open_blocks + 1)
        inside = lambda s: self.window(model, s, window_only, blocks=open_blocks)
        mixed = lambda s: select_rows(starts, fold(s), inside(s))
        partial = jnp.zeros_like(state.done)
        if state.config.sub_block_cache:  # Fast-dLLM v2's use_block_cache: the current sub-block alone
            partial = sub_block_partial_rows(state, state.config.sub_block_cache) & (state.step > 0)
        idle = state.done | partial  # rows the whole-block forwards need not serve
        branch = jnp.where(state.step == 0, 0, jnp.where(jnp.all(starts | idle), 1,
                                                         jnp.where(jnp.any(starts), 3, 2)))
        whole = lambda s: jax.lax.switch(branch, (prefill, fold, inside, mixed), s)
        if state.config.sub_block_cache:
            sub = lambda s: self.sub_block(model, s, window_only)
            both = lambda s: select_rows(partial, sub(s), whole(s))
            which = jnp.where(jnp.all(partial | state.done), 0, jnp.where(jnp.any(partial), 1, 2))
            out = jax.lax.switch(which, (sub, both, whole), state)
        else:
            out = whole(state)
        out = active_block_only(out, state, window_only)
        return out.replace(logits=without_mask_token(out.logits, state))

    def sub_block(self, model, state: DecodeState, window_only: bool) -> StepLogits:
        """Fast-dLLM v2's partial forward (`use_block_cache`): the queries of each row's current
        sub-block only, over the cache, which holds the blocks before (exact) and the active block's
        K/V from its last whole-block forward (stale where the sub-block's commits have moved them since);
        the sub-block's fresh K/V are written in place. Logits: the sub-block's positions only.

        Deviation: under token shift the position before the sub-block is recomputed too (its hidden
        state predicts the sub-block's first position) and its K/V rewritten, where v2 forwards the
        sub-block's positions alone and keeps that column's K/V from the last whole-block forward;
        with more than one layer the sub-block then attends to a fresher K/V there."""
        size = state.config.sub_block_cache
        shift = 1 if model.config.token_shift else 0
        sub_start, sub_end = current_sub_block(state, size)
        columns = self.length(state.tokens.shape[1], state.config)
        start = jnp.clip(1 + state.prompt_width + sub_start, shift, columns - size)
        placed, cache = self.forward_queries(model, state, start, size, window_only)
        g = jnp.arange(state.config.gen_length)[None, :]
        in_sub = (g >= sub_start[:, None]) & (g < sub_end[:, None])
        return StepLogits(placed, cache, in_sub & state.in_window)


def current_sub_block(state: DecodeState, size: int):
    """(start, end) int32 [B] in generation coordinates: each row's first sub-block of `size` (cut on the
    engine's block grid, from where blocks start: p % block_length == block_phase) that holds a mask in
    its window. In a block-causal model's first block a sub-block may start before position 0 (the
    prompt's tail fills its head), so `start` may be negative. Fast-dLLM v2's `small_block_size`."""
    origin = state.block_phase
    first_masked = jnp.argmax(state.is_masked & state.in_window, axis=-1)
    start = origin + (first_masked - origin) // size * size
    return start.astype(jnp.int32), jnp.minimum(start + size, state.block_end).astype(jnp.int32)


def sub_block_partial_rows(state: DecodeState, size: int) -> jax.Array:
    """bool [B]: unfinished rows whose step is Fast-dLLM v2's partial forward: not their block's first
    step (no block K/V from a whole-block forward yet), and the current sub-block's first position is
    decoded (a prompt token, or committed). v2 runs a whole-block forward while that position is still
    masked, deciding over the batch (`.any()`); dllm decides per row."""
    start, _ = current_sub_block(state, size)
    first = jnp.take_along_axis(state.is_masked, jnp.maximum(start, 0)[:, None], axis=1)[:, 0]
    first_decoded = (start < 0) | ~first
    return first_decoded & (state.step_in_block > 0) & ~state.done


def dkv_query_sizes(config: DecodeConfig, shift: int) -> tuple[int, ...]:
    """The static query counts of dKV-Cache's cached steps, largest first: every generation position
    (plus the prompt's last column under token shift), then halvings down to max(block_length,
    gen_length / 8), so at most four compiled forwards."""
    smallest = max(config.block_length, -(-config.gen_length // 8))
    sizes = [config.gen_length + shift]
    size = config.gen_length
    while (size := -(-size // 2)) >= smallest:
        sizes.append(size)
    return tuple(sizes)


def dkv_recomputed(state: DecodeState, shift: int) -> jax.Array:
    """bool [B, canvas]: the columns a dKV-Cache step recomputes. Every masked generation position,
    and every position committed at the previous step: its K/V enter the cache one step late, from
    the forward in which it is first seen decoded (dKV-Cache's delayed caching). Under token shift
    also the column before each masked position, whose hidden state predicts it."""
    gen = state.is_masked | ((state.commit_step == state.row_step[:, None] - 1) & (state.row_step[:, None] > 0))
    columns = jnp.pad(gen, ((0, 0), (state.prompt_width, 0)))
    if shift:  # masked generation position j is predicted from canvas column prompt_width + j - 1
        columns = columns | jnp.pad(state.is_masked, ((0, 0), (state.prompt_width - 1, 1)))
    return columns


def gathered_step(state: DecodeState, window_only: bool, rows: jax.Array, fresh: jax.Array, sizes: tuple[int, ...],
                  length_of, shift: int, forward, vocab: int) -> StepLogits:
    """A step that recomputes, per row of `rows` (bool [B]), the canvas columns `fresh` (bool [B, canvas])
    against the policy's buffer (`DKVCache`, `ElasticCache`).

    Each row's columns are gathered in ascending order into the smallest of the static query counts
    `sizes` that holds them, padded with distinct hidden tail columns (the buffer is `length_of(canvas,
    config)` columns long); one forward runs per size that some row needs, each row taking its own, so
    a row decodes as it does alone. `forward(tokens, positions, buffer, key_mask, columns, logits_at,
    rows_here)` -> (logits at the slots `logits_at`, buffer); rows outside `rows_here` must keep their
    buffer (their slots point at the hidden tail). Logits: those of the positions a sampler
    reads (the active block for window-only samplers) whose predicting column (j - `shift`) was
    recomputed; zeros elsewhere, where `has_logits` is False."""
    config, width = state.config, state.prompt_width
    canvas = state.tokens.shape[1]
    tail = length_of(canvas, config) - canvas
    tokens = jnp.pad(state.tokens, ((0, 0), (0, tail)), constant_values=state.special.mask)
    key_mask = jnp.pad(state.attention_mask, ((0, 0), (0, tail)))
    positions = positions_from_mask(state.attention_mask)
    positions = jnp.concatenate([positions, positions[:, -1:] + 1 + jnp.arange(tail)[None, :]], axis=1)
    count = fresh.sum(-1)
    order = jnp.argsort(~fresh, axis=1, stable=True)  # the recomputed columns first, ascending
    order = jnp.pad(order, ((0, 0), (0, max(0, max(sizes) - canvas))))  # a size may exceed the canvas
    size_index = (count[:, None] <= jnp.array(sizes)[None, :]).sum(-1) - 1  # the smallest size that fits
    g, batch = config.gen_length, state.tokens.shape[0]
    length, offsets = head_request(state, window_only)
    wanted = jnp.arange(length)[None, :] + (0 if offsets is None else offsets[:, None])  # positions read
    predictor = lambda j: width + j - shift  # the column whose hidden state gives j's logits
    all_j = jnp.arange(g)[None, :]

    def run(queries, rows_here, carry):
        buffer, logits, has = carry
        slots = jnp.arange(queries)[None, :]
        valid = rows_here[:, None] & (slots < count[:, None])
        columns = jnp.where(valid, order[:, :queries], canvas + slots)
        slot_of = jnp.full((batch, canvas + tail), -1, jnp.int32)
        slot_of = slot_of.at[jnp.arange(batch)[:, None], columns].set(jnp.where(valid, slots, -1))
        read = jnp.take_along_axis(slot_of, predictor(wanted), axis=1)
        new, buffer = forward(tokens, positions, buffer, key_mask, columns, jnp.maximum(read, 0), rows_here)
        new = jnp.where((read >= 0)[..., None], new, 0.0)
        logits = jnp.where(rows_here[:, None, None], new, logits)
        has = jnp.where(rows_here[:, None], jnp.take_along_axis(slot_of, predictor(all_j), axis=1) >= 0, has)
        return buffer, logits, has

    carry = (state.cache, jnp.zeros((batch, length, vocab), jnp.float32), jnp.zeros((batch, g), bool))
    for k, queries in enumerate(sizes):
        rows_here = rows & (size_index == k)
        carry = jax.lax.cond(jnp.any(rows_here), functools.partial(run, queries, rows_here), lambda c: c, carry)
    buffer, logits, has = carry
    return StepLogits(logits, buffer, has)


@dataclasses.dataclass(frozen=True)
class DKVCache:
    """dKV-Cache-Decode ("dkv"; Ma et al. 2025, "dKV-Cache: The Cache for Diffusion Language Models",
    arXiv 2505.15781, its dKV-Cache-Decode variant; the rule as the authors' LLaDA loop runs it,
    github.com/horseee/dKV-Cache `generation_utils/llada_dkv_cache_decode.py`).

    Per row, at step i of its block (`step_in_block`):
    * i = 0 and i = 1, and every i with i % `cache_refresh_every` == 0 (the authors'
      `cache_reloading_step`; their LLaDA runs use 4 and 8; 0 here: the two block-start forwards
      only): a full forward that decodes and writes every position's K/V;
    * otherwise the step recomputes only the positions not yet decoded before the previous step
      (`dkv_recomputed`: the masked positions, everywhere in the generation, and those the previous
      step committed) against the cached K/V of the rest (the prompt, fixed template tokens, tokens
      decoded two or more steps ago), writing the recomputed K/V in place. The masked positions
      always have logits; positions served from the cache have none (`StepLogits.has_logits`).
    The commit rule is the sampler's, unchanged (the authors run LLaDA's top-k and Dream's entropy).

    Deviations: the authors gather the recomputed positions into a tensor of their exact count,
    which needs every row to have the same count; here each row's count is rounded up to one of a
    few static sizes (`dkv_query_sizes`), padded with hidden tail columns, and one forward runs per
    size that some row needs, each row taking its own (so a row decodes as it does alone). With
    token shift (Dream) the column predicting each masked position is recomputed too. Only the
    logits of the positions a sampler reads are computed (the active block for window-only
    samplers). dKV-Cache-Greedy (a local window) and -PD (Dream's prefill split) are not built.
    """

    name: str = "dkv"

    def max_window(self, config: DecodeConfig) -> int:
        """Every masked position is recomputed at every step, so any window fits."""
        return config.gen_length

    def length(self, canvas_width: int, config: DecodeConfig) -> int:
        """The canvas plus a hidden tail that holds a step's padding slots (one per query at most)."""
        return canvas_width + dkv_query_sizes(config, 1)[0]

    def init(self, model, batch: int, canvas_width: int, config: DecodeConfig) -> KVCache:
        return KVCache.zeros(model.config, model.layout, batch, self.length(canvas_width, config))

    def rows_to_refresh(self, state: DecodeState) -> jax.Array:
        """bool [B]: unfinished rows whose step is a full forward (the block's first two steps, and
        every `cache_refresh_every`-th step of the block)."""
        i = state.step_in_block
        refresh = i < 2
        if state.config.cache_refresh_every:
            refresh = refresh | (i % state.config.cache_refresh_every == 0)
        return refresh & ~state.done

    def cached_step(self, model, state: DecodeState, window_only: bool, rows: jax.Array) -> StepLogits:
        """The recomputed columns of `rows` (bool [B]) against the cache; other rows' logits are zeros
        and their queries write only the hidden tail."""
        shift = 1 if model.config.token_shift else 0
        forward = lambda tokens, positions, cache, key_mask, columns, logits_at, rows_here: model.forward_columns(
            tokens, positions, cache, key_mask, columns=columns, logits_at=logits_at)
        return gathered_step(state, window_only, rows, dkv_recomputed(state, shift),
                             dkv_query_sizes(state.config, shift), self.length, shift, forward,
                             model.config.vocab_size)

    def step_logits(self, model, state: DecodeState, window_only: bool = False, padded: bool = True) -> StepLogits:
        """Per row a full forward or a cached step (`rows_to_refresh`); both when the rows disagree,
        each row taking its own."""
        refresh = self.rows_to_refresh(state)
        full = lambda s: refresh_forward(model, s, window_only, padded)
        cached = lambda s: self.cached_step(model, s, window_only, ~refresh & ~s.done)
        mixed = lambda s: select_rows(refresh, full(s), cached(s))
        branch = jnp.where(jnp.all(refresh | state.done), 0, jnp.where(jnp.any(refresh), 2, 1))
        out = jax.lax.switch(branch, (full, cached, mixed), state)
        return out.replace(logits=without_mask_token(out.logits, state))


def elastic_query_sizes(config: DecodeConfig, n_layers: int) -> tuple[int, ...]:
    """The static query counts of an Elastic-Cache step, largest first: the tracked tokens (at most
    `elastic_track` per layer), the window and every generation position (an end-of-text
    truncation may decode the whole tail in one step); then the tracked tokens and two windows (the
    window and the tokens it decoded at the previous step), the usual case."""
    tracked = n_layers * config.elastic_track
    largest = tracked + config.sliding_window + config.gen_length
    usual = tracked + 2 * config.sliding_window
    return (largest, usual) if usual < largest else (largest,)


@dataclasses.dataclass(frozen=True)
class ElasticCache:
    """Elastic-Cache ("elastic"; Nguyen-Tri et al. 2025, "Attention Is All You Need for KV Cache in
    Diffusion LLMs", arXiv 2510.14973; the rule as the authors' LLaDA code runs it,
    github.com/VILA-Lab/Elastic-Cache `llada/generate.py` `generate_with_elastic_cache` and
    `modeling_llada.py` `LLaDABlock.attention`, read from the copy yxu-dev/Elastic-Cache @ 46c0bc3).

    The window slides (`DecodeConfig.sliding_window`: the first W masked positions, the engine's
    `sliding_window`); masked positions beyond it are served from the cache. Per row:
    * its first step: a full forward that decodes and writes every column's K/V, queries and layer
      inputs (the authors' only full forward);
    * every later step recomputes the columns of the window, of the tokens decoded at the previous
      step and of the tracked tokens (the most-attended ones) against the cache, layer by layer;
      when the tracked tokens' attention drifts at layer l (cosine similarity below
      `elastic_gamma`), layers l + 1 ... recompute every column (`Transformer.forward_elastic`).
    Only the recomputed positions have logits (`has_logits`; the window's are the masked ones). The
    commit rule is the sampler's: the authors' is threshold 0.9 with at least the most confident
    token (`samplers.Threshold`), window 16, gamma 0.9, one tracked token per layer, over the whole
    generation (block_length = gen_length).

    Deviations: no EOS cut of the masked tail (the authors drop masked positions after the first
    decoded EOS; the engine's `eos_policy` and end-of-text samplers are the levers);
    semi-AR blocks are allowed (the window stays in its block); the query count is one of two static
    sizes (`elastic_query_sizes`), each row its own; per-row decisions (see `forward_elastic`).
    """

    name: str = "elastic"

    def max_window(self, config: DecodeConfig) -> int:
        """The window is at most W masked positions of one block, recomputed at every step."""
        return config.gen_length

    def length(self, canvas_width: int, config: DecodeConfig, n_layers: int) -> int:
        """The canvas plus a hidden tail that holds a step's padding slots (one per query at most)."""
        return canvas_width + elastic_query_sizes(config, n_layers)[0]

    def init(self, model, batch: int, canvas_width: int, config: DecodeConfig) -> ElasticBuffer:
        return ElasticBuffer.zeros(model.config, model.layout, batch,
                                   self.length(canvas_width, config, model.config.n_layers))

    def step_logits(self, model, state: DecodeState, window_only: bool = False, padded: bool = True) -> StepLogits:
        config, width = state.config, state.prompt_width
        n_layers = model.config.n_layers
        first = (state.nfe == 0) & ~state.done
        window = jnp.pad(state.is_masked & state.in_window, ((0, 0), (width, 0)))
        decoded_last = (state.commit_step == state.row_step[:, None] - 1) & (state.row_step[:, None] > 0)
        canvas = state.tokens.shape[1]
        tracked = state.cache.tracked[:, :canvas] & ~first[:, None]
        fresh = window | jnp.pad(decoded_last, ((0, 0), (width, 0))) | tracked
        masked = jnp.pad(state.is_masked, ((0, 0), (width, 0)))

        def forward(tokens, positions, buffer, key_mask, columns, logits_at, rows_here):
            pad = lambda a: jnp.pad(a, ((0, 0), (0, tokens.shape[1] - canvas)))
            at = lambda a: jnp.take_along_axis(pad(a), columns, axis=1) & rows_here[:, None]
            logits, new = model.forward_elastic(
                tokens, positions, buffer, key_mask, columns=columns, tracked_slots=at(tracked),
                window_slots=at(window), full_rows=first & rows_here, masked_columns=pad(masked),
                gamma=config.elastic_gamma, track=config.elastic_track, logits_at=logits_at, canvas=canvas)
            return logits, new.replace(tracked=jnp.where(rows_here[:, None], new.tracked, buffer.tracked))

        out = gathered_step(state, window_only, ~state.done, fresh, elastic_query_sizes(config, n_layers),
                            functools.partial(self.length, n_layers=n_layers), 0, forward, model.config.vocab_size)
        return out.replace(logits=without_mask_token(out.logits, state))


CACHE_POLICIES = {"none": NoCache(), "prefix": FastDLLMCache("prefix", dual=False),
                  "dual": FastDLLMCache("dual", dual=True), "block": BlockCache(), "dkv": DKVCache(),
                  "elastic": ElasticCache()}
CACHE_MODES = tuple(CACHE_POLICIES)


def cache_policy(config: DecodeConfig):
    """The policy of `config.cache`."""
    if config.cache == "auto":
        raise ValueError("cache='auto' names no policy until it is resolved from the model: "
                         "dllm.decoding.engine.resolve_cache(model, config) (generate does this)")
    return CACHE_POLICIES[config.cache]


def clip_window(state: DecodeState, block_end: jax.Array) -> jax.Array:
    """block_end limited so each row's window fits what its steps recompute (`max_window`)."""
    return jnp.minimum(block_end, state.block_start + cache_policy(state.config).max_window(state.config))
