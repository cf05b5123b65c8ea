"""Every YAML under configs/ composes through Hydra and builds what it describes.

* primary configs (config, train, benchmark) compose;
* sampler/*: instantiate to a `samplers.base.Sampler`, bind to the tiny-tasks
  tokenizer and validate against the main job's decode settings;
* model/*: build a `dllm.ModelConfig` (every key a field);
* train/*: compose through train.yaml into `TrainConfig` and `DataConfig`;
* task/*: compose, and the task resolves (suite prompts, or a benchmark name);
* experiment/*: compose with `+experiment=<name>`, declare `hydra.sweeper.params`,
  and every job of the sweep composes and builds its sampler;
* hydra/launcher/*: compose as the launcher of the main job;
* any other group (added later) must at least compose.

A YAML that none of these reaches fails `test_every_yaml_is_covered`.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import dllm
from dllm.data import DataConfig
from dllm.training import TrainConfig
from experiments.common import REPO_ROOT, decode_config
from samplers.base import Sampler

CONFIG_DIR = REPO_ROOT / "configs"
PRIMARY = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
GROUPED = sorted(p.relative_to(CONFIG_DIR) for p in CONFIG_DIR.rglob("*.yaml") if p.parent != CONFIG_DIR)


def group_and_name(path: Path) -> tuple[str, str]:
    return str(path.parent), path.stem


def defaults_groups(primary: str) -> set[str]:
    """Groups named in a primary config's defaults list (`- model: tiny_tasks` -> model)."""
    data = yaml.safe_load((CONFIG_DIR / f"{primary}.yaml").read_text()) or {}
    groups = set()
    for entry in data.get("defaults", []):
        if isinstance(entry, dict):
            for key in entry:
                groups.add(key.replace("override ", "").replace("optional ", "").strip("/").strip())
    return groups


def compose_cfg(config_name: str, overrides=(), hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra_config)


def primary_for(group: str) -> tuple[str, str]:
    """(primary config, override prefix) that selects an option of `group`."""
    for primary in ("config", "train", "benchmark"):
        if primary in PRIMARY and group in defaults_groups(primary):
            return primary, ""
    return "config", "+"


@pytest.fixture(scope="module")
def tokenizer():
    return dllm.Tokenizer.from_folder(REPO_ROOT / "checkpoints" / "tiny-tasks")


def of_group(group: str) -> list[str]:
    return [p.stem for p in GROUPED if str(p.parent) == group]


KNOWN = ("sampler", "model", "train", "task", "experiment", "hydra/launcher")
OTHER = [p for p in GROUPED if str(p.parent) not in KNOWN and not str(p.parent).startswith("hydra")]


def test_every_yaml_is_covered():
    assert {"config", "train"} <= set(PRIMARY), PRIMARY
    tested = {Path(group) / f"{name}.yaml" for group in KNOWN for name in of_group(group)} | set(OTHER)
    assert set(GROUPED) - tested == set(), "YAMLs no test composes (add a handler to tests/test_configs.py)"
    assert all(of_group(g) for g in ("sampler", "model", "train", "task", "experiment"))


@pytest.mark.parametrize("primary", PRIMARY)
def test_primary_composes(primary):
    cfg = compose_cfg(primary)
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("name", of_group("sampler"))
def test_sampler_config_instantiates(name, tokenizer):
    cfg = compose_cfg("config", [f"sampler={name}"])
    sampler = instantiate(cfg.sampler, _convert_="all")
    assert isinstance(sampler, Sampler), type(sampler)
    bound = sampler.bind(tokenizer)
    assert isinstance(bound, Sampler)
    bound.validate(decode_config(cfg))
    assert bound.settings()["name"]


@pytest.mark.parametrize("name", of_group("model"))
def test_model_config_builds(name):
    cfg = compose_cfg("config", [f"model={name}"])
    config = dllm.ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    assert config.vocab_size > 0 and config.n_layers > 0


@pytest.mark.parametrize("name", of_group("train"))
def test_train_preset_composes(name):
    cfg = compose_cfg("train", [f"train={name}"])
    container = OmegaConf.to_container(cfg, resolve=True)
    dllm.ModelConfig(**container["model"])
    TrainConfig(**container["train"])
    DataConfig(**container.get("data", {}))


@pytest.mark.parametrize("name", of_group("task"))
def test_task_config_composes(name):
    from dllm.tasks import SUITES, suite_examples, suite_of_task_config
    from dllm.tasks.benchmarks import BENCHMARKS

    cfg = compose_cfg("config", [f"task={name}"])
    task = cfg.task
    assert task.name == name and task.split
    suite = suite_of_task_config(name)
    if suite in SUITES:
        tasks = list(task.tasks) if task.get("tasks") else None
        assert all(t in SUITES[suite] for t in tasks or [])
        assert len(suite_examples(task.split, 1, tasks=tasks, suite=suite)) == len(tasks or SUITES[suite])
    else:
        assert name in BENCHMARKS, f"task config {name!r} names neither the suite nor a benchmark"
        BENCHMARKS[name].check_settings(OmegaConf.to_container(task, resolve=True))


def sweep_jobs(params: dict) -> list[list[str]]:
    """The override lists of a basic-sweeper sweep (comma-separated values, cartesian product)."""
    axes = []
    for key, value in params.items():
        values = [v.strip() for v in str(value).split(",")]
        assert all(values) and not str(value).startswith(("glob(", "range(", "choice(")), (
            f"{key}: {value!r}; this test expands plain comma lists only")
        axes.append([f"{key}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*axes)]


@pytest.mark.parametrize("name", of_group("experiment"))
def test_experiment_config_composes_and_every_job_builds(name, tokenizer):
    cfg = compose_cfg("config", [f"+experiment={name}"], hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params, f"experiment {name} has no hydra.sweeper.params: it would run a single job"
    for overrides in sweep_jobs(params):
        job = compose_cfg("config", [f"+experiment={name}", *overrides])
        sampler = instantiate(job.sampler, _convert_="all").bind(tokenizer)
        assert isinstance(sampler, Sampler)
        sampler.validate(decode_config(job))


@pytest.mark.parametrize("name", of_group("hydra/launcher"))
def test_launcher_config_composes(name):
    cfg = compose_cfg("config", [f"hydra/launcher={name}"], hydra_config=True)
    assert cfg.hydra.launcher._target_


@pytest.mark.parametrize("path", OTHER, ids=[str(p) for p in OTHER])
def test_other_groups_compose(path):
    group, name = group_and_name(path)
    primary, prefix = primary_for(group)
    OmegaConf.to_container(compose_cfg(primary, [f"{prefix}{group}={name}"]), resolve=True)


def test_layout_overrides_reach_the_loaded_checkpoint():
    """`layout.*` (config.yaml) changes the loaded checkpoint's parameter layout and
    attention; null keeps the checkpoint's own setting."""
    from experiments.common import load_model

    cfg = compose_cfg("config", [f"checkpoint={REPO_ROOT / 'checkpoints' / 'tiny-tasks'}", "layout.scan_layers=false",
                                 "layout.fused_projections=true", "layout.window_attention_impl=xla"])
    model, _, _ = load_model(cfg)
    assert not model.layout.scan_layers and model.layout.fused_projections
    assert model.layout.window_attention_impl == "xla" and model.layout.attention_impl is None
    assert "qkv_proj" in model.layer_params()[0]
    default, _, _ = load_model(compose_cfg("config", [f"checkpoint={REPO_ROOT / 'checkpoints' / 'tiny-tasks'}"]))
    assert default.layout.scan_layers and not default.layout.fused_projections
