"""Elastic-Cache (cache='elastic') and the sliding window it decodes: hand-worked windows and drift
statistic, one step against a layer-by-layer reference, exactness where staleness cannot matter, and
clear refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dllm
import samplers
from dllm.decoding import SpecialIds
from dllm.decoding.cache import CACHE_POLICIES
from dllm.decoding.engine import initial_state, sliding_window
from dllm.decoding.state import DecodeConfig
from dllm.models import transformer as tf
from tests.helpers import refusal, registered_samplers

SPECIAL = SpecialIds(mask=39, eos=38, eot=38, pad=0)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11]]


def make_model(n_layers, **fields):
    config = dllm.ModelConfig(arch="llada", vocab_size=40, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                              mlp_hidden=64, **fields)
    model = dllm.Transformer(config, rngs=nnx.Rngs(3))
    model.lm_head[...] = model.lm_head[...] * 40.0  # spread logits away from ties
    return model


def test_sliding_window_holds_the_first_masked_positions_of_their_block():
    config = DecodeConfig(gen_length=8, block_length=4, sliding_window=2)
    masked = jnp.array([[0, 1, 1, 0, 1, 1, 1, 1],   # first masked 1: positions 1, 2
                        [0, 1, 0, 0, 1, 1, 1, 1],   # only position 1 is left in its block: [1, 2)
                        [0, 0, 0, 0, 1, 0, 1, 1],   # next block: positions 4, 6
                        [0, 0, 0, 0, 0, 0, 0, 0]], bool)  # done: the empty window [8, 8)
    start, end = sliding_window(config, masked)
    np.testing.assert_array_equal(start, [1, 1, 4, 8])
    np.testing.assert_array_equal(end, [3, 2, 7, 8])
    whole = DecodeConfig(gen_length=8, block_length=8, sliding_window=3)  # the authors' setting: no blocks
    start, end = sliding_window(whole, masked)
    np.testing.assert_array_equal(start, [1, 1, 4, 8])
    np.testing.assert_array_equal(end, [5, 6, 8, 8])


def test_attention_similarity_by_hand():
    """Cosine over the head axis, averaged over tracked queries and real keys."""
    old = jnp.zeros((1, 2, 2, 3)).at[0, :, 0, 0].set(jnp.array([0.5, 1.0])).at[0, :, 0, 1].set(jnp.array([0.5, 0.0]))
    new = jnp.zeros((1, 2, 2, 3)).at[0, :, 0, 0].set(jnp.array([1.0, 0.5])).at[0, :, 0, 1].set(jnp.array([0.0, 0.5]))
    old = old.at[0, :, 1].set(0.3)  # query 1 is not tracked, key 2 is padding: neither counts
    tracked = jnp.array([[True, False]])
    key_mask = jnp.array([[1, 1, 0]])
    # key 0: (0.5 + 0.5) / (sqrt(1.25) sqrt(1.25)) = 0.8; key 1: 0 / (0.5 * 0.5) = 0
    np.testing.assert_allclose(tf.attention_similarity(old, new, tracked, key_mask), [0.4], rtol=1e-6)
    np.testing.assert_allclose(tf.attention_similarity(old, new, tracked & False, key_mask), [1.0])


def layer_by_layer(model, old_canvas, new_canvas, mask, columns, window, refresh_from):
    """Reference of one Elastic-Cache step after a full forward over `old_canvas` (one row): layers
    below `refresh_from` recompute `columns` over the old K/V elsewhere; from `refresh_from` on every
    column is recomputed, its input the old layer input with the columns' fresh values written in.
    Logits at the `window` columns."""
    c = model.config
    params = model.layer_params()
    layer = lambda i: {name: value[i] for name, value in params.items()}
    positions = tf.positions_from_mask(mask[None])[0]
    cos, sin = tf.rope_tables(positions[None], c.head_dim, c.rope_theta)

    def full_layer(x, p):
        q, k, v = tf.attention_qkv(x[None], p, c, cos, sin)
        att = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None, None, :].astype(bool))
        return tf.attention_out_and_mlp(x[None], att, p, c)[0], k[0], v[0]

    inputs, keys, values, x = [], [], [], model.embed_tokens(old_canvas[None])[0]
    for i in range(c.n_layers):  # the full forward that filled the cache
        inputs.append(x)
        x, k, v = full_layer(x, layer(i))
        keys.append(k)
        values.append(v)
    h = model.embed_tokens(new_canvas[None])[0]
    for i in range(c.n_layers):
        p = layer(i)
        if i >= refresh_from:
            x = inputs[i].at[columns].set(h[columns]) if i == refresh_from else h
            h, _, _ = full_layer(x, p)
            continue
        q, k, v = tf.attention_qkv(h[None], p, c, cos, sin)
        keys_i = keys[i].at[columns].set(k[0, columns])
        values_i = values[i].at[columns].set(v[0, columns])
        att = jax.nn.dot_product_attention(q, keys_i[None], values_i[None], mask=mask[None, None, None, :].astype(bool))
        h = h.at[columns].set(tf.attention_out_and_mlp(h[None], att, p, c)[0][columns])
    return model.hidden_to_logits(h[window][None])[0]


@pytest.mark.parametrize("gamma, refresh_from", [(-1.0, None), (2.0, 1)])
def test_one_step_equals_the_layer_by_layer_reference(gamma, refresh_from):
    """A step after the first forward, with one token decoded at the previous step: gamma -1 never
    refreshes (every layer over the cache), gamma 2 always does from layer 1 (the drift test at layer 0
    fails), against a reference built from the model's parts."""
    model = make_model(3)
    config = DecodeConfig(gen_length=8, block_length=8, cache="elastic", sliding_window=3, elastic_gamma=gamma)
    policy = CACHE_POLICIES["elastic"]
    tokens = jnp.array([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]], jnp.int32)
    mask = jnp.array([[0, 0, 1, 1, 1], [1] * 5], jnp.int32)
    state = initial_state(tokens, mask, jax.random.key(0), config, SPECIAL, model)
    first = policy.step_logits(model, state)
    gen = state.gen_tokens.at[:, 1].set(jnp.array([21, 22]))  # position 1 decoded at step 0
    start, end = sliding_window(config, gen == SPECIAL.mask)
    later = state.replace(tokens=state.tokens.at[:, 5:].set(gen), commit_step=state.commit_step.at[:, 1].set(0),
                          step=jnp.int32(1), nfe=jnp.ones(2, jnp.int32), block_start=start, block_end=end,
                          cache=first.cache)
    out = policy.step_logits(model, later)
    tracked = np.asarray(first.cache.tracked)[:, :13]
    assert tracked.any(axis=1).all()  # the first step picked the tokens to track
    for row in range(2):
        window = [5 + j for j in (0, 2, 3)]  # the first three masked positions
        columns = sorted(set(window) | {6} | set(np.flatnonzero(tracked[row])))
        expected = layer_by_layer(model, state.tokens[row], later.tokens[row], later.attention_mask[row],
                                  jnp.array(columns), jnp.array(window), refresh_from or model.config.n_layers)
        got = out.logits[row, [0, 2, 3]]
        np.testing.assert_allclose(got, jnp.where(jnp.arange(40) == SPECIAL.mask, -jnp.inf, expected),
                                   rtol=2e-4, atol=2e-4)
        np.testing.assert_array_equal(out.has_logits[row], [5 + j in columns for j in range(8)])


