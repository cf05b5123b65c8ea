"""Times the attention of a cached window step alone, per implementation.

    python -m experiments.benchmark_window_attention                 # LLaDA-8B, batch 1, dual window
    python -m experiments.benchmark_window_attention batch_sizes=[32] 'window_splits=[1,4]'

For every layer of the model geometry one cache [B, prompt + gen + window + 1,
kv_heads, head_dim] is drawn; a jitted function runs the window's attention
through all layers in sequence (each layer's query depends on the previous
output, so nothing overlaps), as a decoding step does. Prints, as JSON, the
microseconds per layer of XLA's attention, cuDNN's (on GPU) and the Pallas
kernel (`dllm.models.window_attention`) for each split count / block size,
and each one's largest difference from XLA's output.
"""

from __future__ import annotations

import itertools
import json

import hydra
import jax
import jax.numpy as jnp
from omegaconf import DictConfig

from dllm.evaluation import environment, write_json_atomic
from dllm.models.window_attention import window_attention
from experiments.benchmark_parts import timed
from experiments.common import model_config


@hydra.main(config_path="../configs", config_name="benchmark", version_base=None)
def main(cfg: DictConfig) -> list[dict]:
    c = model_config(cfg)
    dtype = jnp.dtype(cfg.dtype)
    window, canvas = cfg.block_length, cfg.prompt_length + cfg.gen_length
    length = canvas + window + 1  # as the dual cache policy's length (dllm.decoding.cache.FastDLLMCache.length)
    rows = []
    for batch in cfg.batch_sizes:
        keys = jax.random.split(jax.random.key(0), 2 * c.n_layers + 1)
        caches = [jax.random.normal(k, (batch, length, c.n_kv_heads, c.head_dim), dtype) for k in keys[1:]]
        q = jax.random.normal(keys[0], (batch, window, c.n_heads, c.head_dim), dtype)
        key_mask = jnp.pad(jnp.ones((batch, canvas), jnp.int32), ((0, 0), (0, window + 1)))

        def chain(attend):
            def run(q, caches):
                x = q
                for i in range(c.n_layers):
                    x = attend(x, caches[2 * i], caches[2 * i + 1])
                return x
            return jax.jit(run)

        def library(impl):
            lengths = jnp.full((batch,), canvas, jnp.int32)
            return lambda x, k, v: jax.nn.dot_product_attention(x, k, v, key_value_seq_lengths=lengths,
                                                                implementation=impl)

        variants = {"xla": library("xla")}
        if jax.default_backend() == "gpu":
            variants["cudnn"] = library("cudnn")
        for splits, block_k, warps, stages in itertools.product(cfg.window_splits, cfg.window_block_k,
                                                                cfg.window_num_warps, cfg.window_num_stages):
            variants[f"pallas splits={splits} block_k={block_k} warps={warps} stages={stages}"] = (
                lambda x, k, v, s=splits, b=block_k, w=warps, st=stages: window_attention(
                    x, k, v, key_length=canvas, splits=s, block_k=b, num_warps=w, num_stages=st))
        variants["pallas with key mask"] = lambda x, k, v: window_attention(x, k, v, key_mask, key_length=canvas)
        reference = chain(variants["xla"])(q, caches).astype(jnp.float32)
        for name, attend in variants.items():
            fn = chain(attend)
            try:
                us = 1000 * timed(fn, q, caches, repeats=20) / c.n_layers
                error = float(jnp.max(jnp.abs(fn(q, caches).astype(jnp.float32) - reference)))
            except Exception as e:  # a launch parameter Triton rejects is a row, not the end of the sweep
                row = {"batch": batch, "variant": name, "error": str(e).splitlines()[0][:200]}
            else:
                row = {"batch": batch, "variant": name, "us_per_layer": round(us, 2),
                       "max_abs_diff_vs_xla": round(error, 5)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_json_atomic(cfg.window_out, {"rows": rows, "environment": environment()})
    return rows


if __name__ == "__main__":
    main()
