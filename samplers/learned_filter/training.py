"""Training the learned filter (Learn2PD, arXiv 2509.25188, `train.ipynb`): BCE-with-logits under AdamW on
the oracle records, full batch, with early stopping on the validation BCE (Learn2PD runs 40,000
iterations and watches the false-positive rate at 0.9; we log that too). Train / validation / test
are drawn over prompts, not over step records (Learn2PD splits 80/10/10 without saying over what).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from samplers.learned_filter.filter import FilterMLP, check_features, stack_features
from samplers.learned_filter.oracle import OracleData


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

