"""The Pallas window attention (`dllm.models.window_attention`), run in Pallas's
interpreter on CPU: it equals XLA's attention (key mask, key length, a column
limit per query, GQA, split-K plans), its fused cache write equals `write_rows`, a decode through it gives the
XLA path's tokens, and bad arguments are refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dllm
import samplers
from dllm.models.transformer import window_attention_impl, write_rows
from dllm.models.window_attention import combine_splits, default_splits, split_plan, window_attention
from tests.test_cache import PROMPTS, SPECIAL


def reference(q, k, v, key_mask, key_length):
    allowed = jnp.ones(k.shape[:2], bool) if key_mask is None else key_mask.astype(bool)
    allowed = allowed & (jnp.arange(k.shape[1]) < key_length)[None]
    return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None, None, :], implementation="xla")


def draw(batch, queries, heads, kv_heads, head_dim, length, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (batch, queries, heads, head_dim))
    k, v = (jax.random.normal(keys[i], (batch, length, kv_heads, head_dim)) for i in (1, 2))
    key_mask = (jax.random.uniform(keys[3], (batch, length)) > 0.3).astype(jnp.int32)
    new_k, new_v = (jax.random.normal(keys[i], (batch, queries, kv_heads, head_dim)) for i in (4, 5))
    return q, k, v, key_mask, (new_k, new_v)


# (batch, queries, heads, kv_heads, head_dim, cache length, key_length, splits, block_k)
SHAPES = [(2, 8, 4, 4, 16, 40, 30, None, 16),   # MHA, the default split plan
          (1, 5, 4, 2, 32, 70, 70, 2, 32),      # GQA, 2 x 5 rows padded to 16, the whole cache
          (3, 8, 8, 2, 16, 100, 90, 3, 16),     # 4 query heads per KV head, 3 splits
          (1, 16, 2, 1, 16, 48, 44, 1, 16),     # one KV head, one split
          (2, 33, 8, 2, 16, 100, 96, 2, 16),    # 4 x 33 rows per KV head in 3 row blocks; the window crosses splits
          (1, 33, 14, 2, 16, 70, 66, None, 16),  # Qwen2.5-7B's groups of 7: 231 rows, 4 blocks, the last one part padding
          (1, 65, 14, 2, 16, 160, 150, 2, 16)]  # a block's first step: 455 query rows, the window's block (128) past them


@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa-padded", "gqa-splits", "mqa-one-split", "row-blocks",
                                               "group-of-7", "window-of-65"])
@pytest.mark.parametrize("masked", [False, True], ids=["key-length", "key-mask"])
def test_equals_xla_attention_and_write_rows(shape, masked):
    batch, queries, heads, kv_heads, head_dim, length, key_length, splits, block_k = shape
    q, k, v, key_mask, new_kv = draw(batch, queries, heads, kv_heads, head_dim, length)
    key_mask = key_mask if masked else None
    out = window_attention(q, k, v, key_mask, key_length=key_length, splits=splits, block_k=block_k)
    np.testing.assert_allclose(out, reference(q, k, v, key_mask, key_length), atol=2e-6)

    # length - 2: clamped to length - queries, as write_rows does; 40: the window spans both splits of row-blocks
    start = jnp.array([3, length - 2, 10][:batch] if queries < 33 else [40, length - 2][:batch])
    out, new_k, new_v = window_attention(q, k, v, key_mask, new_kv, start, key_length=key_length, splits=splits,
                                         block_k=block_k)
    written_k, written_v = write_rows(k, new_kv[0], start), write_rows(v, new_kv[1], start)
    np.testing.assert_array_equal(new_k, written_k)
    np.testing.assert_array_equal(new_v, written_v)
    np.testing.assert_allclose(out, reference(q, written_k, written_v, key_mask, key_length), atol=2e-6)


@pytest.mark.parametrize("shape", SHAPES[1:3] + SHAPES[4:], ids=["gqa-padded", "gqa-splits", "row-blocks",
                                                                   "group-of-7", "window-of-65"])
def test_a_column_limit_per_query_equals_xla_with_the_pair_mask(shape):
    """key_limit: query q sees columns < limit[b, q] (the block-causal window), with the key mask,
    the key length and the fused write, against XLA's attention under the [B, Q, S] pair mask."""
    batch, queries, heads, kv_heads, head_dim, length, key_length, splits, block_k = shape
    q, k, v, key_mask, new_kv = draw(batch, queries, heads, kv_heads, head_dim, length, seed=1)
    key_mask = key_mask.at[:, 0].set(1)  # every query keeps a key
    limit = jax.random.randint(jax.random.key(2), (batch, queries), 1, length + 1)
    start = jnp.array([3, length - 2, 10][:batch] if queries < 33 else [40, length - 2][:batch])
    out, new_k, new_v = window_attention(q, k, v, key_mask, new_kv, start, key_length=key_length, key_limit=limit,
                                         splits=splits, block_k=block_k)
    written_k, written_v = write_rows(k, new_kv[0], start), write_rows(v, new_kv[1], start)
    pairs = key_mask.astype(bool)[:, None, :] & (jnp.arange(length)[None, None, :] < limit[:, :, None])
    pairs = pairs & (jnp.arange(length) < key_length)
    expected = jax.nn.dot_product_attention(q, written_k, written_v, mask=pairs[:, None], implementation="xla")
    np.testing.assert_allclose(out, expected, atol=2e-6)
    np.testing.assert_array_equal(new_k, written_k)


