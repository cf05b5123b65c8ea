"""FP8 weight GEMMs at a cached step's row count: the Pallas kernel `dllm.models.fp8_gemm.fp8_matmul`
against XLA's bf16 GEMMs and XLA's dequantize pattern, on LLaDA-8B's GEMM shapes.

    python experiments/results/speed2/fp8_gemm_bench.py [--rows 32] [--layers 32] [--out FILE]

1. Per shape (fused q/k/v, attention output, fused gate/up, down, the output head), a small sweep of
   the kernel's tiles (block_n, block_k, splits, warps, stages), its weight layout (`transposed`) and its
   multiply's dtype (`dot_dtype`); each config is checked against the
   dequantized GEMM before it is timed.
2. The chain of all layers' GEMMs (`experiments.benchmark.gemm_chain`, which the chained floor
   `chained_gemm_tb_s` times) three ways: bf16 weights through XLA (the chained floor of issue 25), FP8 weights
   through the kernel at each shape's best config, and FP8 weights through XLA's
   `x @ (convert(w8) * scale)` in bf16. Printed: ms, GB read, TB/s of the bytes each reads, and the FP8
   kernel's chain over half the bf16 chain (the FP8 weight-read floor the issue sets).
Each time is the best of `--repeats` runs of one jitted call.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import jax
import jax.numpy as jnp

from dllm.evaluation import write_json_atomic
from dllm.models.config import ModelConfig
from dllm.models.fp8_gemm import fp8_matmul
from experiments.benchmark import best_seconds, gemm_chain, gemm_shapes

LLADA_8B = ModelConfig(vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, mlp_hidden=12288)
SHAPES = {**gemm_shapes(LLADA_8B), "head": (LLADA_8B.d_model, LLADA_8B.vocab_size)}
ATTENTION_WIDTH = LLADA_8B.n_heads * LLADA_8B.head_dim
LABEL = "bn{block_n}_bk{block_k}_s{splits}_w{num_warps}_st{num_stages}_t{transposed:d}_{dot_dtype}"


def fp8_weights(key, shape):
    w8 = (jax.random.normal(key, shape, jnp.float32) * 64).astype(jnp.float8_e4m3fn)
    return w8, jnp.full((shape[1],), 1e-3 / 64, jnp.float32)


def sweep(rows: int, repeats: int):
    configs = [dict(block_n=bn, block_k=bk, splits=None, num_warps=4, num_stages=3, transposed=t, dot_dtype=d)
               for bn, bk, t, d in itertools.product((64, 128), (128, 256, 512), (False, True), (None, "float16"))]
    configs += [{**dict(block_n=128, block_k=256, splits=None, num_warps=4, num_stages=3, transposed=t, dot_dtype=None),
                 **extra} for t in (False, True) for extra in (dict(splits=1), dict(num_warps=8), dict(num_stages=5))]
    best, table = {}, {}
    for name, (k, n) in SHAPES.items():
        x = jax.random.normal(jax.random.PRNGKey(1), (rows, k), jnp.float32).astype(jnp.bfloat16)
        w8, scale = fp8_weights(jax.random.PRNGKey(2), (k, n))
        w8t = w8.T.copy()
        bf16 = (w8.astype(jnp.float32) * scale).astype(jnp.bfloat16)
        reference = jnp.dot(x, bf16, preferred_element_type=jnp.float32)
        rows_out = {"xla_bf16_ms": 1e3 * best_seconds(jax.jit(jnp.dot), x, bf16, repeats=repeats)}
        for config in configs:
            label = LABEL.format(**config)
            try:
                run = jax.jit(lambda x, w8, scale, config=config: fp8_matmul(x, w8, scale, **config))
                given = w8t if config["transposed"] else w8
                error = float(jnp.max(jnp.abs(run(x, given, scale).astype(jnp.float32) - reference)))
                scale_of = float(jnp.max(jnp.abs(reference)))
                if not error <= 1e-2 * scale_of + 1e-6:
                    rows_out[label] = f"wrong: max error {error:.3g} at scale {scale_of:.3g}"
                    continue
                rows_out[label] = 1e3 * best_seconds(run, x, given, scale, repeats=repeats)
            except Exception as error:  # a config Triton cannot compile here is reported, not hidden
                rows_out[label] = f"{type(error).__name__}: {str(error)[:200]}"
        timed = {label: ms for label, ms in rows_out.items() if isinstance(ms, float) and label != "xla_bf16_ms"}
        if timed:
            label = min(timed, key=timed.get)
            best[name] = next(c for c in configs if LABEL.format(**c) == label)
            print(json.dumps({"shape": name, "k_n": [k, n], "xla_bf16_ms": round(rows_out["xla_bf16_ms"], 4),
                              "fp8_best_ms": round(timed[label], 4), "best": label,
                              "fp8_over_bf16": round(timed[label] / rows_out["xla_bf16_ms"], 3)}), flush=True)
        else:
            print(json.dumps({"shape": name, "no config ran": rows_out}), flush=True)
        table[name] = rows_out
    return best, table


def chains(rows: int, layers: int, best: dict, repeats: int):
    keys = iter(jax.random.split(jax.random.PRNGKey(3), 5 * layers + 1))
    fp8 = [{name: fp8_weights(next(keys), SHAPES[name]) for name in ("qkv", "out", "gate_up", "down")}
           for _ in range(layers)]
    head8 = fp8_weights(next(keys), SHAPES["head"])
    bf16 = [{name: (w8.astype(jnp.float32) * s).astype(jnp.bfloat16) for name, (w8, s) in layer.items()}
            for layer in fp8]
    head16 = (head8[0].astype(jnp.float32) * head8[1]).astype(jnp.bfloat16)

    config_of = lambda shape: best.get(next(name for name, s in SHAPES.items() if s == shape), {})
    stored = lambda w: (w[0].T.copy(), w[1]) if config_of(w[0].shape).get("transposed") else w
    fp8_stored = [{name: stored(w) for name, w in layer.items()} for layer in fp8]
    head8_stored = stored(head8)
    # a weight's [K, N] shape in either layout: N is its scale's length
    kernel = lambda x, w: fp8_matmul(x, w[0], w[1], **config_of((w[0].size // w[1].size, w[1].size)))
    dequantize = lambda x, w: x @ (w[0].astype(jnp.bfloat16) * w[1].astype(jnp.bfloat16))
    x = jnp.full((rows, LLADA_8B.d_model), 0.01, jnp.bfloat16)
    nbytes = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))
    out = {}
    for name, weights, head, matmul in (("bf16_xla", bf16, head16, jnp.matmul),
                                        ("fp8_kernel", fp8_stored, head8_stored, kernel),
                                        ("fp8_xla_dequantize", fp8, head8, dequantize)):
        try:
            chain = jax.jit(functools.partial(gemm_chain, attention_width=ATTENTION_WIDTH, matmul=matmul))
            seconds = best_seconds(chain, x, weights, head, repeats=repeats)
            gb = nbytes((weights, head)) / 1e9
            out[name] = {"ms": round(1e3 * seconds, 3), "gb": round(gb, 3), "tb_s": round(gb / seconds / 1e3, 3)}
        except Exception as error:
            out[name] = f"{type(error).__name__}: {str(error)[:300]}"
        print(json.dumps({"chain": name, **(out[name] if isinstance(out[name], dict) else {"error": out[name]})}),
              flush=True)
    if all(isinstance(out.get(n), dict) for n in ("bf16_xla", "fp8_kernel")):
        out["fp8_kernel_over_half_bf16_chain"] = round(out["fp8_kernel"]["ms"] / (out["bf16_xla"]["ms"] / 2), 3)
        out["fp8_kernel_speedup_over_bf16"] = round(out["bf16_xla"]["ms"] / out["fp8_kernel"]["ms"], 3)
        print(json.dumps({k: out[k] for k in ("fp8_kernel_over_half_bf16_chain", "fp8_kernel_speedup_over_bf16")}))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-sweep", action="store_true", help="the kernel's default tiles for every shape")
    parser.add_argument("--out", default="fp8_gemm.json")
    args = parser.parse_args()
    best, table = ({}, {}) if args.no_sweep else sweep(args.rows, max(3, args.repeats // 2))
    result = {"rows": args.rows, "layers": args.layers, "best_configs": best, "sweep_ms": table,
              "environment": {"jax": jax.__version__, "device": jax.devices()[0].device_kind}}
    write_json_atomic(args.out, result)  # the sweep is kept if the chains run out of time
    result["chains"] = chains(args.rows, args.layers, best, args.repeats)
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
