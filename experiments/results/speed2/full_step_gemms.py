"""The GEMMs of LLaDA-8B's full (uncached) step at batch 1, alone: the model's GEMM shapes chained over
its 32 layers and the head at the step's 512 rows (prompt 256 + generation 256), in bf16 through XLA
(`experiments.benchmark.chained_gemm_seconds`, the chained floor's chain at more rows).

    python experiments/results/speed2/full_step_gemms.py [--rows 512] [--out FILE]

The full step's floor in `experiments.benchmark` is its FLOPs at the measured matmul peak (the best of
[8192, 8192] and [16384, 16384] matmuls). This prints what these GEMMs alone reach at the step's row
count (ms, TFLOP/s, and their share of the peak measured in the same run), so a profile of the step can
split its time into GEMMs at their own rate and everything else.
"""

from __future__ import annotations

import argparse
import json

import jax

from dllm.evaluation import write_json_atomic
from experiments.benchmark import chained_gemm_seconds, gemm_shapes, measure_floors
from experiments.results.speed2.fp8_gemm_bench import LLADA_8B


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="full_step_gemms.json")
    args = parser.parse_args()
    c = LLADA_8B
    seconds, _ = chained_gemm_seconds(c, args.rows, args.repeats)
    per_row = c.n_layers * sum(k * n for k, n in gemm_shapes(c).values()) + c.d_model * c.vocab_size
    flops = 2 * args.rows * per_row
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
