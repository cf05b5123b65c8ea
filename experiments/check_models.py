"""Measures the bundled checkpoints' figures.

    python -m experiments.check_models                       # every model
    python -m experiments.check_models --only tasks-base --n-per-task 200 --out figures.json

tiny-tasks: held-out exact match per task (tiny suite) with one token committed
per step (LowConfidence, gen 24, block 8).

attention-variants: tiny-ar, tiny-block and tiny-full (one size, one recipe,
attention causal / block-causal of 8 / bidirectional): held-out exact match per
task of the tiny suite, one token per step and with Threshold(0.9).

block-decoding: the same three over their caches (the exact block cache for
tiny-ar and tiny-block, the dual cache for tiny-full): accuracy and mean NFE for
one token per step, Threshold at several bars and SDAR's dynamic rule.

tasks-base: held-out accuracy per task of the `parallel` suite with one token
per step (gen 128, block 32), each deterministic task against the 0.90 bar,
and the model's confidence (max-prob of the proposed token) at the first
forward of a decode: the share of the generation's positions above 0.9 and
0.99 (the first block's and the whole canvas's).

text-base: validation negative-ELBO bound in bits per token and bits per byte
over windows of `data/corpus/val.npy` (build it with `python -m dllm.corpus
--cache data/cache --out data/corpus`); then samples of 128 tokens after
32-token validation prompts, with temperature 1, for one token per step and
fewer NFE (random remasking, as MDLM's ancestral sampler; LowConfidence with
1 / 2 / 4 / 8 tokens per step; Threshold at several bars), each scored by the generative perplexity under `text-ar` (an
autoregressive model trained by the framework on the same corpus,
configs/train/text_ar.yaml) and by its unigram entropy (MDLM, arXiv
2406.07524, §4.1); the validation continuations themselves are scored the
same way as the reference row.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import dllm
import samplers
from dllm import evaluation
from dllm.decoding import DecodeConfig, generate
from dllm.decoding.engine import pad_prompts, prompt_keys
from dllm.diffusion import elbo_bits_per_token
from dllm.tasks import SUITES, suite_examples
from experiments.common import REPO_ROOT

MODELS = ("tiny-tasks", "attention-variants", "block-decoding", "tasks-base", "text-base")
# tiny-ar / tiny-block / tiny-full (configs/model/tiny_*.yaml, train=tiny_compare): one size, one recipe,
# three attention patterns. Each decodes with engine blocks its training matches: the AR model one
# position at a time, the block model one model block (8) at a time, the full model in blocks of 8
# (semi-AR, as tiny-tasks).
ATTENTION_VARIANTS = {"tiny-ar": 1, "tiny-block": 8, "tiny-full": 8}  # checkpoint -> engine block_length
ACCURACY_BAR = 0.90  # tasks-base: deterministic tasks at one token per step
PARALLEL_PROMPT_WIDTH = 96


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


def check_attention_variants(n_per_task: int) -> dict:
    """AR vs block diffusion vs full diffusion at equal size and data: held-out exact match per task."""
    examples = suite_examples("test", n_per_task)
    runs = {"one token per step": samplers.LowConfidence, "threshold 0.9": lambda: samplers.Threshold(tau=0.9)}
    report = {}
    for name, block_length in ATTENTION_VARIANTS.items():
        model, tokenizer = dllm.from_pretrained(REPO_ROOT / "checkpoints" / name)
        report[name] = {"attention": model.config.attention, "block_size": model.config.block_size,
                        "engine_block_length": block_length}
        for run, make_sampler in runs.items():
            result = evaluation.evaluate_examples(model, tokenizer, make_sampler(), examples,
                                                  DecodeConfig(gen_length=24, block_length=block_length),
                                                  batch_size=250, prompt_width=24)
            summary = result["summary"]
            report[name][run] = {"per_task_accuracy": {k: v["accuracy"] for k, v in summary["per_task"].items()},
                                 "accuracy": summary["accuracy"], "mean_nfe": summary["mean_nfe"]}
    for run in runs:
        print(f"attention variants (0.87M parameters each, same data and recipe): held-out exact match, {run}, "
              f"gen 24, {n_per_task} prompts per task")
        print(f"  {'task':15s}" + "".join(f"{name:>12s}" for name in ATTENTION_VARIANTS))
        for task in report["tiny-ar"][run]["per_task_accuracy"]:
            print(f"  {task:15s}" + "".join(f"{report[name][run]['per_task_accuracy'][task]:12.3f}"
                                          for name in ATTENTION_VARIANTS))
        print(f"  {'all':15s}" + "".join(f"{report[name][run]['accuracy']:12.3f}" for name in ATTENTION_VARIANTS))
        print(f"  {'mean NFE':15s}" + "".join(f"{report[name][run]['mean_nfe']:12.1f}" for name in ATTENTION_VARIANTS))
    return report | {"n_per_task": n_per_task}


# block-decoding: each variant over its cache (the exact block cache for the block-causal two,
# Fast-dLLM's dual cache for the full model), one token per step and the parallel rules.
BLOCK_DECODING_CACHES = {"tiny-ar": "block", "tiny-block": "block", "tiny-full": "dual"}


def block_decoding_samplers() -> dict:
    """{row name: (sampler, DecodeConfig overrides)}."""
    runs = {"one token per step": (samplers.LowConfidence(), {})}
    runs |= {f"threshold {tau}": (samplers.Threshold(tau=tau), {}) for tau in (0.95, 0.9, 0.7, 0.5, 0.3)}
    runs |= {f"low_confidence_dynamic {tau}": (samplers.DynamicLowConfidence(tau=tau), {}) for tau in (0.9, 0.5)}
    runs |= {f"sub_blocks {size} (threshold > 0.9)": (samplers.SubBlocks(size=size), {}) for size in (4, 2)}
    # Fast-dLLM v2's sub-block cache (use_block_cache): block-cache models only
    runs |= {f"sub_blocks {size}, sub-block cache": (samplers.SubBlocks(size=size), {"sub_block_cache": size})
             for size in (4, 2)}
    # D2F pipelining (pipelined rows of the full model run uncached: the dual cache takes one block)
    runs |= {f"threshold {tau}, 2 blocks pipelined at {fraction}": (
        samplers.Threshold(tau=tau), {"pipeline_blocks": 2, "pipeline_fraction": fraction})
        for tau, fraction in ((0.9, 0.5), (0.9, 0.25), (0.7, 0.25))}
    return runs


def check_block_decoding(n_per_task: int) -> dict:
    """Accuracy and NFE of the attention variants decoded over their caches, per sampler."""
    examples = suite_examples("test", n_per_task)
    report = {}
    for name, cache in BLOCK_DECODING_CACHES.items():
        model, tokenizer = dllm.from_pretrained(REPO_ROOT / "checkpoints" / name)
        report[name] = {"cache": cache, "block_length": ATTENTION_VARIANTS[name], "runs": {}}
        for run, (sampler, overrides) in block_decoding_samplers().items():
            if isinstance(sampler, samplers.SubBlocks) and ATTENTION_VARIANTS[name] % sampler.size:
                continue  # sub-blocks larger than the model's blocks (tiny-ar): no such row
            if "sub_block_cache" in overrides and cache != "block":
                continue  # the sub-block cache refines the exact block cache (tiny-full has none)
            run_cache = "none" if overrides and cache == "dual" else cache
            decode = DecodeConfig(gen_length=24, block_length=ATTENTION_VARIANTS[name], cache=run_cache, **overrides)
            summary = evaluation.evaluate_examples(model, tokenizer, sampler, examples, decode, batch_size=250,
                                                   prompt_width=24)["summary"]
            report[name]["runs"][run] = {"accuracy": summary["accuracy"], "mean_nfe": summary["mean_nfe"],
                                         "cache": run_cache, **overrides,
                                         "per_task_accuracy": {k: v["accuracy"]
                                                               for k, v in summary["per_task"].items()}}
    print(f"block decoding: held-out exact match (mean NFE), gen 24, {n_per_task} prompts per task; "
          + ", ".join(f"{n} cache {c}" for n, c in BLOCK_DECODING_CACHES.items()))
    print(f"  {'sampler':30s}" + "".join(f"{name:>18s}" for name in BLOCK_DECODING_CACHES))
    for run in block_decoding_samplers():
        cells = [report[name]["runs"].get(run) for name in BLOCK_DECODING_CACHES]
        print(f"  {run:30s}" + "".join(f"{'-':>18s}" if c is None else f"{c['accuracy']:10.3f} ({c['mean_nfe']:4.1f})"
                                        for c in cells))
    return report | {"n_per_task": n_per_task}


def first_forward_confidence(model, tokenizer, prompts: list[str], gen_length: int, block_length: int,
                             prompt_width: int) -> dict:
    """Max-prob confidence of every generation position at the first forward (all of them masked)."""
    tokens, mask = pad_prompts([tokenizer.encode(p) for p in prompts], tokenizer.pad_id, prompt_width)
    canvas = np.concatenate([tokens, np.full((len(prompts), gen_length), tokenizer.mask_id, np.int32)], axis=1)
    attention = np.concatenate([mask, np.ones((len(prompts), gen_length), np.int32)], axis=1)
    logits = jax.jit(lambda t, m: model(t, m, logits_start=prompt_width))(jnp.asarray(canvas), jnp.asarray(attention))
    confidence = np.asarray(jax.nn.softmax(logits, axis=-1).max(-1))

    def shares(values):
        return {"above_0.9": float((values > 0.9).mean()), "above_0.99": float((values > 0.99).mean()),
                "median": float(np.median(values))}

    return {"first_block": shares(confidence[:, :block_length]), "whole_generation": shares(confidence)}


def check_tasks_base(n_per_task: int, batch_size: int, checkpoint: Path = REPO_ROOT / "checkpoints/tasks-base") -> dict:
    model, tokenizer = dllm.from_pretrained(checkpoint)
    examples = suite_examples("test", n_per_task, suite="parallel")
    decode = DecodeConfig(gen_length=128, block_length=32)
    result = evaluation.evaluate_examples(model, tokenizer, samplers.LowConfidence(), examples, decode,
                                          batch_size=batch_size, prompt_width=PARALLEL_PROMPT_WIDTH)
    tasks = SUITES["parallel"]
    per_task = {k: v["accuracy"] for k, v in result["summary"]["per_task"].items()}
    print(f"tasks-base: held-out accuracy, one token per step, gen 128 / block 32, {n_per_task} prompts per task")
    misses = {}
    for name, acc in per_task.items():
        kind = "exact" if tasks[name].deterministic else "validity"
        flag = ""
        if tasks[name].deterministic and acc < ACCURACY_BAR:
            misses[name] = ACCURACY_BAR - acc
            flag = f"   < {ACCURACY_BAR} by {ACCURACY_BAR - acc:.3f}"
        print(f"  {name:15s} {acc:.3f}  ({kind}){flag}")
    confidence = first_forward_confidence(model, tokenizer, [e.prompt for e in examples], decode.gen_length,
                                          decode.block_length, PARALLEL_PROMPT_WIDTH)
    for region, c in confidence.items():
        print(f"  first forward, {region}: {c['above_0.9']:.1%} of positions above 0.9, "
              f"{c['above_0.99']:.1%} above 0.99 (median {c['median']:.3f})")
    return {"checkpoint": str(checkpoint), "per_task_accuracy": per_task, "n_per_task": n_per_task,
            "deterministic_misses": misses, "mean_nfe": result["summary"]["mean_nfe"],
            "first_forward_confidence": confidence}


def validation_tokens(corpus: Path) -> tuple[np.ndarray, float]:
    """val.npy's tokens, and the corpus's UTF-8 bytes per token of the validation split."""
    val_path = corpus / "val.npy"
    if not val_path.is_file():
        raise FileNotFoundError(f"{val_path}: no validation tokens; build them with "
                                f"`python -m dllm.corpus --cache data/cache --out {corpus}`")
    tokens = np.load(val_path).astype(np.int32)
    text_path = corpus / "val.txt"
    if not text_path.is_file():
        raise FileNotFoundError(f"{text_path}: the validation text (bytes per token) is missing; rebuild the corpus")
    from dllm.corpus import DOCUMENT_SEPARATOR

    text_bytes = sum(len(doc.encode()) for doc in text_path.read_text().split(DOCUMENT_SEPARATOR))
    return tokens, text_bytes / len(tokens)


def windows_of(tokens: np.ndarray, count: int, length: int) -> np.ndarray:
    """`count` evenly spaced windows of `length` tokens."""
    starts = np.linspace(0, len(tokens) - length - 1, count).astype(int)
    return np.stack([tokens[s:s + length] for s in starts])


def sample_and_score(model, scorer, tokenizer, prompts: np.ndarray, sampler, *, gen_length: int, block_length: int,
                     key, batch_size: int) -> dict:
    """Decodes `prompts` (no padding) with temperature 1 and scores the samples (gen-PPL, entropy, NFE)."""
    outputs, nfe = [], []
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start:start + batch_size]
        result = generate(model, rows, sampler, gen_length=gen_length, block_length=block_length,
                          key=prompt_keys(key, np.arange(start, start + len(rows))),  # per prompt, any batch_size
                          tokenizer=tokenizer, temperature=1.0)
        outputs.append(np.asarray(result.tokens))
        nfe.append(np.asarray(result.nfe))
    generations, nfe = np.concatenate(outputs), np.concatenate(nfe)
    return score_text(scorer, tokenizer, prompts, generations) | {"mean_nfe": float(nfe.mean())}


def score_text(scorer, tokenizer, prompts: np.ndarray, generations: np.ndarray) -> dict:
    """Gen-PPL under `scorer` and unigram entropy of `generations`, cut before each row's first EOS."""
    is_end = generations == tokenizer.eos_id
    before_end = np.cumsum(is_end, axis=1) == 0
    ppl = evaluation.generative_perplexity(scorer, prompts, np.ones_like(prompts), generations, before_end)
    return {**ppl, "entropy": evaluation.unigram_entropy(generations, before_end),
            "mean_length": float(before_end.sum(1).mean())}


