"""The learned filter's inputs and network (Learn2PD, Bao et al. 2025, arXiv 2509.25188): the per-position
features of the active window, the filter MLP, and its checkpoint folder (`save_filter` / `load_filter`).

One home for what the oracle data records and what the sampler reads, so both see the same inputs.
The checkpoint is an orbax PyTree of the parameters plus `filter.json`, written to a temporary
folder and renamed (atomic).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm.checkpoints import atomic_folder
from dllm.decoding.state import DecodeState


REPO_ROOT = Path(__file__).resolve().parents[2]


FILTER_FORMAT = "dllm-learned-filter"


FILTER_VERSION = 1


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
    step_fraction = state.row_step / state.config.gen_length
    return {
        "confidence": window(confidence).astype(jnp.float32),
        "entropy": window(entropy).astype(jnp.float32),
        "masked": window(state.is_masked),
        "progress": state.progress.astype(jnp.float32),
        "step_fraction": jnp.broadcast_to(step_fraction, state.block_start.shape).astype(jnp.float32),
    }


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

