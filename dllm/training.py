"""The masked-diffusion train loop: AdamW, orbax checkpoints, exact resume.

    params  = Transformer(config) split into a pure {name: array} dict
    for step in range(start, steps):
        batch = data.batch(step)                      # pure function of (seed, step)
        key   = fold_in(PRNGKey(seed), step)          # pure function of (seed, step)
        t ~ U(eps, 1); x_t = mask(x_0, t)             # dllm.diffusion
        loss  = sft_loss or pretrain_loss(model(x_t)) # LLaDA Eq. 5 / Eq. 3
        params, opt_state = AdamW(clip(grad))         # warmup + cosine
        every checkpoint_every steps: orbax save {params, opt_state} + {step, data state}

Because the batch and the noise are pure functions of (seed, step), restoring
(params, opt_state, step) from a checkpoint continues a killed run exactly:
its parameters are bitwise those of an uninterrupted run. (On CPU always. On
GPU only with deterministic kernels, `XLA_FLAGS=--xla_gpu_deterministic_ops=true`:
by default the scatter-add of the embedding gradient uses atomics, so even two
uninterrupted GPU runs differ in the last bits; checked on the H100.)

Checkpoints are an orbax `CheckpointManager` under `workdir/checkpoints`:
each step is written to a temporary folder and renamed when complete (atomic
commit), so a kill mid-save leaves no half checkpoint that resume could read;
leftover temporary folders are deleted on the next start. At the end the model
is written with `dllm.save_pretrained` to `workdir/model`.

Metrics go to `workdir/metrics.jsonl`, one JSON object per line: an "event"
line at each start or resume, then "split": "train" / "eval" rows. After a
resume, rows of steps past the restored checkpoint that the killed run had
already written appear again; the later row is the one that counts.

Sharding (`dllm.sharding`): the step runs under the mesh of a `MeshConfig`
(default: every device on "data"). Parameters and the AdamW moments are
placed by the logical-axis rules (born sharded: the init is jitted with
their shardings), the batch is split over the batch axes (data and fsdp),
and the step constrains its outputs to the same shardings; XLA inserts the
gradient reductions and the fsdp all-gathers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax
from flax import nnx

from dllm import diffusion, sharding
from dllm.checkpoints import model_from_params, save_pretrained
from dllm.data import Data, check_batch_divides
from dllm.models.config import DTYPES, ModelConfig
from dllm.models.layout import Layout
from dllm.models.transformer import Transformer, default_positions, positions_from_mask

OBJECTIVES = ("sft", "pretrain", "autoregressive")
BLOCK_NOISE = ("per_row", "per_block")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimization, logging and checkpointing of one run (Hydra fills it from `cfg.train`).

    Attributes:
      steps: optimizer updates of the whole run (a resumed run stops here too).
      batch_size: sequences per update, over all devices.
      lr: peak learning rate, reached after `warmup_steps` of linear warmup,
        then cosine decay to `lr * min_lr_ratio` at `steps`.
      warmup_steps: linear warmup length, 0 <= warmup_steps < steps.
      min_lr_ratio: final learning rate as a fraction of `lr`, in [0, 1].
      weight_decay: AdamW decoupled weight decay (not applied to norms and biases).
      grad_clip: global-norm clipping threshold; 0 disables clipping.
      b1, b2, adam_eps: AdamW moments and epsilon.
      seed: seeds the init, the data order and the diffusion noise.
      objective: "sft" (prompt never masked, LLaDA Eq. 5), "pretrain"
        (every token maskable, LLaDA Eq. 3), or "autoregressive" (next-token
        cross-entropy on clean tokens; needs ModelConfig attention="causal"
        and token_shift=True: the generative-perplexity scorer).
        A block-causal model (ModelConfig.attention="block_causal") trains "sft"
        and "pretrain" on the 2L input [x_t ; x_0] (`dllm.diffusion.two_l_inputs`).
      block_noise: with a block-causal model, "per_row" (one t per sequence,
        SDAR) or "per_block" (one t per block, BD3-LM).
      complementary_mask: with a block-causal model, also train on each row's
        complementary mask (Fast-dLLM v2), which doubles the batch per update.
      low_discrepancy: stratified t over the batch (MDLM §3.5).
      time_eps: t ~ U(time_eps, 1).
      log_every: steps between metrics lines and progress-bar updates.
      eval_every: steps between evaluations on the held-out stream (0: never).
      eval_batches: batches per evaluation.
      elbo_samples: (t, x_t) draws per sequence for the ELBO in bits per token.
      checkpoint_every: steps between checkpoints (0: only the final one).
      keep_checkpoints: newest checkpoints kept on disk (>= 1).
      workdir: run folder: checkpoints/, metrics.jsonl, model/.
      resume: continue from the newest checkpoint in workdir if there is one.
      save_dtype: parameter dtype of the final `workdir/model` ("float32",
        "bfloat16"; None keeps the training dtype). Training always uses the
        model config's param_dtype.
      progress: show a tqdm progress bar.
      tensorboard: also write TensorBoard scalars if tensorboardX or
        torch.utils.tensorboard can be imported.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.99
    adam_eps: float = 1e-8
    seed: int = 0
    objective: str = "sft"
    block_noise: str = "per_row"
    complementary_mask: bool = False
    low_discrepancy: bool = True
    time_eps: float = 1e-3
    log_every: int = 50
    eval_every: int = 500
    eval_batches: int = 4
    elbo_samples: int = 4
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    workdir: str = "runs/train"
    resume: bool = True
    save_dtype: str | None = None
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        def check(name, ok, allowed):
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: allowed {allowed}")

        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        check("steps", is_int(self.steps) and self.steps > 0, "an int >= 1")
        check("batch_size", is_int(self.batch_size) and self.batch_size > 0, "an int >= 1")
        check("lr", self.lr > 0, "> 0")
        check("warmup_steps", is_int(self.warmup_steps) and 0 <= self.warmup_steps < self.steps,
              f"an int in [0, steps={self.steps})")
        check("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "[0, 1]")
        check("weight_decay", self.weight_decay >= 0, ">= 0")
        check("grad_clip", self.grad_clip >= 0, ">= 0 (0 disables clipping)")
        check("b1", 0 <= self.b1 < 1, "[0, 1)")
        check("b2", 0 <= self.b2 < 1, "[0, 1)")
        check("adam_eps", self.adam_eps > 0, "> 0")
        check("objective", self.objective in OBJECTIVES, OBJECTIVES)
        check("block_noise", self.block_noise in BLOCK_NOISE, BLOCK_NOISE)
        check("complementary_mask", isinstance(self.complementary_mask, bool), "true or false")
        check("time_eps", 0 < self.time_eps < 1, "(0, 1)")
        for name in ("log_every",  "eval_batches", "elbo_samples", "keep_checkpoints"):
            check(name, is_int(getattr(self, name)) and getattr(self, name) >= 1, "an int >= 1")
        for name in ("eval_every", "checkpoint_every"):
            check(name, is_int(getattr(self, name)) and getattr(self, name) >= 0, "an int >= 0 (0: never)")
        check("save_dtype", self.save_dtype is None or self.save_dtype in DTYPES, (None, *DTYPES))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TrainResult:
    """What `train` returns: the trained model (training dtype), its step, last metrics, saved folder."""

    model: Transformer
    step: int
    metrics: dict
    model_path: Path | None


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=config.warmup_steps,
        decay_steps=config.steps, end_value=config.lr * config.min_lr_ratio)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (Loshchilov & Hutter 2019); no decay on norms and biases."""
    decay_mask = lambda params: {name: not name.endswith(("norm", "bias")) for name in params}
    adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.adam_eps,
                        weight_decay=config.weight_decay, mask=decay_mask)
    if config.grad_clip == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)


