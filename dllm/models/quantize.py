"""FP8 (e4m3) weights: quantize, dequantize, a model whose GEMM weights are rounded to FP8, and the
GEMM of a model that holds them in FP8 (`Layout.fp8_weights`).

The format the FP8 decoding peers use (LLaDA2.1's speed mode, DiffusionGemma on vLLM): float8 e4m3
(`float8_e4m3fn`, largest finite value 448, 3 mantissa bits) with one float32 scale per output
channel, scale = max |w| over the contraction axes / 448, so each channel's largest weight maps to
448. Round trip: w ~ dequantize(quantize(w)) = float(w8) * scale, with |error| <= scale * 2^-4 * |w /
scale| for normal values and <= scale * 2^-10 below the smallest normal (2^-6), half a step of the
3-bit mantissa and of the subnormal spacing 2^-9.

`fp8_rounded(model)` is the accuracy side of FP8 decoding: every GEMM weight of the layers (q/k/v,
attention output, gate/up, down) and the untied output head replaced by its FP8 round trip, held in
the parameter dtype. What FP8 weights do to a decode's tokens and a task's accuracy is then
measured exactly (a GEMM that reads the FP8 bytes and dequantizes in registers multiplies by the same
values, up to the parameter dtype's rounding of float(w8) * scale, which float32 holds exactly, and
the order of float sums). It does not make a step faster: the weights are still read in the parameter
dtype. The embedding (a gather) and the norms stay as they are.

`Layout.fp8_weights` is the speed side: the model holds the same weights as float8 with a float32
`<name>_scale` beside each (`quantize_weights`), and `fp8_einsum` multiplies by them as
(x @ float(w8)) * scale, the scale on the float32 output. A GEMM of at most `fp8_gemm.MAX_ROWS` rows
(a cached step's window at small batch) whose sizes tile runs the Pallas kernel
`dllm.models.fp8_gemm.fp8_matmul` on a GPU (or in Pallas's interpreter on CPU), which reads the FP8
bytes; otherwise (full forwards: compute-bound; other backends) XLA converts the weight to the compute
dtype (exact: every e4m3 value is a bfloat16 and a float16 value) and multiplies, reading it once more.
Checkpoints (`canonical_params`) hold float(w8) * scale rounded to the parameter dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
# GEMM weight -> its contraction axes, counted from the end (layer weights are stacked [layers, ...])
CONTRACTION_AXES = {
    "q_proj": (-3,), "k_proj": (-3,), "v_proj": (-3,),  # [d, heads, head_dim]
    "o_proj": (-3, -2),                                 # [heads, head_dim, d]
    "gate_proj": (-2,), "up_proj": (-2,),               # [d, mlp]
    "down_proj": (-2,),                                 # [mlp, d]
    "lm_head": (-2,),                                   # [d, vocab]
    # fused (`Layout.fused_projections`): one scale per output column of every part
    "qkv_proj": (-4,), "gqa_qkv_proj": (-4,), "gate_up_proj": (-3,),
}
SCALE_SUFFIX = "_scale"


@functools.partial(jax.jit, static_argnums=1)  # one fusion: no float32 copy of a large weight
def quantize_fp8(w: jax.Array, contract_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(w8 float8_e4m3fn, scale float32 broadcastable to w): per-output-channel scales, the maximum
    |w| over `contract_axes` mapped to 448 (an all-zero channel gets scale 1)."""
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=contract_axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    return (w / scale).astype(FP8), scale


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize_fp8(w8: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    return (w8.astype(jnp.float32) * scale).astype(dtype)


def fp8_round_trip(w: jax.Array, contract_axes: tuple[int, ...]) -> jax.Array:
    """w's values after FP8 quantization and back, in w's dtype."""
    return dequantize_fp8(*quantize_fp8(w, contract_axes), dtype=w.dtype)


def fp8_rounded(model):
    """A copy of `model` (same config and layout) whose GEMM weights are their FP8 round trips
    (`CONTRACTION_AXES`; the output head only when untied)."""
    from dllm.checkpoints import model_from_params
    from dllm.models.transformer import canonical_params

    params = canonical_params(model)
    rounded = {name: fp8_round_trip(value, CONTRACTION_AXES[name]) if name in CONTRACTION_AXES else value
               for name, value in params.items()}
    return model_from_params(model.config, rounded, model.layout)


def quantize_weights(params: dict) -> dict:
    """{name: weight} -> the same with every GEMM weight (`CONTRACTION_AXES`: arrays, stacked
    [layers, ...] or per-layer lists) as float8 and its `<name>_scale` beside it; a weight whose
    scale is present already, and every other parameter, pass through."""
    params = dict(params)
    for name, axes in CONTRACTION_AXES.items():
        value = params.get(name)
        if value is None or name + SCALE_SUFFIX in params:
            continue
        if isinstance(value, (list, tuple)):
            pairs = [quantize_fp8(layer, axes) for layer in value]
            params[name], params[name + SCALE_SUFFIX] = [w for w, _ in pairs], [scale for _, scale in pairs]
        else:
            params[name], params[name + SCALE_SUFFIX] = quantize_fp8(value, axes)
    return params


def dequantize_weights(params: dict, dtype) -> dict:
    """Inverse of `quantize_weights`: each float8 weight times its scale, in `dtype`, scales dropped."""
    params = dict(params)
    for name in CONTRACTION_AXES:
        scale = params.pop(name + SCALE_SUFFIX, None)
        if scale is None:
            continue
        value = params[name]
        if isinstance(value, (list, tuple)):
            params[name] = [dequantize_fp8(w, s, dtype) for w, s in zip(value, scale)]
        else:
            params[name] = dequantize_fp8(value, scale, dtype)
    return params


def _block(size: int, largest: int) -> int | None:
    """The largest power of two <= `largest` and >= 16 that divides `size`, or None."""
    block = largest
    while block >= 16 and size % block:
        block //= 2
    return block if block >= 16 else None


def fp8_einsum(spec: str, x: jax.Array, w8: jax.Array, scale: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, x, dequantize(w8, scale))` in x's dtype, for the model's GEMMs: x's trailing
    axes contract with w8's leading ones (e.g. "bld,dhk->blhk", "blhk,hkd->bld").

    At most `fp8_gemm.MAX_ROWS` rows of x, output columns and contraction that tile by powers of
    two of at least 16, on a GPU or CPU: the Pallas kernel `fp8_matmul` (reads the FP8 bytes; its
    default tiles, each shrunk to the largest power of two that divides the size). Otherwise XLA
    multiplies by the weight converted to x's dtype. Either way the scale multiplies the float32
    output, so both compute (x @ float(w8)) * scale up to the order of float sums."""
    from dllm.models import fp8_gemm

    operands, out = spec.split("->")
    x_axes, w_axes = operands.split(",")
    contracted = len([a for a in w_axes if a in x_axes and a not in out])
    if not contracted or w_axes[:contracted] != x_axes[len(x_axes) - contracted:] or out != (
            x_axes[:len(x_axes) - contracted] + w_axes[contracted:]):
        raise ValueError(f"fp8_einsum: spec {spec!r}: expected x's trailing axes to contract with the weight's "
                         "leading ones, the output x's other axes then the weight's")
    k = math.prod(w8.shape[:contracted])
    n = math.prod(w8.shape[contracted:])
    rows = math.prod(x.shape[:x.ndim - contracted])
    block_n, block_k = _block(n, fp8_gemm.BLOCK_N), _block(k, fp8_gemm.BLOCK_K)
    if rows > fp8_gemm.MAX_ROWS or block_n is None or block_k is None or jax.default_backend() not in ("gpu", "cpu"):
        out = jnp.einsum(spec, x, w8.astype(x.dtype), preferred_element_type=jnp.float32)
        return (out * scale.reshape(w8.shape[contracted:])).astype(x.dtype)
    flat = fp8_gemm.fp8_matmul(x.reshape(rows, k), w8.reshape(k, n), scale.reshape(n).astype(jnp.float32),
                               block_n=block_n, block_k=block_k)
    return flat.reshape(*x.shape[:x.ndim - contracted], *w8.shape[contracted:])
