"""Device meshes and logical-axis rules: where every array lives.

Sharding is data (as in MaxText's `logical_axis_rules`). Every parameter
carries logical axis names (`nnx.Param(..., logical_axes=("layers", "embed",
"heads", "head_dim"))`, see `dllm.models.transformer`), activations use
"batch" and "length", and the KV cache uses `CACHE_AXES`. One table of rules,
given in the mesh config (`configs/mesh/*.yaml`), maps logical names to mesh
axes:

    rules = [("batch", ["data", "fsdp"]),   # batch rows split over data and fsdp
             ("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
             ("embed", "fsdp"),              # parameters split (ZeRO-3 style) over fsdp
             ("layers", None), ("head_dim", None), ("length", None)]

For each logical axis of an array the first rule with that name whose mesh
axes are not already used by an earlier dimension of the same array wins
(flax `logical_to_mesh_axes` semantics); `None`, or no rule, means that
dimension is replicated. Inside jit, XLA's sharding propagation (GSPMD) does
the rest: the einsums of the model need no annotations.

    mesh   = make_mesh(MeshConfig(axes={"data": 1, "fsdp": 2, "tensor": 4}))
    model  = shard_model(model, mesh, rules)         # or init_model / from_pretrained(place=Placer(mesh, rules))
    assert_sharded(model, mesh, rules)               # fails if a parameter is replicated against the rules
    result = dllm.generate(model, prompts, sampler, ..., mesh=mesh, rules=rules)

Multi-host (TPU pods, multi-node GPU): every process runs the same program;
`initialize_distributed(cfg)` (called by `make_mesh` when
`cfg.distributed` is true) connects them before any device is touched, the
mesh then spans every device of every host, and arrays are built with
`jax.make_array_from_callback`, so each process transfers only the shards
its own devices hold (the batch is a pure function of (seed, step), so
every host can compute it and put its slice). Multi-slice TPU meshes (a DCN
axis across slices) are not built here: `jax.make_mesh` refuses them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dllm.models.transformer import CACHE_AXES

MeshAxes = tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# The rules of every preset in configs/mesh/ (MaxText's base.yml, reduced to our logical names).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("embed", ("fsdp",)),
    ("layers", None),
    ("head_dim", None),
    ("length", None),
)

BATCH_AXES = ("batch", "length")


# --------------------------------------------------------------------------- #
# Rules
# --------------------------------------------------------------------------- #


def normalize_rules(rules) -> Rules:
    """Rules from YAML/Python (`[logical, mesh_axis | None | [mesh_axes]]` pairs)
    as a hashable tuple `((logical, (mesh_axes...) | None), ...)`."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for i, rule in enumerate(rules):
        if isinstance(rule, str) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"rules[{i}]={rule!r}: each rule is a pair (logical_axis, mesh_axis | null | "
                             f"[mesh_axes])")
        logical, target = rule
        if target is None:
            out.append((logical, None))
        elif isinstance(target, str):
            out.append((logical, (target,)))
        elif all(isinstance(a, str) for a in target) and len(target) > 0:
            out.append((logical, tuple(target)))
        else:
            raise ValueError(f"rules[{i}]={rule!r}: the mesh side must be an axis name, null or a list of names")
    return tuple(out)


def check_rules(rules, mesh_axes: Sequence[str]) -> Rules:
    """Normalized rules; ValueError naming the rule and the axis if a rule names an unknown mesh axis."""
    rules = normalize_rules(rules)
    for logical, target in rules:
        for axis in target or ():
            if axis not in mesh_axes:
                raise ValueError(f"rule ({logical!r}, {list(target)}) names mesh axis {axis!r}, which the mesh "
                                 f"does not have; mesh axes: {tuple(mesh_axes)}")
    return rules


