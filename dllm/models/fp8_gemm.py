"""A GEMM of a few activation rows by FP8 (e4m3) weights that reads the FP8 bytes from memory: one
Pallas (Triton) kernel, `fp8_matmul`.

A cached decoding step at batch 1 multiplies 32-64 rows by every weight once, so it is bound by
reading the weights; FP8 weights halve those bytes. XLA (jax 0.11.2) does not turn the dequantize
pattern `x @ (convert(w8) * scale)` into a GEMM that reads FP8: it materializes the bf16 weights or
runs slow Triton fusions (speed issue 25). Here each program owns `block_n` output columns and a
share of the contraction (split-K, as `dllm.models.window_attention` splits keys): it walks its rows
of the weight in blocks of `block_k`, loads the FP8 tile, converts it to the activations' dtype in
registers, and accumulates `x_tile @ w_tile` in float32. The per-output-channel scale
(`dllm.models.quantize`) multiplies the summed result once, which is exact algebra:

    x @ (w8 * scale[None, :]) = (x @ w8) * scale[None, :].

So the result equals the GEMM of x with the dequantized weights up to the order of float32 sums.
On CPU the kernel runs in Pallas's interpreter (the tests); on GPU it compiles through Triton.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK_N = 128
BLOCK_K = 256
TARGET_PROGRAMS = 264  # default_splits aims at about this many programs (two per H100/H200 SM)
MAX_SPLITS = 16


def default_splits(n: int, k: int, block_n: int, block_k: int) -> int:
    """Programs over the contraction so that the grid has about `TARGET_PROGRAMS` programs."""
    column_programs = n // block_n
    return int(max(1, min(MAX_SPLITS, k // block_k, -(-TARGET_PROGRAMS // column_programs))))


def _kernel(x_ref, w_ref, out_ref, *, block_k: int, split_length: int, k: int):
    """Program (column block j, split s): rows [s * split_length, (s + 1) * split_length) ∩ [0, k) of
    the weight's columns j * block_n + [0, block_n), times the same columns of x, in float32."""
    begin = pl.program_id(1) * split_length
    rows = x_ref.shape[0]

    def body(i, acc):
        first = pl.multiple_of(begin + i * block_k, block_k)
        xs = x_ref[:, pl.ds(first, block_k)]
        ws = w_ref[pl.ds(first, block_k), :].astype(xs.dtype)
        return acc + plgpu.dot(xs, ws).astype(jnp.float32)

    blocks = jnp.clip((k - begin) // block_k, 0, split_length // block_k)
    acc = jax.lax.fori_loop(0, blocks, body, jnp.zeros((rows, out_ref.shape[-1]), jnp.float32))
    out_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "splits", "num_warps", "num_stages",
                                             "interpret"))
def fp8_matmul(x: jax.Array, w8: jax.Array, scale: jax.Array, *, block_n: int = BLOCK_N, block_k: int = BLOCK_K,
               splits: int | None = None, num_warps: int = 4, num_stages: int = 3,
               interpret: bool | None = None) -> jax.Array:
    """x [M, K] @ (w8 [K, N] float8_e4m3fn * scale [N] float32) -> [M, N] in x's dtype, accumulated in
    float32. M is padded to at least 16 rows (Triton's smallest dot). K must be a multiple of
    `block_k` and N of `block_n`; `splits` (default `default_splits`) programs share each column
    block's contraction, and their float32 partial sums are added afterwards.
    `interpret`: run in Pallas's interpreter (default: on CPU)."""
    if x.ndim != 2 or w8.ndim != 2 or x.shape[1] != w8.shape[0]:
        raise ValueError(f"fp8_matmul: x {x.shape} @ w8 {w8.shape}: expected [M, K] @ [K, N]")
    if w8.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"fp8_matmul: w8 dtype {w8.dtype}: expected float8_e4m3fn")
    m, k = x.shape
    n = w8.shape[1]
    if scale.shape != (n,):
        raise ValueError(f"fp8_matmul: scale shape {scale.shape}: expected ({n},), one per output column")
    if k % block_k or n % block_n:
        raise ValueError(f"fp8_matmul: K={k} and N={n} must be multiples of block_k={block_k} and "
                         f"block_n={block_n}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    splits = default_splits(n, k, block_n, block_k) if splits is None else splits
    if not 1 <= splits <= k // block_k:
        raise ValueError(f"fp8_matmul: splits={splits}: allowed 1 ... K / block_k = {k // block_k}")
    split_length = -(-(k // block_k) // splits) * block_k
    splits = -(-k // split_length)  # drop empty splits
    rows = max(16, pl.next_power_of_2(m))
    xp = jnp.pad(x, ((0, rows - m), (0, 0)))
    partial = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, split_length=split_length, k=k),
        grid=(n // block_n, splits),
        in_specs=[pl.BlockSpec((rows, k), lambda j, s: (0, 0)),
                  pl.BlockSpec((k, block_n), lambda j, s: (0, j))],
        out_specs=pl.BlockSpec((None, rows, block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, rows, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="fp8_matmul",
    )(xp, w8)
    return (partial.sum(axis=0)[:m] * scale[None, :]).astype(x.dtype)