def training_loss(graphdef, params, batch, key, *, objective: str, mask_id: int, time_eps: float,
                  low_discrepancy: bool, block_noise: str = "per_row", complementary_mask: bool = False):
    """The loss of `batch` under `objective`: one Monte Carlo draw of a masked-diffusion loss, or the
    autoregressive next-token loss (all in `dllm.diffusion`). A block-causal model's diffusion
    losses read the 2L forward (`block_diffusion_logits`). A batch without "attention_mask" has no
    padding: a bidirectional or causal model's attention then runs without a mask (the fused cuDNN
    kernel's fast path); a block-causal model's 2L forward builds its pair mask from all ones."""
    model = nnx.merge(graphdef, params)
    tokens, attention_mask = batch["tokens"], batch.get("attention_mask")
    if objective == "autoregressive":
        return diffusion.autoregressive_loss(model(tokens, attention_mask), tokens, attention_mask)
    block = model.config.block_size if model.config.attention == "block_causal" else None
    real = jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask.astype(bool)
    maskable = batch["answer_mask"].astype(bool) if objective == "sft" else real
    time_key, mask_key = jax.random.split(key)
    positions = default_positions(tokens, attention_mask)
    if block is not None and block_noise == "per_block":
        t = diffusion.block_times(time_key, positions, block, time_eps, low_discrepancy)
    else:
        t = diffusion.sample_times(time_key, tokens.shape[0], time_eps, low_discrepancy)
    noisy, masked = diffusion.mask_tokens(mask_key, tokens, t, mask_id, maskable)
    if block is not None and complementary_mask:
        copy, masked_copy, t_copy = diffusion.complementary_copy(tokens, masked, t, mask_id, maskable, time_eps)
        every_position = lambda rate: jnp.broadcast_to(diffusion.per_position(rate), tokens.shape)
        t = jnp.concatenate([every_position(t), every_position(t_copy)])
        noisy, masked = jnp.concatenate([noisy, copy]), jnp.concatenate([masked, masked_copy])
        tokens, maskable, positions = (jnp.concatenate([x, x]) for x in (tokens, maskable, positions))
        attention_mask = None if attention_mask is None else jnp.concatenate([attention_mask, attention_mask])
    if block is None:
        logits = model(noisy, attention_mask)
    else:
        logits = block_diffusion_logits(model, noisy, tokens, attention_mask, positions)
    if objective == "sft":
        return diffusion.sft_loss(logits, tokens, masked, t, maskable)
    return diffusion.pretrain_loss(logits, tokens, masked, t, maskable)


