"""FP8 e4m3 weights (issue: speed round 2): the quantize/dequantize round trip within its error bound,
worked values, and a model whose GEMM weights are rounded (`from_pretrained(weight_rounding="fp8")`)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dllm
from dllm.models.quantize import CONTRACTION_AXES, dequantize_fp8, fp8_round_trip, quantize_fp8
from experiments.common import REPO_ROOT


def test_round_trip_error_is_within_half_a_step_of_e4m3():
    """|w - round trip| <= scale * max(2^-4 |w / scale|, 2^-10): half an ulp of e4m3's 3-bit mantissa for
    normal values, half the subnormal spacing 2^-9 below 2^-6; each channel's largest |w| maps to 448."""
    w = jax.random.normal(jax.random.key(0), (64, 4, 8)) * jnp.exp(jax.random.normal(jax.random.key(1), (64, 4, 8)))
    w8, scale = quantize_fp8(w, (0,))
    assert w8.dtype == jnp.float8_e4m3fn and scale.shape == (1, 4, 8)
    np.testing.assert_allclose(np.abs(np.asarray(w8, np.float32)).max(axis=0), 448.0)
    x = np.asarray(w / scale)
    bound = np.asarray(scale) * np.maximum(np.abs(x) * 2.0 ** -4, 2.0 ** -10)
    error = np.abs(np.asarray(dequantize_fp8(w8, scale)) - np.asarray(w))
    assert np.all(error <= bound * (1 + 1e-6)), (error / bound).max()
    assert error.max() > 0  # the rounding is real


def test_worked_values():
    """Channel max 448 * 0.5: scale 0.5. 224 -> 448 (exact); 1.0 -> 2 (exact); 0.3 -> 0.6, between
    the e4m3 neighbours 0.5625 and 0.625 (spacing 2^-4 in [0.5, 1)), nearest 0.625 -> 0.3125."""
    w = jnp.array([[224.0], [1.0], [0.3], [0.0]])
    w8, scale = quantize_fp8(w, (0,))
    assert float(scale[0, 0]) == 0.5
    np.testing.assert_array_equal(np.asarray(dequantize_fp8(w8, scale))[:, 0], [224.0, 1.0, 0.3125, 0.0])
    zero8, zero_scale = quantize_fp8(jnp.zeros((3, 2)), (0,))  # an all-zero channel: scale 1, zeros
    assert np.all(np.asarray(zero_scale) == 1.0) and np.all(np.asarray(zero8, np.float32) == 0.0)


def test_fp8_rounded_model_rounds_the_gemm_weights_only_and_still_decodes():
    path = REPO_ROOT / "checkpoints/tiny-tasks"
    model, tokenizer = dllm.from_pretrained(path, dtype="float32")
    rounded, _ = dllm.from_pretrained(path, dtype="float32", weight_rounding="fp8")
    from dllm.models.transformer import canonical_params

    before, after = canonical_params(model), canonical_params(rounded)
    for name, value in before.items():
        if name in CONTRACTION_AXES:
            np.testing.assert_array_equal(after[name], fp8_round_trip(value, CONTRACTION_AXES[name]))
            assert not np.array_equal(after[name], value), name
        else:  # embedding, norms
            np.testing.assert_array_equal(after[name], value, err_msg=name)
    prompt = [tokenizer.encode("copy : Ann Bob Cid Dan =>")]
    out = dllm.generate(rounded, prompt, dllm_sampler(), gen_length=24, block_length=8, tokenizer=tokenizer)
    assert not np.any(np.asarray(out.tokens) == tokenizer.mask_id)
    with pytest.raises(ValueError, match=r"weight_rounding='int4': allowed None or 'fp8'"):
        dllm.from_pretrained(path, weight_rounding="int4")


@pytest.mark.parametrize("layout", [dllm.Layout(fp8_weights=True),
                                    dllm.Layout(scan_layers=False, fused_projections=True, fp8_weights=True)],
                         ids=["scanned", "unrolled-fused"])
