"""The decoding engine: one jitted `lax.while_loop` over `DecodeState`.

    canvas = [left-padded prompt | MASK * gen_length]   (or an infilling template: fixed tokens and MASKs)
    while some row has a MASK and step < max_steps:
        logits = model(canvas)[generation region]        (one NFE; CFG doubles the batch; a
                                                          self-speculative sampler's drafted canvases
                                                          run as one batch: Sampler.draft_canvases)
        commit, carry = sampler.step(logits, state, carry)
        canvas = where(commit & masked & row unfinished, commit.tokens, canvas)
        advance each row's block when its window has no MASK left

Shapes are static; block offsets are traced per row, so nothing recompiles
per block, and rows move through blocks independently (a threshold sampler
may finish row 0's block before row 1's). Rows are left-padded: the
generation region is the same columns for every row, and RoPE positions
count only real tokens, so a padded row decodes exactly as it does alone.

Block-causal models (`ModelConfig.attention="block_causal"`): the engine's
blocks follow the model's, which are cut by RoPE position from the prompt's
first token; the first generation block completes the block that holds the
prompt's tail (its length is block_length - prompt_length % block_size, per
row), as SDAR and Fast-dLLM v2 decode (the prompt's tail in the first canvas).
Every step is a full forward (cache "none").

KV caches (none, Fast-dLLM's prefix and dual, the exact block cache): one policy object per
`DecodeConfig.cache` mode in `dllm/decoding/cache.py` decides what each step's
forward runs and which positions get logits (`DecodeState.has_logits`); the
engine commits nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm.decoding.cache import StepLogits, cache_policy, clip_window, guided_logits, without_mask_token
from dllm.decoding.sampler import Sampler
from dllm.decoding.state import DecodeConfig, DecodeResult, DecodeState, SpecialIds, Trace
from dllm.models.transformer import CACHE_AXES
from dllm.models.function import LogitsFunction


def pad_prompts(prompts, pad_id: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads a list of token sequences: (tokens [B, P], attention_mask [B, P]).

    `width`: P (default the longest prompt); a longer prompt is an error. An int array
    [B, P] is taken as it is (no padding)."""
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 2:
        tokens = np.asarray(prompts, np.int32)
        return tokens, np.ones_like(tokens)
    if isinstance(prompts, str) or (len(prompts) and all(isinstance(p, str) for p in prompts)):
        raise TypeError("prompt_tokens must be token ids, got text; encode it first "
                        "([tokenizer.encode(text) for text in texts]) or use dllm.evaluation.decode_texts")
    if len(prompts) and all(isinstance(p, (int, np.integer)) for p in prompts):
        raise TypeError(f"prompt_tokens is one flat list of {len(prompts)} token ids; allowed: a list of "
                        "token-id lists, one per prompt (for one prompt: [tokens]), or an int array [B, L]")
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("prompt_tokens is empty: pass at least one prompt")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    width = longest if width is None else width
    if longest > width:
        i = next(i for i, p in enumerate(prompts) if len(p) == longest)
        raise ValueError(f"prompt {i} has {longest} tokens, more than the prompt width {width}")
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return tokens, mask


def resolve_special_ids(model, tokenizer=None, special: SpecialIds | None = None) -> SpecialIds:
    """Special ids from the tokenizer, else from the model's config.json fields."""
    if special is not None:
        return special
    if tokenizer is not None:
        return SpecialIds(mask=tokenizer.mask_id, eos=tokenizer.eos_id, eot=tokenizer.eot_id, pad=tokenizer.pad_id)
    c = model.config
    if c.mask_token_id is None or c.eos_token_id is None:
        raise ValueError("no special ids: pass tokenizer= (or special=SpecialIds(...)); "
                         f"the model config has mask_token_id={c.mask_token_id}, eos_token_id={c.eos_token_id}")
    pad = c.pad_token_id if c.pad_token_id is not None and c.pad_token_id != c.mask_token_id else c.eos_token_id
    return SpecialIds(mask=c.mask_token_id, eos=c.eos_token_id, eot=c.eos_token_id, pad=pad)


def prompt_keys(key, indices) -> jax.Array:
    """[len(indices)] keys: fold_in(key, i) for each i, the key of prompt i of a list decoded in batches
    (`dllm.evaluation.decode_texts`), whatever batch it lands in."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices))


def row_keys(key, batch: int) -> jax.Array:
    """One PRNG key per row: `key` itself when it holds `batch` keys, else row i gets fold_in(key, i).

    Every random draw of a row comes from its own key (`DecodeState.step_key`),
    so a row's tokens depend on its prompt, its key and the settings, never on
    the rows around it. To decode a prompt the same alone and in any batch,
    give it the same key in both (`dllm.evaluation.decode_texts` keys rows by
    their index in the prompt list).
    """
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.dtype != jnp.uint32 or key.shape[-1:] != (2,):
            raise ValueError(f"key of dtype {key.dtype} and shape {key.shape} is not a PRNG key; allowed: "
                             "jax.random.key(seed), or one per prompt (shape [batch])")
        key = jax.random.wrap_key_data(key)
    if key.shape == ():
        return prompt_keys(key, np.arange(batch))
    if key.shape != (batch,):
        raise ValueError(f"key has shape {key.shape}; allowed: one key (row i draws from fold_in(key, i)) "
                         f"or one key per prompt, shape ({batch},)")
    return key


def first_block_end(attention_mask, config: DecodeConfig, model_block: int | None) -> jax.Array:
    """int32 [B]: where each row's first block ends, in generation coordinates: block_length, or
    with a block-causal model of block `model_block`, the end of the model block that holds the
    prompt's tail (block_length - prompt_length % model_block)."""
    batch = attention_mask.shape[0]
    if model_block is None:
        return jnp.full((batch,), config.block_length, jnp.int32)
    prompt_length = jnp.sum(attention_mask, axis=-1).astype(jnp.int32)
    return (config.block_length - prompt_length % model_block).astype(jnp.int32)


