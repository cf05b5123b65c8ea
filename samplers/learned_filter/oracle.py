"""The learned filter's training data (Learn2PD, Bao et al. 2025, "Learning to Parallel: Accelerating
Diffusion LLMs via Learnable Parallel Decoding", arXiv 2509.25188), as implemented in
ims-kdks/Learning-to-Parallel-Decoding (`llada/generate_training_data.py`):

    reference = decode(prompt, LLaDA low confidence, one token per step, T = 0)
    oracle    = decode again, and at every step record, for the active block,
                  confidence[i] = p(argmax_i)          (the filter's input)
                  correct[i]    = argmax_i == reference[i]   (its label)
                then commit every masked block position that is already correct
                ("Extremely Greedy Parallel", EGP)

The two decodes are a `lax.while_loop` each over the engine's public pieces (`initial_state`,
`forward_logits`, `apply_commit`); `oracle_analysis` adds the Prophet-style analysis of the
reference run.

Deviations from the reference code:
* Anti-stall. Learn2PD copies the reference into the block when the
  predictions did not change since the previous step, which (the model being
  deterministic at T = 0) happens one step after a step that committed
  nothing, so the stalled state is recorded twice. We copy the reference into
  the window at the step where no masked window position is correct: the
  same data without the duplicate record.
* Batches: rows decode independently (the engine's per-row windows); the
  reference code handles one prompt at a time.
* Optional richer features (entropy, masked flag, progress, step fraction;
  `samplers.learned_filter.filter.FEATURES`); the default is Learn2PD's
  confidence vector alone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm.decoding.engine import apply_commit, forward_logits, initial_state, resolve_special_ids
from dllm.decoding.sampler import Commit, Sampler
from dllm.decoding.state import DecodeConfig, SpecialIds
from samplers.learned_filter.filter import feature_values, window_positions
from samplers.low_confidence import LowConfidence


@dataclasses.dataclass(frozen=True)
class OracleConfig:
    """How the oracle data is made (Hydra fills it from `cfg.oracle`).

    Attributes:
      split: task-suite split the prompts come from ("train"; never "test",
        which is held out for evaluation).
      n_per_task: prompts per task (`dllm.tasks.suite_examples`).
      tasks: task names; None means every task of the suite.
      gen_length, block_length: decode geometry; the filter is trained for
        this block_length and only runs with it.
      prompt_width: prompts are left-padded to this width (the evaluation
        uses 24 for the task suite); None means the longest prompt.
      batch_size: prompts decoded together.
    """

    split: str = "train"
    n_per_task: int = 50
    tasks: tuple[str, ...] | None = None
    gen_length: int = 24
    block_length: int = 8
    prompt_width: int | None = 24
    batch_size: int = 64

    def __post_init__(self):
        if self.split not in ("train", "test"):
            raise ValueError(f"OracleConfig.split={self.split!r}: allowed ('train', 'test')")
        for name in ("n_per_task", "gen_length", "block_length", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"OracleConfig.{name}={value!r}: must be a positive int")
        if self.prompt_width is not None and (not isinstance(self.prompt_width, int) or self.prompt_width <= 0):
            raise ValueError(f"OracleConfig.prompt_width={self.prompt_width!r}: must be a positive int or None")
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks))
        DecodeConfig(gen_length=self.gen_length, block_length=self.block_length)  # geometry checks

    def decode_config(self) -> DecodeConfig:
        return DecodeConfig(gen_length=self.gen_length, block_length=self.block_length)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["tasks"] = list(self.tasks) if self.tasks is not None else None
        return out


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "special", "sampler"))
def _reference_loop(graphdef, params, tokens, attention_mask, *, config: DecodeConfig, special: SpecialIds,
                    sampler: Sampler):
    """The reference decode (LLaDA low confidence, one token per step, T = 0); records the argmax canvas of
    every step."""
    model = nnx.merge(graphdef, params)
    state = initial_state(tokens, attention_mask, jax.random.key(0), config, special)
    canvases = jnp.zeros((config.max_steps, *state.gen_tokens.shape), jnp.int32)

    def body(loop):
        state, carry, canvases = loop
        logits = forward_logits(model, state)
        commit, carry = sampler.step(logits, state, carry)
        predicted = jnp.where(state.is_masked, jnp.argmax(logits, -1).astype(jnp.int32), state.gen_tokens)
        canvases = canvases.at[state.step].set(predicted)
        return apply_commit(state, commit), carry, canvases

    cond = lambda loop: (loop[0].step < config.max_steps) & ~jnp.all(loop[0].done)
    state, _, canvases = jax.lax.while_loop(cond, body, (state, sampler.init(state), canvases))
    return state.gen_tokens, state.nfe, canvases


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "special"))
def _oracle_loop(graphdef, params, tokens, attention_mask, reference, *, config: DecodeConfig, special: SpecialIds):
    """The Extremely Greedy Parallel re-decode; records the window's features and labels each step."""
    model = nnx.merge(graphdef, params)
    block = config.block_length
    state = initial_state(tokens, attention_mask, jax.random.key(0), config, special)
    batch, steps = tokens.shape[0], config.max_steps
    records = {
        "confidence": jnp.zeros((steps, batch, block), jnp.float32),
        "entropy": jnp.zeros((steps, batch, block), jnp.float32),
        "masked": jnp.zeros((steps, batch, block), bool),
        "correct": jnp.zeros((steps, batch, block), bool),
        "progress": jnp.zeros((steps, batch), jnp.float32),
        "step_fraction": jnp.zeros((steps, batch), jnp.float32),
        "step_in_block": jnp.zeros((steps, batch), jnp.int32),
        "block_start": jnp.zeros((steps, batch), jnp.int32),
        "active": jnp.zeros((steps, batch), bool),
        "stalled": jnp.zeros((steps, batch), bool),
    }

    def body(loop):
        state, records = loop
        logits = forward_logits(model, state)
        argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        values = feature_values(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), argmax, state, block)
        correct = argmax == reference
        eligible = state.is_masked & state.in_window
        greedy = correct & eligible
        stalled = ~jnp.any(greedy, axis=-1)  # no masked window position is right: copy the reference
        commit = Commit(tokens=jnp.where(stalled[:, None], reference, argmax),
                        commit=jnp.where(stalled[:, None], eligible, greedy))
        step = state.step
        new = {**values, "correct": jnp.take_along_axis(correct, window_positions(state, block), axis=1),
               "step_in_block": state.step_in_block, "block_start": state.block_start,
               "active": ~state.done, "stalled": stalled & ~state.done}
        records = {k: records[k].at[step].set(new[k].astype(records[k].dtype)) for k in records}
        return apply_commit(state, commit), records

    cond = lambda loop: (loop[0].step < config.max_steps) & ~jnp.all(loop[0].done)
    state, records = jax.lax.while_loop(cond, body, (state, records))
    return state.gen_tokens, state.nfe, records


