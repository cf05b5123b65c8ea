"""One LLaDA-8B GEMM shape at 32 rows, FP8 kernel and XLA's bf16 GEMM, for Nsight Compute to read:

    XLA_FLAGS="--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false" \
    ncu --clock-control none --kernel-name regex:"fp8_matmul|nvjet|gemm|cutlass|sm90" --launch-skip 2 \
        --launch-count 4 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats ... \
        python3 experiments/results/speed2/fp8_ncu.py [--shape qkv] [kernel keyword=value ...]

Each function is compiled first, then the FP8 kernel runs three times and the bf16 GEMM three times,
so skipping two matching launches reads the FP8 kernel's third launch and the bf16 GEMM's three. With
XLA's autotuning off (the flags above) compiling launches no candidate GEMMs that the count would
include, and the bf16 GEMM is cuBLAS's heuristic choice; the Triton GEMM is off as in
`experiments.benchmark`. The numerics are the benchmark's (fp8_gemm_bench.fp8_weights). Keyword
arguments go to `fp8_matmul` (block_n=64, transposed=1 for the [N, K] weights, dot_dtype=float16 ...).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from dllm.models.fp8_gemm import fp8_matmul
from experiments.results.speed2.fp8_gemm_bench import SHAPES, fp8_weights


def setting(text: str):
    key, value = text.split("=", 1)
    return key, int(value) if value.lstrip("-").isdigit() else value


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qkv", choices=sorted(SHAPES))
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("config", nargs="*", type=setting, help="fp8_matmul keyword=value")
    args = parser.parse_args()
    config = dict(args.config)
    k, n = SHAPES[args.shape]
    x = jax.random.normal(jax.random.PRNGKey(1), (args.rows, k), jnp.float32).astype(jnp.bfloat16)
    w8, scale = fp8_weights(jax.random.PRNGKey(2), (k, n))
    w16 = (w8.astype(jnp.float32) * scale).astype(jnp.bfloat16)
    if config.get("transposed"):
        w8 = w8.T.copy()
    fp8 = jax.jit(lambda x, w8, scale: fp8_matmul(x, w8, scale, **config)).lower(x, w8, scale).compile()
    bf16 = jax.jit(jnp.dot).lower(x, w16).compile()
    for _ in range(3):
        jax.block_until_ready(fp8(x, w8, scale))
    for _ in range(3):
        jax.block_until_ready(bf16(x, w16))
    print(f"shape {args.shape} [{args.rows} x {k}] @ [{k} x {n}], fp8 config {config or 'default'}: done")


if __name__ == "__main__":
    main()
