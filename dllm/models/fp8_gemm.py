"""A GEMM of a few activation rows by FP8 (e4m3) weights that reads the FP8 bytes from memory: one
Pallas (Triton) kernel, `fp8_matmul`.

A cached decoding step at batch 1 multiplies 32-64 rows by every weight once, so it is bound by
reading the weights; FP8 weights halve those bytes. XLA (jax 0.11.2) does not turn the dequantize
pattern `x @ (convert(w8) * scale)` into a GEMM that reads FP8: it materializes the bf16 weights or
runs slow Triton fusions (speed issue 25). Here each program owns `block_n` output columns and a
share of the contraction (split-K, as `dllm.models.window_attention` splits keys): it walks its rows
of the weight in blocks of `block_k`, loads the FP8 tile, converts it to the multiply's dtype (the
activations', or float16) in registers, and accumulates `x_tile @ w_tile` in float32. The
per-output-channel scale (`dllm.models.quantize`) multiplies the summed result once, which is exact algebra:

    x @ (w8 * scale[None, :]) = (x @ w8) * scale[None, :].

So the result equals the GEMM of x with the dequantized weights up to the order of float32 sums.

`transposed=True` takes the weights as [N, K] (each output column's weights contiguous) and swaps the
GEMM's operands, `(w8 @ x.T).T`: the converted weight tile becomes the dot's first operand, which
Hopper's warpgroup MMA may read from registers (the second must come from shared memory), so the
converted tile need not be written back to shared memory; the few activation rows become the MMA's
narrow N side. This is the "swap A and B" layout of weight-only-quantized GEMMs at small batch.

`dot_dtype="float16"` multiplies in float16 instead of the activations' dtype: Hopper converts a pair
of e4m3 values to float16 in one instruction, while bfloat16 takes a detour through wider types.
Every e4m3 value is exact in float16; bfloat16 activations are exact in float16 for 2^-17 <= |x|
<= 65504 (11 significant bits against bfloat16's 8, subnormals down to 2^-24), lose bits below that
and overflow above it. The range is not checked: this is a kernel option for measurement.
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
MAX_ROWS = 128


def default_splits(n: int, k: int, block_n: int, block_k: int) -> int:
    """Programs over the contraction so that the grid has about `TARGET_PROGRAMS` programs."""
    column_programs = n // block_n
    return int(max(1, min(MAX_SPLITS, k // block_k, -(-TARGET_PROGRAMS // column_programs))))


def _kernel(x_ref, w_ref, out_ref, *, block_k: int, blocks: int, splits: int, transposed: bool):
    """Program (column block j, split s): contraction blocks [s * blocks // splits, (s + 1) * blocks //
    splits) of `block_k` rows each (every split gets at least one when splits <= blocks) of the
    weight's columns j * block_n + [0, block_n), times the same columns of x, in float32; transposed:
    the weight's rows j * block_n + [0, block_n), and the program's output is [block_n, rows]."""
    split = pl.program_id(1)
    first_block, end_block = split * blocks // splits, (split + 1) * blocks // splits
    rows = x_ref.shape[0]

    def body(i, acc):
        first = pl.multiple_of(i * block_k, block_k)
        xs = x_ref[:, pl.ds(first, block_k)]
        if transposed:
            ws = w_ref[:, pl.ds(first, block_k)].astype(xs.dtype)
            return acc + plgpu.dot(ws, xs, trans_b=True).astype(jnp.float32)
        ws = w_ref[pl.ds(first, block_k), :].astype(xs.dtype)
        return acc + plgpu.dot(xs, ws).astype(jnp.float32)

    acc = jax.lax.fori_loop(first_block, end_block, body, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "splits", "num_warps", "num_stages",
                                             "transposed", "dot_dtype", "interpret"))
def fp8_matmul(x: jax.Array, w8: jax.Array, scale: jax.Array, *, block_n: int = BLOCK_N, block_k: int = BLOCK_K,
               splits: int | None = None, num_warps: int = 4, num_stages: int = 3,
               transposed: bool = False, dot_dtype: str | None = None, interpret: bool | None = None) -> jax.Array:
    """x [M, K] @ (w8 [K, N] float8_e4m3fn * scale [N] float32) -> [M, N] in x's dtype, accumulated in
    float32. M (at most `MAX_ROWS`: the kernel is for a cached step's few rows) is padded to a power of
    two of at least 16 rows (Triton's smallest dot). K must be a multiple of `block_k` and N of
    `block_n`, both powers of two. `splits` (default `default_splits`; at most K / block_k) programs
    share each column block's contraction as evenly as whole blocks allow, and their float32 partial
    sums are added afterwards. `transposed`: w8 is [N, K] (the operands swapped in the kernel; see the
    module's docstring); a square weight's layout cannot be checked from its shape. `dot_dtype`: None
    (the activations' dtype) or "float16" (see the module's docstring). `interpret`: run in Pallas's interpreter (default: on CPU)."""
    k_axis = 1 if transposed else 0
    if x.ndim != 2 or w8.ndim != 2 or x.shape[1] != w8.shape[k_axis]:
        layout = "[N, K] (transposed=True)" if transposed else "[K, N]"
        raise ValueError(f"fp8_matmul: x {x.shape} @ w8 {w8.shape}: expected x [M, K] and w8 {layout}")
    if w8.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"fp8_matmul: w8 dtype {w8.dtype}: expected float8_e4m3fn")
    m, k = x.shape
    n = w8.shape[1 - k_axis]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"fp8_matmul: M={m} rows: allowed 1 ... {MAX_ROWS} (a GEMM of more rows is compute-bound: "
                         "dequantize and use XLA's GEMM)")
    if scale.shape != (n,):
        raise ValueError(f"fp8_matmul: scale shape {scale.shape}: expected ({n},), one per output column")
    for name, value in (("block_n", block_n), ("block_k", block_k)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"fp8_matmul: {name}={value}: must be a power of two >= 16 (Triton tiles)")
    if n == 0 or k == 0 or k % block_k or n % block_n:
        raise ValueError(f"fp8_matmul: K={k} and N={n} must be positive multiples of block_k={block_k} and "
                         f"block_n={block_n}")
    if dot_dtype not in (None, "float16"):
        raise ValueError(f"fp8_matmul: dot_dtype={dot_dtype!r}: allowed None (x's dtype) or 'float16'")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    blocks = k // block_k
    splits = default_splits(n, k, block_n, block_k) if splits is None else splits
    if not 1 <= splits <= blocks:
        raise ValueError(f"fp8_matmul: splits={splits}: allowed 1 ... K / block_k = {blocks}")
    rows = max(16, pl.next_power_of_2(m))
    xp = jnp.pad(x.astype(dot_dtype or x.dtype), ((0, rows - m), (0, 0)))
    if transposed:
        weight_spec = pl.BlockSpec((block_n, k), lambda j, s: (j, 0))
        out_spec, out_shape = pl.BlockSpec((None, block_n, rows), lambda j, s: (s, j, 0)), (splits, n, rows)
    else:
        weight_spec = pl.BlockSpec((k, block_n), lambda j, s: (0, j))
        out_spec, out_shape = pl.BlockSpec((None, rows, block_n), lambda j, s: (s, 0, j)), (splits, rows, n)
    partial = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, blocks=blocks, splits=splits, transposed=transposed),
        grid=(n // block_n, splits),
        in_specs=[pl.BlockSpec((rows, k), lambda j, s: (0, 0)), weight_spec],
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="fp8_matmul",
    )(xp, w8)
    summed = partial.sum(axis=0)
    summed = summed.T if transposed else summed
    return (summed[:m] * scale[None, :]).astype(x.dtype)
