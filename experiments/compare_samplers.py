"""Every sampler (and compositions) on a held-out task suite, next to the
one-token-per-step baseline: accuracy, mean NFE and tokens per forward per
sampler and per task.

    python -m experiments.compare_samplers                      # bundled tiny-tasks, 200 prompts per task
    python -m experiments.compare_samplers --n-per-task 50 --cache dual --out results.json
    python -m experiments.compare_samplers --preset tasks-base --cache dual --out tasks_base_dual.json

`--preset tasks-base` is the bundled tasks-base model on the `parallel` suite at
gen 128 / block 32 (prompt width 96) with the threshold sweep tau 0.5 ... 0.95
and LowConfidence at 2 and 4 tokens per step.

Sampler settings come from configs/sampler/*.yaml (plus the compositions
below), so the table measures exactly what `sampler=<name>` runs. The loop is
`dllm.evaluation.compare_samplers` (train_filter's evaluation runs the same),
and `--results-jsonl` writes the lines `experiments.evaluate` writes, for
`experiments.report`.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
from hydra.utils import instantiate

import dllm
from dllm import evaluation
from dllm.decoding import DecodeConfig
from dllm.decoding.sampler import sampler_names, sampler_spec
from dllm.tasks import SUITES, suite_examples, task_config_of_suite
from experiments.common import resolve_path

COMPOSITIONS = {
    "early_commit(threshold)": {"_target_": "samplers.early_commit.EarlyCommit",
                                "inner": {"_target_": "samplers.threshold.Threshold", "tau": 0.9}},
    "adaptive_block(credit)": {"_target_": "samplers.adaptive_block.AdaptiveBlock", "delimiters": ["/"],
                               "inner": {"_target_": "samplers.credit.Credit"}},
}
EXTRA = {f"threshold(tau={tau})": {"_target_": "samplers.threshold.Threshold", "tau": tau}
         for tau in (0.5, 0.7, 0.8, 0.95)}
PRESETS = {  # a bundled model, the suite it was trained on and its decoding geometry
    "tiny-tasks": {"checkpoint": "checkpoints/tiny-tasks", "suite": "tiny", "gen_length": 24, "block_length": 8,
                   "prompt_width": 24},
    "tasks-base": {"checkpoint": "checkpoints/tasks-base", "suite": "parallel", "gen_length": 128,
                   "block_length": 32, "prompt_width": 96},
}


def parallel_extra(gen_length: int) -> dict[str, dict]:
    """Sweeps added on the parallel suite: the threshold bar, and LLaDA's fixed k tokens per step."""
    return {
        **{f"threshold(tau={tau})": {"_target_": "samplers.threshold.Threshold", "tau": tau}
           for tau in (0.5, 0.6, 0.7, 0.8, 0.95)},
        **{f"low_confidence({k} tokens/step)": {"_target_": "samplers.low_confidence.LowConfidence",
                                                 "steps": gen_length // k}
           for k in (2, 4)},
        "self_speculative(k=2)": {"_target_": "samplers.self_speculative.SelfSpeculative", "draft_length": 2},
    }


# The bundled learned filter was trained for tiny-tasks at block 8; it has no filter for other models.
TINY_ONLY = ("learned_filter",)


def sampler_specs(names=None, suite: str = "tiny", gen_length: int = 128) -> dict[str, dict]:
    specs = {name: sampler_spec(name) for name in sampler_names()}  # the registry: configs/sampler/*.yaml
    if suite == "tiny":
        specs = {"low_confidence": specs.pop("low_confidence"), **specs, **COMPOSITIONS, **EXTRA}
    else:
        specs = {name: spec for name, spec in specs.items() if name not in TINY_ONLY}
        first = {name: specs.pop(name) for name in ("low_confidence", "threshold")}  # the sweep first
        specs = {**first, **parallel_extra(gen_length), **specs, **COMPOSITIONS}
    if names:
        unknown = sorted(set(names) - set(specs))
        if unknown:
            raise ValueError(f"unknown sampler(s) {unknown}; allowed: {sorted(specs)}")
        specs = {k: v for k, v in specs.items() if k in names}
    return specs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny-tasks",
                        help="model, suite and geometry; the flags below override it")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--suite", default=None, choices=sorted(SUITES))
    parser.add_argument("--n-per-task", type=int, default=200)
    parser.add_argument("--gen-length", type=int, default=None)
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument("--prompt-width", type=int, default=None)
    parser.add_argument("--cache", default="none")
    parser.add_argument("--cache-refresh-every", type=int, default=0,
                        help="DecodeConfig.cache_refresh_every (dkv: its reload period in steps of the block)")
    parser.add_argument("--sliding-window", type=int, default=0,
                        help="DecodeConfig.sliding_window: decode the first W masked positions of the block "
                             "(Elastic-Cache's window; needed by --cache elastic)")
    parser.add_argument("--elastic-gamma", type=float, default=0.9, help="DecodeConfig.elastic_gamma")
    parser.add_argument("--elastic-track", type=int, default=1, help="DecodeConfig.elastic_track")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--weight-rounding", default=None, choices=["fp8"],
                        help="round the GEMM weights to FP8 e4m3 at load (their accuracy; held in the param dtype)")
    parser.add_argument("--continuous", action="store_true",
                        help="continuous batching: --batch-size slots, a finished row's slot takes the next prompt")
    parser.add_argument("--samplers", nargs="*", default=None)
    parser.add_argument("--out", default=None, help="write all figures to this JSON file")
    parser.add_argument("--results-jsonl", default=None,
                        help="append one line per sampler run, as experiments.evaluate does (for experiments.report)")
    args = parser.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    model, tokenizer = dllm.from_pretrained(resolve_path(args.checkpoint), weight_rounding=args.weight_rounding)
    examples = suite_examples("test", args.n_per_task, suite=args.suite)
    decode = DecodeConfig(gen_length=args.gen_length, block_length=args.block_length, cache=args.cache,
                          cache_refresh_every=args.cache_refresh_every, sliding_window=args.sliding_window,
                          elastic_gamma=args.elastic_gamma, elastic_track=args.elastic_track)
    runs = {name: instantiate(spec, _convert_="all")
            for name, spec in sampler_specs(args.samplers, args.suite, args.gen_length).items()}
    for name, sampler in list(runs.items()):  # e.g. self_speculative runs uncached only: said, not hidden
        try:
            sampler.bind(tokenizer).validate(decode)
        except ValueError as error:
            if args.samplers:  # asked for by name: an error
                raise
            print(f"not run: {name}: {error}")
            del runs[name]
    results = {}

    def write(label, sampler, summary):  # after every sampler, so a run cut short keeps what it measured
        results[label] = {"settings": sampler.settings(), **summary}
        if args.out:
            payload = {"checkpoint": str(args.checkpoint), "suite": args.suite, "n_per_task": args.n_per_task,
                       "decode": vars(args), "environment": evaluation.environment(), "results": results}
            evaluation.write_json_atomic(args.out, payload)
        if args.results_jsonl:  # the record experiments.evaluate writes, so experiments.report reads it
            line = evaluation.results_line(summary, task=task_config_of_suite(args.suite), split="test",
                                           model=str(args.checkpoint), sampler=sampler,
                                           decode=dataclasses.asdict(decode), label=label)
            evaluation.write_json_atomic(args.results_jsonl, line, lines=True, append=True)

    results = evaluation.compare_samplers(model, tokenizer, runs, examples, decode, batch_size=args.batch_size,
                                          key=jax.random.key(0), prompt_width=args.prompt_width, after_each=write,
                                          continuous=args.continuous)
    if args.out:  # with each run's wall time
        payload = {"checkpoint": str(args.checkpoint), "suite": args.suite, "n_per_task": args.n_per_task,
                   "decode": vars(args), "environment": evaluation.environment(), "results": results}
        evaluation.write_json_atomic(args.out, payload)
    print_table(results)
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
