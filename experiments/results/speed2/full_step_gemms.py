"""The GEMMs of LLaDA-8B's full (uncached) step at batch 1, alone: the model's GEMM shapes chained over
its 32 layers and the head at the step's 512 rows (prompt 256 + generation 256), in bf16 through XLA.

    python experiments/results/speed2/full_step_gemms.py [--rows 512] [--out FILE]

The full step's floor in `experiments.benchmark` is its FLOPs at the measured matmul peak (the best of
[8192, 8192] and [16384, 16384] matmuls). At
512 rows cuBLAS runs below that peak; this prints what these GEMMs alone reach (ms, TFLOP/s, and their
share of the measured peak), so a profile of the step can split its time into GEMMs at their own rate
and everything else. Time: the best of `--repeats` runs of one jitted chain.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp

from dllm.evaluation import write_json_atomic
from experiments.benchmark import best_seconds, gemm_chain, gemm_shapes, measure_floors
from experiments.results.speed2.fp8_gemm_bench import ATTENTION_WIDTH, LLADA_8B


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="full_step_gemms.json")
    args = parser.parse_args()
    c = LLADA_8B
    fill = jax.jit(lambda shape: jnp.full(shape, 1e-3, jnp.bfloat16), static_argnums=0)
    layers = [{name: fill(shape) for name, shape in gemm_shapes(c).items()} for _ in range(c.n_layers)]
    head = fill((c.d_model, c.vocab_size))
    chain = jax.jit(functools.partial(gemm_chain, attention_width=ATTENTION_WIDTH))
    x = jnp.full((args.rows, c.d_model), 0.01, jnp.bfloat16)
    seconds = best_seconds(chain, x, layers, head, repeats=args.repeats)
    flops = 2 * args.rows * sum(k * n for layer in layers for k, n in (w.shape for w in layer.values()))
    flops += 2 * args.rows * c.d_model * c.vocab_size
    peak = measure_floors([8192, 16384], 1024, repeats=args.repeats)["peak_tflops"]
    tflops = flops / seconds / 1e12
    result = {"rows": args.rows, "gemm_chain_ms": round(1e3 * seconds, 3), "tflop": round(flops / 1e12, 3),
              "tflops": round(tflops, 1), "peak_tflops": peak, "fraction_of_peak": round(tflops / peak, 3),
              "ms_at_peak": round(flops / peak / 1e9, 3),
              "environment": {"jax": jax.__version__, "device": jax.devices()[0].device_kind}}
    print(json.dumps(result), flush=True)
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
