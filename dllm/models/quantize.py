"""FP8 (e4m3) weights: quantize, dequantize, and a model whose GEMM weights are rounded to FP8.

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
values, up to the order of float sums). It does not make a step faster: the weights are still read
in the parameter dtype. The embedding (a gather) and the norms stay as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
# canonical GEMM weight -> its contraction axes, counted from the end (layer weights are stacked [layers, ...])
CONTRACTION_AXES = {
    "q_proj": (-3,), "k_proj": (-3,), "v_proj": (-3,),  # [d, heads, head_dim]
    "o_proj": (-3, -2),                                 # [heads, head_dim, d]
    "gate_proj": (-2,), "up_proj": (-2,),               # [d, mlp]
    "down_proj": (-2,),                                 # [mlp, d]
    "lm_head": (-2,),                                   # [d, vocab]
}


def quantize_fp8(w: jax.Array, contract_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(w8 float8_e4m3fn, scale float32 broadcastable to w): per-output-channel scales, the maximum
    |w| over `contract_axes` mapped to 448 (an all-zero channel gets scale 1)."""
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=contract_axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    return (w / scale).astype(FP8), scale


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
