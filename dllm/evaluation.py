"""Run (model x task x sampler) and report accuracy with NFE, tokens per
forward, latency and throughput.

Every batch has the same shape (prompts left-padded to one width, the last
batch filled with repeats that are not scored), so a whole evaluation
compiles once; the compile is done by a warm-up batch that is not timed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from dllm.decoding import DecodeConfig, generate
from dllm.decoding.engine import pad_prompts, prompt_keys


MASK_TEXT = "[MASK]"  # how a position a decode left masked is printed (never silently dropped)


def answer_text(tokenizer, tokens) -> str:
    """Decoded generation up to (excluding) the first EOS / end-of-turn; a position still
    masked (a decode cut short by max_steps) reads `MASK_TEXT`."""
    pieces, run = [], []
    for t in np.asarray(tokens).tolist():
        if t in (tokenizer.eos_id, tokenizer.eot_id):
            break
        if t == tokenizer.mask_id:
            pieces += [tokenizer.decode(run).strip(), MASK_TEXT]
            run = []
        else:
            run.append(t)
    pieces.append(tokenizer.decode(run).strip())
    return " ".join(p for p in pieces if p)


def decode_texts(model, tokenizer, sampler, prompts: list[str], decode: DecodeConfig, *, batch_size: int = 64,
                 key=None, prompt_width: int | None = None, mesh=None, rules=None,
                 progress: bool = True, compiler_options: dict | None = None,
                 continuous: bool = False, queue_length: int | None = None) -> tuple[list[dict], dict]:
    """Decodes every prompt; returns per-prompt rows and timing figures.

    `progress`: a tqdm bar over the prompts (prompts/s) on a terminal; never in a log file.
    `compiler_options`: XLA options of the decoding loop, as `dllm.generate`'s.
    `continuous`: continuous batching (`dllm.generate(slots=batch_size)`): the prompts go through
    `batch_size` slots in queues of `queue_length` prompts (default 16 x batch_size; the last queue
    is padded to the same length and its padding never decoded, so one compile), and a finished row's
    slot takes the next prompt inside the compiled loop. The same tokens as static batches (each row
    decodes as it does alone); the bar moves once per queue.

    `mesh`, `rules`: decode sharded (see `dllm.generate`); `batch_size` must
    then divide over the mesh's batch axes.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r}: must be a positive int")
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a list of strings, got {prompts!r}"
                        + (" (one string: wrap it in a list, e.g. prompts='[\"...\"]' from Hydra)"
                           if isinstance(prompts, str) else ""))
    if hasattr(sampler, "bind"):
        sampler = sampler.bind(tokenizer)
    encoded = [tokenizer.encode(p) for p in prompts]
    if not encoded:
        raise ValueError("no prompts to decode")
    width = prompt_width or max(len(e) for e in encoded)
    batch_size = min(batch_size, len(encoded))
    key = jax.random.key(0) if key is None else key
    fields = {f.name: getattr(decode, f.name) for f in dataclasses.fields(decode)  # every setting, so none is dropped
              if f.name not in ("gen_length", "block_length")}

    if queue_length is not None and not continuous:
        raise ValueError(f"queue_length={queue_length!r} without continuous=True: it is the number of prompts of a "
                         "continuous-batching queue; allowed: queue_length=None, or continuous=True")
    chunk_length = batch_size  # prompts per call: a batch, or a continuous-batching queue
    if continuous:
        chunk_length = 16 * batch_size if queue_length is None else queue_length
        if isinstance(chunk_length, bool) or not isinstance(chunk_length, int) or chunk_length < 1:
            raise ValueError(f"queue_length={queue_length!r}: must be an int >= 1 (prompts per compiled queue)")
        chunk_length = min(chunk_length, len(encoded))

    def run(batch_prompts, batch_key, count):
        tokens, mask = pad_prompts(batch_prompts, tokenizer.pad_id, width)
        # more slots than queued prompts would only idle; `count` skips the padding of the last queue
        queue = dict(slots=min(batch_size, chunk_length), count=count) if continuous else {}
        return generate(model, tokens, sampler, gen_length=decode.gen_length, block_length=decode.block_length,
                        key=batch_key, tokenizer=tokenizer, attention_mask=mask, mesh=mesh, rules=rules,
                        compiler_options=compiler_options, **queue, **fields)

    keys_of = lambda start: prompt_keys(key, np.arange(start, start + chunk_length))
    jax.block_until_ready(run(encoded[:chunk_length] + [encoded[0]] * (chunk_length - len(encoded[:chunk_length])),
                              keys_of(0), 1).tokens)  # compile
    rows, seconds = [], 0.0
    from tqdm.auto import tqdm

    bar = tqdm(total=len(encoded), unit="prompt", desc="decoding", disable=None if progress else True,
               dynamic_ncols=True)  # prompts/s; None: shown on a terminal, silent in logs
    for start in range(0, len(encoded), chunk_length):
        chunk = encoded[start:start + chunk_length]
        filled = chunk + [chunk[0]] * (chunk_length - len(chunk))
        began = time.perf_counter()
        result = run(filled, keys_of(start), len(chunk))  # prompt i has key fold_in(key, i), whatever the batch
        tokens = np.asarray(jax.block_until_ready(result.tokens))
        seconds += time.perf_counter() - began
        bar.update(len(chunk))
        nfe = np.asarray(result.nfe)
        committed = np.asarray((result.trace.commit_step >= 0).sum(-1))
        for i in range(len(chunk)):
            left_masked = int((tokens[i] == tokenizer.mask_id).sum())
            rows.append({
                "prompt": prompts[start + i], "output": answer_text(tokenizer, tokens[i]),
                "tokens": tokens[i].tolist(), "nfe": int(nfe[i]),
                "tokens_per_forward": float(committed[i] / max(nfe[i], 1)),
                "finished": left_masked == 0, "left_masked": left_masked,
            })
    bar.close()
    n_batches = -(-len(encoded) // chunk_length)
    timing = {
        "seconds": seconds, "batches": n_batches, "batch_size": batch_size, "continuous": continuous,
        "prompts_per_s": len(encoded) / seconds if seconds else float("nan"),
        "latency_per_sample_s": seconds / len(encoded),
        "latency_per_batch_s": seconds / n_batches,
        "tokens_per_s": len(encoded) * decode.gen_length / seconds if seconds else float("nan"),
    }
    return rows, timing


def evaluate_examples(model, tokenizer, sampler, examples, decode: DecodeConfig, *, batch_size: int = 64,
                      key=None, prompt_width: int | None = None, mesh=None, rules=None,
                      continuous: bool = False) -> dict:
    """Scores a list of `dllm.tasks.Example` (any mix of tasks); `mesh`/`rules`/`continuous` as `decode_texts`.

    Raises ValueError naming the task when a suite task's reference answer is
    longer than `decode.gen_length` (such a decode could only score 0).
    """
    from dllm.tasks import SUITES, check_fits, get_task

    check_fits([e for e in examples if e.task in SUITES.get(e.suite, {})], decode.gen_length, tokenizer)

    rows, timing = decode_texts(model, tokenizer, sampler, [e.prompt for e in examples], decode,
                                batch_size=batch_size, key=key, prompt_width=prompt_width, mesh=mesh, rules=rules,
                                continuous=continuous)
    by_task: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        by_task.setdefault(example.task, []).append(i)
    for name, index in by_task.items():  # score_many: code benchmarks run their sandboxes in parallel
        task = get_task(name, examples[index[0]].suite)
        scores = task.score_many([examples[i] for i in index], [rows[i]["output"] for i in index])
        format_valid = getattr(task, "format_valid", lambda output: None)  # answer_pattern: a format to check
        for i, score in zip(index, scores):
            rows[i]["score"] = score
            rows[i]["format_valid"] = format_valid(rows[i]["output"])
    per_task: dict[str, dict] = {}
    for example, row in zip(examples, rows):
        row["task"] = example.task
        row["answer"] = example.answer
        entry = per_task.setdefault(example.task, {"n": 0, "correct": 0.0, "nfe": [], "format_valid": []})
        entry["n"] += 1
        entry["correct"] += row["score"]
        entry["nfe"].append(row["nfe"])
        if row["format_valid"] is not None:
            entry["format_valid"].append(row["format_valid"])
    nfe = np.array([r["nfe"] for r in rows])
    summary = {
        "n": len(rows),
        "accuracy": float(np.mean([r["score"] for r in rows])),
        "mean_nfe": float(nfe.mean()),
        "median_nfe": float(np.median(nfe)),
        "tokens_per_forward": float(np.mean([r["tokens_per_forward"] for r in rows])),
        "unfinished": sum(not r["finished"] for r in rows),
        **timing,
        "per_task": {
            name: {"n": e["n"], "accuracy": e["correct"] / e["n"], "mean_nfe": float(np.mean(e["nfe"])),
                   **({"format_valid": float(np.mean(e["format_valid"]))} if e["format_valid"] else {})}
            for name, e in sorted(per_task.items())
        },
    }
    return {"summary": summary, "rows": rows}


_full_logits = nnx.jit(lambda model, tokens, attention_mask: model(tokens, attention_mask))


def sequence_log_likelihood(scorer, tokens, attention_mask, scored_mask) -> tuple[np.ndarray, np.ndarray]:
    """Per-row sum of log p(x_i | x_<i) over the positions of `scored_mask`, and their count.

    `scorer` is an autoregressive model (`ModelConfig.attention="causal"`,
    `token_shift=True`), whose logits at position i predict token i.
    tokens, attention_mask, scored_mask: [B, L] (left-padded rows; position 0
    of a row can not be scored).
    """
    if not scorer.config.is_autoregressive:
        raise ValueError(f"the generative-perplexity scorer must be an autoregressive model (attention='causal', "
                         f"token_shift=True); got attention={scorer.config.attention!r}, "
                         f"token_shift={scorer.config.token_shift}")
    tokens = jax.numpy.asarray(tokens, jax.numpy.int32)
    logits = _full_logits(scorer, tokens, jax.numpy.asarray(attention_mask, jax.numpy.int32))
    log_probs = jax.nn.log_softmax(logits.astype(jax.numpy.float32), axis=-1)
    token_log_probs = np.asarray(jax.numpy.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0])
    scored = np.array(scored_mask, bool)  # a copy: the caller's mask is left as it was
    scored[:, 0] = False
    return np.where(scored, token_log_probs, 0.0).sum(-1), scored.sum(-1)


