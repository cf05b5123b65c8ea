"""Fast-dLLM v2's sub-blocks (SubBlocks) and its strict threshold, on hand-worked logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samplers
from dllm.decoding import DecodeConfig, SpecialIds
from tests import helpers
from tests.helpers import logits_of, marks, top

V, EOS, MASK = 6, 4, 5
M = MASK
make_state = functools.partial(helpers.make_state, special=SpecialIds(mask=MASK, eos=EOS, eot=EOS, pad=0))
HALF = [0.5, 0.5, 0.0, 0.0, 0.0, 0.0]


def commit_of(sampler, state, logits):
    commit, _ = jax.jit(sampler.step)(logits_of(logits), state, sampler.init(state))
    return np.asarray(commit.commit)


def test_only_the_first_sub_block_with_a_mask_commits():
    """Block 8, sub-blocks of 4, every confidence 0.99 (all pass tau 0.9)."""
    state = make_state([[M] * 8, [1, 2, 3, 1, M, M, M, M], [M] * 8, [1] * 6 + [M] * 2, [1] * 2 + [M] * 6],
                       [0, 0, 0, 6, 2], [8, 8, 6, 8, 8], block_length=8)
    state = state.replace(block_phase=jnp.asarray([0, 0, 6, 6, 2], jnp.int32))  # where each row's blocks end
    got = commit_of(samplers.SubBlocks(size=4), state, [[top(.99)] * 8] * 5)
    expected = marks(
        "1111....",   # sub-block [0, 4)
        "....1111",   # [0, 4) done: sub-block [4, 8)
        "11......",   # a first block ending at 6 (the prompt's tail fills 2): sub-blocks cut from -2
        "......11",   # the last, partial block [6, 8) starts its model block: its own sub-block
        "..1111..",   # blocks ending at 2 (mod 8): sub-blocks [2, 6), [6, 10)
    )
    # an inner window shortened inside the block (as AdaptiveBlock does) keeps the grid: [0, 4) first
    short = make_state([[M] * 8], 0, 6, block_length=8)
    np.testing.assert_array_equal(commit_of(samplers.SubBlocks(size=4), short, [[top(.99)] * 8]), marks("1111...."))
    np.testing.assert_array_equal(got, expected)


def test_strict_threshold_and_a_size_that_does_not_divide_the_block():
    state = make_state([[M, M, M, M]], 0, 4, block_length=4)
    logits = [[HALF, HALF, top(.3), top(.2)]]  # 0.5 exactly at positions 0 and 1
    np.testing.assert_array_equal(commit_of(samplers.Threshold(tau=0.5, strict=True), state, logits), marks("1..."))
    np.testing.assert_array_equal(commit_of(samplers.Threshold(tau=0.5), state, logits), marks("11.."))
    with pytest.raises(ValueError, match=r"SubBlocks.size=3 does not divide block_length=8"):
        samplers.SubBlocks(size=3).validate(DecodeConfig(gen_length=16, block_length=8))
