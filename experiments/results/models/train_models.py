"""One GPU call that trains the bundled tasks-base, text-base and text-ar models side by side.

Run on the device machine from the repository root (see README.md beside this file):

    python experiments/results/models/train_models.py --deadline-s 560 --out $OUT

Each model is its documented Hydra command (`python -m experiments.train model=X train=X`).
The three share one GPU. First each runs a short probe (the same program, few steps) to
measure its steps per second while the others run too; then each real run gets the
number of steps that fits the time left (`train.steps=N`, rounded down to 500), which is
recorded in the saved model's metadata.json and in this call's log. The model folders
come back as tar files of at most 15 MB pieces.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RUNS = {  # name -> (hydra overrides, tokens per step, longest allowed run in steps)
    "tasks_base": (["model=tasks_base", "train=tasks_base"], 256 * 224, 30000),
    "text_base": (["model=text_base", "train=text_base"], 128 * 256, 40000),
    "text_ar": (["model=text_ar", "train=text_ar"], 128 * 256, 30000),
}
PROBE = ["train.eval_every=0", "train.checkpoint_every=0", "train.log_every=25", "train.progress=false"]


def launch(name: str, overrides: list[str], workdir: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.28", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "experiments.train", *overrides, f"train.workdir={workdir}",
               "train.progress=false"]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(command[1:])}", flush=True)
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def train_rows(workdir: str) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [row for row in map(json.loads, path.read_text().splitlines()) if row.get("split") == "train"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deadline-s", type=float, default=560.0)
    parser.add_argument("--probe-steps", type=int, default=150)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = parser.parse_args()
    began = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path("runs/logs")
    logs.mkdir(parents=True, exist_ok=True)

    probes = {}
    for name, (overrides, _, _) in RUNS.items():
        extra = ["data.n_per_task=300", "data.eval_n_per_task=0"] if name == "tasks_base" else []
        probes[name] = launch(name, [*overrides, f"train.steps={args.probe_steps}", "train.warmup_steps=10",
                                     *PROBE, *extra], f"runs/probe_{name}", logs / f"probe_{name}.log")
    speeds, startup = {}, {}
    for name, process in probes.items():
        process.wait()
        rows = train_rows(f"runs/probe_{name}")
        if process.returncode or len(rows) < 3:
            print((logs / f"probe_{name}.log").read_text()[-3000:])
            raise SystemExit(f"probe {name} failed (rc {process.returncode})")
        (a, b) = rows[1], rows[-1]
        speeds[name] = (b["step"] - a["step"]) / (b["elapsed_s"] - a["elapsed_s"])
        startup[name] = rows[0]["elapsed_s"]
        print(f"probe {name}: {speeds[name]:.1f} steps/s, {speeds[name] * RUNS[name][1] / 1e6:.2f}M tokens/s, "
              f"first row after {startup[name]:.0f} s", flush=True)

    left = args.deadline_s - (time.time() - began)
    runs, steps = {}, {}
    for name, (overrides, _, longest) in RUNS.items():
        setup = startup[name] + (60 if name == "tasks_base" else 15)  # tasks_base also draws 480k examples
        n = int(0.85 * speeds[name] * (left - setup - 25) // 500 * 500)
        steps[name] = max(500, min(longest, n))
        runs[name] = launch(name, [*overrides, f"train.steps={steps[name]}"], f"runs/{name}", logs / f"{name}.log")
    summary = {"probe_steps_per_s": speeds, "steps": steps}
    for name, process in runs.items():
        process.wait()
        rows = train_rows(f"runs/{name}")
        summary[name] = {"returncode": process.returncode, "last_train_row": rows[-1] if rows else None,
                         "wall_s": time.time() - began}
        print(f"[{time.strftime('%H:%M:%S')}] {name} rc {process.returncode}: {rows[-1] if rows else None}",
              flush=True)
        if process.returncode:
            print((logs / f"{name}.log").read_text()[-3000:])
            continue
        tar = out / f"{name}.tar"
        subprocess.run(["tar", "cf", str(tar), "-C", f"runs/{name}", "model", "metrics.jsonl"], check=True)
        if tar.stat().st_size > 15_000_000:
            subprocess.run(["split", "-b", "15000000", "-d", str(tar), str(tar) + "."], check=True)
            tar.unlink()
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    subprocess.run(f"tail -n 5 runs/logs/*.log > {out}/train_logs.txt", shell=True)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