def block_diffusion_logits(model, noisy, clean, attention_mask, positions=None):
    """Logits of the x_t half of the 2L forward [x_t ; x_0] of a block-causal model
    (`dllm.diffusion.two_l_inputs`): each noised block given the clean blocks before it.
    attention_mask None: no padding (the pair mask is built from an all-ones one)."""
    if attention_mask is None:
        attention_mask = jnp.ones(noisy.shape, jnp.int32)
    positions = positions_from_mask(attention_mask) if positions is None else positions
    c = model.config
    return model.forward(**diffusion.two_l_inputs(noisy, clean, attention_mask, positions, c.block_size,
                                                  c.token_shift))[0]


# TrainConfig fields that do not change the update or the evaluation; runs that
# differ only in these share one compiled train step (`jitted_steps`).
BOOKKEEPING_FIELDS = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "workdir", "resume",
                      "save_dtype", "progress", "tensorboard")


def opt_state_shardings(optimizer: optax.GradientTransformation, opt_state, param_shardings: dict,
                        layout: sharding.Placement):
    """Shardings of an optimizer state (real or abstract): per-parameter leaves (AdamW moments)
    as their parameter, the rest (step counts) replicated."""
    return optax.tree_map_params(optimizer, lambda _, s: s, opt_state, param_shardings,
                                 transform_non_params=lambda _: layout.replicated(),
                                 is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def make_train_step(graphdef, optimizer: optax.GradientTransformation, config: TrainConfig, mask_id: int,
                    layout: sharding.Placement | None = None):
    """The update `(params, opt_state, batch, step) -> (params, opt_state, metrics)` (not yet jitted).

    The diffusion noise of update `step` uses key fold_in(PRNGKey(seed), step).
    With a `layout`, the batch is constrained to the batch axes and the new
    parameters and optimizer state to their rule shardings.
    """
    base_key = jax.random.PRNGKey(config.seed)
    loss_fn = lambda params, batch, key: training_loss(
        graphdef, params, batch, key, objective=config.objective, mask_id=mask_id,
        time_eps=config.time_eps, low_discrepancy=config.low_discrepancy, block_noise=config.block_noise,
        complementary_mask=config.complementary_mask)

    def train_step(params, opt_state, batch, step):
        key = jax.random.fold_in(base_key, step)
        if layout is not None:
            batch = {name: layout.constrain(x, layout.batch_axes(x.ndim)) for name, x in batch.items()}
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if layout is not None:
            param_shardings = layout.param_shardings(nnx.merge(graphdef, params))
            opt_state = jax.lax.with_sharding_constraint(
                opt_state, opt_state_shardings(optimizer, opt_state, param_shardings, layout))
            params = jax.lax.with_sharding_constraint(params, param_shardings)
        return params, opt_state, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}

    return train_step