def decode_oracle_batch(model, tokens, attention_mask, config: DecodeConfig, special: SpecialIds,
                        reference_sampler: Sampler | None = None) -> dict:
    """Both decodes of one batch of left-padded prompts, as numpy arrays.

    `reference_sampler`: default LLaDA's low-confidence rule, one token per step
    (`samplers.LowConfidence()`, Learn2PD's reference).

    Returns reference [B, G] and reference_nfe [B] (the one-token-per-step
    decode), canvases [steps, B, G] (its argmax canvas at each step),
    oracle_nfe [B] and records (each [steps, B, ...], see `_oracle_loop`;
    "active" marks the steps a row was still decoding).
    """
    reference_sampler = LowConfidence() if reference_sampler is None else reference_sampler
    graphdef, params = nnx.split(model)
    tokens, attention_mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(attention_mask, jnp.int32)
    reference, reference_nfe, canvases = _reference_loop(graphdef, params, tokens, attention_mask, config=config,
                                                          special=special, sampler=reference_sampler)
    final, oracle_nfe, records = _oracle_loop(graphdef, params, tokens, attention_mask, reference, config=config,
                                              special=special)
    if not np.array_equal(np.asarray(reference), np.asarray(final)):
        raise AssertionError("the oracle re-decode did not reproduce the reference; this is a bug")
    return {"reference": np.asarray(reference), "reference_nfe": np.asarray(reference_nfe),
            "canvases": np.asarray(canvases), "oracle_nfe": np.asarray(oracle_nfe),
            "records": {k: np.asarray(v) for k, v in records.items()}}


