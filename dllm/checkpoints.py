"""Checkpoints: Hugging Face safetensors import and our own orbax format.

`from_pretrained(path)` accepts either
* an HF folder: `config.json` (LLaDA or Dream), `model.safetensors` or
  `model.safetensors.index.json` + shards, `tokenizer.json`; or
* one of our folders: `config.json` with `"model_type": "dllm"`,
  `tokenizer.json`, and orbax parameters under `params/`.

HF shards are memory-mapped and read tensor by tensor; each stacked parameter
(e.g. all layers' q_proj) is assembled on the host, moved to the device and
freed before the next one, so an 8B checkpoint never needs two full copies in
host memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from dllm.models import hf_names
from dllm.models.config import DTYPES, ModelConfig, from_hf_config, read_hf_config, read_json, to_own_config_dict
from dllm.models.layout import CANONICAL, LAYOUT_FIELDS, Layout
from dllm.models.transformer import (Transformer, canonical_params, fuse_params, fused_groups, join_parts,
                                     layer_param_shapes, model_layer_shapes, model_param_tree)
from dllm.tokenizer import Tokenizer

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """A memory-mapped .safetensors file: header parsed once, tensors are views."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: safetensors shard is missing")
        size = self.path.stat().st_size
        if size < 8:
            raise ValueError(f"{self.path}: truncated safetensors shard ({size} bytes; the 8-byte header "
                             "length alone is longer)")
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"{self.path}: bad safetensors header: it says {header_len} header bytes, "
                                 f"the file has {size - 8} after the length (truncated or not a safetensors file)")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ValueError(f"{self.path}: bad safetensors header: its {header_len} bytes are not JSON "
                                 "(corrupted, or not a safetensors file)") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: bad safetensors header: expected a JSON object")
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + header_len
        self.size = size
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

    def keys(self):
        return self.header.keys()

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if self.data_start + end > self.size:
            raise ValueError(f"{self.path}: truncated safetensors shard: tensor {name!r} needs bytes up to "
                             f"{self.data_start + end}, the file has {self.size}")
        expected = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != expected:
            raise ValueError(f"{self.path}: bad safetensors header: tensor {name!r} of shape {info['shape']} "
                             f"and dtype {info['dtype']} needs {expected} bytes, its offsets span {end - begin}")
        raw = self._mmap[self.data_start + begin:self.data_start + end]
        return raw.view(dtype).reshape(info["shape"])


