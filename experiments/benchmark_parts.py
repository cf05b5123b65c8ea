"""Where a decoding step's time goes: times the parts of one engine step alone.

    python -m experiments.benchmark_parts                 # LLaDA-8B geometry, batch 1

Prints ms for: the bare full forward (512 tokens), the full forward that also
returns K/V, the bare window forward (32 queries against the cache), the
sampler step on [B, gen_length, V] logits (what samplers that read more than
their block get; window-only ones get [B, block_length, V]), and the whole engine step
measured by `experiments.benchmark` for comparison.
"""

from __future__ import annotations

import json
import time

import hydra
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from omegaconf import DictConfig

import samplers
from dllm.decoding import DecodeConfig
from dllm.decoding.engine import initial_state
from experiments.benchmark import random_model, random_model_special_ids


def timed(fn, *args, repeats=10) -> float:
    jax.block_until_ready(fn(*args))
    began = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return 1000 * (time.perf_counter() - began) / repeats


@hydra.main(config_path="../configs", config_name="benchmark", version_base=None)
def main(cfg: DictConfig) -> dict:
    model = random_model(cfg)
    c = model.config
    graphdef, params = nnx.split(model)
    batch, p, g, w = cfg.batch_sizes[0], cfg.prompt_length, cfg.gen_length, cfg.block_length
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, c.vocab_size - 3, (batch, p + g)), jnp.int32)
    mask = jnp.ones_like(tokens)
    full = jax.jit(lambda prm, t, m: nnx.merge(graphdef, prm)(t, m, logits_start=p, logits_length=g))
    empty = model.empty_cache(batch, p + g + w + 1)  # as the dual cache's length
    with_kv = jax.jit(lambda prm, t, m: nnx.merge(graphdef, prm).forward(
        t, m, logits_start=p, logits_length=g, cache=empty))
    _, cache = with_kv(params, tokens, mask)
    key_mask = jnp.pad(mask, ((0, 0), (0, w + 1)))
    start = jnp.full((batch,), p, jnp.int32)
    window = jax.jit(lambda prm, t, pos, cch: nnx.merge(graphdef, prm).forward_window(
        t, pos, cch, key_mask, start=start, queries=w, logits_count=w))
    canvas = jnp.pad(tokens, ((0, 0), (0, w + 1)))
    positions = jnp.broadcast_to(jnp.arange(p + g + w + 1), (batch, p + g + w + 1))
    special = random_model_special_ids(c)
    state = initial_state(tokens[:, :p], mask[:, :p], jax.random.key(0), DecodeConfig(gen_length=g, block_length=w),
                          special)
    logits = jax.random.normal(jax.random.key(1), (batch, g, c.vocab_size), jnp.float32)
    results = {}
    for name, sampler in [("low_confidence", samplers.LowConfidence()), ("threshold", samplers.Threshold())]:
        step = jax.jit(lambda lg, st, s=sampler: s.step(lg, st, s.init(st))[0].commit)
        results[f"sampler_step_{name}_ms"] = round(timed(step, logits, state), 3)
    results.update({
        "batch": batch,
        "full_forward_ms": round(timed(full, params, tokens, mask), 3),
        "full_forward_with_kv_ms": round(timed(with_kv, params, tokens, mask), 3),
        "window_forward_ms": round(timed(window, params, canvas, positions, cache), 3),
    })
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
