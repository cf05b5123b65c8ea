"""Where a decoding step's time goes: a `jax.profiler` trace of the engine, per kernel.

    python -m experiments.profile_decode batch_sizes=[1] caches=[none,dual]   # LLaDA-8B geometry
    python -m experiments.profile_decode batch_sizes=[32] caches=[none]

Same settings as `experiments.benchmark` (configs/benchmark.yaml). For each
(batch, cache) it decodes `timed_steps` steps once to compile, then once under
the profiler, and writes `profile_<batch>_<cache>.trace.json.gz` (open it in
ui.perfetto.dev) and `profile_<batch>_<cache>.json` into the Hydra run directory: GPU busy time per step and
the kernels that take it (name, ms per step, launches per step, share), which
is how `experiments/results/benchmark/README.md` was written.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import shutil
import tempfile

import hydra
import jax
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import dllm
from dllm.evaluation import write_json_atomic
from experiments.benchmark import random_model, random_prompts, timed_decode_args


def kernel_summary(trace_file: str, steps: int, top: int = 60) -> dict:
    """Device-side time of a perfetto trace, per kernel name, per decoding step."""
    with gzip.open(trace_file) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    busy, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "/device:" in process.get(e["pid"], "") and "CPU" not in process[e["pid"]]:
            busy[e["name"][:100]] += e.get("dur", 0)
            count[e["name"][:100]] += 1
    total = sum(busy.values())
    return {
        "device_busy_ms_per_step": round(total / steps / 1000, 3),
        "kernels": [{"name": name, "ms_per_step": round(us / steps / 1000, 3),
                     "launches_per_step": round(count[name] / steps, 1), "share": round(us / max(total, 1), 3)}
                    for name, us in busy.most_common(top)],
    }


@hydra.main(config_path="../configs", config_name="benchmark", version_base=None)
def main(cfg: DictConfig) -> dict:
    model = random_model(cfg)
    c = model.config
    out = {}
    for batch in cfg.batch_sizes:
        prompts = random_prompts(cfg, c, batch)
        for cache in cfg.caches:
            kwargs = timed_decode_args(cfg, c, cache)
            jax.block_until_ready(dllm.generate(model, prompts, **kwargs).tokens)  # compile
            folder = tempfile.mkdtemp(prefix="dllm-profile-")
            with jax.profiler.trace(folder, create_perfetto_trace=True):
                result = dllm.generate(model, prompts, **kwargs)
                jax.block_until_ready(result.tokens)
            found = glob.glob(f"{folder}/**/*perfetto_trace.json.gz", recursive=True)
            if not found:
                raise RuntimeError(f"the profiler wrote no perfetto trace under {folder}")
            steps = int(np.asarray(result.nfe).max())
            summary = {"batch": batch, "cache": cache, "steps": steps, **kernel_summary(found[0], steps)}
            name = f"profile_{batch}_{cache}"
            run_dir = HydraConfig.get().runtime.output_dir
            shutil.copy(found[0], f"{run_dir}/{name}.trace.json.gz")
            write_json_atomic(f"{run_dir}/{name}.json", summary)
            shutil.rmtree(folder, ignore_errors=True)
            print(f"batch {batch}, cache {cache}: device busy {summary['device_busy_ms_per_step']} ms per step"
                  + ("" if summary["kernels"] else " (no device kernels in the trace: profile on a GPU or TPU)")
                  + f"; wrote {run_dir}/{name}.json")
            for k in summary["kernels"][:12]:
                print(f"  {k['ms_per_step']:9.3f} ms  x{k['launches_per_step']:6.1f}  {100 * k['share']:5.1f}%  {k['name']}")
            out[name] = summary
    return out


if __name__ == "__main__":
    main()