def _answer_ids(tokens: np.ndarray, special: SpecialIds) -> tuple[int, ...]:
    """Token ids up to (excluding) the first EOS / end-of-turn: the answer the scorer reads."""
    out = []
    for t in tokens.tolist():
        if t in (special.eos, special.eot):
            break
        out.append(t)
    return tuple(out)


def settled_steps(canvases: np.ndarray, final: np.ndarray, nfe: int, special: SpecialIds) -> tuple[int, int]:
    """(first, stable): forward passes (1-based) after which the argmax canvas already
    reads the final answer: the first such pass, and the pass from which it never
    changes again (Prophet's "the answer is known before decoding ends")."""
    target = _answer_ids(final, special)
    hits = [(_answer_ids(canvases[s], special) == target) for s in range(nfe)]
    first = next((s + 1 for s, hit in enumerate(hits) if hit), nfe)
    stable = nfe
    while stable > 1 and hits[stable - 2]:
        stable -= 1
    return first, stable


@dataclasses.dataclass
class OracleData:
    """Step records of the oracle run (one row per active row and step) and
    per-prompt results.

    records: confidence, entropy [N, block] float32; masked, correct [N, block]
      bool; progress, step_fraction [N] float32; step_in_block, block_start,
      example [N] int32; stalled [N] bool (the reference was copied at this step).
    examples: task, prompt (str); reference [E, G] int32 (the reference
      decode); reference_score, reference_nfe, oracle_nfe, settled_first,
      settled_stable [E].
    settings: how the data was made (OracleConfig, checkpoint, rules).
    """

    records: dict
    examples: dict
    settings: dict

    @property
    def block_length(self) -> int:
        return int(self.records["confidence"].shape[-1])

    def save(self, path) -> Path:
        """One .npz (records as `r_*`, examples as `e_*`, settings as JSON), written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"r_{k}": v for k, v in self.records.items()}
        arrays.update({f"e_{k}": v for k, v in self.examples.items()})
        arrays["settings_json"] = np.array(json.dumps(self.settings))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
        os.close(fd)
        try:
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path) -> "OracleData":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no oracle data file")
        with np.load(path, allow_pickle=False) as f:
            records = {k[2:]: f[k] for k in f.files if k.startswith("r_")}
            examples = {k[2:]: f[k] for k in f.files if k.startswith("e_")}
            settings = json.loads(str(f["settings_json"]))
        return cls(records, examples, settings)


def build_oracle_data(model, tokenizer, examples, config: OracleConfig, reference_sampler: Sampler | None = None, *,
                      log: Callable[[str], None] = print, settings: dict | None = None) -> OracleData:
    """Reference decode (`reference_sampler`, see `decode_oracle_batch`) + EGP oracle re-decode of `examples`
    (any mix of tasks)."""
    from dllm.decoding.engine import pad_prompts
    from dllm.evaluation import answer_text
    from dllm.tasks import get_task

    if not examples:
        raise ValueError("build_oracle_data: no examples")
    decode = config.decode_config()
    special = resolve_special_ids(model, tokenizer)
    encoded = [tokenizer.encode(e.prompt) for e in examples]
    width = config.prompt_width or max(len(e) for e in encoded)
    records: dict[str, list] = {}
    per_example: dict[str, list] = {k: [] for k in ("reference", "reference_nfe", "oracle_nfe", "settled_first",
                                                    "settled_stable", "reference_score")}
    began = time.perf_counter()
    for start in range(0, len(encoded), config.batch_size):
        chunk = encoded[start:start + config.batch_size]
        filled = chunk + [chunk[0]] * (config.batch_size - len(chunk))  # one shape, one compile
        tokens, mask = pad_prompts(filled, tokenizer.pad_id, width)
        out = decode_oracle_batch(model, tokens, mask, decode, special, reference_sampler)
        reference, ref_nfe, canvases = out["reference"], out["reference_nfe"], out["canvases"]
        oracle_nfe, rec = out["oracle_nfe"], out["records"]
        n = len(chunk)
        active = rec.pop("active")[:, :n]  # [steps, n]
        example = np.broadcast_to(np.arange(start, start + n)[None, :], active.shape)
        # Order records prompt by prompt, step by step.
        order = lambda a: np.swapaxes(a[:, :n], 0, 1)[np.swapaxes(active, 0, 1)]
        for key, value in rec.items():
            records.setdefault(key, []).append(order(value))
        records.setdefault("example", []).append(order(example).astype(np.int32))
        for i in range(n):
            e = examples[start + i]
            first, stable = settled_steps(canvases[:, i], reference[i], int(ref_nfe[i]), special)
            per_example["reference"].append(reference[i])
            per_example["reference_nfe"].append(int(ref_nfe[i]))
            per_example["oracle_nfe"].append(int(oracle_nfe[i]))
            per_example["settled_first"].append(first)
            per_example["settled_stable"].append(stable)
            per_example["reference_score"].append(get_task(e.task).score(e, answer_text(tokenizer, reference[i])))
        log(f"oracle data: {start + n}/{len(encoded)} prompts, {time.perf_counter() - began:.0f}s")
    out_records = {k: np.concatenate(v) for k, v in records.items()}
    out_examples = {k: np.asarray(v) for k, v in per_example.items()}
    out_examples["task"] = np.array([e.task for e in examples])
    out_examples["prompt"] = np.array([e.prompt for e in examples])
    out_settings = {
        **config.to_dict(), **(settings or {}),
        "reference_rule": "LLaDA low confidence, one token per step (steps = gen_length), temperature 0",
        "oracle_rule": "Extremely Greedy Parallel: commit every masked window position whose argmax equals "
                       "the reference; if none does, copy the reference into the window",
        "labels": "correct = argmax == reference, every window position (decoded ones included)",
        "special_ids": dataclasses.asdict(special),
        "seconds": time.perf_counter() - began,
    }
    return OracleData(out_records, out_examples, out_settings)


def oracle_analysis(data: OracleData) -> list[dict]:
    """Per task: reference accuracy, EGP oracle NFE and when the answer was settled.

    settled_first / settled_stable: the forward pass (1-based, of the
    reference's gen_length) after which the argmax of the whole canvas
    already spelled the final answer: the first time, and from when on it
    never changed (Prophet, arXiv 2508.19982, Fig. 1).
    """
    e = data.examples
    gen_length = int(data.settings["gen_length"])
    rows = []
    for task in list(dict.fromkeys(e["task"].tolist())) + ["all"]:
        sel = np.ones(len(e["task"]), bool) if task == "all" else e["task"] == task
        rows.append({
            "task": task, "n": int(sel.sum()),
            "reference_accuracy": float(e["reference_score"][sel].mean()),
            "reference_nfe": float(e["reference_nfe"][sel].mean()),
            "oracle_nfe": float(e["oracle_nfe"][sel].mean()),
            "settled_first_mean": float(e["settled_first"][sel].mean()),
            "settled_first_median": float(np.median(e["settled_first"][sel])),
            "settled_stable_mean": float(e["settled_stable"][sel].mean()),
            "settled_by_half": float((e["settled_first"][sel] <= gen_length // 2).mean()),
        })
    return rows


def format_analysis(rows: list[dict]) -> str:
    lines = ["| task | n | reference acc | reference NFE | EGP oracle NFE | answer is argmax from pass (mean / median) "
             "| stable from pass (mean) | settled by half |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['n']} | {r['reference_accuracy']:.3f} | {r['reference_nfe']:.1f} | "
                     f"{r['oracle_nfe']:.2f} | {r['settled_first_mean']:.2f} / {r['settled_first_median']:.0f} | "
                     f"{r['settled_stable_mean']:.2f} | {r['settled_by_half']:.2f} |")
    return "\n".join(lines)

