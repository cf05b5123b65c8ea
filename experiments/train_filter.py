"""Train a Learn2PD filter: oracle data, training and (optionally) the held-out comparison, one command.

    python -m experiments.train_filter                              # writes checkpoints/filters/tiny-tasks-block8
    python -m experiments.train_filter evaluate.n_per_task=200      # + filter vs threshold on the test split
    python -m experiments.train_filter oracle.n_per_task=100 train.masked_only=false filter_path=runs/f/all

Steps (see the `samplers/learned_filter/` package for the rules and where we deviate from Learn2PD):

1. Oracle data on `oracle.n_per_task` training prompts per task: the reference
   decode (LLaDA low confidence, one token per step, T = 0) and the Extremely
   Greedy Parallel re-decode, recording each step's window confidences and
   per-position labels (argmax == reference). Saved to `workdir/oracle.npz`
   with its settings; reused when the settings match (`oracle.reuse`).
2. The oracle analysis table: per task, the reference's accuracy, the EGP
   oracle's NFE (what a perfect filter could reach) and the forward pass
   from which the argmax canvas already spelled the final answer.
3. The filter: full-batch AdamW on the BCE, early-stopped on a validation
   split of the prompts; saved atomically to `filter_path`.
4. With `evaluate.n_per_task > 0`: the filter (an accept-threshold sweep,
   and with end-of-text prediction) against the threshold sampler's tau
   sweep on held-out prompts, and whether the filter lies on the front.

`train.masked_only` (false by default, as Learn2PD) restricts the BCE to
positions still masked. The task model's logits at already-decoded positions
are untrained (its SFT loss covers masked positions only): its argmax there
equals the committed token only ~16% of the time, at a mean confidence of
~0.64, so those labels say nothing about what the sampler can still commit.
Fitting them anyway made the filter more conservative and, on held-out
prompts, more accurate at the same NFE (0.997 vs 0.977 on 30 prompts per
task), so the default stays with Learn2PD.

Everything goes to `workdir/report.json`; the tables are printed.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
import jax
from omegaconf import DictConfig, OmegaConf

import dllm
import samplers.learned_filter as ft
from dllm import evaluation
from dllm.tasks import suite_examples
from experiments.common import resolve_path


def oracle_data(cfg: dict, model, tokenizer, workdir: Path) -> ft.OracleData:
    """The oracle data of `cfg['oracle']`, from workdir/oracle.npz when it was made with the same settings."""
    settings = dict(cfg["oracle"])
    reuse = settings.pop("reuse", False)
    config = ft.OracleConfig(**settings)
    made_by = {"checkpoint": str(cfg["checkpoint"]), "dtype": cfg["dtype"]}
    path = workdir / "oracle.npz"
    if reuse and path.exists():
        cached = ft.OracleData.load(path)
        wanted = {**config.to_dict(), **made_by}
        if all(cached.settings.get(k) == v for k, v in wanted.items()):
            print(f"oracle data: reusing {path} ({len(cached.records['example'])} records)")
            return cached
    examples = suite_examples(config.split, config.n_per_task, tasks=config.tasks)
    data = ft.build_oracle_data(model, tokenizer, examples, config, settings=made_by)
    print(f"oracle data: wrote {data.save(path)}")
    return data


def evaluate(cfg: dict, model, tokenizer, filter_path: Path) -> dict:
    """Held-out accuracy / NFE of the filter and of the threshold sweep (same prompts, same batches)."""
    from samplers.end_of_text import EndOfText
    from samplers.learned_filter import LearnedFilter
    from samplers.threshold import Threshold

    ev, oracle = cfg["evaluate"], cfg["oracle"]
    examples = suite_examples("test", ev["n_per_task"])
    decode = dllm.DecodeConfig(gen_length=oracle["gen_length"], block_length=oracle["block_length"])
    runs = {f"threshold(tau={tau})": Threshold(tau=tau) for tau in ev["thresholds"]}
    runs.update({f"learned_filter({a})": LearnedFilter(str(filter_path), accept_threshold=a)
                 for a in ev["accept_thresholds"]})
    if ev["eot_prediction"]:
        runs["learned_filter(0.96)+EoTP"] = LearnedFilter(str(filter_path), accept_threshold=0.96,
                                                          eot_prediction=True)
        runs.update({f"end_of_text(threshold(tau={tau}))": EndOfText(inner=Threshold(tau=tau))
                     for tau in ev["eot_thresholds"]})
    return evaluation.compare_samplers(model, tokenizer, runs, examples, decode, batch_size=ev["batch_size"],
                                       key=jax.random.key(0), prompt_width=oracle["prompt_width"])


def dominated_by(run: dict, points: dict) -> list[str]:
    """Names of the points at least as accurate with no more NFE (one of the two strictly)."""
    return [name for name, p in points.items()
            if p["accuracy"] >= run["accuracy"] and p["mean_nfe"] <= run["mean_nfe"]
            and (p["accuracy"] > run["accuracy"] or p["mean_nfe"] < run["mean_nfe"])]


def front_verdicts(results: dict) -> dict:
    """For each run that is not a plain threshold: the threshold points that dominate it
    (none: it is on or above the threshold front). Filter runs with end-of-text prediction
    are also held against EndOfText(threshold), the same cut without the filter."""
    plain = {k: v for k, v in results.items() if k.startswith("threshold(")}
    with_eot = {k: v for k, v in results.items() if k.startswith("end_of_text(threshold(")}
    return {name: dominated_by(r, {**plain, **with_eot} if "EoTP" in name else plain)
            for name, r in results.items() if name not in plain}


def format_results(results: dict, verdicts: dict) -> str:
    lines = ["| sampler | accuracy | mean NFE | tokens/forward | vs threshold front |", "|---|---|---|---|---|"]
    for name, r in sorted(results.items(), key=lambda kv: kv[1]["mean_nfe"]):
        verdict = "-" if name not in verdicts else (
            "dominated by " + ", ".join(verdicts[name]) if verdicts[name] else "on / above the front")
        lines.append(f"| {name} | {r['accuracy']:.4f} | {r['mean_nfe']:.3f} | {r['tokens_per_forward']:.2f} "
                     f"| {verdict} |")
    tasks = sorted(next(iter(results.values()))["per_task"])
    lines += ["", "per task: accuracy / mean NFE", "| sampler | " + " | ".join(tasks) + " |",
              "|---|" + "---|" * len(tasks)]
    for name, r in sorted(results.items(), key=lambda kv: kv[1]["mean_nfe"]):
        cells = [f"{r['per_task'][t]['accuracy']:.2f} / {r['per_task'][t]['mean_nfe']:.2f}" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict:
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
    container = OmegaConf.to_container(cfg, resolve=True)
    workdir = resolve_path(container["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = dllm.from_pretrained(resolve_path(container["checkpoint"]), dtype=container["dtype"])

    began = time.perf_counter()
    data = oracle_data(container, model, tokenizer, workdir)
    analysis = ft.oracle_analysis(data)
    print("\noracle analysis (training prompts)\n" + ft.format_analysis(analysis) + "\n")

    train_config = ft.FilterTrainConfig(**container["train"])
    result = ft.train_filter(data, container["filter"]["features"], container["filter"]["hidden"], train_config)
    for split, m in result.metrics.items():
        print(f"filter {split:5s}: BCE {m['bce']:.4f}  at {train_config.accept_threshold}: accepted "
              f"{m['accepted_fraction']:.3f} of masked, precision {m['precision']:.4f}, recall {m['recall']:.3f}, "
              f"false-positive rate {m['false_positive_rate']:.4f}")
    filter_path = resolve_path(container["filter_path"])
    metadata = {
        "command": " ".join(["python -m experiments.train_filter", *sys.argv[1:]]),
        "oracle_settings": data.settings, "train_config": container["train"], "metrics": result.metrics,
        "best_step": result.best_step, "oracle_analysis": analysis,
    }
    saved = ft.save_filter(filter_path, result.mlp, metadata)
    print(f"filter saved to {saved} ({time.perf_counter() - began:.0f}s for data + training)")

    report = {"config": container, "oracle_analysis": analysis, "filter_metrics": result.metrics,
              "history": result.history, "filter_path": str(saved), "environment": evaluation.environment()}
    if container["evaluate"]["n_per_task"] > 0:
        results = evaluate(container, model, tokenizer, saved)
        verdicts = front_verdicts(results)
        print("\nheld-out test split, "
              f"{container['evaluate']['n_per_task']} prompts per task\n" + format_results(results, verdicts))
        report.update(evaluation=results, front=verdicts)
    print(f"wrote {evaluation.write_json_atomic(workdir / 'report.json', report)}")
    return report


@hydra.main(config_path="../configs", config_name="train_filter", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
