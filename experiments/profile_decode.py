"""Where a decoding step's time goes: a `jax.profiler` trace of the engine, per kernel.

    python -m experiments.profile_decode batch_sizes=[1] caches=[none,dual]   # LLaDA-8B geometry
    python -m experiments.profile_decode batch_sizes=[32] caches=[none]

Same settings as `experiments.benchmark` (configs/benchmark.yaml). For each
(batch, cache) it decodes `timed_steps` steps once to compile, then once under
the profiler, and writes `profile_<batch>_<cache>.trace.json.gz` (open it in
ui.perfetto.dev) and `profile_<batch>_<cache>.json` into the Hydra run directory: GPU busy time per step and
the kernels that take it (name, ms per step, launches per step, share), which
is how `experiments/results/benchmark/README.md` was written.

    python -m experiments.profile_decode ... profile_hlo=true

also says what each XLA fusion kernel computes (the profile names them `loop_pad_fusion_338` and the
like): the run dumps XLA's optimized HLO (`--xla_dump_to`, set before the backend starts) and each
kernel found there gets an `hlo` entry, its fusion kind, output shape and ops (`hlo_fusions`).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile

import hydra
import jax
import numpy as np
from jax._src import xla_bridge
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import dllm
from dllm.evaluation import write_json_atomic
from experiments.benchmark import random_model, random_prompts, set_window_kernel_plan, timed_decode_args


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


HLO_SKIPPED = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple"}


def hlo_fusions(dump_files) -> dict[str, str]:
    """Kernel name -> what its fusion computes, from XLA's dump files (`--xla_dump_to` with
    `--xla_dump_hlo_as_text`): for every fusion instruction of the largest optimized module among them
    (the decoding loop), "<kind> -> <shape>: <op> xN, ..." over the ops of its fused computation
    (parameters, constants, bitcasts and tuples left out). Names as the profiler gives them:
    `loop_pad_fusion.338` is the kernel `loop_pad_fusion_338`, cut to `kernel_summary`'s 100 characters.
    A kernel of a smaller module run in the same trace under a name the decoding loop also uses
    (`kernel_summary` merges kernels by name) gets the loop's description."""
    dumps = [f for f in dump_files if f.endswith("after_optimizations.txt")]
    if not dumps:
        return {}
    with open(max(dumps, key=os.path.getsize)) as f:
        text = f.read()
    instruction = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\(")
    computations, body = {}, None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            body = computations.setdefault(header.group(1), [])
        elif line.startswith("}"):
            body = None
        elif body is not None and (found := instruction.match(line)):
            body.append((found.group(1), found.group(2), found.group(3), line))
    described = {}
    for instructions in computations.values():
        for name, shape, op, line in instructions:
            called = re.search(r"calls=%?([\w.\-]+)", line)
            if op != "fusion" or not called:
                continue
            kind = re.search(r"kind=(\w+)", line)
            ops = collections.Counter(o for _, _, o, _ in computations.get(called.group(1), []) if o not in HLO_SKIPPED)
            summary = ", ".join(o if n == 1 else f"{o} x{n}" for o, n in ops.most_common())
            described[re.sub(r"[.\-]", "_", name)[:100]] = f"{kind.group(1) if kind else 'fusion'} -> {shape[:80]}: {summary}"
    return described


def profile_run(model, prompts, cfg: DictConfig, cache: str, dump_dir: str | None) -> tuple[str, dict]:
    """Compiles, then profiles one decode of `prompts` with `cache`; writes its trace and summary into the
    Hydra run directory and prints the top kernels. Returns (name, summary)."""
    batch = len(prompts)
    kwargs = timed_decode_args(cfg, model.config, cache)
    dumped_before = set(glob.glob(f"{dump_dir}/*")) if dump_dir else set()
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
    if dump_dir is not None:
        described = hlo_fusions(sorted(set(glob.glob(f"{dump_dir}/*")) - dumped_before))
        if summary["kernels"] and not described:
            print(f"profile_hlo: no optimized HLO was dumped under {dump_dir}; kernels stay unnamed")
        for kernel in summary["kernels"]:
            if kernel["name"] in described:
                kernel["hlo"] = described[kernel["name"]]
    name = f"profile_{batch}_{cache}"
    run_dir = HydraConfig.get().runtime.output_dir
    shutil.copy(found[0], f"{run_dir}/{name}.trace.json.gz")
    write_json_atomic(f"{run_dir}/{name}.json", summary)
    shutil.rmtree(folder, ignore_errors=True)
    print(f"batch {batch}, cache {cache}: device busy {summary['device_busy_ms_per_step']} ms per step"
          + ("" if summary["kernels"] else " (no device kernels in the trace: profile on a GPU or TPU)")
          + f"; wrote {run_dir}/{name}.json")
    for k in summary["kernels"][:12]:
        print(f"  {k['ms_per_step']:9.3f} ms  x{k['launches_per_step']:6.1f}  {100 * k['share']:5.1f}%  {k['name']}"
              + (f"  [{k['hlo'][:120]}]" if "hlo" in k else ""))
    return name, summary


@hydra.main(config_path="../configs", config_name="benchmark", version_base=None)
def main(cfg: DictConfig) -> dict:
    dump_dir = None
    if cfg.get("profile_hlo"):  # before the backend starts: XLA reads its flags once
        if xla_bridge.backends_are_initialized():  # (jax-internal; present in jax 0.10 and 0.11)
            raise RuntimeError("profile_hlo=true needs XLA_FLAGS set before the backend starts, and it has started")
        dump_dir = tempfile.mkdtemp(prefix="dllm-hlo-")
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
    set_window_kernel_plan(cfg)
    model = random_model(cfg)
    c = model.config
    out = {}
    try:
        for batch in cfg.batch_sizes:
            prompts = random_prompts(cfg, c, batch)
            for cache in cfg.caches:
                name, summary = profile_run(model, prompts, cfg, cache, dump_dir)
                out[name] = summary
    finally:  # a whole decode's HLO dump is large
        if dump_dir is not None:
            shutil.rmtree(dump_dir, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