def make_eval_step(graphdef, config: TrainConfig, mask_id: int):
    """`(params, batch, key) -> metrics` on held-out data: the loss of the objective,
    masked accuracy, and for "pretrain" the ELBO in bits per token."""

    def eval_step(params, batch, key):
        loss, metrics = training_loss(graphdef, params, batch, key, objective=config.objective, mask_id=mask_id,
                                       time_eps=config.time_eps, low_discrepancy=True,
                                       block_noise=config.block_noise)
        out = {"loss": loss, **metrics}
        if config.objective == "autoregressive":
            out["bits_per_token"] = loss / np.log(2.0)
        if config.objective == "pretrain":
            model, mask = nnx.merge(graphdef, params), batch.get("attention_mask")
            if model.config.attention == "block_causal":  # each noised block given its clean prefix
                logits_fn = lambda noisy: block_diffusion_logits(model, noisy, batch["tokens"], mask)
            else:
                logits_fn = lambda noisy: model(noisy, mask)
            out["bits_per_token"] = diffusion.elbo_bits_per_token(
                logits_fn, batch["tokens"], key, mask_id=mask_id,
                n_samples=config.elbo_samples, valid=mask, eps=config.time_eps)
        return out

    return eval_step


@functools.lru_cache(maxsize=8)
def _jitted_steps(graphdef, config: TrainConfig, mask_id: int, layout: sharding.Placement | None):
    optimizer = make_optimizer(config)
    train_step = jax.jit(make_train_step(graphdef, optimizer, config, mask_id, layout), donate_argnums=(0, 1))
    return optimizer, train_step, jax.jit(make_eval_step(graphdef, config, mask_id))


def check_training_layout(model_layout: Layout) -> Layout:
    """The model `Layout` a train step may run: the checkpoints' parameter structure (scanned,
    unfused: the same initialization, checkpoints and resume as the default), with any attention
    kernel (`attention_impl`, e.g. "cudnn": fused flash attention in the forward and backward) and
    any `scan_unroll`."""
    if not isinstance(model_layout, Layout):
        raise ValueError(f"training layout {model_layout!r}: expected a dllm.models.layout.Layout")
    if not model_layout.scan_layers or model_layout.fused_projections or model_layout.fp8_weights:
        raise ValueError(f"training layout scan_layers={model_layout.scan_layers}, fused_projections="
                         f"{model_layout.fused_projections}, fp8_weights={model_layout.fp8_weights}: training "
                         "runs the checkpoints' parameters (scan_layers=true, fused_projections=false, "
                         "fp8_weights=false); a training layout chooses the "
                         "attention kernel (attention_impl: null, xla or cudnn) and scan_unroll only")
    return model_layout


