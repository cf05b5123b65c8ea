"""Batch invariance and x64 for every sampler (issue: reliability).

A row's tokens and NFE depend only on its prompt, its key and the settings,
never on the rows around it, the batch size or the padding (Fast-dLLM issue
#39 is this failing in the authors' code). Under threshold-like rules rows of
the trained tiny-tasks model finish their blocks at different steps, so a
batch-wide cache refresh or a noise draw shaped by the batch would move a
row: both are decided per row (`engine.row_keys`, `cache.FastDLLMCache.rows_to_refresh`).
"""

from __future__ import annotations

import jax
import pytest
from hydra.utils import instantiate

import dllm
from dllm import evaluation
from dllm.decoding import DecodeConfig
from experiments.common import REPO_ROOT
from tests.helpers import GRID_PROMPTS, grid_sampler_specs, refusal

pytestmark = pytest.mark.usefixtures("release_after_each_test")  # see tests/conftest.py
SAMPLER_SPECS = grid_sampler_specs()
PROMPTS = GRID_PROMPTS  # the batch of five is left-padded
WIDTH = 15  # the longest prompt: the batch's width
# XLA's backend optimisations off: the same tokens for every run of the grid, half the compile time
# (compiling dominates these tests on CPU; batch and solo runs compile alike).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def tiny():
    return dllm.from_pretrained(REPO_ROOT / "checkpoints/tiny-tasks")


def decoded(model, tokenizer, sampler, decode, batch_size, prompt_width=WIDTH):
    rows, _ = evaluation.decode_texts(model, tokenizer, sampler, PROMPTS, decode, batch_size=batch_size,
                                      key=jax.random.key(7), prompt_width=prompt_width, progress=False,
                                      compiler_options=FAST_COMPILE)
    return [(row["tokens"], row["nfe"]) for row in rows]


ALL_SETTINGS = [(cache, temperature) for cache in ("none", "prefix", "dual") for temperature in (0.0, 1.0)]


@pytest.mark.parametrize("name", list(SAMPLER_SPECS))
def test_every_row_decodes_as_it_does_alone(tiny, name):
    """Every sampler x cache policy x temperature: each row of the padded batch of five equals the
    row decoded alone (a batch of one at the same prompt width: one compile for the five solo runs;
    compiling dominates on CPU), token for token and NFE for NFE; a cache policy the sampler refuses
    (self_speculative's prefix/dual) is asserted refused."""
    model, tokenizer = tiny
    sampler = instantiate(SAMPLER_SPECS[name], _convert_="all")
    for cache, temperature in ALL_SETTINGS:
        decode = DecodeConfig(gen_length=24, block_length=8, cache=cache, temperature=temperature)
        if refusal(sampler.bind(tokenizer), cache=cache):
            with pytest.raises(ValueError, match=f"cache='{cache}'"):
                decoded(model, tokenizer, sampler, decode, 1)
            continue
        alone = decoded(model, tokenizer, sampler, decode, 1)
        assert decoded(model, tokenizer, sampler, decode, 5) == alone, (cache, temperature)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_padding_does_not_move_a_row(tiny, cache):
    """A row decoded alone without padding equals that row left-padded in the batch (RoPE positions
    count real tokens, padded keys are hidden), under each cache policy, with per-row noise."""
    model, tokenizer = tiny
    sampler = instantiate(SAMPLER_SPECS["threshold"], _convert_="all")
    decode = DecodeConfig(gen_length=24, block_length=8, cache=cache, temperature=1.0)
    unpadded = decoded(model, tokenizer, sampler, decode, 1, prompt_width=None)  # each at its own width
    assert decoded(model, tokenizer, sampler, decode, 5) == unpadded


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