def model_block_of(model) -> int | None:
    """The block size the engine aligns to: a block-causal model's, else None."""
    config = getattr(model, "config", None)
    return config.block_size if getattr(config, "attention", None) == "block_causal" else None


def check_block_alignment(model, config: DecodeConfig) -> None:
    """A block-causal model decodes in blocks of whole model blocks, uncached or over the exact
    block cache; that cache is for block-causal models only."""
    block = model_block_of(model)
    if block is None:
        if config.cache == "block":
            attention = getattr(getattr(model, "config", None), "attention", None)
            raise ValueError(f"cache='block' with ModelConfig.attention={attention!r}: the exact block cache needs "
                             "a block-causal model (a bidirectional model's K/V change with every commit); "
                             "allowed here: cache='none', 'prefix' or 'dual'")
        return
    if config.block_length % block:
        raise ValueError(f"block_length={config.block_length} with a block-causal model of block_size={block}: "
                         f"allowed block lengths are multiples of the model's block ({block}, {2 * block}, ...)")
    if config.sliding_window:
        raise ValueError(f"sliding_window={config.sliding_window} with a block-causal model: its windows are its "
                         "model blocks; allowed sliding_window=0")
    if config.sub_block_cache and block % config.sub_block_cache:
        raise ValueError(f"sub_block_cache={config.sub_block_cache} with a block-causal model of block_size={block}: "
                         f"a sub-block must not straddle model blocks; allowed: a divisor of {block}")
    if config.cache not in ("none", "block"):
        raise ValueError(f"cache={config.cache!r} with a block-causal model (ModelConfig.attention="
                         f"'block_causal'): the prefix, dual and dKV caches attend bidirectionally; allowed: cache='block' "
                         "(exact) or 'none'")


def resolve_cache(model, config: DecodeConfig) -> DecodeConfig:
    """cache='auto' made concrete: the exact block cache for a block-causal model (without
    classifier-free guidance, which runs uncached), else no cache."""
    if config.cache != "auto":
        return config
    exact = model_block_of(model) is not None and config.cfg_scale == 0
    return dataclasses.replace(config, cache="block" if exact else "none")


def initial_state(tokens, attention_mask, key, config: DecodeConfig, special: SpecialIds, model=None,
                  template=None) -> DecodeState:
    """The state before the first step. `key`: one PRNG key or one per row (`row_keys`).
    `model`: the cache policy's empty buffer is made for it (its config and layout; none without),
    and a block-causal model's blocks set the first block's end (`first_block_end`).
    `template`: int32 [B, G], the generation canvas to start from (infilling: [MASK] where to
    fill, fixed tokens elsewhere); None: all [MASK]. Blocks without a mask are skipped, and a row
    without any is done before the first step."""
    batch, width = tokens.shape
    key = row_keys(key, batch)
    g = config.gen_length
    gen = jnp.full((batch, g), special.mask, jnp.int32) if template is None else jnp.asarray(template, jnp.int32)
    canvas = jnp.concatenate([tokens, gen], axis=1)
    mask = jnp.concatenate([attention_mask, jnp.ones((batch, g), jnp.int32)], axis=1)
    history = (jnp.zeros((config.max_steps, batch, g), jnp.float32) if config.record_confidence else None)
    first_end = first_block_end(attention_mask, config, model_block_of(model))
    state = DecodeState(
        tokens=canvas, attention_mask=mask,
        block_start=jnp.zeros((batch,), jnp.int32),
        block_end=first_end,
        step_in_block=jnp.zeros((batch,), jnp.int32),
        block_phase=first_end % config.block_length,
        step=jnp.zeros((), jnp.int32),
        nfe=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
        commit_step=jnp.full((batch, g), -1, jnp.int32),
        committed_per_step=jnp.zeros((batch, config.max_steps), jnp.int32),
        confidence_history=history,
        key=key, cache=None, has_logits=jnp.ones((batch, g), bool), config=config, special=special,
        prompt_width=width,
    )
    if config.sliding_window or template is not None:
        # the first W masked positions, or (infilling) the first block that holds a mask
        if config.sliding_window:
            block_start, block_end = sliding_window(config, gen == special.mask)
        else:
            block_start, block_end, _ = next_window(state, gen, first_end)
        state = state.replace(block_start=block_start, block_end=block_end,
                              done=~jnp.any(gen == special.mask, axis=-1))
    if model is not None:
        state = state.replace(cache=cache_policy(config).init(model, batch, canvas.shape[1], config))
    return state


def forward_logits(model, state: DecodeState, window_only: bool = False, padded: bool = True) -> jax.Array:
    """Logits [B, G, V] of a full forward over the canvas (no cache), [MASK] at -inf:
    the "none" policy's step (`dllm.decoding.cache.NoCache`)."""
    return without_mask_token(guided_logits(model, state, window_only, padded), state)


def canvas_logits(model, state: DecodeState, canvases, padded: bool = True) -> StepLogits:
    """Logits [B, n, G, V] of n generation canvases per row (`Sampler.draft_canvases`) in one
    uncached forward of B * n rows, each with its row's prompt and padding; [MASK] at -inf."""
    batch, n, g = canvases.shape
    tokens = jnp.repeat(state.tokens[:, None], n, axis=1).at[:, :, state.prompt_width:].set(canvases)
    wide = state.replace(tokens=tokens.reshape(batch * n, -1), attention_mask=jnp.repeat(state.attention_mask, n, 0))
    logits = guided_logits(model, wide, False, padded).reshape(batch, n, g, -1)
    return StepLogits(without_mask_token(logits, state), state.cache, jnp.ones((batch, g), bool))


