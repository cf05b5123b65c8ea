"""Every sampler (and compositions) on the held-out task suite, next to the
one-token-per-step baseline: accuracy, mean NFE and tokens per forward per
sampler and per task.

    python -m experiments.compare_samplers                      # bundled tiny-tasks, 200 prompts per task
    python -m experiments.compare_samplers --n-per-task 50 --cache dual --out results.json

Sampler settings come from configs/sampler/*.yaml (plus the compositions
below), so the table measures exactly what `sampler=<name>` runs.
"""

from __future__ import annotations

import argparse
import time

import jax
from hydra.utils import instantiate
from omegaconf import OmegaConf

import dllm
from dllm import evaluation
from dllm.decoding import DecodeConfig
from dllm.tasks import suite_examples
from experiments.common import REPO_ROOT, resolve_path

SAMPLER_DIR = REPO_ROOT / "configs" / "sampler"
COMPOSITIONS = {
    "early_commit(threshold)": {"_target_": "samplers.early_commit.EarlyCommit",
                                "inner": {"_target_": "samplers.threshold.Threshold", "tau": 0.9}},
    "adaptive_block(credit)": {"_target_": "samplers.adaptive_block.AdaptiveBlock", "delimiters": ["/"],
                               "inner": {"_target_": "samplers.credit.Credit"}},
}
EXTRA = {f"threshold(tau={tau})": {"_target_": "samplers.threshold.Threshold", "tau": tau}
         for tau in (0.5, 0.7, 0.8, 0.95)}


def sampler_specs(names=None) -> dict[str, dict]:
    specs = {p.stem: OmegaConf.to_container(OmegaConf.load(p)) for p in sorted(SAMPLER_DIR.glob("*.yaml"))}
    specs = {"low_confidence": specs.pop("low_confidence"), **specs, **COMPOSITIONS, **EXTRA}
    if names:
        unknown = sorted(set(names) - set(specs))
        if unknown:
            raise ValueError(f"unknown sampler(s) {unknown}; allowed: {sorted(specs)}")
        specs = {k: v for k, v in specs.items() if k in names}
    return specs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/tiny-tasks")
    parser.add_argument("--n-per-task", type=int, default=200)
    parser.add_argument("--gen-length", type=int, default=24)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--cache", default="none")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--samplers", nargs="*", default=None)
    parser.add_argument("--out", default=None, help="write all figures to this JSON file")
    args = parser.parse_args(argv)

    model, tokenizer = dllm.from_pretrained(resolve_path(args.checkpoint))
    examples = suite_examples("test", args.n_per_task)
    decode = DecodeConfig(gen_length=args.gen_length, block_length=args.block_length, cache=args.cache)
    results = {}
    for name, spec in sampler_specs(args.samplers).items():
        sampler = instantiate(spec, _convert_="all")
        began = time.perf_counter()
        out = evaluation.evaluate_examples(model, tokenizer, sampler, examples, decode,
                                           batch_size=args.batch_size, key=jax.random.key(0), prompt_width=24)
        results[name] = {"settings": sampler.settings(), **out["summary"], "wall_s": time.perf_counter() - began}
        s = out["summary"]
        print(f"{name:26s} acc {s['accuracy']:.3f}  NFE {s['mean_nfe']:5.2f}  tok/fwd {s['tokens_per_forward']:.2f}",
              flush=True)
    print_table(results)
    if args.out:
        payload = {"checkpoint": str(args.checkpoint), "n_per_task": args.n_per_task, "decode": vars(args),
                   "environment": evaluation.environment(), "results": results}
        evaluation.write_json_atomic(args.out, payload)
    return results


def print_table(results: dict) -> None:
    base = results.get("low_confidence")
    tasks = sorted(next(iter(results.values()))["per_task"])
    print("\n| sampler | mean acc | mean NFE | tokens/forward | NFE vs baseline |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{base['mean_nfe'] / r['mean_nfe']:.2f}x fewer" if base else "-"
        print(f"| {name} | {r['accuracy']:.3f} | {r['mean_nfe']:.2f} | {r['tokens_per_forward']:.2f} | {ratio} |")
    print("\nper task: accuracy / mean NFE")
    print("| sampler | " + " | ".join(tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    for name, r in results.items():
        cells = [f"{r['per_task'][t]['accuracy']:.2f} / {r['per_task'][t]['mean_nfe']:.1f}" for t in tasks]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
