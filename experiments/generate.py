"""Main job: decode prompts with the bundled model and print what happened.

    python -m experiments.generate
    python -m experiments.generate sampler=threshold sampler.tau=0.7 n=4
    python -m experiments.generate 'prompts=["reverse : Ann Bob Cid Dan Eve Fay Gus Hal =>"]'

Prints each prompt, its output, NFE, tokens per forward and wall time, and
writes the same to `generate.json` in the Hydra run directory.
"""

from __future__ import annotations

import time

import hydra
import jax
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dllm import evaluation
from experiments.common import decode_setup, task_examples


@hydra.main(config_path="../configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> dict:
    model, tokenizer, source, sampler, decode, mesh, rules = decode_setup(cfg)
    if cfg.prompts:
        if isinstance(cfg.prompts, str):
            raise TypeError(f"prompts={cfg.prompts!r} is one string; allowed: a list of prompt texts, "
                            f"e.g. 'prompts=[\"{cfg.prompts}\"]'")
        prompts = list(cfg.prompts)
    else:
        by_task: dict[str, list] = {}
        for example in task_examples(cfg, tokenizer):
            by_task.setdefault(example.task, []).append(example)
        rounds = zip(*by_task.values())  # one prompt of each task in turn
        prompts = [e.prompt for batch in rounds for e in batch][: cfg.n]
    began = time.perf_counter()
    rows, timing = evaluation.decode_texts(model, tokenizer, sampler, prompts, decode,
                                           batch_size=cfg.batch_size, key=jax.random.key(cfg.seed), mesh=mesh, rules=rules)
    total = time.perf_counter() - began
    print(f"model: {source}\nsampler: {sampler.settings()}\n")
    for row in rows:
        unfinished = "" if row["finished"] else (f"  UNFINISHED: {row['left_masked']} positions still masked "
                                                 "(decode.max_steps ran out)")
        print(f"prompt : {row['prompt']}\noutput : {row['output']}\n"
              f"nfe {row['nfe']}  tokens/forward {row['tokens_per_forward']:.2f}{unfinished}\n")
    print(f"wall time {total:.2f}s (incl. compile); decode {timing['seconds']:.3f}s, "
          f"{timing['tokens_per_s']:.0f} tokens/s")
    payload = {"model": source, "sampler": sampler.settings(), "decode": OmegaConf.to_container(cfg.decode),
               "rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows],
               "timing": {**timing, "wall_s_including_compile": total}, "environment": evaluation.environment()}
    out = evaluation.write_json_atomic(f"{HydraConfig.get().runtime.output_dir}/generate.json", payload)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