class SafetensorsIndex:
    """All tensors of an HF folder, single file or sharded with an index."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        index_path = folder / "model.safetensors.index.json"
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if index_path.is_file():
            index = read_json(index_path)
            if not isinstance(index.get("weight_map"), dict):
                raise ValueError(f"{index_path}: missing field 'weight_map' (tensor name -> shard file)")
            weight_map = index["weight_map"]
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise FileNotFoundError(
                        f"{folder / shard}: shard named in {index_path.name} is missing "
                        f"(it holds e.g. {next(k for k, v in weight_map.items() if v == shard)!r})"
                    )
            self.where = dict(weight_map)
        elif (folder / "model.safetensors").is_file():
            single = SafetensorsFile(folder / "model.safetensors")
            self.files["model.safetensors"] = single
            self.where = {name: "model.safetensors" for name in single.keys()}
        else:
            raise FileNotFoundError(
                f"{folder}: no model.safetensors or model.safetensors.index.json in the checkpoint folder"
            )
        self.folder = folder

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> tuple[np.ndarray, Path]:
        if name not in self.where:
            raise KeyError(f"{self.folder}: tensor {name!r} not found in any safetensors file")
        shard = self.where[name]
        if shard not in self.files:
            self.files[shard] = SafetensorsFile(self.folder / shard)
        return self.files[shard].get(name), self.files[shard].path


def _abstract_model(config: ModelConfig, layout: Layout = CANONICAL):
    abstract = nnx.eval_shape(lambda: Transformer(config, layout, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def load_hf_params(folder: Path, config: ModelConfig, layout: Layout = CANONICAL, place=None) -> dict[str, jax.Array]:
    """Reads HF safetensors into the parameter names of a model in `layout`, one stacked parameter
    at a time (with `scan_layers=False`, one list of per-layer tensors named
    `blocks/{i}/{name}`; with `fused_projections`, q/k/v and gate/up joined on
    the host into `qkv_proj` or `gqa_qkv_proj` / `gate_up_proj` before they are placed).

    Args:
      place: optional `fn(name, host_array) -> jax.Array` that puts a finished
        parameter on the device(s) (e.g. with its NamedSharding); default
        `jnp.asarray`.
    """
    index = SafetensorsIndex(folder)
    layer_names, global_names = hf_names.NAMES[config.arch]
    dtype = config.weight_dtype
    place = place or (lambda name, array: jnp.asarray(array))

    def read(hf_name: str, name: str, our_shape) -> np.ndarray:
        try:
            array, path = index.get(hf_name)
        except KeyError as e:
            raise KeyError(f"{e.args[0]} (needed for parameter {name!r})") from None
        expected = hf_names.hf_shape(name, our_shape)
        if tuple(array.shape) != tuple(expected):
            raise ValueError(
                f"{path}: tensor {hf_name!r} has shape {tuple(array.shape)}, expected {tuple(expected)} "
                f"from config.json (arch={config.arch}, d_model={config.d_model}, heads={config.n_heads}, "
                f"kv_heads={config.n_kv_heads}, mlp_hidden={config.mlp_hidden}, vocab={config.vocab_size})"
            )
        return hf_names.hf_to_ours(name, array, our_shape)

    shapes = layer_param_shapes(config)
    parts_of = {name: (name,) for name in shapes}  # model parameter -> the HF tensors stacked into it
    for fused, parts in fused_groups(config, layout).items():
        parts_of = {name: p for name, p in parts_of.items() if name not in parts} | {fused: parts}

    def read_layer(name: str, i: int) -> np.ndarray:
        arrays = [read(layer_names[part].format(i=i), part, shapes[part]) for part in parts_of[name]]
        array = arrays[0] if len(arrays) == 1 else join_parts(config, name, arrays, xp=np)
        return array.astype(dtype, copy=False)

    params: dict[str, jax.Array] = {}
    for name, shape in model_layer_shapes(config, layout).items():
        if not layout.scan_layers:  # unrolled: each layer's tensor placed on its own
            params[name] = [place(f"blocks/{i}/{name}", read_layer(name, i)) for i in range(config.n_layers)]
            continue
        stacked = np.empty((config.n_layers, *shape), dtype=dtype)
        for i in range(config.n_layers):
            stacked[i] = read_layer(name, i)
        params[name] = place(name, stacked)
        del stacked
    globals_ = {"embed": (config.vocab_size, config.d_model), "final_norm": (config.d_model,)}
    if not config.tie_embeddings:
        globals_["lm_head"] = (config.d_model, config.vocab_size)
    for name, shape in globals_.items():
        params[name] = place(name, read(global_names[name], name, shape).astype(dtype))
    return params


def _flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dicts -> {"a/0/b": leaf} (lists are leaves)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, name + "/") if isinstance(value, dict) else {name: value})
    return flat


def model_from_params(config: ModelConfig, params: dict, layout: Layout | None = None) -> Transformer:
    """Builds a Transformer(config, layout) whose parameters are `params` (no random init).

    `params`: canonical {name: array} (layer parameters stacked [layers, ...]
    or given as per-layer lists, as checkpoints hold them; a fused parameter
    such as `qkv_proj` may replace its parts), or the model's own pure-dict
    structure (`nnx.to_pure_dict`). Shapes are checked against the
    config first; an unrolled layout (`scan_layers=False`) gets one array per
    layer. `layout` defaults to `Layout()`.
    """
    layout = Layout() if layout is None else layout
    own = "blocks" in params
    graphdef, state = _abstract_model(config, layout)
    expected = nnx.to_pure_dict(state if own else _abstract_model(config)[1])
    if not own:  # a fused parameter may stand for its parts (as `load_hf_params` returns them)
        fused_shapes = nnx.to_pure_dict(_abstract_model(config, layout.replace(scan_layers=True))[1])
        for fused, parts in fused_groups(config, layout).items():
            if fused in params:
                expected = {k: v for k, v in expected.items() if k not in parts} | {fused: fused_shapes[fused]}

    def shape(value) -> tuple:  # a list of per-layer arrays counts as their stack
        if isinstance(value, (list, tuple)):
            layers = {tuple(np.shape(v)) for v in value}
            return (len(value), *layers.pop()) if len(layers) == 1 else (len(value), "per-layer shapes differ")
        return tuple(np.shape(value))

    expected_shapes = {name: tuple(v.shape) for name, v in _flatten(expected).items()}
    given_shapes = {name: shape(v) for name, v in _flatten(params).items()}
    missing, extra = set(expected_shapes) - set(given_shapes), set(given_shapes) - set(expected_shapes)
    if missing or extra:
        raise ValueError(f"parameters do not match the config: missing {sorted(missing)}, unexpected {sorted(extra)}")
    for name, want in expected_shapes.items():
        if given_shapes[name] != want:
            raise ValueError(f"parameter {name!r} has shape {given_shapes[name]}, the config expects {want}")
    nnx.replace_by_pure_dict(state, model_param_tree(config, layout, params))  # fuses canonical parts
    return nnx.merge(graphdef, state)


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: allowed {tuple(DTYPES)}")
        return dtype
    for name, value in DTYPES.items():
        if jnp.dtype(value) == jnp.dtype(dtype):
            return name
    raise ValueError(f"dtype={dtype!r}: allowed {tuple(DTYPES)}")


def from_pretrained(path, dtype=None, *, param_dtype=None, place=None, layout: Layout | None = None,
                    weight_rounding: str | None = None, **config_overrides):
    """Loads `(model, tokenizer)` from an HF folder or one of our orbax folders.

    Args:
      path: the checkpoint folder.
      dtype: compute dtype ("float32", "bfloat16" or a jnp dtype). The
        parameter dtype follows it unless `param_dtype` is given.
      place: optional `fn(name, host_array) -> jax.Array` placing each
        parameter, e.g. `dllm.sharding.Placer(mesh, rules)` to load directly
        into shards. If it also has `sharding(name, shape)` (as `Placer`
        does), our orbax checkpoints are restored straight into those
        shardings instead of being placed after the read.
      layout: how the model runs (`dllm.Layout`: scanned or unrolled layers,
        fused projections, attention kernels); default `Layout()`. The
        checkpoint does not decide it.
      weight_rounding: None, or "fp8": every GEMM weight rounded to FP8 e4m3 with per-output-channel
        scales (`dllm.models.quantize.fp8_rounded`) and held in the parameter dtype: the accuracy of
        FP8 weights, not their speed (no FP8 kernel reads them).
      config_overrides: any other `ModelConfig` field (e.g. max_seq_len=8192).
    """
    if weight_rounding not in (None, "fp8"):
        raise ValueError(f"weight_rounding={weight_rounding!r}: allowed None or 'fp8'")
    misplaced = sorted(set(config_overrides) & set(LAYOUT_FIELDS))
    if misplaced:
        raise ValueError(f"from_pretrained({', '.join(f'{k}=...' for k in misplaced)}): these are Layout fields, not "
                         f"ModelConfig ones; pass layout=dllm.Layout({', '.join(f'{k}=...' for k in misplaced)})")
    layout = Layout() if layout is None else layout
    if layout.fp8_weights and getattr(place, "layout", None) is not None:  # a Placer: its mesh
        from dllm.sharding import refuse_fp8_on_mesh

        refuse_fp8_on_mesh(layout, place.layout.mesh)
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: checkpoint folder does not exist")
    raw = read_hf_config(folder)
    overrides = dict(config_overrides)
    if (name := _dtype_name(dtype)) is not None:
        overrides["dtype"] = name
        overrides.setdefault("param_dtype", name)
    if (name := _dtype_name(param_dtype)) is not None:
        overrides["param_dtype"] = name
    config = from_hf_config(raw, folder / "config.json", **overrides)
    tokenizer = Tokenizer.from_folder(folder)
    if raw.get("model_type") == "dllm":
        target_sharding = getattr(place, "sharding", None)
        params = restore_params(folder / "params", config, target_sharding)
        if place is not None and target_sharding is None:
            params = {k: place(k, v) for k, v in params.items()}
        if fused_groups(config, layout):  # stacked on the device, then placed as the fused parameter
            params = fuse_params(config, layout, params)
            if place is not None:
                params.update({name: place(name, params[name]) for name in fused_groups(config, layout)})
    else:
        params = load_hf_params(folder, config, layout, place)
    model = model_from_params(config, params, layout)
    if weight_rounding == "fp8":
        from dllm.models.quantize import fp8_rounded

        model = fp8_rounded(model)
    return model, tokenizer


def save_pretrained(model: Transformer, tokenizer: Tokenizer | None, path, extra: dict | None = None) -> Path:
    """Writes our own checkpoint folder atomically (temp folder, then rename).

    Layout: config.json (model_type "dllm"), tokenizer.json (+ its config),
    params/ (an orbax PyTree checkpoint), optional metadata.json.
    """
    import orbax.checkpoint as ocp

    final = Path(path).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(final) as staging:
        (staging / "config.json").write_text(json.dumps(to_own_config_dict(model.config), indent=2))
        if tokenizer is not None:
            tokenizer.save(staging)
        if extra:
            (staging / "metadata.json").write_text(json.dumps(extra, indent=2))
        params = jax.tree.map(np.asarray, canonical_params(model))
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / "params", params)
            checkpointer.wait_until_finished()
    return final


@contextlib.contextmanager
def atomic_folder(final: Path):
    """Yields an empty staging folder next to `final`; on success it replaces
    `final` by renames (an old `final` survives until the new one is in place),
    on any exception it is deleted. Readers never see a half-written folder."""
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield staging
        if final.exists():
            backup = final.with_name(f".{final.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(final, backup)
            os.replace(staging, final)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def restore_params(params_dir: Path, config: ModelConfig, sharding=None) -> dict[str, jax.Array]:
    """Restores orbax parameters, checking them against `config` first.

    `sharding`: optional `fn(name, shape) -> jax.sharding.Sharding`; each
    parameter is then restored directly into it (a sharded target).
    """
    import orbax.checkpoint as ocp

    params_dir = Path(params_dir).absolute()
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{params_dir}: no orbax parameters folder")
    _, state = _abstract_model(config)  # checkpoints hold the canonical layout: stacked, unfused layers
    target = nnx.to_pure_dict(state)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(params_dir)
        stored_tree = getattr(stored, "item_metadata", stored)
        stored_tree = getattr(stored_tree, "tree", stored_tree)
        for name, struct_ in target.items():
            if name not in stored_tree:
                raise ValueError(f"{params_dir}: parameter {name!r} missing from the checkpoint")
            found = tuple(stored_tree[name].shape)
            if found != tuple(struct_.shape):
                raise ValueError(
                    f"{params_dir}: parameter {name!r} has shape {found}, config.json expects {tuple(struct_.shape)}"
                )
        abstract = {k: jax.ShapeDtypeStruct(v.shape, config.weight_dtype,
                                            sharding=None if sharding is None else sharding(k, v.shape))
                    for k, v in target.items()}
        return checkpointer.restore(params_dir, abstract)
