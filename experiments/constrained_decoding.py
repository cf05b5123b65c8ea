"""DINGO constrained decoding against the same rule unconstrained, per task with a fixed answer format.

    python -m experiments.constrained_decoding                       # tiny-tasks, 50 prompts per task
    python -m experiments.constrained_decoding --preset tasks-base --n-per-task 100 --out dingo.json

For every task of the suite that has a format (`Task.answer_pattern`, e.g. the grid of a latin square,
the digits of a sum), and for each inner rule (one token per step, threshold 0.9 / 0.7 / 0.5): the
held-out accuracy, the share of outputs in the task's format, and the mean NFE, without and with
DINGO (`samplers.dingo.Dingo(pattern=answer_pattern, inner=rule)`).
"""

from __future__ import annotations

import argparse

import jax

import dllm
from dllm import evaluation
from dllm.decoding import DecodeConfig
from dllm.tasks import SUITES, get_task, suite_examples
from experiments.common import resolve_path
from experiments.compare_samplers import PRESETS
from samplers import Dingo, LowConfidence, Threshold

INNER = {"one token per step": LowConfidence(), "threshold 0.9": Threshold(tau=0.9),
         "threshold 0.7": Threshold(tau=0.7), "threshold 0.5": Threshold(tau=0.5)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny-tasks")
    parser.add_argument("--n-per-task", type=int, default=50)
    parser.add_argument("--tasks", nargs="*", default=None, help="default: every task with an answer_pattern")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=None, help="write the figures to this JSON file (atomically)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    suite = preset["suite"]
    formatted = sorted(name for name, task in SUITES[suite].items() if task.answer_pattern is not None)
    tasks = args.tasks or formatted
    unknown = sorted(set(tasks) - set(formatted))
    if unknown:
        raise ValueError(f"task(s) {unknown} of suite {suite!r} have no answer_pattern; allowed: {formatted}")

    model, tokenizer = dllm.from_pretrained(resolve_path(preset["checkpoint"]))
    decode = DecodeConfig(gen_length=preset["gen_length"], block_length=preset["block_length"])
    examples = suite_examples("test", args.n_per_task, suite=suite)
    results: dict[str, dict] = {}
    for name in tasks:
        task = get_task(name, suite)
        rows = [e for e in examples if e.task == name]
        for label, inner in INNER.items():
            for constrained in (False, True):
                sampler = Dingo(pattern=task.answer_pattern, inner=inner) if constrained else inner
                summary = evaluation.evaluate_examples(model, tokenizer, sampler, rows, decode,
                                                       batch_size=args.batch_size, key=jax.random.key(0),
                                                       prompt_width=preset["prompt_width"])["summary"]
                figures = summary["per_task"][name]
                results.setdefault(name, {})[f"{'dingo + ' if constrained else ''}{label}"] = {
                    "accuracy": figures["accuracy"], "format_valid": figures["format_valid"],
                    "mean_nfe": figures["mean_nfe"], "unfinished": summary["unfinished"],
                    "seconds": summary["seconds"]}
                if args.out:
                    evaluation.write_json_atomic(args.out, {
                        "preset": args.preset, "checkpoint": preset["checkpoint"], "suite": suite,
                        "n_per_task": args.n_per_task, "decode": {k: v for k, v in preset.items() if k != "checkpoint"},
                        "environment": evaluation.environment(), "results": results})
    print_table(results)
    return results


def print_table(results: dict) -> None:
    print("\n| task | rule | accuracy | in format | mean NFE | with DINGO: accuracy | in format | mean NFE |")
    print("|---|---|---|---|---|---|---|---|")
    for task, runs in results.items():
        for label in INNER:
            plain, dingo = runs.get(label), runs.get(f"dingo + {label}")
            if plain is None or dingo is None:
                continue
            print(f"| {task} | {label} | {plain['accuracy']:.3f} | {plain['format_valid']:.3f} | "
                  f"{plain['mean_nfe']:.1f} | {dingo['accuracy']:.3f} | {dingo['format_valid']:.3f} | "
                  f"{dingo['mean_nfe']:.1f} |")


if __name__ == "__main__":
    main()
