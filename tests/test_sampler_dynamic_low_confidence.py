"""SDAR / LLaDA2's dynamic low-confidence rule on hand-worked logits (expected commits by hand from
JetAstra/SDAR generate.py's rule: every confidence > tau if at least k pass, else the top k)."""

import functools

import jax
import numpy as np
import pytest

import samplers
from dllm.decoding import SpecialIds
from samplers.dynamic_low_confidence import DynamicLowConfidence
from tests import helpers
from tests.helpers import logits_of, marks, top

V, EOS, MASK = 6, 4, 5
M = MASK
make_state = functools.partial(helpers.make_state, special=SpecialIds(mask=MASK, eos=EOS, eot=EOS, pad=0))
HALF = [0.5, 0.5, 0.0, 0.0, 0.0, 0.0]  # softmax gives exactly 0.5 on tokens 0 and 1


def commits(sampler, rows, logits):
    state = make_state(rows, 0, 4, block_length=4)
    commit, _ = jax.jit(sampler.step)(logits_of(logits), state, sampler.init(state))
    return np.asarray(commit.commit)


def test_all_above_tau_when_at_least_k_else_top_k():
    """One block of 4, 2 steps (k = 2 at the first step), tau 0.9."""
    got = commits(DynamicLowConfidence(tau=0.9, steps=2), [[M, M, M, M]] * 3, [
        [top(.95), top(.92), top(.6), top(.5)],    # two pass: exactly those
        [top(.95), top(.6), top(.7), top(.5)],     # one passes, k = 2: the top 2
        [top(.95), top(.93), top(.91), top(.5)],   # three pass: all three, more than k
    ])
    np.testing.assert_array_equal(got, marks("11..", "1.1.", "111."))


def test_the_bar_is_strict_and_ties_go_to_the_lower_position():
    """tau 0.5, k = 2: 0.5 does not pass (Fast-dLLM v1's threshold would commit it)."""
    logits = [[HALF, HALF, top(.99), top(.4)]]
    got = commits(DynamicLowConfidence(tau=0.5, steps=2), [[M, M, M, M]], logits)
    np.testing.assert_array_equal(got, marks("1.1."))
    np.testing.assert_array_equal(commits(samplers.Threshold(tau=0.5), [[M, M, M, M]], logits), marks("111."))


def test_bad_tau_and_random_remasking_are_refused():
    with pytest.raises(ValueError, match=r"DynamicLowConfidence.tau"):
        DynamicLowConfidence(tau=0.0)
    with pytest.raises(ValueError, match=r"DynamicLowConfidence.remasking='random': allowed 'low_confidence'"):
        DynamicLowConfidence(remasking="random")
