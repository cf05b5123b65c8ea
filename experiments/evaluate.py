"""Evaluate one (model x task x sampler) run; append one JSON line of metrics.

    python -m experiments.evaluate sampler=threshold sampler.tau=0.9
    python -m experiments.evaluate -m sampler=low_confidence,threshold     # a sweep

Writes `results.jsonl` (one line per run: task, split, n, accuracy, NFE,
tokens per forward, latency, tokens/s, the full sampler and decode settings,
model, versions, device) and `rows.jsonl` (every prompt, output and score)
into the Hydra run directory.
"""

from __future__ import annotations

import hydra
import jax
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dllm import evaluation
from experiments.common import decode_setup, task_examples


@hydra.main(config_path="../configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> dict:
    model, tokenizer, source, sampler, decode, mesh, rules = decode_setup(cfg)
    examples = task_examples(cfg, tokenizer)
    result = evaluation.evaluate_examples(model, tokenizer, sampler, examples, decode,
                                          batch_size=cfg.batch_size, key=jax.random.key(cfg.seed), mesh=mesh, rules=rules,
                                          continuous=cfg.continuous_batching)
    summary = result["summary"]
    line = evaluation.results_line(summary, task=cfg.task.name, split=cfg.task.split, model=source, sampler=sampler,
                                   decode=OmegaConf.to_container(cfg.decode),
                                   task_config=OmegaConf.to_container(cfg.task))
    out_dir = HydraConfig.get().runtime.output_dir
    evaluation.write_json_atomic(f"{out_dir}/results.jsonl", line, lines=True, append=True)
    evaluation.write_json_atomic(f"{out_dir}/rows.json", result["rows"])
    print(f"{sampler.settings()['name']}: accuracy {summary['accuracy']:.3f}  mean NFE {summary['mean_nfe']:.2f}  "
          f"tokens/forward {summary['tokens_per_forward']:.2f}  {summary['tokens_per_s']:.0f} tokens/s")
    for name, t in summary["per_task"].items():
        print(f"  {name:15s} acc {t['accuracy']:.3f}  nfe {t['mean_nfe']:.2f}")
    return line


if __name__ == "__main__":
    main()