def init_training(model_config: ModelConfig, config: TrainConfig, mask_id: int, layout: sharding.Placement,
                  model_layout: Layout | None = None):
    """What the loop starts from, under `layout`:
    (graphdef, params, opt_state, optimizer, jitted train step, jitted eval step).

    Parameters are born sharded (jitted init) and checked with
    `sharding.assert_sharded`; the AdamW moments take their parameter's sharding.
    `model_layout` (`check_training_layout`; default `Layout()`) picks the attention kernel.
    """
    model_layout = check_training_layout(Layout() if model_layout is None else model_layout)
    abstract = nnx.eval_shape(lambda: Transformer(model_config, model_layout, rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(abstract)
    params = sharding.sharded_init(model_config, config.seed, layout, model_layout)()
    sharding.assert_sharded(abstract, layout.mesh, layout.rules, params=params)
    optimizer, train_step, eval_step = jitted_steps(graphdef, config, mask_id, layout)
    opt_shardings = opt_state_shardings(optimizer, jax.eval_shape(optimizer.init, params),
                                        layout.param_shardings(abstract), layout)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    return graphdef, params, opt_state, optimizer, train_step, eval_step


def jitted_steps(graphdef, config: TrainConfig, mask_id: int, layout: sharding.Placement | None = None):
    """(optimizer, jitted train step with params/opt_state donated, jitted eval step).

    Cached on everything but `BOOKKEEPING_FIELDS`, so a resumed run (or a
    sweep over workdirs) in the same process reuses the compiled steps.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in BOOKKEEPING_FIELDS}
    return _jitted_steps(graphdef, dataclasses.replace(config, **defaults), mask_id, layout)


# --------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------- #


def checkpoint_manager(directory: Path, keep: int):
    """Orbax manager: synchronous atomic saves, `keep` newest steps, stale temp folders removed."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def save_checkpoint(manager, step: int, params, opt_state, data_state: dict, model_config: ModelConfig) -> None:
    import orbax.checkpoint as ocp

    meta = {
        "step": step,
        "data": data_state,
        "param_shapes": {name: list(value.shape) for name, value in params.items()},
        "model_config": model_config.to_dict(),
    }
    saved = manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
        meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    if not saved:  # orbax refuses a step at or below its latest; never report a save that did not happen
        raise RuntimeError(f"{manager.directory}: checkpoint of step {step} was not written (the manager holds "
                           f"steps {sorted(manager.all_steps())})")


class ResumeMismatch(ValueError):
    """A checkpoint that is intact but belongs to another model shape or data stream."""


def restore_checkpoint(manager, step: int, params, opt_state, data_state: dict):
    """Restores (params, opt_state) of `step` after checking shapes and the data stream.

    Raises ResumeMismatch (a ValueError) naming the parameter and both shapes
    when the checkpoint belongs to another model shape, or the field when the
    data stream differs.
    """
    import orbax.checkpoint as ocp

    where = Path(manager.directory) / str(step)
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    stored = {name: tuple(shape) for name, shape in meta["param_shapes"].items()}
    for name, value in params.items():
        if name not in stored:
            raise ResumeMismatch(f"{where}: cannot resume: parameter {name!r} (shape {tuple(value.shape)}) "
                             f"is not in the checkpoint; it holds {sorted(stored)}")
        if stored[name] != tuple(value.shape):
            raise ResumeMismatch(f"{where}: cannot resume: parameter {name!r} has shape {stored[name]} in the "
                             f"checkpoint, the model config expects {tuple(value.shape)}")
    if extra := sorted(set(stored) - set(params)):
        raise ResumeMismatch(f"{where}: cannot resume: the checkpoint has parameters {extra} the model config lacks")
    for field, value in data_state.items():
        if meta["data"].get(field) != value:
            raise ResumeMismatch(f"{where}: cannot resume exactly: data {field}={meta['data'].get(field)!r} in the "
                             f"checkpoint, {value!r} now; use a new workdir or train.resume=false")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            {"params": params, "opt_state": opt_state})
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    return state["params"], state["opt_state"]


def restore_newest(manager, params, opt_state, data_state: dict):
    """(params, opt_state, step) of the newest checkpoint that restores.

    A checkpoint that does not restore (killed mid-write on a filesystem
    without atomic renames, a truncated or corrupted file) is skipped with
    one printed line naming it and the error, and the one before it is tried.
    Once an older one restores, each skipped folder is renamed
    `<step>.unrestorable` (kept, not deleted; orbax ignores it), so the run
    can save those steps again. A checkpoint that restores but belongs to
    another run (`ResumeMismatch`) is an error, not skipped. RuntimeError
    when none restores, listing each one's error (nothing is renamed then).
    """
    skipped, skipped_folders = [], []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            params_, opt_state_ = restore_checkpoint(manager, step, params, opt_state, data_state)
        except ResumeMismatch:
            raise
        except Exception as error:  # noqa: BLE001: any damage; the message is kept and shown
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            where = Path(manager.directory) / str(step)
            print(f"resume: skipping damaged checkpoint {where} ({type(error).__name__}: {first})", flush=True)
            skipped.append(f"{where}: {type(error).__name__}: {first}")
            skipped_folders.append(where)
            continue
        for where in skipped_folders:
            aside = where.with_name(f"{where.name}.unrestorable")
            where.rename(aside)
            print(f"resume: moved {where} to {aside}; restored step {step}", flush=True)
        if skipped_folders:
            manager.reload()
        return params_, opt_state_, step
    raise RuntimeError("resume: no checkpoint restores (a changed model or optimizer also looks like this); "
                       + "; ".join(skipped) + ". Use a new workdir, or move the folders aside")


# --------------------------------------------------------------------------- #
# Logging
# --------------------------------------------------------------------------- #


class MetricsWriter:
    """Appends one JSON object per line to workdir/metrics.jsonl (+ TensorBoard when importable)."""

    def __init__(self, workdir: Path, tensorboard: bool):
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None and "step" in row:
            prefix = row.get("split", "train")
            for name, value in row.items():
                if isinstance(value, (int, float)) and name != "step":
                    self.tb.add_scalar(f"{prefix}/{name}", value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _to_python(metrics: dict) -> dict:
    return {name: (v.item() if hasattr(v, "item") else v) for name, v in jax.device_get(metrics).items()}


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #


def evaluate(eval_step, params, data, config: TrainConfig, put_batch) -> dict:
    """Mean of `eval_step` metrics over the first `eval_batches` held-out batches (fixed noise)."""
    key = jax.random.PRNGKey(config.seed + 1)
    totals: dict[str, float] = {}
    for i in range(config.eval_batches):
        out = _to_python(eval_step(params, put_batch(data.eval.batch(i)), jax.random.fold_in(key, i)))
        for name, value in out.items():
            totals[name] = totals.get(name, 0.0) + value / config.eval_batches
    return totals


def train(model_config: ModelConfig, config: TrainConfig, data: Data, *, devices=None,
          mesh_config: sharding.MeshConfig | None = None, callback: Callable[[int, dict], None] | None = None,
          metadata: dict | None = None, model_layout: Layout | None = None) -> TrainResult:
    """Trains (or resumes) a masked-diffusion model and saves it to `workdir/model`.

    Args:
      model_config: the network; its special ids are set from the tokenizer.
      config: optimization, logging, checkpoints (`TrainConfig`).
      data: `dllm.data.make_data(...)`; its batch size must equal config.batch_size.
      devices: devices of the mesh (default: those of `mesh_config`, else all).
      mesh_config: the mesh and its logical-axis rules (`configs/mesh/*.yaml`);
        default every device on "data" (parameters replicated).
      callback: called as `callback(step, metrics)` after every update (metrics
        are device arrays; an exception raised here stops the run as a kill would).
      metadata: extra entries for the saved model's metadata.json.
      model_layout: how the model runs in the train step (`check_training_layout`): the attention
        kernel, e.g. `Layout(attention_impl="cudnn")` on a GPU (configs/layout/gpu_train.yaml).
        Not saved: the checkpoint holds the canonical parameters either way.
    """
    tokenizer = data.tokenizer
    if model_layout is not None:
        check_training_layout(model_layout)
    if config.objective == "sft" and not data.has_answers:
        raise ValueError(f"TrainConfig.objective='sft' needs prompt/answer data; data.source="
                         f"{data.config.source!r} allows only objective='pretrain'")
    if model_config.attention != "block_causal" and (config.block_noise != "per_row" or config.complementary_mask):
        raise ValueError(f"TrainConfig.block_noise={config.block_noise!r}, complementary_mask="
                         f"{config.complementary_mask!r} are block-diffusion options; the model has "
                         f"attention={model_config.attention!r} (allowed there: block_noise='per_row', "
                         "complementary_mask=false)")
    if config.objective == "autoregressive" and not model_config.is_autoregressive:
        raise ValueError(f"TrainConfig.objective='autoregressive' needs ModelConfig.attention='causal' and "
                         f"token_shift=True; got attention={model_config.attention!r}, "
                         f"token_shift={model_config.token_shift}")
    if data.train.batch_size != config.batch_size:
        raise ValueError(f"data batch size {data.train.batch_size} != TrainConfig.batch_size={config.batch_size}")
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"ModelConfig.vocab_size={model_config.vocab_size} is smaller than the tokenizer's "
                         f"vocabulary ({tokenizer.vocab_size} tokens, {tokenizer.source})")
    model_config = model_config.replace(mask_token_id=tokenizer.mask_id, eos_token_id=tokenizer.eos_id,
                                        pad_token_id=tokenizer.pad_id)
    mesh_config = mesh_config or sharding.MeshConfig()
    mesh = sharding.make_mesh(mesh_config, devices)
    rules = mesh_config.rules
    if mesh_config.fit_to_model and mesh.size > 1:  # a preset: replicate an axis this model cannot split
        from dllm.models.transformer import Transformer

        rules = sharding.fit_rules(rules, mesh, nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))
    layout = sharding.Placement.of(mesh, rules)
    batch_axes, n_batch_shards = layout.batch_devices()
    split = [a for a in batch_axes if mesh.shape[a] > 1]
    check_batch_divides(config.batch_size, n_batch_shards, split[0] if len(split) == 1 else " x ".join(split))
    put_batch = layout.put_batch

    workdir = Path(config.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    graphdef, params, opt_state, optimizer, train_step, eval_step = init_training(
        model_config, config, tokenizer.mask_id, layout, model_layout)
    n_params = sum(int(np.prod(v.shape)) for v in params.values())

    manager = checkpoint_manager(workdir / "checkpoints", config.keep_checkpoints)
    writer = MetricsWriter(workdir, config.tensorboard)
    step = 0
    latest = manager.latest_step()
    if latest is not None and not config.resume:
        manager.close()
        raise ValueError(f"TrainConfig.resume=False but {workdir / 'checkpoints'} holds checkpoints up to step "
                         f"{latest}; allowed: resume=True, or a new workdir")
    if latest is not None:
        params, opt_state, step = restore_newest(manager, params, opt_state, data.train.state())
        writer.write({"event": "resume", "step": step})
    else:
        writer.write({"event": "start", "step": 0, "n_params": n_params, "model_config": model_config.to_dict(),
                      "train_config": config.to_dict(), "data_config": dataclasses.asdict(data.config)})

    if data.eval is None:
        eval_step = None
    schedule = learning_rate_schedule(config)
    tokens_per_step = config.batch_size * data.train.seq_len

    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=step, disable=not config.progress, dynamic_ncols=True,
               file=sys.stderr, desc="train")
    last = {}
    window_start, window_steps, start_time = time.perf_counter(), 0, time.perf_counter()
    saved_step = step if latest is not None else None
    try:
        while step < config.steps:
            batch = put_batch(data.train.batch(step))
            params, opt_state, metrics = train_step(params, opt_state, batch, np.int32(step))
            step += 1
            window_steps += 1
            if callback is not None:
                callback(step, metrics)
            if step % config.log_every == 0 or step == config.steps:
                last = _to_python(metrics)
                now = time.perf_counter()
                last.update(step=step, lr=float(schedule(step - 1)),
                            tokens_per_s=tokens_per_step * window_steps / (now - window_start),
                            elapsed_s=now - start_time)
                writer.write({"split": "train", **last})
                bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['masked_accuracy']:.3f}",
                                tok_s=f"{last['tokens_per_s']:.3g}")
                bar.update(window_steps)
                window_start, window_steps = time.perf_counter(), 0
            if eval_step is not None and config.eval_every and (step % config.eval_every == 0
                                                                  or step == config.steps):
                row = evaluate(eval_step, params, data, config, put_batch)
                writer.write({"split": "eval", "step": step, **row})
                last.update({f"eval_{name}": value for name, value in row.items()})
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.steps:
                save_checkpoint(manager, step, params, opt_state, data.train.state(), model_config)
                saved_step = step
    finally:
        bar.close()
        writer.close()
        manager.close()

    if all(x.is_fully_addressable for x in params.values()):
        params = jax.device_get(params)
    else:  # multi-host: every process gathers the whole model
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    model = model_from_params(model_config, params)
    saved = model
    if config.save_dtype is not None and config.save_dtype != model_config.param_dtype:
        dtype = DTYPES[config.save_dtype]
        saved = model_from_params(model_config.replace(param_dtype=config.save_dtype),
                                  {name: jnp.asarray(v, dtype) for name, v in params.items()})
    info = {
        "step": step, "n_params": n_params, "train_config": config.to_dict(),
        "data_config": dataclasses.asdict(data.config), "final_metrics": last,
        "train_seconds_this_process": time.perf_counter() - start_time, "checkpoint_step": saved_step,
        "versions": {"jax": jax.__version__, "flax": flax.__version__,
                     "devices": [d.device_kind for d in mesh.devices.flat]},
        **(metadata or {}),
    }
    path = save_pretrained(saved, tokenizer, workdir / "model", extra=info)
    return TrainResult(model=model, step=step, metrics=last, model_path=path)


def params_of(model: Transformer) -> dict[str, jax.Array]:
    """The pure {name: array} parameter dict of a model (to compare runs)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
