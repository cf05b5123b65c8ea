"""KV cache plumbing: exact where staleness cannot matter, clear errors otherwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dllm
import samplers
from dllm.decoding import SpecialIds
from tests.helpers import refusal, registered_samplers

SPECIAL = SpecialIds(mask=39, eos=38, eot=38, pad=0)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11]]


def make_model(arch, n_layers):
    config = dllm.ModelConfig(arch=arch, vocab_size=40, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                              mlp_hidden=64, qkv_bias=arch == "dream", token_shift=arch == "dream")
    model = dllm.Transformer(config, rngs=nnx.Rngs(3))
    model.lm_head[...] = model.lm_head[...] * 40.0  # spread logits away from ties
    return model


def decode(model, sampler, **kw):
    r = dllm.generate(model, PROMPTS, sampler, gen_length=16, block_length=8, special=SPECIAL, **kw)
    return np.asarray(r.tokens), np.asarray(r.nfe)


def all_samplers():
    return list(registered_samplers(delimiter_id=38).values())


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("mode", ["prefix", "dual", "dkv"])
def test_one_layer_cache_is_exact(arch, mode):
    """With one layer, K/V depend only on each position's own token, and tokens
    outside the window do not change between refreshes: the cache is exact, so
    any plumbing error (RoPE positions, offsets, token shift, masks) shows."""
    model = make_model(arch, 1)
    for sampler in all_samplers():
        if refusal(sampler, cache=mode):  # self_speculative runs uncached only
            with pytest.raises(ValueError, match=f"cache='{mode}'"):
                decode(model, sampler, cache=mode)
            continue
        expected = decode(model, sampler)
        got = decode(model, sampler, cache=mode)
        np.testing.assert_array_equal(got[0], expected[0], err_msg=f"{sampler} {mode}")
        np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("mode", ["prefix", "dual", "dkv"])
def test_refresh_every_step_equals_uncached(mode):
    model = make_model("llada", 2)
    expected = decode(model, samplers.LowConfidence())
    got = decode(model, samplers.LowConfidence(), cache=mode, cache_refresh_every=1)
    np.testing.assert_array_equal(got[0], expected[0])


def test_window_forward_matches_full_forward():
    model = make_model("llada", 2)
    tokens = jnp.array([[0, 0, 5, 6, 7, 39, 39, 39, 39, 39], [4, 5, 6, 7, 8, 9, 39, 39, 39, 39]], jnp.int32)
    mask = jnp.array([[0, 0] + [1] * 8, [1] * 10], jnp.int32)
    full = model(tokens, mask)
    empty = model.empty_cache(2, 14)
    _, cache = model.forward(tokens, mask, logits_start=0, logits_length=10, cache=empty)
    start = jnp.array([5, 6], jnp.int32)
    positions = jnp.pad(dllm.models.transformer.positions_from_mask(mask), ((0, 0), (0, 4)))
    key_mask = jnp.pad(mask, ((0, 0), (0, 4)))
    logits, _ = model.forward_window(jnp.pad(tokens, ((0, 0), (0, 4))), positions, cache, key_mask, start=start,
                                     queries=3, logits_count=3)
    np.testing.assert_allclose(logits[0], full[0, 5:8], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[1], full[1, 6:9], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_columns_forward_matches_full_forward(arch):
    """Any set of columns recomputed over a cache that holds this canvas's own K/V gives the full
    forward's logits there (gather, RoPE positions, padding, the scattered writes); a column's
    logits predict the next column under token shift."""
    model = make_model(arch, 2)
    tokens = jnp.array([[0, 0, 5, 6, 7, 39, 39, 39, 39, 39], [4, 5, 6, 7, 8, 9, 39, 39, 39, 39]], jnp.int32)
    mask = jnp.array([[0, 0] + [1] * 8, [1] * 10], jnp.int32)
    full = model(tokens, mask)  # [B, 10, V]: position i's logits (from hidden i - 1 under token shift)
    _, cache = model.forward(tokens, mask, logits_start=0, logits_length=10, cache=model.empty_cache(2, 14))
    positions = dllm.models.transformer.positions_from_mask(mask)
    positions = jnp.concatenate([positions, positions[:, -1:] + 1 + jnp.arange(4)[None, :]], axis=1)
    columns = jnp.array([[3, 5, 8, 10], [0, 6, 7, 9]], jnp.int32)  # row 0's last slot: the hidden tail
    logits, written = model.forward_columns(jnp.pad(tokens, ((0, 0), (0, 4)), constant_values=39), positions, cache,
                                            jnp.pad(mask, ((0, 0), (0, 4))), columns=columns,
                                            logits_at=jnp.array([[0, 1, 2], [1, 2, 3]], jnp.int32))
    shift = int(model.config.token_shift)
    for row, used in ((0, [3, 5, 8]), (1, [6, 7, 9])):
        for slot, column in enumerate(used):
            if column + shift < 10:
                np.testing.assert_allclose(logits[row, slot], full[row, column + shift], rtol=1e-4, atol=1e-4)
    for new, old in zip(jax.tree.leaves(written), jax.tree.leaves(cache)):  # rewritten with the same K/V
        np.testing.assert_allclose(np.asarray(new)[..., :10, :, :], np.asarray(old)[..., :10, :, :], atol=1e-5)


def dkv_state(commit_step, gen_tokens, step, step_in_block, refresh_every=0):
    from dllm.decoding.engine import initial_state
    from dllm.decoding.state import DecodeConfig

    config = DecodeConfig(gen_length=6, block_length=3, cache="dkv", cache_refresh_every=refresh_every)
    state = initial_state(jnp.array([[1, 2]] * len(gen_tokens), jnp.int32), jnp.ones((len(gen_tokens), 2), jnp.int32),
                          jax.random.key(0), config, SPECIAL)
    gen = jnp.array(gen_tokens, jnp.int32)
    return state.replace(tokens=state.tokens.at[:, 2:].set(gen), commit_step=jnp.array(commit_step, jnp.int32),
                         step=jnp.array(step, jnp.int32), step_in_block=jnp.array(step_in_block, jnp.int32),
                         nfe=jnp.full((len(gen_tokens),), step, jnp.int32))  # the row step of rows started together


def test_dkv_recomputes_the_masked_and_the_just_decoded():
    """Hand-worked (the authors' `~prv_transfer_idx`): at step 3, a token committed at step 2 is
    recomputed once more, one committed at step 1 (or a fixed template token, step -1) is served
    from the cache, every [MASK] is recomputed; under token shift also the column before each [MASK]."""
    from dllm.decoding.cache import dkv_recomputed

    m = SPECIAL.mask
    state = dkv_state([[1, 2, -1, -1, -1, -1]], [[7, 8, m, 9, m, m]], step=3, step_in_block=[0])
    np.testing.assert_array_equal(dkv_recomputed(state, 0)[0], [0, 0, 0, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(dkv_recomputed(state, 1)[0], [0, 0, 0, 1, 1, 1, 1, 1])
    first = dkv_state([[-1] * 6], [[m] * 6], step=0, step_in_block=[0])  # step 0: nothing "just" decoded
    np.testing.assert_array_equal(dkv_recomputed(first, 1)[0], [0, 1, 1, 1, 1, 1, 1, 1])


def test_dkv_full_forwards_at_the_first_two_steps_of_a_block_and_every_reload():
    from dllm.decoding.cache import CACHE_POLICIES, dkv_query_sizes
    from dllm.decoding.state import DecodeConfig

    policy, m = CACHE_POLICIES["dkv"], SPECIAL.mask
    rows = [[m] * 6] * 6
    never = dkv_state([[-1] * 6] * 6, rows, step=9, step_in_block=[0, 1, 2, 3, 4, 6])
    np.testing.assert_array_equal(policy.rows_to_refresh(never), [1, 1, 0, 0, 0, 0])
    every = dkv_state([[-1] * 6] * 6, rows, step=9, step_in_block=[0, 1, 2, 3, 4, 6], refresh_every=2)
    np.testing.assert_array_equal(policy.rows_to_refresh(every), [1, 1, 1, 0, 1, 1])
    assert dkv_query_sizes(DecodeConfig(gen_length=256, block_length=32), 1) == (257, 128, 64, 32)
    assert dkv_query_sizes(DecodeConfig(gen_length=24, block_length=8), 0) == (24, 12)
    assert dkv_query_sizes(DecodeConfig(gen_length=64, block_length=1), 0) == (64, 32, 16, 8)


def test_dkv_rows_decode_as_they_do_alone():
    """Rows at different progress take different query sizes (and full forwards): a row's tokens
    are those it decodes alone."""
    model = make_model("llada", 2)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    run = lambda rows: np.asarray(dllm.generate(model, [prompts[r] for r in rows], samplers.Threshold(tau=0.3),
                                                gen_length=16, block_length=4, special=SPECIAL,
                                                cache="dkv").tokens)
    together = run([0, 1, 2])
    for r in range(3):
        np.testing.assert_array_equal(run([r])[0], together[r])


def test_deeper_model_cache_is_approximate_but_terminates():
    model = make_model("llada", 2)
    tokens, nfe = decode(model, samplers.LowConfidence(), cache="dual")
    assert not np.any(tokens == SPECIAL.mask) and np.all(nfe == 16)


def test_bad_cache_settings():
    model = make_model("llada", 1)
    with pytest.raises(ValueError, match=r"cache='kv': allowed \('none', 'prefix', 'dual', 'block', 'dkv', 'elastic', 'auto'\)"):
        decode(model, samplers.LowConfidence(), cache="kv")
    with pytest.raises(ValueError, match="cache_window=32: allowed 1..gen_length=16"):
        decode(model, samplers.LowConfidence(), cache="dual", cache_window=32)
    with pytest.raises(ValueError, match="classifier-free guidance runs without a cache"):
        decode(model, samplers.LowConfidence(), cache="dual", cfg_scale=1.0)
    with pytest.raises(ValueError, match="cache_refresh_every=-1"):
        decode(model, samplers.LowConfidence(), cache="dual", cache_refresh_every=-1)


def test_place_logits_puts_each_row_at_its_start_and_drops_the_overhang():
    """Window logits land at their generation positions; a window running past G
    loses its tail; every other position is zero."""
    from dllm.decoding.cache import place_logits

    logits = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2) + 1.0  # [B=2, L=3, V=2]
    placed = np.asarray(place_logits(logits, jnp.array([1, 4]), 6))
    expected = np.zeros((2, 6, 2), np.float32)
    expected[0, 1:4] = np.asarray(logits[0])
    expected[1, 4:6] = np.asarray(logits[1, :2])  # positions 4, 5; position 6 is past G
    np.testing.assert_array_equal(placed, expected)


def test_write_rows_writes_each_row_at_its_start_clamped_like_dynamic_update_slice():
    """The cache write is one in-bounds scatter; a start past S - Q is clamped, as
    `dynamic_update_slice` clamps (the vmapped form it replaced)."""
    from dllm.models.transformer import write_rows

    cache = jnp.zeros((3, 10, 2))
    update = jnp.ones((3, 4, 2)) * jnp.arange(1, 4)[:, None, None]
    written = np.asarray(write_rows(cache, update, jnp.array([0, 8, 3])))
    expected = np.zeros((3, 10, 2))
    expected[0, 0:4], expected[1, 6:10], expected[2, 3:7] = 1, 2, 3  # row 1: start 8 -> 6
    np.testing.assert_array_equal(written, expected)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_refresh_into_an_existing_cache_writes_the_canvas_and_keeps_the_tail(scan_layers):
    """forward(cache=...) (the decoder's refresh) writes the canvas's K/V in
    place from column 0, as a fresh cache would hold them, and leaves the tail alone."""
    from dllm.checkpoints import model_from_params
    from dllm.models.transformer import canonical_params

    model = make_model("llada", 2)
    model = model_from_params(model.config, canonical_params(model), dllm.Layout(scan_layers=scan_layers))
    tokens = jnp.array([[4, 5, 6, 7, 8, 9, 39, 39]], jnp.int32)
    logits, fresh = model.forward(tokens, None, logits_start=0, logits_length=8,
                                  cache=model.empty_cache(1, 12))
    old = model.empty_cache(1, 12)
    old = jax.tree.map(lambda a: a + 7.0, old)  # a stale tail to keep
    again, written = model.forward(tokens, None, logits_start=0, logits_length=8, cache=old)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(logits))
    for new, ref in zip(jax.tree.leaves(written), jax.tree.leaves(fresh)):
        np.testing.assert_array_equal(np.asarray(new)[..., :8, :, :], np.asarray(ref)[..., :8, :, :])
        assert np.all(np.asarray(new)[..., 8:, :, :] == 7.0)