def test_fp8_weights_hold_the_fp8_bytes_and_compute_the_rounded_model(layout, monkeypatch):
    """Layout.fp8_weights: the GEMM weights held as float8 with float32 scales, whose logits equal those
    of the independent route (weight_rounding="fp8" in float32, where float(w8) * scale is exact: the
    round trip through XLA's einsum), through the Pallas kernel (<= 128 rows; a spy counts its calls)
    and through XLA's GEMM of the converted weight (more rows); canonical_params gives back the
    rounded weights; a dual-cache decode commits the same tokens."""
    from dllm.models import fp8_gemm
    from dllm.models.transformer import canonical_params

    calls = []
    kernel = fp8_gemm.fp8_matmul
    monkeypatch.setattr(fp8_gemm, "fp8_matmul", lambda *a, **k: calls.append(a[1].shape) or kernel(*a, **k))
    path = REPO_ROOT / "checkpoints/tiny-tasks"
    rounded, tokenizer = dllm.from_pretrained(path, dtype="float32", weight_rounding="fp8")
    fp8, _ = dllm.from_pretrained(path, dtype="float32", layout=layout)
    layer = fp8.layer_params()[0] if isinstance(fp8.layer_params(), list) else fp8.layer_params()
    gemms = [name for name in layer if name in CONTRACTION_AXES]
    assert len(gemms) >= 3 and all(layer[name].dtype == jnp.float8_e4m3fn for name in gemms)
    assert all(layer[name + "_scale"].dtype == jnp.float32 for name in gemms)
    assert fp8.lm_head[...].dtype == jnp.float8_e4m3fn
    for name, value in canonical_params(rounded).items():
        np.testing.assert_array_equal(canonical_params(fp8)[name], value, err_msg=name)
    # 2 x 16 = 32 rows: the kernel (the head's 57 columns do not tile: XLA); 3 x 48 = 144 > 128 rows: XLA
    for shape, through_the_kernel in (((2, 16), True), ((3, 48), False)):
        calls.clear()
        tokens = jax.random.randint(jax.random.key(shape[0]), shape, 3, 57)
        np.testing.assert_allclose(fp8(tokens), rounded(tokens), atol=1e-4, rtol=1e-4, err_msg=str(shape))
        assert bool(calls) == through_the_kernel, (shape, calls)
    prompts = [tokenizer.encode("copy : Ann Bob Cid Dan =>"), tokenizer.encode("sort : 3 1 2 =>")]
    runs = [dllm.generate(m, prompts, dllm_sampler(), gen_length=16, block_length=8, tokenizer=tokenizer,
                          cache="dual") for m in (rounded, fp8)]
    np.testing.assert_array_equal(np.asarray(runs[1].tokens), np.asarray(runs[0].tokens))


def test_fp8_kernel_and_xla_paths_agree_in_bfloat16(monkeypatch):
    """In the checkpoint's own dtypes (bfloat16 parameters), a row computed through the kernel (a batch of
    32 rows) and through XLA's GEMM (the same rows among 160) gives the same logits: both multiply by
    float(w8) and scale the float32 output."""
    path = REPO_ROOT / "checkpoints/tiny-tasks"
    fp8, _ = dllm.from_pretrained(path, layout=dllm.Layout(fp8_weights=True))
    assert fp8.config.weight_dtype == jnp.bfloat16
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 3, 57)
    alone, among_many = fp8(tokens), fp8(jnp.tile(tokens, (5, 1)))[:2]
    np.testing.assert_allclose(alone, among_many, atol=1e-3, rtol=1e-3)


def test_fp8_weights_with_grouped_query_attention_equal_the_rounded_model(tmp_path):
    """Dream's fixture (GQA, q/k/v biases): its fused q/k/v (`gqa_qkv_proj`) in FP8 gives the rounded
    model's logits."""
    from tests import hf_fixtures

    hf_fixtures.make_dream(tmp_path)
    rounded, _ = dllm.from_pretrained(tmp_path, dtype="float32", weight_rounding="fp8")
    fp8, _ = dllm.from_pretrained(tmp_path, dtype="float32", layout=dllm.Layout(
        scan_layers=False, fused_projections=True, fp8_weights=True))
    assert fp8.layer_params()[0]["gqa_qkv_proj"].dtype == jnp.float8_e4m3fn
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 3, rounded.config.vocab_size)
    np.testing.assert_allclose(fp8(tokens), rounded(tokens), atol=1e-4, rtol=1e-4)


def test_fp8_weights_bad_input():
    from dllm.models.quantize import fp8_einsum
    from dllm.training import check_training_layout

    with pytest.raises(ValueError, match=r"Layout.fp8_weights='yes': must be true or false"):
        dllm.Layout(fp8_weights="yes")
    with pytest.raises(ValueError, match=r"fp8_weights=True: training runs the checkpoints' parameters"):
        check_training_layout(dllm.Layout(fp8_weights=True))
    w8, scale = quantize_fp8(jnp.ones((16, 32)), (0,))
    with pytest.raises(ValueError, match=r"fp8_einsum: spec 'bd,fd->bf'"):
        fp8_einsum("bd,fd->bf", jnp.ones((2, 32)), w8.T, scale.T)
    import samplers
    from flax import nnx

    from dllm.decoding import SpecialIds
    from dllm.sharding import MeshConfig, make_mesh

    from types import SimpleNamespace

    eight_devices = SimpleNamespace(layout=SimpleNamespace(mesh=SimpleNamespace(size=8)))  # a Placer's mesh
    with pytest.raises(ValueError, match=r"Layout.fp8_weights on a mesh of 8 devices"):
        dllm.from_pretrained(REPO_ROOT / "checkpoints/tiny-tasks", place=eight_devices,
                             layout=dllm.Layout(fp8_weights=True))
    config = dllm.ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, mlp_hidden=64)
    model = dllm.Transformer(config, dllm.Layout(fp8_weights=True), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"Layout.fp8_weights decodes on one device"):
        dllm.generate(model, [[5, 6, 7]], samplers.Threshold(), gen_length=4, block_length=4,
                      special=SpecialIds(mask=63, eos=62, eot=62, pad=0),
                      mesh=make_mesh(MeshConfig(), devices=jax.devices()[:1]))


