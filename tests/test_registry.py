"""One registry per concept: configs/sampler/*.yaml is the sampler registry, every
cache mode has one policy object."""

import dataclasses
import importlib
import inspect
import pkgutil

import pytest

import samplers
from dllm.decoding import cache
from dllm.decoding.sampler import Sampler, build_sampler, sampler_names, sampler_spec
from dllm.decoding.state import DecodeConfig


def sampler_classes() -> set[type]:
    """Every Sampler subclass defined anywhere in the samplers package (its subpackages too)."""
    found = set()
    for info in pkgutil.walk_packages(samplers.__path__, "samplers."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Sampler) and cls is not Sampler and cls.__module__ == module.__name__:
                found.add(cls)
    return found


def test_every_sampler_class_has_a_yaml_and_every_yaml_builds_its_sampler():
    from hydra.utils import get_class

    targets = {name: get_class(sampler_spec(name)["_target_"]) for name in sampler_names()}
    assert set(targets.values()) == sampler_classes(), "a sampler class without a YAML, or a YAML without a class"
    for name in sampler_names():
        built = build_sampler(name, **({"delimiter_ids": [1]} if name == "adaptive_block" else {}))
        assert isinstance(built, Sampler) and built.name == name, name
        assert built.settings()["name"] == name


def test_build_sampler_overrides_and_errors():
    assert build_sampler("threshold", tau=0.7).tau == 0.7
    assert build_sampler("early_commit", **{"inner.steps": 4}).inner.steps == 4
    inner = samplers.Threshold(tau=0.5)
    assert build_sampler("end_of_text", inner=inner).inner is inner
    assert samplers.get_sampler("low_confidence", confidence="margin").confidence == "margin"
    with pytest.raises(ValueError, match="unknown sampler 'fastest'; allowed: .*threshold"):
        build_sampler("fastest")
    with pytest.raises(ValueError, match="need a sampler name"):
        build_sampler(samplers.Threshold(), tau=0.5)
    with pytest.raises(ValueError, match=r"LowConfidence.confidence='surprise': allowed \('max_prob', 'margin'"):
        samplers.LowConfidence(confidence="surprise")
    with pytest.raises(ValueError, match=r"Threshold.tau=1.5: allowed range \(0, 1\]"):
        samplers.Threshold(tau=1.5)
    with pytest.raises(ValueError, match=r"Credit.alpha=inf: allowed range \[0, inf\)"):
        samplers.Credit(alpha=float("inf"))


def test_every_cache_mode_has_one_policy():
    assert set(cache.CACHE_POLICIES) == set(cache.CACHE_MODES) == {"none", "prefix", "dual", "block", "dkv",
                                                                          "elastic"}
    config = DecodeConfig(gen_length=16, block_length=4, cache_window=8)
    assert {name: policy.max_window(config) for name, policy in cache.CACHE_POLICIES.items()} == {
        "none": 16, "prefix": 16, "dual": 8, "block": 4, "dkv": 16, "elastic": 16}
    for name, policy in cache.CACHE_POLICIES.items():
        assert policy.name == name and dataclasses.is_dataclass(policy)


def test_one_task_registry_behind_every_task_config():
    from omegaconf import OmegaConf

    from dllm.tasks import Suite, get_task_set, suite_examples, task_sets
    from experiments.common import REPO_ROOT

    names = {OmegaConf.load(path).name for path in (REPO_ROOT / "configs" / "task").glob("*.yaml")}
    assert names == set(task_sets()), "a task config without a task set, or a task set without a config"
    tiny = get_task_set("suite")
    assert isinstance(tiny, Suite) and tiny.name == "tiny"
    settings = {"split": "test", "n_per_task": 2, "tasks": ["copy", "sort"]}
    examples = tiny.examples_of_config(settings)
    assert examples == suite_examples("test", 2, tasks=["copy", "sort"])
    assert tiny.score_many(examples, [e.answer for e in examples]) == [1.0] * 4
    assert get_task_set("parallel").examples("test", 1)[0].suite == "parallel"
    with pytest.raises(ValueError, match="unknown task config name 'gsm9k'; allowed: suite, parallel, gsm8k"):
        get_task_set("gsm9k")
