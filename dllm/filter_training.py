"""Learn2PD's learned filter: oracle data, the filter MLP and its trainer.

Bao et al. 2025, "Learning to Parallel: Accelerating Diffusion LLMs via
Learnable Parallel Decoding" (arXiv 2509.25188), as implemented in
ims-kdks/Learning-to-Parallel-Decoding (`llada/generate_training_data.py`,
`train.ipynb`, `small_model.py`; reference/samplers.md §4):

    reference = decode(prompt, LLaDA low confidence, one token per step, T = 0)
    oracle    = decode again, and at every step record, for the active block,
                  confidence[i] = p(argmax_i)          (the filter's input)
                  correct[i]    = argmax_i == reference[i]   (its label)
                then commit every masked block position that is already correct
                ("Extremely Greedy Parallel", EGP)
    filter    = Linear(block, block) -> ReLU -> Linear(block, block), one logit
                per block position, trained with BCE-with-logits under AdamW

What this module holds, in order: the filter's input features and the NNX
MLP; the two decodes that make the data (`reference_decode`, `oracle_decode`,
a `lax.while_loop` each that reuses the engine's forward and `apply_commit`)
and the Prophet-style analysis of the reference run; the trainer with early
stopping; the checkpoint (`save_filter` / `load_filter`).

Deviations from the reference code:
* Anti-stall. Learn2PD copies the reference into the block when the
  predictions did not change since the previous step, which (the model being
  deterministic at T = 0) happens one step after a step that committed
  nothing, so the stalled state is recorded twice. We copy the reference into
  the window at the step where no masked window position is correct: the
  same data without the duplicate record.
* Batches: rows decode independently (the engine's per-row windows); the
  reference code handles one prompt at a time.
* Split: train / validation / test are drawn over prompts, not over step
  records, so records of one prompt never straddle two splits (Learn2PD
  splits 80/10/10 without saying over what).
* Early stopping on the validation BCE (Learn2PD runs 40,000 full-batch
  iterations and watches the false-positive rate at 0.9; we log that too).
* Optional richer features (entropy, masked flag, progress, step fraction);
  the default is Learn2PD's confidence vector alone.
* The checkpoint is an orbax PyTree of the parameters plus `filter.json`,
  written to a temporary folder and renamed (atomic).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dllm.checkpoints import atomic_folder
from dllm.decoding.engine import apply_commit, forward_logits, initial_state, resolve_special_ids
from dllm.decoding.sampler import Commit, Sampler
from dllm.decoding.state import DecodeConfig, DecodeState, SpecialIds

REPO_ROOT = Path(__file__).resolve().parents[1]
FILTER_FORMAT = "dllm-learned-filter"
FILTER_VERSION = 1

# ----------------------------------------------------------------- features

# Per-position inputs the filter may see, all read off one step of the active
# window. Learn2PD uses "confidence" alone.
FEATURES = {
    "confidence": "softmax(logits)[argmax] of each window position (decoded ones included)",
    "entropy": "entropy of softmax(logits) in nats, per window position",
    "masked": "1 where the window position is still [MASK], else 0",
    "progress": "fraction of the row's generation already committed (same for every position)",
    "step_fraction": "forward passes so far / gen_length (same for every position)",
}
PER_ROW_FEATURES = ("progress", "step_fraction")


def check_features(features, where: str = "features") -> tuple[str, ...]:
    """The feature names as a tuple; ValueError naming the bad one and the allowed ones."""
    if isinstance(features, str):
        features = (features,)
    features = tuple(features)
    if not features:
        raise ValueError(f"{where}=(): give at least one feature; allowed {tuple(FEATURES)}")
    for name in features:
        if name not in FEATURES:
            raise ValueError(f"{where}: unknown feature {name!r}; allowed {tuple(FEATURES)}")
    if len(set(features)) != len(features):
        raise ValueError(f"{where}={features}: a feature is named twice")
    if all(name in PER_ROW_FEATURES for name in features):
        raise ValueError(f"{where}={features}: needs at least one per-position feature "
                         f"({', '.join(n for n in FEATURES if n not in PER_ROW_FEATURES)})")
    return features


def stack_features(values: dict, features: Sequence[str]):
    """float32 [..., block, F]: the named features of each window position.

    `values` maps every name of `features` to an array: [..., block] for the
    per-position ones, [...] for the per-row ones (broadcast over the block).
    Works on numpy and jax arrays alike.
    """
    xp = jnp if any(isinstance(values[n], jax.Array) for n in features) else np
    block = next(values[n].shape[-1] for n in values if n not in PER_ROW_FEATURES)
    columns = []
    for name in features:
        v = xp.asarray(values[name]).astype(xp.float32)
        if name in PER_ROW_FEATURES:
            v = xp.broadcast_to(v[..., None], (*v.shape, block))
        columns.append(v)
    return xp.stack(columns, axis=-1)


class FilterMLP(nnx.Module):
    """Learn2PD's filter: features of the block -> one acceptance logit per position.

    Linear(block * F, hidden) -> ReLU -> Linear(hidden, block). With the
    default F = 1 (confidence) and hidden = block this is Learn2PD's
    `Linear(32, 32) -> ReLU -> Linear(32, 32)` at block 32 (their class is
    named `LogisticRegression` but has two layers). Learn2PD zero-pads
    shorter blocks to 32; we size the network to the block instead, so a
    filter belongs to one block length.
    """

    def __init__(self, block_length: int, features: Sequence[str] = ("confidence",), hidden: int | None = None, *,
                 rngs: nnx.Rngs):
        self.block_length = block_length
        self.features = check_features(features)
        width = block_length * len(self.features)
        self.hidden_width = hidden or width
        self.hidden = nnx.Linear(width, self.hidden_width, rngs=rngs)
        self.out = nnx.Linear(self.hidden_width, block_length, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., block, F] from `stack_features`; returns logits [..., block]."""
        x = x.reshape(*x.shape[:-2], -1)
        return self.out(jax.nn.relu(self.hidden(x)))

    @classmethod
    def from_params(cls, params: dict, block_length: int, features: Sequence[str], hidden: int) -> "FilterMLP":
        """A filter whose parameters are `params` (a pure dict, as `nnx.to_pure_dict`)."""
        abstract = nnx.eval_shape(lambda: cls(block_length, features, hidden, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)


def filter_params(mlp: FilterMLP) -> dict:
    """The MLP's parameters as a pure dict of numpy arrays."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(mlp, nnx.Param)))


# ----------------------------------------------------------------- oracle data


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


def window_positions(state: DecodeState, block: int) -> jax.Array:
    """int32 [B, block]: the `block` positions from each row's block_start (clipped to gen_length)."""
    return jnp.clip(state.block_start[:, None] + jnp.arange(block)[None, :], 0, state.config.gen_length - 1)


def feature_values(probs: jax.Array, tokens: jax.Array, state: DecodeState, block: int) -> dict:
    """Every feature of `FEATURES` for the active window of each row (one home
    for the oracle data and the sampler, so both see the same inputs).

    probs: [B, G, V] softmax of the logits (no temperature); tokens: [B, G]
    proposals x0. Returns per-position values [B, block] and per-row ones [B].
    """
    positions = window_positions(state, block)
    window = lambda values: jnp.take_along_axis(values, positions, axis=1)
    confidence = jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-30)), axis=-1)
    step_fraction = state.step / state.config.gen_length
    return {
        "confidence": window(confidence).astype(jnp.float32),
        "entropy": window(entropy).astype(jnp.float32),
        "masked": window(state.is_masked),
        "progress": state.progress.astype(jnp.float32),
        "step_fraction": jnp.broadcast_to(step_fraction, state.block_start.shape).astype(jnp.float32),
    }


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
                        reference_sampler: Sampler) -> dict:
    """Both decodes of one batch of left-padded prompts, as numpy arrays.

    `reference_sampler`: LLaDA's low-confidence rule, one token per step
    (`samplers.LowConfidence()`, Learn2PD's reference); the caller builds it,
    since the `samplers` package builds on this one.

    Returns reference [B, G] and reference_nfe [B] (the one-token-per-step
    decode), canvases [steps, B, G] (its argmax canvas at each step),
    oracle_nfe [B] and records (each [steps, B, ...], see `_oracle_loop`;
    "active" marks the steps a row was still decoding).
    """
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


