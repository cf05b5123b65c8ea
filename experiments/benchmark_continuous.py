"""Continuous against static batching on held-out prompts: completed prompts per second, the same
tokens row for row.

    python -m experiments.benchmark_continuous                          # tasks-base, 1000 prompts, batch 64
    python -m experiments.benchmark_continuous --preset tiny-tasks --n 64 --batch-size 8 --out cb.json

Both runs decode the same prompts (the held-out split of the preset's suite, tasks mixed by a fixed
shuffle, as an evaluation meets them) with the same sampler, keys and settings; each is timed after
its own compile (`dllm.evaluation.decode_texts` times the decode calls only). Static batching decodes
`batch_size` prompts per call and waits for the slowest row of each batch; continuous batching
(`dllm.generate(slots=batch_size)`) moves the next prompt into a finished row's slot inside the
compiled loop. Printed: prompts/s of both, their ratio, and the ratio the NFE allows, sum over static
batches of (batch size x the batch's largest NFE) over the sum of NFE (continuous batching with no
cost per refill and no tail would reach it). The tokens and NFE of every row must be equal; the
script exits 1 when they are not.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np
from hydra.utils import instantiate

import dllm
from dllm import evaluation
from dllm.decoding import DecodeConfig
from dllm.tasks import SUITES, suite_examples
from experiments.common import resolve_path
from experiments.compare_samplers import PRESETS, sampler_specs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tasks-base")
    parser.add_argument("--n", type=int, default=1000, help="held-out prompts (tasks mixed)")
    parser.add_argument("--batch-size", type=int, default=64, help="static batch size = continuous slots")
    parser.add_argument("--sampler", default="threshold", help="a name of configs/sampler/ (or the preset's sweep)")
    parser.add_argument("--cache", default="none")
    parser.add_argument("--queue-length", type=int, default=None, help="prompts per compiled queue (default all)")
    parser.add_argument("--seed", type=int, default=0, help="the shuffle of the prompts and the decoding key")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.n < 1 or args.batch_size < 1:
        raise ValueError(f"--n={args.n}, --batch-size={args.batch_size}: both must be >= 1")

    model, tokenizer = dllm.from_pretrained(resolve_path(preset["checkpoint"]))
    per_task = -(-args.n // len(SUITES[preset["suite"]]))
    examples = suite_examples("test", per_task, suite=preset["suite"])
    examples = [examples[i] for i in np.random.default_rng(args.seed).permutation(len(examples))[:args.n]]
    prompts = [e.prompt for e in examples]
    sampler = instantiate(sampler_specs([args.sampler], preset["suite"], preset["gen_length"])[args.sampler],
                          _convert_="all")
    decode = DecodeConfig(gen_length=preset["gen_length"], block_length=preset["block_length"], cache=args.cache)
    common = dict(batch_size=args.batch_size, key=jax.random.key(args.seed), prompt_width=preset["prompt_width"])

    static_rows, static = evaluation.decode_texts(model, tokenizer, sampler, prompts, decode, **common)
    queue = args.queue_length or len(prompts)
    rows, continuous = evaluation.decode_texts(model, tokenizer, sampler, prompts, decode, continuous=True,
                                               queue_length=queue, **common)
    same = [(r["tokens"], r["nfe"]) for r in rows] == [(r["tokens"], r["nfe"]) for r in static_rows]
    nfe = np.array([r["nfe"] for r in static_rows])
    batches = [nfe[i:i + args.batch_size] for i in range(0, len(nfe), args.batch_size)]
    static_forwards = sum(args.batch_size * b.max() for b in batches)
    figures = {
        "preset": args.preset, "n": len(prompts), "batch_size": args.batch_size, "sampler": sampler.settings(),
        "decode": {"gen_length": decode.gen_length, "block_length": decode.block_length, "cache": decode.cache},
        "queue_length": queue,
        "static": static, "continuous": continuous, "identical_rows": same,
        "mean_nfe": float(nfe.mean()), "max_nfe": int(nfe.max()),
        "speedup": continuous["prompts_per_s"] / static["prompts_per_s"],
        "speedup_nfe_allows": float(static_forwards / nfe.sum()),
        "environment": evaluation.environment(),
    }
    print(f"{args.preset}, {len(prompts)} prompts, {args.sampler}, cache {args.cache}, batch {args.batch_size}: "
          f"static {static['prompts_per_s']:.1f} prompts/s, continuous {continuous['prompts_per_s']:.1f} "
          f"prompts/s = {figures['speedup']:.2f}x (the NFE allow {figures['speedup_nfe_allows']:.2f}x); "
          f"mean NFE {figures['mean_nfe']:.1f}, max {figures['max_nfe']}; identical rows: {same}")
    if args.out:
        evaluation.write_json_atomic(args.out, figures)
    if not same:
        sys.exit(1)
    return figures


if __name__ == "__main__":
    main()