def test_a_column_limit_without_key_mask_or_cache_write_equals_xla():
    """key_limit alone with a key length (an unpadded batch: no key mask) and no fused write."""
    q, k, v, _, _ = draw(2, 8, 4, 2, 16, 40, seed=3)
    limit = jax.random.randint(jax.random.key(4), (2, 8), 1, 41)
    out = window_attention(q, k, v, key_length=33, key_limit=limit, block_k=16)
    pairs = (jnp.arange(40)[None, None, :] < limit[:, :, None]) & (jnp.arange(40) < 33)
    expected = jax.nn.dot_product_attention(q, k, v, mask=pairs[:, None], implementation="xla")
    np.testing.assert_allclose(out, expected, atol=2e-6)


def test_bfloat16_cache_matches_xla_to_bfloat16_precision():
    q, k, v, key_mask, _ = draw(1, 8, 4, 4, 16, 64, 1)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = window_attention(q, k, v, key_mask, key_length=60, block_k=16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(reference(q, k, v, key_mask, 60), np.float32), atol=2e-2)


def test_split_plan_covers_the_keys_in_whole_blocks():
    for key_length, splits, block_k in [(512, 4, 128), (512, 8, 128), (545, 4, 64), (30, 8, 16)]:
        programs, per_split = split_plan(key_length, splits, block_k)
        assert per_split % block_k == 0 and programs <= splits
        assert (programs - 1) * per_split < key_length <= programs * per_split
    assert default_splits(32) == 4 and default_splits(128) == 1  # LLaDA-8B's 32 heads at batch 1; batch 4


def test_combine_splits_is_the_softmax_over_all_keys():
    scores = jax.random.normal(jax.random.key(0), (3, 2, 10))  # [rows, splits, keys per split]
    values = jax.random.normal(jax.random.key(1), (2, 10, 4))
    per_split = jnp.einsum("rsk,skd->srd", jax.nn.softmax(scores, -1), values)
    lse = jax.nn.logsumexp(scores, -1).T  # [splits, R]
    whole = jnp.einsum("rk,kd->rd", jax.nn.softmax(scores.reshape(3, 20), -1), values.reshape(20, 4))
    np.testing.assert_allclose(combine_splits(per_split, lse), whole, atol=1e-6)
    # a split that saw no key (the kernel writes zeros and lse HIDDEN) weighs nothing, first or last
    from dllm.models.window_attention import HIDDEN
    for at in (0, 2):
        padded = jnp.insert(per_split, at, 0.0, axis=0)
        np.testing.assert_allclose(combine_splits(padded, jnp.insert(lse, at, HIDDEN, axis=0)), whole, atol=1e-6)