def build_oracle_data(model, tokenizer, examples, config: OracleConfig, reference_sampler: Sampler, *,
                      log: Callable[[str], None] = print, settings: dict | None = None) -> OracleData:
    """Reference decode (`reference_sampler`, see `decode_oracle_batch`) + EGP oracle re-decode of `examples`
    (any mix of tasks)."""
    from dllm.evaluation import answer_text, left_pad
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
        tokens, mask = left_pad(filled, width, tokenizer.pad_id)
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


# ----------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class FilterTrainConfig:
    """The filter's optimisation (Hydra fills it from `cfg.train`).

    Attributes:
      lr: AdamW learning rate (Learn2PD: 3e-3).
      weight_decay: AdamW decoupled weight decay (PyTorch's default 0.01).
      steps: at most this many full-batch updates (Learn2PD: 40,000).
      eval_every: updates between validation checks.
      patience: stop after this many checks without a lower validation BCE;
        the parameters of the best check are kept.
      val_fraction, test_fraction: share of prompts held out for early
        stopping and for the final report (Learn2PD: 80/10/10).
      masked_only: BCE only on positions still masked at that step (the ones
        the sampler can commit); Learn2PD trains on every block position.
      accept_threshold: the acceptance bar the validation metrics are
        reported at (the sampler's default, 0.96).
      seed: parameter init and the prompt split.
    """

    lr: float = 3e-3
    weight_decay: float = 0.01
    steps: int = 20_000
    eval_every: int = 100
    patience: int = 20
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    masked_only: bool = False
    accept_threshold: float = 0.96
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "eval_every", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"FilterTrainConfig.{name}={value!r}: must be a positive int")
        if not self.lr > 0:
            raise ValueError(f"FilterTrainConfig.lr={self.lr!r}: must be > 0")
        if not self.weight_decay >= 0:
            raise ValueError(f"FilterTrainConfig.weight_decay={self.weight_decay!r}: must be >= 0")
        for name in ("val_fraction", "test_fraction"):
            if not 0 < getattr(self, name) < 0.5:
                raise ValueError(f"FilterTrainConfig.{name}={getattr(self, name)!r}: allowed range (0, 0.5)")
        if not 0 < self.accept_threshold < 1:
            raise ValueError(f"FilterTrainConfig.accept_threshold={self.accept_threshold!r}: allowed range (0, 1)")


