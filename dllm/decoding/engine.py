"""The decoding engine: one jitted `lax.while_loop` over `DecodeState`.

    canvas = [left-padded prompt | MASK * gen_length]
    while some row has a MASK and step < max_steps:
        logits = model(canvas)[generation region]        (one NFE; CFG doubles the batch)
        commit, carry = sampler.step(logits, state, carry)
        canvas = where(commit & masked & row unfinished, commit.tokens, canvas)
        advance each row's block when its window has no MASK left

Shapes are static; block offsets are traced per row, so nothing recompiles
per block, and rows move through blocks independently (a threshold sampler
may finish row 0's block before row 1's). Rows are left-padded: the
generation region is the same columns for every row, and RoPE positions
count only real tokens, so a padded row decodes exactly as it does alone.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm.decoding.state import DecodeConfig, DecodeResult, DecodeState, SpecialIds, Trace


def pad_prompts(prompts, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads a list of token sequences: (tokens [B, P], attention_mask [B, P])."""
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 2:
        tokens = np.asarray(prompts, np.int32)
        return tokens, np.ones_like(tokens)
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("prompt_tokens is empty: pass at least one prompt")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
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


def initial_state(tokens, attention_mask, key, config: DecodeConfig, special: SpecialIds) -> DecodeState:
    batch, width = tokens.shape
    g = config.gen_length
    canvas = jnp.concatenate([tokens, jnp.full((batch, g), special.mask, jnp.int32)], axis=1)
    mask = jnp.concatenate([attention_mask, jnp.ones((batch, g), jnp.int32)], axis=1)
    history = (jnp.zeros((config.max_steps, batch, g), jnp.float32) if config.record_confidence else None)
    return DecodeState(
        tokens=canvas, attention_mask=mask,
        block_start=jnp.zeros((batch,), jnp.int32),
        block_end=jnp.full((batch,), config.block_length, jnp.int32),
        step_in_block=jnp.zeros((batch,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        nfe=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
        commit_step=jnp.full((batch, g), -1, jnp.int32),
        committed_per_step=jnp.zeros((batch, config.max_steps), jnp.int32),
        confidence_history=history,
        key=key, config=config, special=special, prompt_width=width,
    )


def forward_logits(model, state: DecodeState) -> jax.Array:
    """Logits [B, G, V] of the generation region, with LLaDA's unsupervised CFG.

    The [MASK] token itself is never a valid proposal: its logit is -inf.
    (LLaDA relies on training for this; an untrained or under-trained model
    could otherwise "commit" [MASK] and make no progress.)
    """
    logits = _guided_logits(model, state)
    return logits.at[..., state.special.mask].set(-jnp.inf)


def _guided_logits(model, state: DecodeState) -> jax.Array:
    config, width = state.config, state.prompt_width
    call = functools.partial(model, logits_start=width, logits_length=config.gen_length)
    if config.cfg_scale == 0:
        return call(state.tokens, state.attention_mask)
    is_prompt = (jnp.arange(state.tokens.shape[1]) < width)[None, :] & (state.attention_mask == 1)
    unconditional = jnp.where(is_prompt, state.special.mask, state.tokens)
    both = call(jnp.concatenate([state.tokens, unconditional]), jnp.concatenate([state.attention_mask] * 2))
    cond, uncond = jnp.split(both, 2)
    return uncond + (config.cfg_scale + 1.0) * (cond - uncond)


def next_window(state: DecodeState, gen_tokens, block_end):
    """Moves a row whose window is fully decoded to the next block that still
    has a MASK (blocks already filled, e.g. by an early commit, are skipped)."""
    config, g = state.config, state.config.gen_length
    masked = gen_tokens == state.special.mask
    j = jnp.arange(g)
    window = (j >= state.block_start[:, None]) & (j < block_end[:, None])
    window_done = ~jnp.any(masked & window, axis=-1)
    after = masked & (j >= block_end[:, None])
    first_after = jnp.where(jnp.any(after, -1), jnp.argmax(after, axis=-1), g).astype(jnp.int32)
    skipped = (first_after - block_end) // config.block_length * config.block_length
    new_start = jnp.where(window_done, jnp.minimum(block_end + skipped, g), state.block_start)
    new_end = jnp.where(window_done, jnp.minimum(new_start + config.block_length, g), block_end)
    step_in_block = jnp.where(window_done, 0, state.step_in_block + 1)
    return new_start, new_end, step_in_block


def apply_commit(state: DecodeState, commit) -> DecodeState:
    """Writes committed tokens, updates the trace, the windows and `done`."""
    special, g = state.special, state.config.gen_length
    active = ~state.done
    gen = state.gen_tokens
    masked = gen == special.mask
    chosen = commit.commit & masked & active[:, None]
    gen = jnp.where(chosen, commit.tokens, gen)
    commit_step = jnp.where(chosen, state.step, state.commit_step)
    if commit.truncate_at is not None:  # end-of-text prediction
        beyond = (jnp.arange(g)[None, :] > commit.truncate_at[:, None]) & (gen == special.mask) & active[:, None]
        gen = jnp.where(beyond, special.eos, gen)
        commit_step = jnp.where(beyond, state.step, commit_step)
        chosen = chosen | beyond
    block_end = state.block_end if commit.block_end is None else jnp.where(active, commit.block_end, state.block_end)
    block_start, block_end, step_in_block = next_window(state, gen, block_end)
    finished = ~jnp.any(gen == special.mask, axis=-1)
    if commit.stop is not None:
        finished = finished | commit.stop
    history = state.confidence_history
    if history is not None and commit.confidence is not None:
        history = history.at[state.step].set(commit.confidence.astype(jnp.float32))
    return state.replace(
        tokens=state.tokens.at[:, state.prompt_width:].set(gen),
        block_start=block_start, block_end=block_end, step_in_block=step_in_block,
        step=state.step + 1,
        nfe=state.nfe + active.astype(jnp.int32),
        done=state.done | finished,
        commit_step=commit_step,
        committed_per_step=state.committed_per_step.at[:, state.step].set(chosen.sum(-1).astype(jnp.int32)),
        confidence_history=history,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "config", "special"))
def _decode(graphdef, params, tokens, attention_mask, key, *, sampler, config, special):
    model = nnx.merge(graphdef, params)
    state = initial_state(tokens, attention_mask, key, config, special)
    carry = sampler.init(state)

    def cond(loop):
        state, _ = loop
        return (state.step < config.max_steps) & ~jnp.all(state.done)

    def body(loop):
        state, carry = loop
        logits = forward_logits(model, state)
        commit, carry = sampler.step(logits, state, carry)
        return apply_commit(state, commit), carry

    state, _ = jax.lax.while_loop(cond, body, (state, carry))
    trace = Trace(state.commit_step, state.committed_per_step, state.confidence_history)
    return DecodeResult(tokens=state.gen_tokens, nfe=state.nfe, trace=trace)


def generate(model, prompt_tokens: Sequence[Sequence[int]] | np.ndarray, sampler, *, gen_length: int,
             block_length: int, key: jax.Array | None = None, tokenizer=None, attention_mask=None,
             special: SpecialIds | None = None, **config_fields) -> DecodeResult:
    """Decodes a batch of prompts with `sampler`.

    Args:
      model: a `dllm.Transformer` (anything with the same call signature).
      prompt_tokens: a list of token-id lists (left-padded here) or an int
        array [B, P] (then pass `attention_mask` for its padding).
      sampler: a `samplers.base.Sampler`.
      gen_length, block_length: see `DecodeConfig`.
      key: PRNG key; the same key gives the same tokens.
      tokenizer: source of the special ids (else the model config's).
      config_fields: the other `DecodeConfig` fields (temperature, cfg_scale,
        eos_policy, noise_dtype, max_steps, record_confidence).

    Returns:
      DecodeResult with tokens [B, gen_length], nfe [B] and the trace.
    """
    from samplers.base import Sampler

    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler={sampler!r} is not a samplers.base.Sampler; build one with samplers.get_sampler(name)")
    config = DecodeConfig(gen_length=gen_length, block_length=block_length, **config_fields)
    sampler.validate(config)
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
        raise ValueError(f"a prompt contains the mask token id {special.mask}; prompts must be fully observed")
    key = jax.random.key(0) if key is None else key
    graphdef, params = nnx.split(model)
    return _decode(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask), key,
                   sampler=sampler, config=config, special=special)