def decode(model, sampler, **kw):
    r = dllm.generate(model, PROMPTS, sampler, gen_length=16, block_length=8, special=SPECIAL, sliding_window=4,
                      **kw)
    return np.asarray(r.tokens), np.asarray(r.nfe)


def test_one_layer_elastic_cache_is_exact_for_every_sampler():
    """With one layer a column's K/V depend on its own token alone, and every changed token is
    recomputed: the elastic decode equals the uncached sliding-window decode for every sampler that
    reads only its window (credit, end-of-text, the learned filter and DINGO also read positions
    outside it, which an elastic step leaves without logits: they must finish), and the others
    refuse it."""
    model = make_model(1)
    for name, sampler in registered_samplers(delimiter_id=38).items():
        reason = refusal(sampler, cache="elastic", sliding_window=4)
        if reason:
            with pytest.raises(ValueError, match="sliding_window|cache='elastic'"):
                decode(model, sampler, cache="elastic")
            continue
        got = decode(model, sampler, cache="elastic")
        assert not np.any(got[0] == SPECIAL.mask), name
        if sampler.reads_only_window:  # the others read positions outside the window, which have no logits
            expected = decode(model, sampler)
            np.testing.assert_array_equal(got[0], expected[0], err_msg=name)
            np.testing.assert_array_equal(got[1], expected[1], err_msg=name)


def test_rows_decode_as_they_do_alone():
    model = make_model(2)
    sampler = samplers.Threshold(tau=0.7)
    batch = dllm.generate(model, PROMPTS, sampler, gen_length=16, block_length=16, special=SPECIAL, sliding_window=4,
                          cache="elastic", elastic_gamma=0.95, key=jax.random.key(1), temperature=1.0)
    for row, prompt in enumerate(PROMPTS):
        alone = dllm.generate(model, [prompt], sampler, gen_length=16, block_length=16, special=SPECIAL,
                              sliding_window=4, cache="elastic", elastic_gamma=0.95,
                              key=jax.random.fold_in(jax.random.key(1), row)[None], temperature=1.0)
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[row])
        assert alone.nfe[0] == batch.nfe[row]


def test_refusals():
    model = make_model(1)
    with pytest.raises(ValueError, match="cache='elastic' needs sliding_window > 0"):
        DecodeConfig(cache="elastic")
    with pytest.raises(ValueError, match="sliding_window=4 with cache='dual'"):
        DecodeConfig(cache="dual", sliding_window=4)
    with pytest.raises(ValueError, match="sliding_window=-1"):
        DecodeConfig(sliding_window=-1)
    with pytest.raises(ValueError, match="elastic_track=0"):
        DecodeConfig(cache="elastic", sliding_window=4, elastic_track=0)
    with pytest.raises(ValueError, match="elastic_gamma=5"):
        DecodeConfig(cache="elastic", sliding_window=4, elastic_gamma=5)
    with pytest.raises(ValueError, match="LowConfidence with sliding_window=4"):
        decode(model, samplers.LowConfidence())
    with pytest.raises(ValueError, match="token_shift=True"):
        decode(make_model(1, token_shift=True), samplers.Threshold(), cache="elastic")
    block_causal = make_model(1, attention="block_causal", block_size=4)
    with pytest.raises(ValueError, match="sliding_window=4 with a block-causal model"):
        decode(block_causal, samplers.Threshold(), cache="none")
