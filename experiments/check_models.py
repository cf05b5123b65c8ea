"""Measures the bundled checkpoints' figures (issue: bundled default models).

    python -m experiments.check_models                # both
    python -m experiments.check_models --only tiny-tasks --n-per-task 200

tiny-tasks: held-out exact match per task with one token committed per step
(LowConfidence, gen 24, block 8).
small-text: validation negative-ELBO bound in bits per token over windows of
`data/corpus/val.npy` (build it with `python -m dllm.corpus --cache data/cache
--out data/corpus`), and a few samples.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import dllm
import samplers
from dllm import evaluation
from dllm.decoding import DecodeConfig
from dllm.diffusion import elbo_bits_per_token
from dllm.tasks import suite_examples
from experiments.common import REPO_ROOT


def check_tiny_tasks(n_per_task: int) -> dict:
    model, tokenizer = dllm.from_pretrained(REPO_ROOT / "checkpoints/tiny-tasks")
    result = evaluation.evaluate_examples(model, tokenizer, samplers.LowConfidence(), suite_examples("test", n_per_task),
                                          DecodeConfig(gen_length=24, block_length=8), batch_size=250,
                                          prompt_width=24)
    per_task = {k: v["accuracy"] for k, v in result["summary"]["per_task"].items()}
    print(f"tiny-tasks: held-out exact match, one token per step, {n_per_task} prompts per task")
    for task, acc in per_task.items():
        print(f"  {task:15s} {acc:.3f}{'' if acc >= 0.95 else '   < 0.95'}")
    return {"per_task_accuracy": per_task, "n_per_task": n_per_task}


def check_small_text(corpus: Path, windows: int, seq_len: int, n_samples: int) -> dict:
    model, tokenizer = dllm.from_pretrained(REPO_ROOT / "checkpoints/small-text")
    val_path = corpus / "val.npy"
    if not val_path.is_file():
        raise FileNotFoundError(f"{val_path}: no validation tokens; build them with "
                                f"`python -m dllm.corpus --cache data/cache --out {corpus}`")
    tokens = np.load(val_path).astype(np.int32)
    starts = np.linspace(0, len(tokens) - seq_len - 1, windows).astype(int)
    batch = jnp.asarray(np.stack([tokens[s:s + seq_len] for s in starts]))
    logits_fn = jax.jit(lambda t: model(t))
    bits = []
    for i in range(0, windows, 16):
        bits.append(float(elbo_bits_per_token(logits_fn, batch[i:i + 16], jax.random.key(i),
                                              mask_id=tokenizer.mask_id, n_samples=n_samples)))
    bpt = float(np.mean(bits))
    print(f"small-text: validation -ELBO bound {bpt:.3f} bits per token "
          f"({windows} windows of {seq_len} tokens, {n_samples} (t, x_t) draws each)")
    prompts = ["It is a truth universally acknowledged, that", "def read_config(path):", "In the beginning"]
    rows, _ = evaluation.decode_texts(model, tokenizer, samplers.LowConfidence(), prompts,
                                      DecodeConfig(gen_length=64, block_length=16), batch_size=3)
    for row in rows:
        print(f"  {row['prompt']!r} -> {row['output']!r}")
    return {"bits_per_token": bpt, "windows": windows, "seq_len": seq_len,
            "samples": [{"prompt": r["prompt"], "output": r["output"]} for r in rows]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["tiny-tasks", "small-text"])
    parser.add_argument("--n-per-task", type=int, default=200)
    parser.add_argument("--corpus", default=str(REPO_ROOT / "data/corpus"))
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--elbo-samples", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    report = {}
    if args.only in (None, "tiny-tasks"):
        report["tiny-tasks"] = check_tiny_tasks(args.n_per_task)
    if args.only in (None, "small-text"):
        report["small-text"] = check_small_text(Path(args.corpus), args.windows, args.seq_len, args.elbo_samples)
    if args.out:
        evaluation.write_json_atomic(args.out, report)
    return report


if __name__ == "__main__":
    main()