def test_bad_arguments_name_the_value():
    q, k, v, key_mask, new_kv = draw(1, 8, 4, 4, 16, 40)
    with pytest.raises(ValueError, match="key_length=41: must lie in"):
        window_attention(q, k, v, key_length=41)
    with pytest.raises(ValueError, match="block_k=24: must be a power of two"):
        window_attention(q, k, v, block_k=24)
    with pytest.raises(ValueError, match="splits=0"):
        window_attention(q, k, v, splits=0)
    with pytest.raises(ValueError, match="key_mask shape"):
        window_attention(q, k, v, key_mask[:, :10])
    with pytest.raises(ValueError, match=r"key_limit shape \(1, 7\)"):
        window_attention(q, k, v, key_limit=jnp.ones((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="key_limit dtype float32: expected an integer"):
        window_attention(q, k, v, key_limit=jnp.ones((1, q.shape[1]), jnp.float32))
    with pytest.raises(ValueError, match="new_kv and start go together"):
        window_attention(q, k, v, new_kv=new_kv)
    q48, k48, v48, _, _ = draw(1, 8, 4, 4, 48, 40)
    with pytest.raises(ValueError, match="head_dim=48"):
        window_attention(q48, k48, v48)
    _, k3, v3, _, _ = draw(1, 8, 4, 3, 16, 40)
    with pytest.raises(ValueError, match="k cache float32 and v cache bfloat16: expected one dtype"):
        window_attention(q, k, v.astype(jnp.bfloat16), key_mask)
    with pytest.raises(ValueError, match="H a multiple of KV"):
        window_attention(q, k3, v3)
    with pytest.raises(ValueError, match=r"new_kv \(1, 7, 4, 16\)"):
        window_attention(q, k, v, None, (new_kv[0][:, :7], new_kv[1][:, :7]), jnp.zeros((1,), jnp.int32))


def test_pallas_with_a_mesh_is_refused():
    from dllm import sharding

    config = dllm.ModelConfig(vocab_size=40, d_model=64, n_layers=1, n_heads=4, mlp_hidden=64)
    model = dllm.Transformer(config, dllm.Layout(window_attention_impl="pallas"), rngs=nnx.Rngs(0))
    mesh_config = sharding.MeshConfig()
    with pytest.raises(ValueError, match="window_attention_impl='pallas' runs on one device"):
        dllm.generate(model, PROMPTS, samplers.LowConfidence(), gen_length=16, block_length=8, special=SPECIAL,
                      cache="dual", mesh=sharding.make_mesh(mesh_config), rules=mesh_config.rules)


def test_engine_decodes_the_xla_tokens_through_the_kernel():
    """Dual and prefix caches, padded and unpadded prompts, MHA and GQA (with
    Dream's qkv bias and token shift): the decode with window_attention_impl=
    'pallas' (the fused cache write) gives the tokens of the XLA path."""
    for arch, kv_heads in (("llada", 4), ("dream", 2)):
        config = dllm.ModelConfig(arch=arch, vocab_size=40, d_model=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads,
                                  mlp_hidden=64, qkv_bias=arch == "dream", token_shift=arch == "dream")
        model = dllm.Transformer(config, rngs=nnx.Rngs(3))
        model.lm_head[...] = model.lm_head[...] * 40.0  # spread logits away from ties
        for prompts in (PROMPTS, [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]):
            for cache in ("dual", "prefix"):
                runs = []
                for impl in ("xla", "pallas"):
                    model.layout = dllm.Layout(window_attention_impl=impl)
                    result = dllm.generate(model, prompts, samplers.Threshold(tau=0.5), gen_length=16,
                                           block_length=8, special=SPECIAL, cache=cache, key=jax.random.key(0))
                    runs.append((np.asarray(result.tokens), np.asarray(result.nfe)))
                np.testing.assert_array_equal(runs[1][0], runs[0][0], err_msg=f"{arch} {cache} {prompts}")
                np.testing.assert_array_equal(runs[1][1], runs[0][1])


@pytest.mark.parametrize("geometry", [(32, 32, 32, False), (33, 28, 4, False), (33, 28, 4, True), (65, 28, 4, True)],
                         ids=["llada-8b", "dream-7b", "fast-dllm-v2-7b-block-causal", "fast-dllm-v2-7b-first-step"])
def test_lowers_to_triton_for_cuda(geometry):
    """CI has no GPU: lowering for CUDA (jax.export, no device needed) runs the
    Pallas-to-Triton lowering of the kernel at the real decode shapes (bf16,
    head_dim 128, cache 545, key length 512, key mask and fused write; the
    block-causal window with its column limit per query), which is where an
    unsupported block shape or op would fail."""
    queries, heads, kv_heads, limited = geometry
    q = jax.ShapeDtypeStruct((1, queries, heads, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((1, 545, kv_heads, 128), jnp.bfloat16)
    fresh = jax.ShapeDtypeStruct((1, queries, kv_heads, 128), jnp.bfloat16)
    key_mask, start = jax.ShapeDtypeStruct((1, 545), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)
    limit = jax.ShapeDtypeStruct((1, queries), jnp.int32)

    def step(q, k, v, key_mask, new_k, new_v, start, limit):
        return window_attention(q, k, v, key_mask, (new_k, new_v), start, key_length=512,
                                key_limit=limit if limited else None, interpret=False)

    exported = jax.export.export(jax.jit(step), platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(q, cache, cache, key_mask, fresh, fresh,
                                                                              start, limit)
    assert "xla.gpu.triton" in exported.mlir_module()


def test_default_picks_the_kernel_on_one_gpu_only(monkeypatch):
    """None: the Pallas kernel for short windows on a single GPU when head_dim
    is a power of two; XLA's on CPU, on several devices (the kernel is not
    partitioned) and for other head sizes."""
    config, layout = dllm.ModelConfig(head_dim=128), dllm.Layout(attention_impl="cudnn")
    assert window_attention_impl(config, layout, 32) == "xla"  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert window_attention_impl(config, layout, 32) == "pallas" and window_attention_impl(config, layout, 256) == "cudnn"
    assert window_attention_impl(config.replace(head_dim=96), layout, 32) == "xla"
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    assert window_attention_impl(config, layout, 32) == "xla"