def dllm_sampler():
    import samplers

    return samplers.Threshold()


@pytest.mark.parametrize("rows, k, splits, transposed, dot_dtype", [
    (3, 512, None, False, None), (3, 512, 2, False, None), (20, 512, 1, False, None), (3, 768, 4, False, None),
    (5, 640, 4, False, None), (3, 640, 4, True, None), (20, 512, None, True, None), (3, 640, 4, False, "float16"),
    (5, 512, None, True, "float16")])
def test_fp8_matmul_equals_the_gemm_of_the_dequantized_weights(rows, k, splits, transposed, dot_dtype):
    """The Pallas kernel (interpreted on CPU) against numpy's float64 GEMM of x and float(w8) * scale: equal
    up to the bf16 rounding of the output (half an ulp of the largest entry); K / block_k = 6 and 5 blocks
    over 4 splits share the contraction unevenly. transposed: the same weights given as [N, K]; float16: these
    bf16 activations are exact in float16, so the same bound holds, and the kernel is seen to multiply in it."""
    from dllm.models.fp8_gemm import fp8_matmul

    key_x, key_w = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(key_x, (rows, k), jnp.float32).astype(jnp.bfloat16)
    w8, scale = quantize_fp8(jax.random.normal(key_w, (k, 256), jnp.float32) * 0.05, (-2,))
    given = w8.T if transposed else w8
    run = functools.partial(fp8_matmul, block_n=128, block_k=128, splits=splits, transposed=transposed,
                            dot_dtype=dot_dtype)
    out = run(x, given, scale.reshape(-1))
    multiplies_in_float16 = re.search(r"(?<!b)f16\[", str(jax.make_jaxpr(run)(x, given, scale.reshape(-1))))
    assert bool(multiplies_in_float16) == (dot_dtype == "float16")
    expected = np.asarray(x, np.float64) @ (np.asarray(w8.astype(jnp.float32), np.float64) * np.asarray(scale))
    assert out.shape == (rows, 256) and out.dtype == jnp.bfloat16
    np.testing.assert_array_less(np.abs(np.asarray(out, np.float64) - expected), 2.0 ** -8 * np.abs(expected).max())


def test_fp8_matmul_bad_input():
    from dllm.models.fp8_gemm import fp8_matmul

    x = jnp.ones((2, 256), jnp.bfloat16)
    w8, scale = quantize_fp8(jnp.ones((256, 128)), (-2,))
    with pytest.raises(ValueError, match="w8 dtype float32: expected float8_e4m3fn"):
        fp8_matmul(x, jnp.ones((256, 128)), scale.reshape(-1))
    with pytest.raises(ValueError, match=r"scale shape \(1, 128\): expected \(128,\)"):
        fp8_matmul(x, w8, scale)
    with pytest.raises(ValueError, match="K=256 and N=128 must be positive multiples of block_k=512"):
        fp8_matmul(x, w8, scale.reshape(-1), block_k=512)
    with pytest.raises(ValueError, match=r"splits=3: allowed 1 ... K / block_k = 2"):
        fp8_matmul(x, w8, scale.reshape(-1), block_k=128, splits=3)
    with pytest.raises(ValueError, match="block_k=96: must be a power of two >= 16"):
        fp8_matmul(x, w8, scale.reshape(-1), block_k=96)
    with pytest.raises(ValueError, match=r"M=200 rows: allowed 1 ... 128"):
        fp8_matmul(jnp.ones((200, 256), jnp.bfloat16), w8, scale.reshape(-1))
    with pytest.raises(ValueError, match=r"expected x \[M, K\] and w8 \[N, K\] \(transposed=True\)"):
        fp8_matmul(x, w8, scale.reshape(-1), transposed=True)
    with pytest.raises(ValueError, match=r"dot_dtype='float32': allowed None \(x's dtype\) or 'float16'"):
        fp8_matmul(x, w8, scale.reshape(-1), dot_dtype="float32")