def next_window(state: DecodeState, gen_tokens, block_end):
    """Moves a row whose window is fully decoded to the next block that still
    has a MASK (blocks already filled, e.g. by an early commit, are skipped).
    With `pipeline_blocks` > 1 a window that is not done drops its first block
    once that block is complete and takes in the next block once its last
    block is `pipeline_fraction` committed (`pipeline_window`)."""
    config, g = state.config, state.config.gen_length
    masked = gen_tokens == state.special.mask
    if config.sliding_window:
        start, end = sliding_window(config, masked)
        same_block = start // config.block_length == state.block_start // config.block_length
        return start, end, jnp.where(same_block, state.step_in_block + 1, 0).astype(jnp.int32)
    j = jnp.arange(g)
    start = state.block_start
    if config.pipeline_blocks > 1:
        start, block_end = pipeline_window(config, masked, start, block_end, state.block_phase)
    window = (j >= start[:, None]) & (j < block_end[:, None])
    window_done = ~jnp.any(masked & window, axis=-1)
    after = masked & (j >= block_end[:, None])
    first_after = jnp.where(jnp.any(after, -1), jnp.argmax(after, axis=-1), g).astype(jnp.int32)
    skipped = (first_after - block_end) // config.block_length * config.block_length
    new_start = jnp.where(window_done, jnp.minimum(block_end + skipped, g), start)
    new_end = jnp.where(window_done, jnp.minimum(new_start + config.block_length, g), block_end)
    step_in_block = jnp.where(window_done | (new_start != state.block_start), 0, state.step_in_block + 1)
    return new_start, new_end, step_in_block