@dataclasses.dataclass
class FilterTrainResult:
    """The trained filter (best validation check), its metrics and the loss history."""

    mlp: FilterMLP
    features: tuple[str, ...]
    metrics: dict
    history: list[dict]
    best_step: int


def split_examples(n_examples: int, config: FilterTrainConfig) -> dict[str, np.ndarray]:
    """Prompt indices of the train / val / test splits (a seeded permutation)."""
    order = np.random.default_rng(config.seed).permutation(n_examples)
    n_val = max(1, round(n_examples * config.val_fraction))
    n_test = max(1, round(n_examples * config.test_fraction))
    if n_examples - n_val - n_test < 1:
        raise ValueError(f"{n_examples} prompts are too few to split into train / val / test "
                         f"({config.val_fraction} / {config.test_fraction}); record more oracle data")
    return {"val": np.sort(order[:n_val]), "test": np.sort(order[n_val:n_val + n_test]),
            "train": np.sort(order[n_val + n_test:])}


def arrays_for(data: OracleData, features: Sequence[str], examples: np.ndarray | None = None,
               masked_only: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(features [N, block, F], labels [N, block], loss weights [N, block], masked [N, block])."""
    r = data.records
    rows = np.ones(len(r["example"]), bool) if examples is None else np.isin(r["example"], examples)
    x = stack_features({k: r[k][rows] for k in features}, features)
    y = r["correct"][rows].astype(np.float32)
    masked = r["masked"][rows].astype(bool)
    w = masked.astype(np.float32) if masked_only else np.ones_like(y)
    return x, y, w, masked


def bce(logits, labels, weights):
    """Mean binary cross-entropy with logits over the weighted positions."""
    losses = optax.sigmoid_binary_cross_entropy(logits, labels)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def acceptance_metrics(probability: np.ndarray, labels: np.ndarray, masked: np.ndarray, threshold: float) -> dict:
    """What the sampler would do at `threshold` on masked positions: how many it
    accepts, how many of those are right (precision), how many right ones it
    catches (recall), and the false-positive rate P(accept | wrong)."""
    accept = (probability > threshold) & masked
    right = labels.astype(bool) & masked
    wrong = ~labels.astype(bool) & masked
    n = lambda a: float(a.sum())
    return {
        "accepted_fraction": n(accept) / max(n(masked), 1),
        "precision": n(accept & right) / max(n(accept), 1),
        "recall": n(accept & right) / max(n(right), 1),
        "false_positive_rate": n(accept & wrong) / max(n(wrong), 1),
        "wrong_accepted_per_1k": 1000 * n(accept & wrong) / max(n(masked), 1),
    }


def train_filter(data: OracleData, features: Sequence[str] = ("confidence",), hidden: int | None = None,
                 config: FilterTrainConfig = FilterTrainConfig(), *,
                 log: Callable[[str], None] = print) -> FilterTrainResult:
    """Full-batch AdamW on the BCE of the oracle labels, early-stopped on the validation split."""
    features = check_features(features)
    split = split_examples(len(data.examples["task"]), config)
    train_x, train_y, train_w, _ = arrays_for(data, features, split["train"], config.masked_only)
    val_x, val_y, val_w, val_masked = arrays_for(data, features, split["val"], config.masked_only)
    mlp = FilterMLP(data.block_length, features, hidden, rngs=nnx.Rngs(config.seed))
    graphdef, params = nnx.split(mlp, nnx.Param)
    optimizer = optax.adamw(config.lr, weight_decay=config.weight_decay)
    opt_state = optimizer.init(params)
    train = tuple(map(jnp.asarray, (train_x, train_y, train_w)))
    val = tuple(map(jnp.asarray, (val_x, val_y, val_w)))

    def loss_fn(params, x, y, w):
        return bce(nnx.merge(graphdef, params)(x), y, w)

    @jax.jit
    def updates(params, opt_state):
        def one(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, *train)
            step_updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, step_updates), opt_state), loss
        (params, opt_state), losses = jax.lax.scan(one, (params, opt_state), None, length=config.eval_every)
        return params, opt_state, losses[-1]

    val_loss = jax.jit(lambda params: loss_fn(params, *val))
    best = (float(val_loss(params)), 0, params)
    history = [{"step": 0, "train_bce": float(loss_fn(params, *train)), "val_bce": best[0]}]
    log(f"filter: {len(train_x)} train / {len(val_x)} val records, features {features}; "
        f"step 0 val BCE {best[0]:.4f}")
    checks_without_gain, step = 0, 0
    while step < config.steps:
        params, opt_state, train_loss = updates(params, opt_state)
        step += config.eval_every
        current = float(val_loss(params))
        history.append({"step": step, "train_bce": float(train_loss), "val_bce": current})
        if current < best[0] - 1e-6:
            best, checks_without_gain = (current, step, params), 0
        else:
            checks_without_gain += 1
        if step % (config.eval_every * 10) == 0:
            log(f"filter: step {step} train BCE {float(train_loss):.4f} val BCE {current:.4f} "
                f"(best {best[0]:.4f} at {best[1]})")
        if checks_without_gain >= config.patience:
            log(f"filter: early stop at step {step}; best val BCE {best[0]:.4f} at step {best[1]}")
            break
    mlp = nnx.merge(graphdef, best[2])
    metrics = {}
    for name, idx in split.items():
        x, y, w, masked = arrays_for(data, features, idx, config.masked_only)
        logits = mlp(jnp.asarray(x))
        probability = np.asarray(jax.nn.sigmoid(logits))
        metrics[name] = {"prompts": int(len(idx)), "records": int(len(x)),
                         "bce": float(bce(logits, jnp.asarray(y), jnp.asarray(w))),
                         **acceptance_metrics(probability, y, masked, config.accept_threshold)}
    return FilterTrainResult(mlp=mlp, features=features, metrics=metrics, history=history, best_step=best[1])


# ----------------------------------------------------------------- checkpoint


def resolve_filter_path(path) -> Path:
    """`path` as given when it exists or is absolute, else relative to the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def save_filter(path, mlp: FilterMLP, metadata: dict | None = None) -> Path:
    """Writes a filter folder atomically: `params/` (orbax) + `filter.json`.

    filter.json holds the format tag, block_length, features, hidden width,
    parameter shapes and whatever `metadata` adds (oracle settings, metrics).
    """
    import orbax.checkpoint as ocp

    final = Path(path).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    params = filter_params(mlp)
    header = {
        "format": FILTER_FORMAT, "version": FILTER_VERSION,
        "block_length": mlp.block_length, "features": list(mlp.features), "hidden": mlp.hidden_width,
        "param_shapes": jax.tree.map(lambda a: list(a.shape), params),
        **(metadata or {}),
    }
    with atomic_folder(final) as staging:
        (staging / "filter.json").write_text(json.dumps(header, indent=2, default=str))
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / "params", params)
            checkpointer.wait_until_finished()
    return final


