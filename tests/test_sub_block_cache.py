"""Fast-dLLM v2's sub-block cache (`DecodeConfig.sub_block_cache`, v2's `use_block_cache`; issue 23).

A partial step forwards the current sub-block's queries over the cache, where the rest of the active
block keeps the K/V of its last whole-block forward. With one layer every K/V depends only on its own
token and position, and the only K/V that change between whole-block forwards are the current
sub-block's, which a partial step recomputes: the decode must then equal the uncached one token for
token (the independent route: every step a full forward). With more layers it is approximate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dllm
import samplers
from dllm.decoding import DecodeConfig, SpecialIds, steps
from dllm.decoding.cache import current_sub_block, sub_block_partial_rows
from experiments.common import REPO_ROOT
from tests.helpers import GRID_PROMPTS, make_state

pytestmark = pytest.mark.usefixtures("release_after_each_test")  # see tests/conftest.py
SPECIAL = SpecialIds(mask=39, eos=38, eot=37, pad=0)
PROMPTS = [[3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]


def block_model(token_shift: bool, n_layers: int):
    config = dllm.ModelConfig(arch="qwen3", qk_norm=True, vocab_size=40, d_model=32, n_layers=n_layers, n_heads=4,
                              n_kv_heads=2, mlp_hidden=64, attention="block_causal", block_size=8,
                              token_shift=token_shift, max_seq_len=64)
    model = dllm.Transformer(config, rngs=nnx.Rngs(1))
    model.lm_head[...] = model.lm_head[...] * 30.0  # confident enough that the bar commits several at once
    return model


def partial_rows(decode_steps) -> list[np.ndarray]:
    """Per step of a decode: the rows whose step was a partial forward (decided on the state before it)."""
    before = [None] + [s.state for s in decode_steps[:-1]]
    return [np.zeros(len(PROMPTS), bool) if state is None else np.asarray(sub_block_partial_rows(state, 4))
            for state in before]


def run(model, sampler, **fields):
    return list(steps(model, PROMPTS, sampler, gen_length=16, block_length=8, special=SPECIAL, **fields))


@pytest.mark.parametrize("token_shift", [False, True])
def test_one_layer_sub_block_cache_decodes_the_uncached_tokens(token_shift):
    model = block_model(token_shift, n_layers=1)
    sampler = samplers.SubBlocks(inner=samplers.Threshold(tau=0.5, strict=True), size=4)
    uncached, cached = run(model, sampler, cache="none"), run(model, sampler, cache="block", sub_block_cache=4)
    assert len(cached) == len(uncached)
    for full, step in zip(uncached, cached):
        np.testing.assert_array_equal(step.tokens, full.tokens)
    assert any(np.any(rows) for rows in partial_rows(cached))  # some steps forwarded one sub-block only
    assert not np.any(cached[-1].tokens == SPECIAL.mask)


def test_partial_steps_are_approximate_with_more_layers_and_still_finish():
    model = block_model(True, n_layers=3)
    sampler = samplers.SubBlocks(inner=samplers.Threshold(tau=0.5, strict=True), size=4)
    cached = run(model, sampler, cache="block", sub_block_cache=4)
    exact = run(model, sampler, cache="block")
    assert not np.any(cached[-1].tokens == SPECIAL.mask) and not np.any(exact[-1].tokens == SPECIAL.mask)
    # up to the first partial step the decodes are the same; its logits differ from the exact cache's
    # at the same canvas, in the rows that ran it (stale block K/V)
    partial = partial_rows(cached)
    first = next(i for i, rows in enumerate(partial) if np.any(rows))
    assert np.array_equal(cached[first - 1].tokens, exact[first - 1].tokens)
    rows = partial[first]
    before = cached[first - 1].state
    start, end = current_sub_block(before, 4)  # the sub-block the partial step forwarded
    width = cached[first].logits.shape[1]  # the window's logits (block_length) or the generation's
    j = np.arange(width)[None, :] + (np.asarray(before.window_offsets)[:, None] if width < 16 else 0)
    inside = (j >= np.asarray(start)[:, None]) & (j < np.asarray(end)[:, None]) & rows[:, None]
    assert inside.any()
    assert not np.allclose(cached[first].logits[inside], exact[first].logits[inside], atol=1e-3)


def test_trained_block_model_decodes_with_the_sub_block_cache():
    model, tokenizer = dllm.from_pretrained(REPO_ROOT / "checkpoints/tiny-block")
    sampler = samplers.get_sampler("sub_blocks", size=4)
    prompts = [tokenizer.encode(p) for p in GRID_PROMPTS]
    kw = dict(gen_length=24, block_length=8, tokenizer=tokenizer, cache="block")
    cached = dllm.generate(model, prompts, sampler, sub_block_cache=4, **kw)
    exact = dllm.generate(model, prompts, sampler, **kw)
    assert not np.any(np.asarray(cached.tokens) == tokenizer.mask_id)
    assert np.mean(np.asarray(cached.tokens) == np.asarray(exact.tokens)) > 0.8  # approximate, but close


def test_partial_rows_by_hand():
    """Blocks of 8, sub-blocks of 4. Row 0: its block's first step (whole forward). Row 1: the current
    sub-block [4, 8) starts at a committed position (partial). Row 2: it starts at a masked one
    (whole). Row 3: finished."""
    m = SPECIAL.mask
    gen = [[m, m, m, m, m, m, m, m],
           [1, 2, 3, 4, 5, m, m, m],
           [1, 2, 3, 4, m, 6, m, m],
           [1, 2, 3, 4, 5, 6, 7, 8]]
    state = make_state(gen, 0, 8, special=SPECIAL, block_length=8, step=3, step_in_block=[0, 2, 2, 2],
                       cache="block", sub_block_cache=4)
    state = state.replace(done=jnp.asarray([False, False, False, True]))
    start, end = current_sub_block(state, 4)
    np.testing.assert_array_equal(start[:3], [0, 4, 4])
    np.testing.assert_array_equal(end[:3], [4, 8, 8])
    np.testing.assert_array_equal(sub_block_partial_rows(state, 4), [False, True, False, False])


def test_bad_sub_block_cache_settings_are_refused():
    with pytest.raises(ValueError, match=r"sub_block_cache=4 with cache='dual': Fast-dLLM v2's sub-block cache"):
        DecodeConfig(gen_length=16, block_length=8, cache="dual", sub_block_cache=4)
    with pytest.raises(ValueError, match=r"sub_block_cache=3 does not divide block_length=8"):
        DecodeConfig(gen_length=16, block_length=8, cache="block", sub_block_cache=3)
    with pytest.raises(ValueError, match=r"sub_block_cache=4 with pipeline_blocks=2"):
        DecodeConfig(gen_length=16, block_length=8, cache="block", sub_block_cache=4, pipeline_blocks=2)
    with pytest.raises(ValueError, match=r"sub_block_cache=-1: must be an int >= 0"):
        DecodeConfig(gen_length=16, block_length=8, cache="block", sub_block_cache=-1)
    model = block_model(False, n_layers=1)
    with pytest.raises(ValueError, match=r"sub_block_cache=16 with a block-causal model of block_size=8: a "
                                         r"sub-block must not straddle model blocks"):
        dllm.generate(model, PROMPTS, samplers.SubBlocks(size=16), gen_length=16, block_length=16, special=SPECIAL,
                      cache="block", sub_block_cache=16)
    for sampler, named in ((samplers.Threshold(), "Threshold"), (samplers.SubBlocks(size=2), r"SubBlocks\(size=2\)")):
        with pytest.raises(ValueError, match=rf"sub_block_cache=4 with {named}: a partial step computes the current "
                                             r"sub-block's logits only; allowed: the sub_blocks sampler with size=4"):
            dllm.generate(model, PROMPTS, sampler, gen_length=16, block_length=8, special=SPECIAL, cache="block",
                          sub_block_cache=4)
