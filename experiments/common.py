"""Pieces the Hydra entry points share: model, sampler, task and decode settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import hydra
from flax import nnx
from omegaconf import DictConfig, OmegaConf

import dllm
from dllm.decoding import DecodeConfig
from dllm.models.layout import LAYOUT_FIELDS

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def run_layout(cfg: DictConfig) -> dllm.Layout:
    """The run's `Layout` (configs/layout/, `layout.<field>=...`); the default layout without that group."""
    return dllm.Layout(**OmegaConf.to_container(cfg.layout, resolve=True)) if cfg.get("layout") else dllm.Layout()


def model_config(cfg: DictConfig) -> dllm.ModelConfig:
    fields = {f.name for f in dataclasses.fields(dllm.ModelConfig)}
    values = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k in fields}
    return dllm.ModelConfig(**values)


def cli_overrides() -> list[str]:
    """The command line's Hydra overrides of the running job ([] outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # no Hydra job (a notebook, a test composing by hand)
        return []


def missing_checkpoint_error(path: Path, given: str) -> FileNotFoundError:
    """A FileNotFoundError naming `path` and the checkpoint folders next to it."""
    parent = path.parent
    nearby = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    where = f"folders in {parent}: {', '.join(nearby)}" if nearby else f"{parent} does not exist either"
    return FileNotFoundError(f"checkpoint={given!r}: {path} does not exist ({where}); "
                             "pass an existing folder, or checkpoint=null for a randomly initialised model")


def load_model(cfg: DictConfig):
    """(model, tokenizer, description): the checkpoint; a random model only for `checkpoint=null`.

    A checkpoint path that does not exist is an error naming it and the
    folders beside it (never a silent random model). With a checkpoint, the
    architecture is the checkpoint's: `model.*` overrides on the command line
    are refused by name (layout knobs go through `layout.*`).
    """
    if cfg.get("checkpoint"):
        path = resolve_path(cfg.checkpoint)
        if not path.exists():
            raise missing_checkpoint_error(path, str(cfg.checkpoint))
        ignored = [o for o in cli_overrides() if o.lstrip("+~").startswith("model.")]
        if ignored:
            raise ValueError(f"{', '.join(ignored)}: model.* settings do not apply when checkpoint={cfg.checkpoint} "
                             "is loaded (its config.json fixes the architecture); allowed: layout.* for how it runs "
                             f"({', '.join(LAYOUT_FIELDS)}), or "
                             "checkpoint=null to build a random model from model.*")
        model, tokenizer = dllm.from_pretrained(path, dtype=cfg.get("dtype"), layout=run_layout(cfg))
        tokenizer.allow_unk = bool(cfg.get("allow_unk", False))
        return model, tokenizer, str(path)
    from dllm.data import task_tokenizer

    print("checkpoint=null: using a RANDOMLY INITIALISED model (configs/model) with the tiny-suite tokenizer")
    tokenizer = task_tokenizer()
    tokenizer.allow_unk = bool(cfg.get("allow_unk", False))
    config = model_config(cfg).replace(vocab_size=tokenizer.vocab_size, mask_token_id=tokenizer.mask_id,
                                       eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return dllm.Transformer(config, run_layout(cfg), rngs=nnx.Rngs(cfg.get("seed", 0))), tokenizer, "random-init"


def build_sampler(cfg: DictConfig):
    return hydra.utils.instantiate(cfg.sampler, _convert_="all")


def decode_setup(cfg: DictConfig):
    """What `generate` and `evaluate` decode with: (model, tokenizer, model description, sampler,
    DecodeConfig, mesh, rules)."""
    model, tokenizer, source = load_model(cfg)
    mesh, rules = decode_mesh(cfg, model)
    return model, tokenizer, source, build_sampler(cfg), decode_config(cfg), mesh, rules


def decode_config(cfg: DictConfig) -> DecodeConfig:
    return DecodeConfig(**OmegaConf.to_container(cfg.decode, resolve=True))


def task_examples(cfg: DictConfig, tokenizer=None):
    """The examples of `cfg.task`: the synthetic suite, or a benchmark of `dllm.tasks.benchmarks`
    (prompts rendered with `tokenizer`'s chat template when the task config asks for it)."""
    from dllm.tasks import get_task_set

    return get_task_set(cfg.task.name).examples_of_config(OmegaConf.to_container(cfg.task, resolve=True), tokenizer)


def decode_mesh(cfg: DictConfig, model=None):
    """(mesh, rules) of `cfg.mesh` for sharded decoding, or (None, None) for one
    device (`mesh=single`, or a mesh of one device: the unsharded path).
    With `mesh.fit_to_model` (the presets) the rules are fitted to `model`
    (`dllm.sharding.fit_rules`: an indivisible axis is replicated, with a notice)."""
    from dllm.sharding import MeshConfig, fit_rules, make_mesh

    if cfg.get("mesh") is None:
        return None, None
    mesh_config = MeshConfig(**OmegaConf.to_container(cfg.mesh, resolve=True))
    mesh = make_mesh(mesh_config)
    if mesh.size == 1:
        return None, None
    if mesh_config.fit_to_model and model is not None:
        return mesh, fit_rules(mesh_config.rules, mesh, model)
    return mesh, mesh_config.rules