def sliding_window(config: DecodeConfig, masked):
    """Elastic-Cache's sliding window (Nguyen-Tri et al. 2025, arXiv 2510.14973, §3; the authors'
    `query_masked_position = masked_position[:window_length]`): per row, [first masked position,
    W-th masked position + 1), cut at the end of the first masked position's block, so the window
    holds the first W = `sliding_window` masked positions of that block (with block_length =
    gen_length, of the whole generation). A row without a mask gets the empty window [G, G)."""
    g, block, width = config.gen_length, config.block_length, config.sliding_window
    j = jnp.arange(g)[None, :]
    first = jnp.where(jnp.any(masked, -1), jnp.argmax(masked, axis=-1), g).astype(jnp.int32)
    block_end = jnp.minimum((first // block + 1) * block, g)
    rank = jnp.cumsum(masked, axis=-1)  # masked positions up to and including j
    kept = masked & (rank <= width) & (j < block_end[:, None])
    end = jnp.max(jnp.where(kept, j + 1, first[:, None]), axis=-1).astype(jnp.int32)
    return first, end


def pipeline_window(config: DecodeConfig, masked, start, end, phase):
    """D2F's pipelined window (arXiv 2508.09192, §3.3) over whole blocks, which end where
    position % block_length == phase: drop the first block once it is complete (unless it is the
    whole window), and take in the next block while fewer than `pipeline_blocks` are open and the
    last one has at least `pipeline_fraction` of its positions committed."""
    g, block = config.gen_length, config.block_length
    j = jnp.arange(g)[None, :]
    inside = lambda lo, hi: (j >= lo[:, None]) & (j < hi[:, None])
    after = lambda x: jnp.minimum(x + (phase - x - 1) % block + 1, g)  # the first block end > x
    before = lambda x: x - (x - phase - 1) % block - 1  # the last block end < x

    def drop_finished_first_block(start, end):
        first_end = after(start)
        first_done = ~jnp.any(masked & inside(start, first_end), axis=-1)
        return jnp.where(first_done & (first_end < end), first_end, start)

    start = drop_finished_first_block(start, end)
    last_start = jnp.maximum(before(end), start)
    committed = jnp.sum(~masked & inside(last_start, end), axis=-1)
    open_blocks = jnp.where(before(end) > start, 1 + (before(end) - after(start)) // block + 1, 1)
    grow = (open_blocks < config.pipeline_blocks) & (end < g) & \
        (committed >= config.pipeline_fraction * (end - last_start))
    end = jnp.where(grow, after(end), end).astype(jnp.int32)
    return drop_finished_first_block(start, end), end  # a complete single block gives way to the one it let in


def apply_commit(state: DecodeState, commit) -> DecodeState:
    """Writes committed tokens, updates the trace, the windows and `done`.

    Commits where this step computed no logits (`state.has_logits`: a cached
    window step) are dropped, and `stop` waits for a step that has them all.
    """
    special, g = state.special, state.config.gen_length
    active = ~state.done
    gen = state.gen_tokens
    masked = gen == special.mask
    chosen = commit.commit & masked & active[:, None] & state.has_logits
    gen = jnp.where(chosen, commit.tokens, gen)
    row_step = state.row_step
    commit_step = jnp.where(chosen, row_step[:, None], state.commit_step)
    if commit.truncate_at is not None:  # end-of-text prediction
        beyond = (jnp.arange(g)[None, :] > commit.truncate_at[:, None]) & (gen == special.mask) & active[:, None]
        gen = jnp.where(beyond, special.eos, gen)
        commit_step = jnp.where(beyond, row_step[:, None], commit_step)
        chosen = chosen | beyond
    block_end = state.block_end if commit.block_end is None else jnp.where(active, commit.block_end, state.block_end)
    block_end = clip_window(state, block_end)  # a window must fit in what its steps recompute
    block_start, block_end, step_in_block = next_window(state, gen, block_end)
    finished = ~jnp.any(gen == special.mask, axis=-1)
    if commit.stop is not None:
        finished = finished | (commit.stop & jnp.all(state.has_logits, axis=-1))
    rows = jnp.arange(row_step.shape[0])
    at_row_step = jnp.where(active, row_step, state.config.max_steps)  # finished rows record nothing
    history = state.confidence_history
    if history is not None and commit.confidence is not None:
        history = history.at[at_row_step, rows].set(commit.confidence.astype(jnp.float32), mode="drop")
    return state.replace(
        tokens=state.tokens.at[:, state.prompt_width:].set(gen),
        block_start=block_start, block_end=block_end, step_in_block=step_in_block,
        step=state.step + 1,
        nfe=state.nfe + active.astype(jnp.int32),
        done=state.done | finished,
        commit_step=commit_step,
        committed_per_step=state.committed_per_step.at[rows, at_row_step].set(chosen.sum(-1).astype(jnp.int32),
                                                                             mode="drop"),
        confidence_history=history,
    )


# XLA compile options of the decoding loop: GEMMs on cuBLAS, not XLA's Triton
# GEMM emitter. On the H200 the two measured alike within run-to-run noise (the
# figures: experiments/results/benchmark/README.md, measured with it). The option is
# ignored off GPU; `generate(compiler_options={})` gives XLA's defaults.
COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def uses_window_logits(sampler, config: DecodeConfig) -> bool:
    """Whether the engine computes and passes only the active blocks' logits:
    the sampler reads nothing else, the trace does not record every position's
    confidence, and a cached window step covers a block."""
    covered = cache_policy(config).max_window(config) >= config.block_length
    single = config.pipeline_blocks == 1  # a pipelined window spans several blocks
    return sampler.reads_only_window and not config.record_confidence and covered and single


@functools.cache
def _decode_with(compiler_options: tuple):
    """`_decode` jitted with these (sorted (name, value) pairs of) XLA options."""
    return jax.jit(_decode, static_argnames=("graphdef", "sampler", "config", "special", "placement", "padded"),
                   compiler_options=dict(compiler_options) or None)


def decode_step(model, state: DecodeState, carry, *, sampler, padded: bool = True,
                constrain=lambda x, axes: x, constrain_cache=lambda cache: cache):
    """One forward pass (one NFE) and its commits: (state, carry, logits, commit).

    The body of the decoding loop; `steps` runs it one call at a time."""
    canvases = sampler.draft_canvases(state, carry)
    if canvases is None:
        out = cache_policy(state.config).step_logits(model, state, uses_window_logits(sampler, state.config), padded)
    else:
        out = canvas_logits(model, state, canvases, padded)
    cache = None if out.cache is None else constrain_cache(out.cache)
    state = state.replace(cache=cache, has_logits=out.has_logits)
    commit, carry = sampler.step(out.logits, state, carry)
    state = apply_commit(state, commit)
    return state.replace(tokens=constrain(state.tokens, ("batch", "length"))), carry, out.logits, commit


def constraints(placement):
    """(constrain(x, logical axes), constrain_cache(cache)) for a `dllm.sharding.Placement`, or
    identities on one device (placement None)."""
    constrain = (lambda x, axes: x) if placement is None else placement.constrain

    # Stacked caches use every CACHE_AXES name; per-layer (unrolled) ones drop "layers".
    # A policy's buffer with other leaves names their axes (`logical_axes`, Elastic-Cache's).
    def constrain_cache(cache):
        if hasattr(cache, "logical_axes"):
            return jax.tree.map(constrain, cache, cache.logical_axes())
        return jax.tree.map(lambda a: constrain(a, CACHE_AXES[-a.ndim:]), cache)
    return constrain, constrain_cache


def start_state(model, tokens, attention_mask, key, template, config, special, placement):
    """`initial_state`, its canvas and cache constrained to the placement."""
    constrain, constrain_cache = constraints(placement)
    state = initial_state(tokens, attention_mask, key, config, special, model, template)
    return state.replace(tokens=constrain(state.tokens, ("batch", "length")),
                         attention_mask=constrain(state.attention_mask, ("batch", "length")),
                         cache=None if state.cache is None else constrain_cache(state.cache))


def _decode(graphdef, params, tokens, attention_mask, key, template=None, *, sampler, config, special, placement=None,
            padded=True):
    """`padded`: whether some prompt has left padding (else full forwards run
    unmasked attention). `placement` (a `dllm.sharding.Placement`, or None on one device): the canvas
    and the KV cache are constrained to it (batch rows over the data axes,
    cache heads over `kv_heads`); the rest follows by XLA's propagation."""
    constrain, constrain_cache = constraints(placement)
    model = nnx.merge(graphdef, params)
    state = start_state(model, tokens, attention_mask, key, template, config, special, placement)
    carry = sampler.init(state)

    def cond(loop):
        state, _ = loop
        return (state.step < config.max_steps) & ~jnp.all(state.done)

    def body(loop):
        state, carry, _, _ = decode_step(model, *loop, sampler=sampler, padded=padded, constrain=constrain,
                                         constrain_cache=constrain_cache)
        return state, carry

    state, _ = jax.lax.while_loop(cond, body, (state, carry))
    trace = Trace(state.commit_step, state.committed_per_step, state.confidence_history)
    return DecodeResult(tokens=constrain(state.gen_tokens, ("batch", "length")), nfe=state.nfe, trace=trace)


# The per-row fields a prompt entering a slot takes from its own `initial_state` (continuous batching).
# The loop's `step` and the cache stay: a row's first step is a full forward (every cache policy that
# continuous batching allows refreshes a row at its first step), which rewrites all of its cache row.
ROW_FIELDS = ("tokens", "attention_mask", "block_start", "block_end", "step_in_block", "block_phase", "nfe", "done",
              "commit_step", "committed_per_step", "key", "has_logits")


def select_slots(take: jax.Array, new, old):
    """Per slot (bool [B]): `new`'s rows where `take`, else `old`'s; every leaf has the batch axis first."""
    pick = lambda a, b: jnp.where(take.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
    return jax.tree.map(pick, new, old)


def _decode_queue(graphdef, params, tokens, attention_mask, keys, template, count, *, slots, sampler, config,
                  special, placement=None, padded=True):
    """Continuous batching: the first `count` of the N prompts in `tokens` [N, P] decode through `slots`
    batch rows inside one `while_loop`. When a row finishes (no mask left, stopped, or max_steps of its
    own), its results are written to the prompt's output row and the next prompt of the queue takes the
    slot: its canvas, its key, its windows and the sampler's carry from its own `initial_state` and
    `sampler.init`, counting its steps from 0 (`DecodeState.row_step`), so it decodes as it does alone.
    Returns the `DecodeResult` of all N rows (rows from `count` on are never decoded: all masks, nfe 0)."""
    constrain, constrain_cache = constraints(placement)
    model = nnx.merge(graphdef, params)
    n, g = tokens.shape[0], config.gen_length
    count = jnp.asarray(count, jnp.int32)
    gather = lambda index: (tokens[index], attention_mask[index], keys[index],
                            None if template is None else template[index])
    first = jnp.minimum(jnp.arange(slots), n - 1)
    state = start_state(model, *gather(first), config, special, placement)
    live = jnp.arange(slots) < count  # the slot holds a prompt whose results are not yet written
    state = state.replace(done=state.done | ~live)
    carry = sampler.init(state)
    results = DecodeResult(
        tokens=jnp.full((n, g), special.mask, jnp.int32), nfe=jnp.zeros((n,), jnp.int32),
        trace=Trace(jnp.full((n, g), -1, jnp.int32), jnp.zeros((n, config.max_steps), jnp.int32),
                    jnp.zeros((config.max_steps, n, g), jnp.float32) if config.record_confidence else None))
    if template is not None:  # a prompt never decoded keeps its template
        results = results.replace(tokens=jnp.asarray(template, jnp.int32))

    def harvest(results, state, rows, finished):
        at = jnp.where(finished, rows, n)  # rows of other slots write nothing
        history = results.trace.confidence
        if history is not None:
            history = history.at[:, at].set(state.confidence_history, mode="drop")
        trace = Trace(results.trace.commit_step.at[at].set(state.commit_step, mode="drop"),
                      results.trace.committed_per_step.at[at].set(state.committed_per_step, mode="drop"), history)
        return DecodeResult(tokens=results.tokens.at[at].set(state.gen_tokens, mode="drop"),
                            nfe=results.nfe.at[at].set(state.nfe, mode="drop"), trace=trace)

    def refill(state, carry, rows, take):
        tokens_in, mask_in, keys_in, template_in = gather(rows)
        fresh = initial_state(tokens_in, mask_in, keys_in, config, special, model, template_in)  # cache unread
        fresh_carry = sampler.init(fresh.replace(cache=state.cache))
        picked = {name: select_slots(take, getattr(fresh, name), getattr(state, name)) for name in ROW_FIELDS}
        if state.confidence_history is not None:  # [max_steps, B, G]: slots on the second axis
            picked["confidence_history"] = jnp.swapaxes(select_slots(
                take, jnp.swapaxes(fresh.confidence_history, 0, 1), jnp.swapaxes(state.confidence_history, 0, 1)), 0, 1)
        state = state.replace(**picked)
        return state.replace(tokens=constrain(state.tokens, ("batch", "length")),
                             attention_mask=constrain(state.attention_mask, ("batch", "length"))), \
            select_slots(take, fresh_carry, carry)

    def cond(loop):
        return jnp.any(loop[3])

    def body(loop):
        state, carry, results, live, rows, next_prompt = loop
        state, carry, _, _ = decode_step(model, state, carry, sampler=sampler, padded=padded, constrain=constrain,
                                         constrain_cache=constrain_cache)
        finished = live & (state.done | (state.row_step >= config.max_steps))
        results = harvest(results, state, rows, finished)
        incoming = next_prompt + jnp.cumsum(finished) - 1  # finished slots take the next prompts in order
        take = finished & (incoming < count)
        rows = jnp.where(take, incoming, rows).astype(jnp.int32)
        state = state.replace(done=state.done | finished)  # a slot stopped at max_steps is idle too
        state, carry = jax.lax.cond(jnp.any(take), lambda: refill(state, carry, jnp.minimum(rows, n - 1), take),
                                    lambda: (state, carry))
        live = (live & ~finished) | take
        return state, carry, results, live, rows, next_prompt + jnp.sum(take).astype(jnp.int32)

    loop = (state, carry, results, live, first.astype(jnp.int32), jnp.minimum(count, slots))
    _, _, results, _, _, _ = jax.lax.while_loop(cond, body, loop)
    return results


@functools.cache
def _decode_queue_with(compiler_options: tuple):
    """`_decode_queue` jitted with these XLA options."""
    return jax.jit(_decode_queue, static_argnames=("graphdef", "slots", "sampler", "config", "special", "placement",
                                                   "padded"), compiler_options=dict(compiler_options) or None)


def generate(model, prompt_tokens: Sequence[Sequence[int]] | np.ndarray, sampler, *, gen_length: int,
             block_length: int, key: jax.Array | None = None, tokenizer=None, attention_mask=None,
             special: SpecialIds | None = None, mesh=None, rules=None, compiler_options: dict | None = None,
             template=None, slots: int | None = None, count: int | None = None, **config_fields) -> DecodeResult:
    """Decodes a batch of prompts with `sampler`.

    Args:
      model: a `dllm.Transformer` (anything with the same call signature), or a plain function
        fn(tokens [B, L], attention_mask or None) -> logits [B, L, V] (`dllm.models.function`:
        decoded uncached, on one device).
      prompt_tokens: a list of token-id lists (left-padded here) or an int
        array [B, P] (then pass `attention_mask` for its padding).
      sampler: a `dllm.decoding.sampler.Sampler` (every sampler of the `samplers` package).
      gen_length, block_length: see `DecodeConfig`.
      key: one PRNG key (row i draws from fold_in(key, i)) or one key per
        prompt, shape [B] (`row_keys`); a row's tokens depend only on its
        prompt, its key and the settings, never on the other rows.
      tokenizer: source of the special ids (else the model config's).
      mesh, rules: decode sharded over a `jax.sharding.Mesh` (see
        `dllm.sharding`): parameters placed by the logical-axis `rules`
        (default `DEFAULT_RULES` restricted to the mesh's axes), prompt rows
        and the KV cache split over the batch axes (data, fsdp), cache heads
        over kv_heads' axis (tensor). The number of prompts must divide over
        the batch axes. Tokens equal the unsharded run's (tested on 8
        simulated devices; sharded reductions may reorder float sums, so
        an exact near-tie could in principle resolve differently).
      compiler_options: XLA options for compiling the decoding loop (default
        `COMPILER_OPTIONS`; {} for XLA's own defaults).
      template: infilling, int ids [B, gen_length] (a list of lists or an array): the generation
        canvas to start from, the mask id where tokens are to be filled and fixed tokens elsewhere
        (`prefix [MASK]* middle [MASK]* suffix`, any number of spans). Every sampler decodes it
        uncached or over the prefix/dual caches (refused: cache='block', end-of-text truncation);
        only masked positions are ever written. None: all masked.
      slots: continuous batching: the prompts decode through this many batch rows in one compiled
        loop; when a row finishes (no mask left, stopped, or after max_steps of its own steps) the
        next prompt takes its slot, with its own first step (a full forward that refreshes its
        cache row), key and sampler carry, so every row's tokens, nfe and trace equal its decode
        alone (tested). Fewer slots than prompts keeps the batch full under samplers whose rows
        finish at different steps (a static batch waits for its slowest row). None: one static
        batch of all prompts. With a mesh, `slots` must divide over the batch axes. Not with
        cache='block' (it prefills the whole batch at the loop's first step).
      count: with `slots`, decode only the first `count` prompts; the rest pad a queue of fixed length
        (one compile for every queue of an evaluation) and come back undecoded (nfe 0).
      config_fields: the other `DecodeConfig` fields (temperature, cfg_scale,
        eos_policy, noise_dtype, max_steps, record_confidence).

    Returns:
      DecodeResult with tokens [B, gen_length], nfe [B] and the trace.
    """
    model, config, sampler, special, tokens, mask, key, template = prepare(
        model, prompt_tokens, sampler, gen_length, block_length, key, tokenizer, attention_mask, special,
        config_fields, template)
    graphdef, params = nnx.split(model)
    padded = bool(np.any(np.asarray(mask) == 0))
    options = COMPILER_OPTIONS if compiler_options is None else compiler_options
    if count is not None and slots is None:
        raise ValueError(f"count={count!r} without slots: count is the number of real prompts of a continuous-"
                         "batching queue; allowed: count=None, or slots= as well")
    if slots is not None:
        check_slots(slots, config)
        count = tokens.shape[0] if count is None else count
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 < count <= tokens.shape[0]:
            raise ValueError(f"count={count!r}: allowed an int in 1..{tokens.shape[0]} (the prompts given)")
        return decode_queue(model, graphdef, params, tokens, mask, key, template, slots=slots, sampler=sampler,
                            config=config, special=special, padded=padded, mesh=mesh, rules=rules, options=options,
                            count=count)
    decode = _decode_with(tuple(sorted(options.items())))
    if mesh is None:
        return decode(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask), key, template,
                       sampler=sampler, config=config, special=special, padded=padded)
    placement = place_on_mesh(model, params, mesh, rules, config, tokens.shape[0], tokens.shape[1], "the prompt batch")
    tokens, mask = placement.put_batch((tokens, mask))
    if template is not None:
        template = placement.put_batch(template)
    key = jax.device_put(key, placement.replicated())
    return decode(graphdef, params, tokens, mask, key, template, sampler=sampler, config=config, special=special,
                   placement=placement, padded=padded)


def place_on_mesh(model, params, mesh, rules, config: DecodeConfig, rows: int, prompt_width: int, what: str):
    """The `dllm.sharding.Placement` of a decode of `rows` batch rows over `mesh`, after checking that
    the model, the rows and the KV cache divide over it (clear errors); `params` (the model's split
    state) are placed by the rules in place."""
    if isinstance(model, LogitsFunction):
        raise ValueError("a function model decodes on one device: it has no parameters to place; pass mesh=None")
    if model.layout.window_attention_impl == "pallas":
        raise ValueError("window_attention_impl='pallas' runs on one device (the kernel is not partitioned); "
                         "with a mesh use 'xla', 'cudnn' or None")
    if model.layout.fp8_weights:
        raise ValueError("Layout.fp8_weights decodes on one device (its FP8 GEMM kernel is not partitioned); "
                         "pass mesh=None, or load the model without fp8_weights")
    from dllm import sharding

    placement = sharding.Placement.of(mesh, rules)
    placement.check_batch(rows, what)
    width = prompt_width + config.gen_length
    empty = jax.eval_shape(lambda: cache_policy(config).init(model, rows, width, config))
    for leaf in jax.tree.leaves(empty)[:1]:
        placement.check("the KV cache", leaf.shape, CACHE_AXES[-leaf.ndim:])
    nnx.replace_by_pure_dict(params, jax.device_put(nnx.to_pure_dict(params), placement.param_shardings(model)))
    return placement


def check_slots(slots, config: DecodeConfig) -> None:
    """ValueError unless `slots` (continuous batching) is a positive int and the cache allows it."""
    if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 1:
        raise ValueError(f"slots={slots!r}: must be an int >= 1 (batch rows of continuous batching), or None "
                         "for one static batch")
    if config.cache == "block":
        raise ValueError("slots= with cache='block': the exact block cache prefills the whole batch at the loop's "
                         "first step, so a prompt cannot enter a slot later; allowed: cache='none' (or slots=None)")


def decode_queue(model, graphdef, params, tokens, mask, key, template, *, slots, sampler, config, special, padded,
                 mesh, rules, options, count=None) -> DecodeResult:
    """`generate`'s continuous batching (`_decode_queue`) on one device or over a mesh: the queue of
    prompts is replicated, the `slots` rows are split over the batch axes. `count`: decode only the
    first `count` prompts (a queue padded to a fixed length, so it compiles once)."""
    decode = _decode_queue_with(tuple(sorted(options.items())))
    count = tokens.shape[0] if count is None else count
    arguments = (jnp.asarray(tokens), jnp.asarray(mask), key, None if template is None else jnp.asarray(template),
                 jnp.asarray(count, jnp.int32))
    static = dict(slots=int(slots), sampler=sampler, config=config, special=special, padded=padded)
    if mesh is None:
        return decode(graphdef, params, *arguments, **static)
    placement = place_on_mesh(model, params, mesh, rules, config, int(slots), tokens.shape[1], "slots")
    arguments = jax.device_put(arguments, placement.replicated())
    return decode(graphdef, params, *arguments, placement=placement, **static)


def prepare(model, prompt_tokens, sampler, gen_length, block_length, key, tokenizer, attention_mask, special,
            config_fields, template=None):
    """`generate`'s and `steps`' checks and inputs: (model, config, bound sampler, special ids, tokens, mask,
    key, template); a plain function model comes back wrapped (`LogitsFunction`)."""
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler={sampler!r} is not a samplers.base.Sampler; build one with samplers.get_sampler(name)")
    config = resolve_cache(model, DecodeConfig(gen_length=gen_length, block_length=block_length, **config_fields))
    if tokenizer is not None:
        sampler = sampler.bind(tokenizer)  # token texts in sampler settings -> ids
    sampler.validate(config)
    check_block_alignment(model, config)
    if config.sub_block_cache and getattr(sampler, "sub_block_size", None) != config.sub_block_cache:
        raise ValueError(f"sub_block_cache={config.sub_block_cache} with {type(sampler).__name__}"
                         f"{'(size=' + str(sampler.sub_block_size) + ')' if hasattr(sampler, 'sub_block_size') else ''}"
                         ": a partial step computes the current sub-block's logits only; allowed: the sub_blocks "
                         f"sampler with size={config.sub_block_cache} (Fast-dLLM v2), or sub_block_cache=0")
    if model_block_of(model) is not None and getattr(sampler, "needs_whole_canvas", False):
        raise ValueError(f"{type(sampler).__name__} with a block-causal model: it reads or fills positions outside "
                         "the active block, and a block-causal decode computes the active block's logits only; "
                         "allowed: a rule that commits inside the block (threshold, low_confidence_dynamic, ...)")
    if not isinstance(model, nnx.Module) and callable(model):  # a function tokens -> logits
        if special is None and tokenizer is None:
            raise ValueError("a function model has no config: pass tokenizer= or special=SpecialIds(...)")
        width = pad_prompts(prompt_tokens, (special or resolve_special_ids(None, tokenizer)).pad)[0].shape[1]
        model = LogitsFunction.of(model, jnp.zeros((1, width + gen_length), jnp.int32))
    model_config = getattr(model, "config", None)
    if config.cache == "elastic" and model_config is not None and (
            model_config.attention != "bidirectional" or model_config.token_shift):
        raise ValueError(f"cache='elastic' with ModelConfig.attention={model_config.attention!r}, token_shift="
                         f"{model_config.token_shift}: Elastic-Cache is built for bidirectional models without token "
                         "shift (LLaDA); allowed here: cache='none' over the same sliding window")
    if isinstance(model, LogitsFunction) and config.cache != "none":
        raise ValueError(f"cache={config.cache!r} with a function model: it has no K/V to cache; allowed: cache='none'")
    special = resolve_special_ids(model, tokenizer, special)
    tokens, mask = pad_prompts(prompt_tokens, special.pad)
    if attention_mask is not None:
        mask = np.asarray(attention_mask, np.int32)
        if mask.shape != tokens.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != prompt_tokens shape {tokens.shape}")
    if tokens.shape[1] == 0 or np.any(mask.sum(-1) == 0):
        raise ValueError("a prompt is empty: every prompt needs at least one token")
    limit = model.config.max_seq_len
    if tokens.shape[1] + gen_length > limit:
        raise ValueError(
            f"prompt length {tokens.shape[1]} + gen_length {gen_length} = {tokens.shape[1] + gen_length} "
            f"exceeds the model's context of {limit} tokens"
        )
    vocab = model.config.vocab_size
    real = tokens[mask == 1]
    if real.size and (real.min() < 0 or real.max() >= vocab):
        raise ValueError(f"prompt token ids must lie in [0, {vocab}); found {real.min()}..{real.max()}")
    if np.any(real == special.mask):
        raise ValueError(f"a prompt contains the mask token id {special.mask}; prompts must be fully observed "
                         "(to fill positions, give the generation canvas as template=, [MASK] where to fill)")
    wrapped = list(sampler_chain(sampler))
    for outer, inner in zip(wrapped, wrapped[1:]):
        if type(inner).draft_canvases is not Sampler.draft_canvases:
            raise ValueError(f"{type(outer).__name__} wraps {type(inner).__name__}, which verifies draft canvases: "
                             f"its forward is not the one the wrapper passes on; allowed: {type(inner).__name__} "
                             "as the outermost sampler")
    if template is not None:
        template = check_template(template, tokens.shape[0], gen_length, vocab, special)
        if config.cache == "block":
            raise ValueError("template= with cache='block': a fully fixed block is skipped, and the exact block "
                             "cache writes each block's K/V as the next one starts; allowed: cache='none' with "
                             "a block-causal model")
        for rule in wrapped:
            if rule.writes_end_of_text:
                raise ValueError(f"template= with {type(rule).__name__}: its end-of-text prediction writes EOS over "
                                 "the masked tail, cutting off the template's fixed tokens after it; allowed: a "
                                 "sampler without end-of-text truncation")
            check = getattr(rule, "check_template", None)
            if check is not None:
                check(template, special)
    key = jax.random.key(0) if key is None else key
    return model, config, sampler, special, tokens, mask, row_keys(key, tokens.shape[0]), template


def sampler_chain(sampler):
    """The sampler, then each rule it wraps (`inner`), outermost first."""
    while isinstance(sampler, Sampler):
        yield sampler
        sampler = getattr(sampler, "inner", None)


def check_template(template, batch: int, gen_length: int, vocab: int, special: SpecialIds) -> np.ndarray:
    """The infilling template as int32 [B, gen_length], or a ValueError naming what is wrong."""
    try:
        out = np.asarray(template, np.int32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"template must be int ids [batch, gen_length]: {error}") from None
    if out.shape != (batch, gen_length):
        raise ValueError(f"template shape {out.shape}: must be (batch, gen_length) = ({batch}, {gen_length})")
    if out.min() < 0 or out.max() >= vocab:
        raise ValueError(f"template ids must lie in [0, {vocab}); found {out.min()}..{out.max()}")
    if not np.any(out == special.mask):
        raise ValueError(f"template has no mask token (id {special.mask}) to fill: nothing would be decoded")
    return out


@dataclasses.dataclass(frozen=True)
class Step:
    """One forward pass of a decode, as `steps` yields it (host arrays).

    index: the step (0-based); nfe after it = index + 1 for unfinished rows.
    tokens: int32 [B, G], the generation canvas after this step's commits.
    logits: float32 [B, G or block_length, V], what the sampler read (the
      active blocks only for window-only samplers, `uses_window_logits`;
      [B, n, G, V] for a sampler that verifies n draft canvases).
    commit: the sampler's `Commit` (tokens, commit mask, confidence, ...).
    committed: bool [B, G], the positions this step actually wrote.
    done: bool [B], rows finished after this step.
    state: the `DecodeState` after the step (device arrays), for anything else.
    """

    index: int
    tokens: np.ndarray
    logits: np.ndarray
    commit: object
    committed: np.ndarray
    done: np.ndarray
    state: DecodeState


def steps(model, prompt_tokens, sampler, *, gen_length: int, block_length: int, key=None, tokenizer=None,
          attention_mask=None, special: SpecialIds | None = None, template=None, **config_fields):
    """Steps through a decode one forward pass at a time: yields a `Step` per NFE.

    The same inputs, checks and tokens as `generate` (tested): each step is
    `decode_step`, the loop body `generate` compiles, here jitted alone and
    driven from Python, so a notebook can stop anywhere and read the logits,
    the confidences and the commits. Slower than `generate` (one dispatch and
    one host copy per step); one device, no mesh.

        for s in dllm.decoding.steps(model, [tokens], sampler, gen_length=24, block_length=8, tokenizer=tok):
            print(s.index, s.committed.sum(), s.commit.confidence.max())
    """
    model, config, sampler, special, tokens, mask, key, template = prepare(
        model, prompt_tokens, sampler, gen_length, block_length, key, tokenizer, attention_mask, special,
        config_fields, template)
    padded = bool(np.any(np.asarray(mask) == 0))
    graphdef, params = nnx.split(model)

    @jax.jit
    def start(tokens, mask, key, template):
        state = initial_state(tokens, mask, key, config, special, model, template)
        return state, sampler.init(state)

    @jax.jit
    def advance(params, state, carry):
        before = state.gen_tokens
        state, carry, logits, commit = decode_step(nnx.merge(graphdef, params), state, carry, sampler=sampler,
                                                   padded=padded)
        return state, carry, logits, commit, state.gen_tokens != before

    state, carry = start(jnp.asarray(tokens), jnp.asarray(mask), key, template)
    index = 0
    while index < config.max_steps and not bool(jnp.all(state.done)):
        state, carry, logits, commit, committed = advance(params, state, carry)
        yield Step(index=index, tokens=np.asarray(state.gen_tokens), logits=np.asarray(logits), commit=commit,
                   committed=np.asarray(committed), done=np.asarray(state.done), state=state)
        index += 1
