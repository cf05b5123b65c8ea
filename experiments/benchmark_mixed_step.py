"""What a batch-invariant cached step costs when only some rows refresh (random bf16 weights).

    python -m experiments.benchmark_mixed_step batch_sizes=[8,32] caches=[prefix,dual]

The engine decides the KV-cache refresh per row (`dllm.decoding.cache.FastDLLMCache.step_logits`): a step
where every unfinished row starts a block runs one full forward, a step where none does runs
one window forward, and a step where some do runs both and each row keeps its own. Rows in lock
step (batch 1, or the fixed schedule of `experiments.benchmark`) never take the mixed branch;
rows of a threshold-decoded batch do, whenever they are at different points of their blocks.
This times the three branches on one state (half the rows at a block start for the mixed one),
jitted alone, and prints ms per step and mixed / (full + window), which should be about 1.
Same model settings as configs/benchmark.yaml.
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

from dllm.decoding import DecodeConfig, engine
from dllm.decoding.cache import cache_policy
from dllm.evaluation import environment, write_json_atomic
from experiments.benchmark import random_model, random_model_special_ids, random_prompts


def timed(fn, *args, repeats: int) -> float:
    """Median milliseconds of `fn(*args)` over `repeats` runs, after one compiling run."""
    jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - began)
    return 1000 * float(np.median(runs))


@hydra.main(config_path="../configs", config_name="benchmark", version_base=None)
def main(cfg: DictConfig) -> list[dict]:
    model = random_model(cfg)
    special = random_model_special_ids(model.config)
    graphdef, params = nnx.split(model)
    rows = []
    for batch in cfg.batch_sizes:
        prompts = jnp.asarray(random_prompts(cfg, model.config, batch), jnp.int32)
        for cache in cfg.caches:
            if cache == "none":  # no cache, no refresh decision: every step is a full forward
                print("cache=none has no mixed step: skipped", flush=True)
                continue
            config = DecodeConfig(gen_length=cfg.gen_length, block_length=cfg.block_length, cache=cache)
            state = engine.initial_state(prompts, jnp.ones_like(prompts), jax.random.key(0), config, special,
                                         model)
            half = jnp.arange(batch) % 2 == 0

            @jax.jit
            def step(params, state):
                out = cache_policy(state.config).step_logits(nnx.merge(graphdef, params), state, padded=False)
                return out.logits, out.cache

            branches = {"full": jnp.zeros(batch, jnp.int32), "window": jnp.ones(batch, jnp.int32),
                        "mixed": jnp.where(half, 0, 1).astype(jnp.int32)}
            ms = {name: timed(step, params, state.replace(step_in_block=s), repeats=cfg.repeats)
                  for name, s in branches.items()}
            row = {"batch": batch, "cache": cache, **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
                   "mixed_over_full_plus_window": round(ms["mixed"] / (ms["full"] + ms["window"]), 3),
                   "mixed_over_window": round(ms["mixed"] / ms["window"], 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_json_atomic(cfg.mixed_out, {"rows": rows, "environment": environment()})
    return rows


if __name__ == "__main__":
    main()