def check_text_base(corpus: Path, windows: int, seq_len: int, elbo_samples: int, n_samples: int) -> dict:
    model, tokenizer = dllm.from_pretrained(REPO_ROOT / "checkpoints/text-base")
    scorer, scorer_tokenizer = dllm.from_pretrained(REPO_ROOT / "checkpoints/text-ar")
    if scorer_tokenizer.backend.get_vocab() != tokenizer.backend.get_vocab():
        raise ValueError("checkpoints/text-ar and checkpoints/text-base have different tokenizers")
    tokens, bytes_per_token = validation_tokens(corpus)
    batch = windows_of(tokens, windows, seq_len)
    logits_fn = jax.jit(lambda t: model(t))
    bits = [float(elbo_bits_per_token(logits_fn, jnp.asarray(batch[i:i + 16]), jax.random.key(i),
                                      mask_id=tokenizer.mask_id, n_samples=elbo_samples))
            for i in range(0, windows, 16)]
    bpt = float(np.mean(bits))
    ar_val = evaluation.generative_perplexity(scorer, batch[:, :1], np.ones_like(batch[:, :1]), batch[:, 1:],
                                              np.ones_like(batch[:, 1:]))
    print(f"text-base: validation -ELBO bound {bpt:.3f} bits per token = {bpt / bytes_per_token:.3f} bits per byte "
          f"({windows} windows of {seq_len} tokens, {elbo_samples} (t, x_t) draws each; "
          f"{bytes_per_token:.2f} bytes per token)")
    ar_bpt = ar_val["nll_per_token"] / math.log(2)
    print(f"text-ar (scorer): validation {ar_bpt:.3f} bits per token = {ar_bpt / bytes_per_token:.3f} bits per byte")

    gen_length, prompt_length, block_length = 128, 32, 32
    pieces = windows_of(tokens, n_samples, prompt_length + gen_length)
    prompts, references = pieces[:, :prompt_length], pieces[:, prompt_length:]
    rows = {"validation text (reference)": score_text(scorer, tokenizer, prompts, references) | {"mean_nfe": None}}
    runs = {"random remasking (1 token/step)": samplers.LowConfidence(remasking="random"),
            "low_confidence (1 token/step)": samplers.LowConfidence()}
    runs |= {f"low_confidence ({gen_length // steps} tokens/step)": samplers.LowConfidence(steps=steps)
             for steps in (64, 32, 16)}
    runs |= {f"threshold (tau {tau})": samplers.Threshold(tau=tau) for tau in (0.9, 0.7, 0.5, 0.3)}
    print(f"samples: {n_samples} x {gen_length} tokens after {prompt_length}-token validation prompts, "
          f"block {block_length}, temperature 1; gen-PPL under text-ar")
    print(f"  {'decoding':32s} {'NFE':>6s} {'gen-PPL':>8s} {'entropy':>8s} {'length':>7s}")
    for name, sampler in runs.items():
        rows[name] = sample_and_score(model, scorer, tokenizer, prompts, sampler, gen_length=gen_length,
                                      block_length=block_length, key=jax.random.key(0), batch_size=n_samples)
    for name, r in rows.items():
        nfe = "-" if r["mean_nfe"] is None else f"{r['mean_nfe']:.1f}"
        print(f"  {name:32s} {nfe:>6s} {r['gen_ppl']:8.1f} {r['entropy']:8.3f} {r['mean_length']:7.1f}")
    return {"bits_per_token": bpt, "bits_per_byte": bpt / bytes_per_token, "bytes_per_token": bytes_per_token,
            "scorer_bits_per_token": ar_bpt, "scorer_bits_per_byte": ar_bpt / bytes_per_token,
            "windows": windows, "seq_len": seq_len, "elbo_samples": elbo_samples,
            "samples": {"n": n_samples, "gen_length": gen_length, "prompt_length": prompt_length,
                        "block_length": block_length, "temperature": 1.0, "rows": rows}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=MODELS)
    parser.add_argument("--n-per-task", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=600, help="tasks-base decode batch")
    parser.add_argument("--tasks-base", default=str(REPO_ROOT / "checkpoints/tasks-base"),
                        help="the tasks-base checkpoint to check (default: the bundled one)")
    parser.add_argument("--corpus", default=str(REPO_ROOT / "data/corpus"))
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--elbo-samples", type=int, default=8)
    parser.add_argument("--text-samples", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    for name, value in (("--n-per-task", args.n_per_task), ("--batch-size", args.batch_size),
                        ("--windows", args.windows), ("--text-samples", args.text_samples)):
        if value <= 0:
            parser.error(f"{name}={value}: must be a positive int")
    report = {"environment": evaluation.environment()}
    if args.only in (None, "tiny-tasks"):
        report["tiny-tasks"] = check_tiny_tasks(args.n_per_task)
    if args.only in (None, "attention-variants"):
        report["attention-variants"] = check_attention_variants(args.n_per_task)
    if args.only in (None, "block-decoding"):
        report["block-decoding"] = check_block_decoding(args.n_per_task)
    if args.only in (None, "tasks-base"):
        report["tasks-base"] = check_tasks_base(args.n_per_task, args.batch_size, Path(args.tasks_base))
    if args.only in (None, "text-base"):
        report["text-base"] = check_text_base(Path(args.corpus), args.windows, args.seq_len, args.elbo_samples,
                                              args.text_samples)
    if args.out:
        evaluation.write_json_atomic(args.out, report)
    return report


if __name__ == "__main__":
    main()