def logical_to_spec(axes: Sequence[str | None], rules, mesh_axes: Sequence[str] | None = None) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions have logical names `axes`.

    A dimension takes the first rule for its name whose mesh axes are all
    still free in this array; a `None` rule, no rule, or a `None` name
    replicate it. With `mesh_axes` given, every rule is checked against
    them (unknown mesh axis -> ValueError naming it).
    """
    rules = normalize_rules(rules) if mesh_axes is None else check_rules(rules, mesh_axes)
    used: set[str] = set()
    spec = []
    for name in axes:
        choice = None
        for logical, target in rules:
            if logical != name:
                continue
            if target is None:
                break
            if used.isdisjoint(target):
                choice = target
                break
        used.update(choice or ())
        spec.append(None if choice is None else choice[0] if len(choice) == 1 else choice)
    return PartitionSpec(*spec)


def fit_rules(rules, mesh: Mesh, model) -> Rules:
    """`rules` with each logical axis that some parameter of `model` cannot split replicated instead.

    For presets meant to run any model (`MeshConfig.fit_to_model`): a
    dimension that does not divide over its mesh axes (the tiny-tasks model's
    57-token vocabulary over tensor=4) is replicated along that logical axis
    everywhere, with a printed notice naming the parameter and the sizes.
    Rules given to `generate` / `Layout.of` directly are not fitted: there an
    indivisible dimension stays an error.
    """
    rules = check_rules(default_rules(mesh) if rules is None else rules, mesh.axis_names)
    dropped: dict[str, str] = {}
    while True:  # replicating one axis frees its mesh axes for another dimension: check again until stable
        fitted = tuple((logical, None if logical in dropped else target) for logical, target in rules)
        layout, before = Placement(mesh, fitted), len(dropped)
        for path, var in _params(model):
            for dim, name, size, entry in layout.indivisible(var.shape, _logical_axes(path, var)):
                if name is not None and name not in dropped:
                    dropped[name] = (f"parameter {_name(path)!r} dimension {dim} ({name!r}) of size {size} "
                                     f"does not divide over {layout.split(entry)} devices")
        if len(dropped) == before:
            break
    for name, why in dropped.items():
        print(f"sharding: {why}: replicating {name!r} (the other rules hold)", flush=True)
    return fitted


def default_rules(mesh: Mesh) -> Rules:
    """`DEFAULT_RULES` restricted to the axes `mesh` has (for `rules=None` with a hand-made mesh)."""
    out = []
    for logical, target in DEFAULT_RULES:
        kept = tuple(a for a in target or () if a in mesh.axis_names)
        out.append((logical, kept or None))
    return tuple(out)


# --------------------------------------------------------------------------- #
# The mesh
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """A device mesh, its logical-axis rules and the multi-host setup (Hydra fills it from `cfg.mesh`).

    Attributes:
      axes: mesh axis name -> size, in mesh order (outermost first); one size
        may be -1, meaning "the devices that are left". The sizes must
        multiply to the device count.
      rules: logical-axis rules, `[logical_name, mesh_axis | null | [mesh_axes]]`
        pairs (see the module docstring); every mesh axis named must be in `axes`.
        None (the presets): `DEFAULT_RULES`, the one rules table.
      num_devices: use only the first `num_devices` devices (the `single`
        preset sets 1); null uses all.
      distributed: call `jax.distributed.initialize` before building the
        mesh (multi-host). Also switched on by the environment variable
        DLLM_DISTRIBUTED=1.
      coordinator_address, num_processes, process_id: passed to
        `jax.distributed.initialize`; null lets JAX detect them (TPU pods,
        SLURM, Open MPI, Kubernetes) or read JAX_COORDINATOR_ADDRESS etc.
        The environment variables DLLM_COORDINATOR_ADDRESS,
        DLLM_NUM_PROCESSES and DLLM_PROCESS_ID override them.
      fit_to_model: replicate a logical axis some parameter of the model
        cannot split over its mesh axes, with a printed notice (`fit_rules`;
        the presets set it, so they run every bundled model); False: such a
        dimension is an error naming it.
    """

    axes: dict = dataclasses.field(default_factory=lambda: {"data": -1, "fsdp": 1, "tensor": 1})
    rules: Any = DEFAULT_RULES
    num_devices: int | None = None
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    fit_to_model: bool = False

    def __post_init__(self):
        axes = dict(self.axes)
        if not axes:
            raise ValueError("MeshConfig.axes is empty: give at least one axis, e.g. {data: -1}")
        for name, size in axes.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"MeshConfig.axes: axis name {name!r} must be a non-empty string")
            if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
                raise ValueError(f"MeshConfig.axes[{name!r}]={size!r}: allowed an int >= 1, or -1 for the rest")
        if sum(size == -1 for size in axes.values()) > 1:
            raise ValueError(f"MeshConfig.axes={axes}: at most one axis may be -1 (the rest)")
        if self.num_devices is not None and (not isinstance(self.num_devices, int) or self.num_devices < 1):
            raise ValueError(f"MeshConfig.num_devices={self.num_devices!r}: allowed an int >= 1 or null (all)")
        object.__setattr__(self, "axes", axes)
        rules = DEFAULT_RULES if self.rules is None else self.rules
        object.__setattr__(self, "rules", check_rules(rules, tuple(axes)))

    def sizes(self, n_devices: int) -> dict[str, int]:
        """Axis sizes with -1 resolved; ValueError naming axes, sizes and the device count if they do not fit."""
        fixed = math.prod(size for size in self.axes.values() if size != -1)
        if -1 in self.axes.values():
            if n_devices % fixed:
                raise ValueError(f"mesh axes {self.axes} do not fit {n_devices} devices: the fixed sizes multiply "
                                 f"to {fixed}, which does not divide {n_devices}")
            return {name: n_devices // fixed if size == -1 else size for name, size in self.axes.items()}
        if fixed != n_devices:
            raise ValueError(f"mesh axes {self.axes} multiply to {fixed} devices, but there are {n_devices}; "
                             f"make the sizes multiply to {n_devices} or set one to -1")
        return dict(self.axes)


def initialize_distributed(config: MeshConfig | None = None) -> bool:
    """`jax.distributed.initialize` from the config and the environment (multi-host).

    Runs when `config.distributed` is true or DLLM_DISTRIBUTED=1; must run
    before anything touches a device. Returns whether it initialized (False
    if not asked or already done). Not testable on one host; see the README.
    """
    config = config or MeshConfig()
    env = os.environ
    if not (config.distributed or env.get("DLLM_DISTRIBUTED", "0") not in ("", "0", "false")):
        return False
    if jax.distributed.is_initialized():
        return False
    as_int = lambda value: None if value in (None, "") else int(value)
    jax.distributed.initialize(
        coordinator_address=env.get("DLLM_COORDINATOR_ADDRESS") or config.coordinator_address,
        num_processes=as_int(env.get("DLLM_NUM_PROCESSES", config.num_processes)),
        process_id=as_int(env.get("DLLM_PROCESS_ID", config.process_id)),
    )
    return True


def make_mesh(config: MeshConfig | None = None, devices: Sequence | None = None) -> Mesh:
    """The device mesh of `config` (default: all devices on "data").

    `devices` overrides the device list (else the first `config.num_devices`,
    else all, of every host). Axes are `Auto`: XLA propagates shardings from
    the annotated inputs. ValueError if the sizes do not fit the device count.
    """
    config = config or MeshConfig()
    initialize_distributed(config)
    if devices is None:
        devices = jax.devices()
        if config.num_devices is not None:
            if config.num_devices > len(devices):
                raise ValueError(f"MeshConfig.num_devices={config.num_devices} but only {len(devices)} devices "
                                 f"are visible")
            devices = devices[:config.num_devices]
    devices = list(devices)
    sizes = config.sizes(len(devices))
    names = tuple(sizes)
    return jax.make_mesh(tuple(sizes.values()), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                         devices=devices)


# --------------------------------------------------------------------------- #
# Placement: a mesh and its rules (hashable, a jit static)
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Placement:
    """A mesh with its checked rules: maps logical axes to shardings. Hashable."""

    mesh: Mesh
    rules: Rules

    @classmethod
    def of(cls, mesh: Mesh, rules=None) -> "Placement":
        """rules=None: `DEFAULT_RULES` restricted to the mesh's axes."""
        rules = default_rules(mesh) if rules is None else rules
        return cls(mesh, check_rules(rules, mesh.axis_names))

    def spec(self, axes: Sequence[str | None]) -> PartitionSpec:
        return logical_to_spec(axes, self.rules)

    def sharding(self, axes: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def split(self, entry) -> int:
        """Devices one PartitionSpec entry splits a dimension over."""
        names = () if entry is None else (entry,) if isinstance(entry, str) else entry
        return math.prod(self.mesh.shape[a] for a in names)

    def check(self, what: str, shape: Sequence[int], axes: Sequence[str | None]) -> NamedSharding:
        """The sharding of an array of `shape`; ValueError naming `what`, the axis and sizes if a dimension
        does not divide over its mesh axes."""
        if len(axes) != len(shape):
            raise ValueError(f"{what}: logical axes {tuple(axes)} do not match its shape {tuple(shape)}")
        for dim, name, size, entry in self.indivisible(shape, axes)[:1]:
            mesh_axes = (entry,) if isinstance(entry, str) else tuple(entry)
            sizes = ", ".join(f"{a}={self.mesh.shape[a]}" for a in mesh_axes)
            raise ValueError(f"{what}: dimension {dim} ({name!r}) of size {size} does not divide over mesh "
                             f"axis {' x '.join(mesh_axes)} ({sizes}: {self.split(entry)} devices); "
                             f"shape {tuple(shape)}")
        return NamedSharding(self.mesh, self.spec(axes))

    def indivisible(self, shape: Sequence[int], axes: Sequence[str | None]) -> list[tuple]:
        """(dimension, logical name, size, spec entry) of each dimension that does not divide over its mesh axes."""
        spec = tuple(self.spec(axes)) + (None,) * len(shape)
        return [(dim, name, size, entry) for dim, (size, name, entry) in enumerate(zip(shape, axes, spec))
                if size % self.split(entry)]

    def put(self, what: str, array, axes: Sequence[str | None]) -> jax.Array:
        """Places `array` with the sharding of `axes`. A host array goes shard by shard
        (`make_array_from_callback`: each process transfers only its devices' slices)."""
        sharding = self.check(what, np.shape(array), axes)
        if isinstance(array, jax.Array):
            return jax.device_put(array, sharding)
        array = np.asarray(array)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        """`with_sharding_constraint` by logical axes (inside jit)."""
        return jax.lax.with_sharding_constraint(x, self.sharding(axes))

    # ----- batches

    def batch_axes(self, ndim: int) -> tuple[str | None, ...]:
        return BATCH_AXES[:ndim] + (None,) * max(0, ndim - len(BATCH_AXES))

    def batch_devices(self) -> tuple[tuple[str, ...], int]:
        """(mesh axes, device count) the batch dimension is split over."""
        entry = self.spec(("batch",))[0]
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        return names, self.split(entry)

    def check_batch(self, rows: int, what: str = "batch") -> None:
        names, n = self.batch_devices()
        if rows % n:
            sizes = ", ".join(f"{a}={self.mesh.shape[a]}" for a in names)
            raise ValueError(f"{what} of {rows} rows does not divide over the {n} devices of mesh axes "
                             f"{' x '.join(names)} ({sizes}); allowed: a multiple of {n} rows")

    def put_batch(self, batch):
        """Places a pytree of [B, ...] arrays with the batch split over the batch axes."""
        return jax.tree.map(lambda x: self.put("batch", x, self.batch_axes(np.ndim(x))), batch)

    # ----- parameters

    def param_shardings(self, model) -> dict:
        """{name: NamedSharding} of every `nnx.Param` of `model` (nested like `nnx.to_pure_dict`);
        ValueError naming the parameter if a dimension does not divide over its mesh axes."""
        return _tree_from_paths({path: self.check(f"parameter {_name(path)!r}", var.shape, _logical_axes(path, var))
                                 for path, var in _params(model)})


def _params(model):
    """(path, Param) pairs of a model (real or abstract)."""
    return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _name(path) -> str:
    return "/".join(map(str, path))


def _logical_axes(path, var) -> tuple:
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
        raise ValueError(f"parameter {_name(path)!r} has no logical_axes metadata; declare it as "
                         f"nnx.Param(value, logical_axes=(...))")
    return tuple(axes)


def _tree_from_paths(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _leaf_at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


# --------------------------------------------------------------------------- #
# The public functions (mesh, rules) -> ...
# --------------------------------------------------------------------------- #


def param_shardings(model, mesh: Mesh, rules=None) -> dict:
    """{name: NamedSharding} of every parameter of `model` (real or `nnx.eval_shape`)."""
    return Placement.of(mesh, rules).param_shardings(model)


def refuse_fp8_on_mesh(model_layout, mesh: Mesh) -> None:
    """`Layout.fp8_weights` runs on one device: its FP8 GEMM kernel is one unpartitioned custom call."""
    if model_layout.fp8_weights and mesh.size > 1:
        raise ValueError(f"Layout.fp8_weights on a mesh of {mesh.size} devices: FP8 weights decode on one device "
                         "(the FP8 GEMM kernel is not partitioned); use one device, or load without fp8_weights")


def shard_model(model, mesh: Mesh, rules=None):
    """Moves every parameter of `model` to its sharding, in place; returns the model.

    ValueError naming the parameter, the dimension, the mesh axis and its size
    when a dimension does not divide over its mesh axes.
    """
    refuse_fp8_on_mesh(model.layout, mesh)
    layout = Placement.of(mesh, rules)
    shardings = layout.param_shardings(model)
    for path, var in _params(model):
        var.set_value(jax.device_put(var.get_value(), _leaf_at(shardings, path)))
    return model


@functools.lru_cache(maxsize=8)
def sharded_init(config, seed: int, placement: Placement, layout=None):
    """`() -> params`: a fresh `Transformer(config, layout)`'s parameters (a pure dict), the
    initialization jitted straight into their rule shardings (as md4 and the flax gemma
    example do: born sharded, no device holds a full copy)."""
    from dllm.models.transformer import Transformer

    build = lambda: Transformer(config, layout, rngs=nnx.Rngs(seed))
    shardings = placement.param_shardings(nnx.eval_shape(build))
    return jax.jit(lambda: nnx.to_pure_dict(nnx.state(build(), nnx.Param)), out_shardings=shardings)


def init_model(config, mesh: Mesh, rules=None, seed: int = 0, layout=None):
    """A fresh `Transformer(config, layout)` whose parameters are born sharded (`sharded_init`)."""
    from dllm.checkpoints import model_from_params

    return model_from_params(config, sharded_init(config, seed, Placement.of(mesh, rules), layout)(), layout)


class Placer:
    """`place(name, host_array) -> jax.Array` for `dllm.from_pretrained(path, place=Placer(mesh, rules))`:
    each parameter goes straight to its shards as it is read, so no device
    ever holds a full copy. Our orbax checkpoints restore directly into the
    sharded target (`sharding(name, shape)`).

    The logical axes come from the parameters' own metadata (an abstract
    `Transformer` with every optional parameter), keyed by name.
    """

    def __init__(self, mesh: Mesh, rules=None):
        self.layout = Placement.of(mesh, rules)
        self.axes = _transformer_param_axes()

    def logical_axes(self, name: str) -> tuple:
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in self.axes:
            return self.axes[parts[2]][1:]  # one layer of an unrolled model: no "layers" axis
        if name not in self.axes:
            raise ValueError(f"parameter {name!r} is not a Transformer parameter; known: {sorted(self.axes)}")
        return self.axes[name]

    def sharding(self, name: str, shape: Sequence[int]) -> NamedSharding:
        return self.layout.check(f"parameter {name!r}", shape, self.logical_axes(name))

    def __call__(self, name: str, array) -> jax.Array:
        return self.layout.put(f"parameter {name!r}", array, self.logical_axes(name))


def _transformer_param_axes() -> dict[str, tuple]:
    from dllm.models.config import ModelConfig
    from dllm.models.layout import Layout
    from dllm.models.transformer import Transformer

    axes = {}
    for kv_heads in (2, 1):  # multi-head and grouped-query attention (their fused q/k/v differ)
        config = ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, n_kv_heads=kv_heads, mlp_hidden=8,
                             qkv_bias=True, qk_norm=True, arch="qwen3", tie_embeddings=False)
        for fused, fp8 in itertools.product((False, True), (False, True)):  # canonical and fused names, FP8 scales
            layout = Layout(fused_projections=fused, fp8_weights=fp8)
            model = nnx.eval_shape(lambda: Transformer(config, layout, rngs=nnx.Rngs(0)))
            axes.update({_name(path): _logical_axes(path, var) for path, var in _params(model)})
    return axes


def assert_sharded(model, mesh: Mesh, rules=None, params: dict | None = None) -> float:
    """MaxText-style check that the parameters really are sharded as the rules say.

    Fails (AssertionError listing every offender) when a parameter's sharding
    is not the one its logical axes map to, or when the rules split it over
    devices (mesh axes of size > 1) but every device holds the full array.

    Args:
      model: the model, or an abstract one (its logical axes) when `params`
        (a pure {name: array} dict, as in training) holds the values.
    Returns:
      the fraction of all parameter elements that one device holds
      (1.0 = fully replicated; 1/n_devices = perfectly sharded).
    """
    layout = Placement.of(mesh, rules)
    problems, total, per_device = [], 0, 0
    for path, var in _params(model):
        value = var.get_value() if params is None else _leaf_at(params, path)
        axes = _logical_axes(path, var)
        expected = layout.sharding(axes)
        actual = getattr(value, "sharding", None)
        name = _name(path)
        if actual is None:
            problems.append(f"{name}: not a jax.Array on the mesh (type {type(value).__name__})")
            continue
        if not actual.is_equivalent_to(expected, value.ndim):
            problems.append(f"{name}: logical axes {axes} -> {expected.spec}, but it has {actual}")
            continue
        shard = actual.shard_shape(value.shape)
        if math.prod(layout.split(e) for e in expected.spec) > 1 and tuple(shard) == tuple(value.shape):
            problems.append(f"{name}: the rules split it as {expected.spec}, but each device holds all of "
                            f"{tuple(value.shape)}")
        total += math.prod(value.shape)
        per_device += math.prod(shard)
    if problems:
        raise AssertionError(f"parameters not sharded as the rules say on mesh {dict(mesh.shape)}:\n  "
                             + "\n  ".join(problems))
    return per_device / max(total, 1)


def shard_batch(batch, mesh: Mesh, rules=None):
    """Places a pytree of [B, ...] host arrays with B split over the batch mesh axes (data, fsdp)."""
    layout = Placement.of(mesh, rules)
    for leaf in jax.tree.leaves(batch):
        layout.check_batch(np.shape(leaf)[0])
    return layout.put_batch(batch)


def cache_sharding(mesh: Mesh, rules=None) -> NamedSharding:
    """Sharding of a `KVCache` tensor [layers, B, S, kv_heads, head_dim] (batch and kv heads split)."""
    return Placement.of(mesh, rules).sharding(CACHE_AXES)


__all__ = ["DEFAULT_RULES", "Placement", "MeshConfig", "Placer", "assert_sharded", "cache_sharding", "check_rules",
           "init_model", "sharded_init", "initialize_distributed", "logical_to_spec", "make_mesh", "normalize_rules",
           "param_shardings", "shard_batch", "shard_model"]
