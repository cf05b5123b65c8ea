"""The block-decoding rows the GPU run did not have (sub-blocks, pipelined blocks), on this machine's CPU:

    python experiments/results/block_decoding/cpu_rows.py --out experiments/results/block_decoding/cpu_rows.json

tiny-block over the exact block cache and tiny-full (dual cache; its pipelined rows uncached), 200
held-out prompts per task, the rows of `experiments.check_models.block_decoding_samplers` whose name
contains "sub_blocks" or "pipelined", plus threshold 0.9 as the anchor row shared with the GPU run.
Accuracy and NFE do not depend on the device (up to float ties).
"""

import argparse

import dllm
from dllm import evaluation
from dllm.decoding import DecodeConfig
from dllm.tasks import suite_examples
from experiments.check_models import ATTENTION_VARIANTS, BLOCK_DECODING_CACHES, block_decoding_samplers
from experiments.common import REPO_ROOT


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-per-task", type=int, default=200)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    examples = suite_examples("test", args.n_per_task)
    rows = {name: run for name, run in block_decoding_samplers().items()
            if "sub_blocks" in name or "pipelined" in name or name == "threshold 0.9"}
    report = {"n_per_task": args.n_per_task, "environment": evaluation.environment()}
    for model_name in ("tiny-block", "tiny-full"):
        model, tokenizer = dllm.from_pretrained(REPO_ROOT / "checkpoints" / model_name)
        report[model_name] = {}
        for row, (sampler, overrides) in rows.items():
            cache = BLOCK_DECODING_CACHES[model_name]
            cache = "none" if overrides and cache == "dual" else cache
            decode = DecodeConfig(gen_length=24, block_length=ATTENTION_VARIANTS[model_name], cache=cache, **overrides)
            summary = evaluation.evaluate_examples(model, tokenizer, sampler, examples, decode, batch_size=500,
                                                   prompt_width=24)["summary"]
            report[model_name][row] = {"accuracy": summary["accuracy"], "mean_nfe": summary["mean_nfe"],
                                       "cache": cache}
            print(f"{model_name:11s} {row:40s} cache {cache:5s} {summary['accuracy']:.3f} ({summary['mean_nfe']:.2f})",
                  flush=True)
    evaluation.write_json_atomic(args.out, report)


if __name__ == "__main__":
    main()