def generative_perplexity(scorer, prompts: np.ndarray, prompt_mask: np.ndarray, generations: np.ndarray,
                          generation_mask: np.ndarray, batch_size: int = 64) -> dict:
    """Perplexity of generated text under an independent autoregressive model (MDLM §4.1, "Gen PPL").

    Each row is scored as one sequence [prompt | generation]; only the
    generation's tokens (where `generation_mask` is 1, e.g. before the first
    EOS) count: gen-PPL = exp(sum of -log p / number of scored tokens) over all
    rows. Returns {"gen_ppl", "nll_per_token", "scored_tokens"}.
    """
    tokens = np.concatenate([prompts, generations], axis=1)
    attention = np.concatenate([prompt_mask, np.ones_like(generations)], axis=1)
    scored = np.concatenate([np.zeros_like(prompt_mask), generation_mask], axis=1).astype(bool)
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        rows = slice(start, start + batch_size)
        log_likelihood, n = sequence_log_likelihood(scorer, tokens[rows], attention[rows], scored[rows])
        total, count = total - float(log_likelihood.sum()), count + int(n.sum())
    if count == 0:
        raise ValueError("generative_perplexity: no generated token to score (every generation_mask is 0)")
    return {"gen_ppl": float(np.exp(total / count)), "nll_per_token": total / count, "scored_tokens": count}