@dataclasses.dataclass(frozen=True)
class FilterWeights:
    """A loaded filter, frozen and hashable (so a sampler holding it can be a
    jit static): parameters as ((module, name, shape, values), ...) tuples."""

    path: str
    block_length: int
    features: tuple[str, ...]
    hidden: int
    params: tuple

    def param_dict(self) -> dict:
        out: dict = {}
        for module, name, shape, values in self.params:
            out.setdefault(module, {})[name] = np.asarray(values, np.float32).reshape(shape)
        return out

    def mlp(self) -> FilterMLP:
        return FilterMLP.from_params(self.param_dict(), self.block_length, self.features, self.hidden)


def load_filter(path) -> FilterWeights:
    """Reads a filter folder written by `save_filter`.

    Raises FileNotFoundError naming the folder (or its missing filter.json /
    params), ValueError when filter.json is not a filter of this format or
    its parameters do not have the shapes it declares.
    """
    import orbax.checkpoint as ocp

    folder = resolve_filter_path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"learned filter {str(path)!r}: no such folder ({folder.absolute()}); "
                                "train one with `python -m experiments.train_filter`")
    header_path, params_dir = folder / "filter.json", folder / "params"
    for needed in (header_path, params_dir):
        if not needed.exists():
            raise FileNotFoundError(f"learned filter {str(path)!r}: {needed.absolute()} is missing")
    header = json.loads(header_path.read_text())
    if header.get("format") != FILTER_FORMAT:
        raise ValueError(f"{header_path}: format={header.get('format')!r} is not a learned filter "
                         f"(expected {FILTER_FORMAT!r})")
    block_length, hidden = int(header["block_length"]), int(header["hidden"])
    features = check_features(header["features"], f"{header_path}: features")
    shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: FilterMLP(block_length, features, hidden, rngs=nnx.Rngs(0))), nnx.Param))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32), shapes)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(params_dir.absolute())
        stored = getattr(stored, "item_metadata", stored)
        stored = getattr(stored, "tree", stored)
        wanted = {m: {n: tuple(a.shape) for n, a in group.items()} for m, group in abstract.items()}
        try:
            found = {m: {n: tuple(a.shape) for n, a in group.items()} for m, group in stored.items()}
        except (AttributeError, TypeError):
            found = stored
        if found != wanted:
            raise ValueError(f"{params_dir}: parameter shapes {found} do not match filter.json "
                             f"(block_length={block_length}, features={features}, hidden={hidden}: {wanted})")
        params = checkpointer.restore(params_dir.absolute(), abstract)
    flat = []
    for module in sorted(params):
        for name in sorted(params[module]):
            value = np.asarray(params[module][name], np.float32)
            flat.append((module, name, tuple(value.shape), tuple(value.reshape(-1).tolist())))
    return FilterWeights(path=str(path), block_length=block_length, features=features, hidden=hidden,
                         params=tuple(flat))
