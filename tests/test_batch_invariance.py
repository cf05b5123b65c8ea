"""Batch invariance and x64 for every sampler (issue: reliability).

A row's tokens and NFE depend only on its prompt, its key and the settings,
never on the rows around it, the batch size or the padding (Fast-dLLM issue
#39 is this failing in the authors' code). Under threshold-like rules rows of
the trained tiny-tasks model finish their blocks at different steps, so a
batch-wide cache refresh or a noise draw shaped by the batch would move a
row: both are decided per row in the engine (`row_keys`, `rows_to_refresh`).
"""

from __future__ import annotations

import os

import jax
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import dllm
from dllm import evaluation
from dllm.decoding import DecodeConfig
from experiments.common import REPO_ROOT

SAMPLER_SPECS = {
    path.stem: OmegaConf.to_container(OmegaConf.load(path))
    for path in sorted((REPO_ROOT / "configs" / "sampler").glob("*.yaml"))
}
SAMPLER_SPECS["low_confidence_random"] = {"_target_": "samplers.low_confidence.LowConfidence", "remasking": "random"}
SAMPLER_SPECS["end_of_text"] = {"_target_": "samplers.end_of_text.EndOfText",
                                "inner": {"_target_": "samplers.threshold.Threshold", "tau": 0.9}}
# Five prompts of different lengths: the batch of five is left-padded.
PROMPTS = [
    "reverse : Ann Bob Cid Dan Eve Fay Gus Hal =>",
    "sort : Hal Eve Ann Gus Bob Fay Dan Cid Ivy Jon =>",
    "shuffle : Ann Bob Cid Dan Eve Fay Gus Hal Ivy =>",
    "copy : Kim Lou Max Ned Oli Pam Quin Ray =>",
    "insert Zoe at 3 : Sam Tom Uma Val Wes Ann Bob Cid Dan =>",
]


@pytest.fixture(scope="module")
def tiny():
    return dllm.from_pretrained(REPO_ROOT / "checkpoints/tiny-tasks")


def decoded(model, tokenizer, sampler, decode, batch_size):
    rows, _ = evaluation.decode_texts(model, tokenizer, sampler, PROMPTS, decode, batch_size=batch_size,
                                      key=jax.random.key(7))
    return [(row["tokens"], row["nfe"]) for row in rows]


ALL_SETTINGS = [(cache, temperature) for cache in ("none", "prefix", "dual") for temperature in (0.0, 1.0)]
# Compiling the decode loop dominates (~3 s per setting and batch shape on CPU), so by default threshold
# runs every (cache, temperature) pair, low_confidence every cache and both temperatures, and the others
# (random remasking among them) the pair that exercises the most: dual cache (mixed refresh steps) at
# temperature 1 (per-row noise). DLLM_INVARIANCE_FULL=1 runs the whole grid for every sampler (it passed
# when this test was written: every sampler x cache x temperature).
FULL_GRID = os.environ.get("DLLM_INVARIANCE_FULL") == "1"
DEFAULT_SETTINGS = {"threshold": ALL_SETTINGS, "low_confidence": [("none", 1.0), ("prefix", 0.0), ("dual", 1.0)]}


def settings_of(name):
    return ALL_SETTINGS if FULL_GRID else DEFAULT_SETTINGS.get(name, [("dual", 1.0)])


@pytest.mark.parametrize("name", list(SAMPLER_SPECS))
def test_every_row_decodes_as_it_does_alone(tiny, name):
    model, tokenizer = tiny
    sampler = instantiate(SAMPLER_SPECS[name], _convert_="all")
    for cache, temperature in settings_of(name):
        decode = DecodeConfig(gen_length=24, block_length=8, cache=cache, temperature=temperature)
        alone = decoded(model, tokenizer, sampler, decode, 1)
        assert decoded(model, tokenizer, sampler, decode, 5) == alone, (cache, temperature)


@pytest.mark.parametrize("name", list(SAMPLER_SPECS))
def test_every_sampler_decodes_under_x64_with_float64_noise(tiny, name):
    """`noise_dtype="float64"` needs jax_enable_x64; every sampler's carry must keep its dtypes there."""
    model, tokenizer = tiny
    sampler = instantiate(SAMPLER_SPECS[name], _convert_="all")
    with jax.enable_x64(True):
        decode = DecodeConfig(gen_length=24, block_length=8, temperature=1.0, noise_dtype="float64")
        rows, _ = evaluation.decode_texts(model, tokenizer, sampler, PROMPTS[:2], decode, batch_size=2,
                                          key=jax.random.key(0))
    assert all(row["finished"] for row in rows)