def unigram_entropy(tokens: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean over rows of the entropy (nats) of each row's token histogram (MDLM's repetition check).

    A sample that repeats a few tokens has a low entropy (compare with the
    entropy of real text of the same length). Rows with no token under `mask`
    are skipped.
    """
    tokens = np.asarray(tokens)
    mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)
    entropies = []
    for row, keep in zip(tokens, mask):
        values = row[keep]
        if values.size:
            p = np.unique(values, return_counts=True)[1] / values.size
            entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies)) if entropies else float("nan")


def results_line(summary: dict, *, task: str, split: str, model: str, sampler, decode: dict, **extra) -> dict:
    """One line of results.jsonl, the record `experiments.report` reads: the run's settings, its
    summary (`evaluate_examples`) and the versions. Every driver writes this shape."""
    return {"task": task, "tasks": sorted(summary["per_task"]), "split": split, **extra, "model": model,
            "sampler": sampler.settings(), "decode": decode, **summary, **environment()}


def compare_samplers(model, tokenizer, runs: dict, examples, decode: DecodeConfig, *, batch_size: int = 64,
                     key=None, prompt_width: int | None = None, after_each=None, continuous: bool = False) -> dict:
    """Each sampler of `runs` ({label: Sampler}) on the same examples, batches and keys:
    {label: {"settings", the summary fields, "wall_s"}}; prints one line per run.

    `after_each(label, sampler, summary)`, if given, runs after every sampler (the drivers write their
    files there, so a comparison cut short keeps what it measured). `continuous`: as `decode_texts`."""
    key = jax.random.key(0) if key is None else key
    results = {}
    for label, sampler in runs.items():
        began = time.perf_counter()
        out = evaluate_examples(model, tokenizer, sampler, examples, decode, batch_size=batch_size, key=key,
                                prompt_width=prompt_width, continuous=continuous)
        s = out["summary"]
        results[label] = {"settings": sampler.settings(), **s, "wall_s": time.perf_counter() - began}
        print(f"{label:34s} acc {s['accuracy']:.4f}  NFE {s['mean_nfe']:5.2f}  tok/fwd {s['tokens_per_forward']:.2f}",
              flush=True)
        if after_each is not None:
            after_each(label, sampler, s)
    return results


def environment() -> dict:
    """Versions and device, recorded with every result."""
    import flax

    device = jax.devices()[0]
    return {"jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version(),
            "device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count()}


@contextlib.contextmanager
def atomic_file(path: Path | str):
    """Yields a temporary path beside `path`; renames it onto `path` when the block succeeds.

    Readers never see a half-written file, and a failed write leaves the old
    file (if any) in place. The file gets the umask's permissions, as `open` would.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json_atomic(path: Path | str, payload, *, lines: bool = False, append: bool = False) -> Path:
    """Writes JSON (or appends one JSON line) without ever leaving a half-written file."""
    path = Path(path)
    text = json.dumps(payload, default=str) + "\n" if lines else json.dumps(payload, indent=2, default=str)
    if append and path.exists():
        text = path.read_text() + text
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return path
