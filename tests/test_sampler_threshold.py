"""Fast-dLLM threshold / factor rules and dParallel's entropy bound, on hand-worked logits.

Every expected commit mask below is written out by hand from the paper's rule
(reference/samplers.md §2, §8). Logits are log-probabilities, so softmax gives
back the hand-written distributions (exactly where a test sits on a bar).
"""

import math

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from hydra.utils import instantiate
from omegaconf import OmegaConf

import dllm
import samplers
from dllm.decoding import SpecialIds
from samplers.threshold import Factor, Threshold
from tests import helpers
from tests.helpers import logits_of, marks, top

# Step-level vocabulary: ordinary tokens 0..3, then EOS and MASK.
V, EOS, MASK = 6, 4, 5
M = MASK
SPECIAL = SpecialIds(mask=MASK, eos=EOS, eot=EOS, pad=0)
make_state = functools.partial(helpers.make_state, special=SPECIAL)


def dist(*probs):
    """An explicit distribution over the ordinary tokens (EOS and MASK get 0)."""
    return list(probs) + [0.0] * (V - len(probs))


def commit_of(sampler, logits, state):
    commit, _ = jax.jit(sampler.step)(logits, state, sampler.init(state))
    return np.asarray(commit.commit), np.asarray(commit.tokens)


# ------------------------------------------------------------------- threshold


def test_threshold_batch_rows_in_different_states():
    """tau = 0.9, windows of 3 over 6 positions; each row is in a different state."""
    state = make_state(
        [[M, M, M, M, M, M],    # row 0: window [0, 3), all masked
         [1, 0, 1, M, M, M],    # row 1: first block done, window [3, 6)
         [M, 2, M, M, M, M],    # row 2: window [0, 3), position 1 already committed
         [1, 1, 1, M, M, M]],   # row 3: window [0, 3) done, masks only outside it
        block_start=[0, 3, 0, 0], block_end=[3, 6, 3, 3], block_length=3)
    logits = logits_of([
        [top(.95), top(.6), top(.92, 2), top(.99), top(.99), top(.99)],
        [top(.99), top(.99), top(.99), top(.5), top(.7, 3), top(.6)],
        [top(.97, 1), top(.99), top(.98), top(.99), top(.99), top(.99)],
        [top(.99), top(.99), top(.99), top(.99), top(.99), top(.99)],
    ])
    commit, tokens = commit_of(Threshold(tau=0.9), logits, state)
    expected = marks(
        "1.1...",   # 0.95 and 0.92 pass, 0.6 fails; 0.99 outside the window never
        "....1.",   # nothing passes 0.9: only the most confident (0.7 at position 4)
        "1.1...",   # everything eligible passes; committed position 1 is not re-committed
        "......",   # nothing masked in the window: nothing to commit
    )
    np.testing.assert_array_equal(commit, expected)
    assert tokens[0, 2] == 2 and tokens[1, 4] == 3 and tokens[2, 0] == 1


def test_threshold_ties_equality_and_tau_one():
    state = make_state([[M, M, M], [1, M, M], [M, M, M], [M, M, M]], 0, 3, block_length=3)
    half = dist(.5, .5)              # logits [0, 0]: p = 0.5 exactly
    one_hot = dist(1.0)              # p = 1 exactly
    logits = logits_of([
        [top(.6), top(.6), top(.6)],     # three-way tie, nothing passes 0.9
        [top(.6), top(.6), top(.6)],     # tie among positions 1 and 2
        [half, top(.3), half],           # tau = 0.5: equality commits
        [one_hot, top(.99), one_hot],    # tau = 1: only exact certainty passes
    ])
    for tau, rows in [(0.9, [0, 1]), (0.5, [2]), (1.0, [3])]:
        commit, _ = commit_of(Threshold(tau=tau), logits, state)
        expected = marks("1..", ".1.", "1.1", "1.1")
        np.testing.assert_array_equal(commit[rows], expected[rows], err_msg=f"tau={tau}")


def test_threshold_margin_neg_entropy_entropy_bound():
    state = make_state([[M, M, M]] * 4, 0, 3, block_length=3)
    logits = logits_of([
        # max prob 0.7 / 0.8 / 0.65; margin 0.4 / 0.7 / 0.3
        [dist(.7, .3), dist(.8, .1, .1), dist(.65, .35)],
        # entropy (nats): 0.9 ln(1/0.9) + 0.1 ln 10 = 0.0948 + 0.2303 = 0.3251;
        # 0.8 ln 1.25 + 0.2 ln 10 = 0.1785 + 0.4605 = 0.6390;
        # 0.95 ln(1/0.95) + 0.05 ln 20 = 0.0487 + 0.1498 = 0.1985
        [dist(.9, .1), dist(.8, .1, .1), dist(.95, .05)],
        # entropy: ln 2 = 0.6931; 0.6 ln(1/0.6) + 0.4 ln 2.5 = 0.3065 + 0.3665 = 0.6730;
        # 0.4 ln 2.5 + 0.6 ln(1/0.3) = 0.3665 + 0.7224 = 1.0889
        [dist(.5, .5), dist(.6, .4), dist(.4, .3, .3)],
        # entropy 0, 0.1985, 0.3251
        [dist(1.0), dist(.95, .05), dist(.9, .1)],
    ])
    by_max_prob, _ = commit_of(Threshold(tau=0.6), logits, state)
    np.testing.assert_array_equal(by_max_prob[0], [True, True, True])
    by_margin, _ = commit_of(Threshold(tau=0.6, confidence="margin"), logits, state)
    np.testing.assert_array_equal(by_margin[0], [False, True, False])      # only margin 0.7 >= 0.6
    # neg_entropy with tau = 0.7 commits H <= -ln 0.7 = 0.3567 nats (and the lowest entropy).
    by_entropy, _ = commit_of(Threshold(tau=0.7, confidence="neg_entropy"), logits, state)
    np.testing.assert_array_equal(by_entropy[1], [True, False, True])
    # dParallel bound 0.5 nats; tau is not used (1.0 would otherwise forbid everything).
    bound, _ = commit_of(Threshold(tau=1.0, confidence="entropy_bound", entropy_bound=0.5), logits, state)
    np.testing.assert_array_equal(bound[1:], marks(
        "1.1",    # 0.3251 and 0.1985 <= 0.5; 0.6390 fails
        ".1.",    # nothing passes: only the lowest entropy, 0.6730 at position 1
        "111",    # everything passes
    ))
    loose, _ = commit_of(Threshold(confidence="entropy_bound", entropy_bound=0.7), logits, state)
    np.testing.assert_array_equal(loose[2], [True, True, False])             # 0.6931, 0.6730 <= 0.7 < 1.0889


def test_threshold_eos_policies():
    """Position 0 predicts EOS with 0.99; tau = 0.9."""
    eos_first = [0.01, 0, 0, 0, 0.99, 0]
    logits = logits_of([[eos_first, top(.95, 1), top(.5)]])

    def run(policy):
        state = make_state([[M, M, M]], 0, 3, block_length=3, eos_policy=policy)
        return commit_of(Threshold(tau=0.9), logits, state)

    commit, tokens = run("none")
    np.testing.assert_array_equal(commit[0], [True, True, False])
    assert tokens[0, 0] == EOS
    commit, _ = run("confidence_eos_eot_inf")          # EOS proposals get confidence -inf
    np.testing.assert_array_equal(commit[0], [False, True, False])
    commit, tokens = run("logits_eos_inf")              # EOS banned: token 0 now has p = 1
    np.testing.assert_array_equal(commit[0], [True, True, False])
    assert tokens[0, 0] == 0


# ---------------------------------------------------------------------- factor


def test_factor_rule_hand_examples():
    """f = 1: bars 1 - 1/(n+1) = (forced), 2/3, 3/4, 4/5, 5/6, 6/7 for n = 1..6."""
    state = make_state(
        [[M, M, M, M, M, M],
         [M, M, M, 1, 1, 1],
         [M, M, M, M, M, M],
         [M, M, M, M, M, M],
         [M, M, M, M, M, M],
         [1, 1, 1, 1, 1, 1]],
        0, 6, block_length=6)
    low = top(.3)
    logits = logits_of([
        # sorted: 0.95 (pos 1), 0.9 (5), 0.85 (4), 0.78 (2), 0.7 (0), 0.5 (3)
        # n=2: 0.9 >= 2/3; n=3: 0.85 >= 3/4; n=4: 0.78 < 4/5 -> stop, commit 3
        [top(.7), top(.95), top(.78), top(.5), top(.85), top(.9)],
        # 3 masked: 0.9, 0.8 >= 2/3, 0.7 < 3/4 fails at the LAST candidate: commit 2
        # (the reference code's quirk would commit all 3)
        [top(.8), top(.7), top(.9), top(.99), top(.99), top(.99)],
        # nothing passes: 0.6 forced, 0.5 < 2/3
        [top(.6), top(.5), low, low, low, low],
        # everything passes: 0.99 .. 0.94 against bars up to 6/7 = 0.857
        [top(.99), top(.98), top(.97), top(.96), top(.95), top(.94)],
        # ties: 0.7, 0.7 >= 2/3, 0.7 < 3/4: commit the first two positions
        [top(.7), top(.7), top(.7), top(.7), low, low],
        # no masked position (Fast-dLLM PR #33 crashed here)
        [top(.9)] * 6,
    ])
    commit, _ = commit_of(Factor(factor=1.0), logits, state)
    np.testing.assert_array_equal(commit, marks(
        ".1..11", "1.1...", "1.....", "111111", "11....", "......"))
    # f = 2: bars (forced), 1/3, 1/2, 3/5, 2/3, 5/7. Row 0: 0.9 >= 1/3, 0.85 >= 1/2, 0.78 >= 3/5,
    # 0.7 >= 2/3, 0.5 < 5/7 -> commit 5. Row 2: 0.5 >= 1/3, 0.3 < 1/2 -> commit 2.
    commit, _ = commit_of(Factor(factor=2.0), logits, state)
    np.testing.assert_array_equal(commit[[0, 2]], marks("111.11", "11...."))


def test_factor_only_looks_inside_the_window():
    state = make_state([[M, M, M, M, M, M], [1, 1, 1, M, M, M]], [0, 3], [3, 6], block_length=3)
    logits = logits_of([[top(.8), top(.7), top(.99), top(.99), top(.99), top(.99)]] * 2)
    commit, _ = commit_of(Factor(), logits, state)
    # row 0: 0.99 forced, 0.8 >= 2/3, 0.7 < 3/4; row 1: all three 0.99 pass
    np.testing.assert_array_equal(commit, marks("1.1...", "...111"))


# ------------------------------------------------------------ real decoding


VOCAB, DEC_MASK, DEC_EOS = 40, 39, 38
DEC_SPECIAL = SpecialIds(mask=DEC_MASK, eos=DEC_EOS, eot=DEC_EOS, pad=0)


@pytest.fixture(scope="module")
def model():
    config = dllm.ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, mlp_hidden=64,
                              max_seq_len=64, mask_token_id=DEC_MASK, eos_token_id=DEC_EOS, pad_token_id=0)
    m = dllm.Transformer(config, rngs=nnx.Rngs(0))
    m.lm_head[...] = m.lm_head[...] * 40.0      # spread the logits (a fresh init is near uniform)
    return m


PROMPTS = [[5, 6, 7, 8, 9], [12, 13]]


# The random model's confidences sit near 0.2-0.4, with a few near 0.86: low bars make it parallel.
@pytest.mark.parametrize("sampler", [Threshold(tau=0.3), Factor(factor=3.0)], ids=["threshold", "factor"])
def test_generate_terminates_in_fewer_forwards(model, sampler):
    result = dllm.generate(model, PROMPTS, sampler, gen_length=16, block_length=8, special=DEC_SPECIAL)
    assert not np.any(np.asarray(result.tokens) == DEC_MASK)
    nfe = np.asarray(result.nfe)
    assert np.all(nfe >= 2) and np.all(nfe <= 16) and np.any(nfe < 16)    # >= 1 forward per block
    committed = np.asarray(result.trace.committed_per_step)
    assert np.all(committed.sum(-1) == 16) and committed.max() > 1


def test_threshold_one_matches_one_token_per_step_baseline(model):
    """tau = 1: nothing passes unless p == 1 exactly, so Threshold = LowConfidence(steps=gen_length)."""
    kw = dict(gen_length=16, block_length=8, special=DEC_SPECIAL)
    ours = dllm.generate(model, PROMPTS, Threshold(tau=1.0), **kw)
    baseline = dllm.generate(model, PROMPTS, samplers.LowConfidence(), **kw)
    np.testing.assert_array_equal(np.asarray(ours.tokens), np.asarray(baseline.tokens))
    np.testing.assert_array_equal(np.asarray(ours.nfe), [16, 16])


# -------------------------------------------------------------- configs, bad input


@pytest.mark.parametrize("name,cls,fields", [
    ("threshold", Threshold, dict(tau=0.9, confidence="max_prob", entropy_bound=0.5)),
    ("factor", Factor, dict(factor=1.0)),
])
def test_yaml_instantiates(name, cls, fields):
    sampler = instantiate(OmegaConf.load(f"configs/sampler/{name}.yaml"))
    assert type(sampler) is cls and sampler.name == name
    assert {k: getattr(sampler, k) for k in fields} == fields


def test_bad_input():
    for tau in [0, 0.0, -0.1, 1.5, math.nan, "0.9", True]:
        with pytest.raises(ValueError, match=r"Threshold.tau=.*allowed range \(0, 1\]"):
            Threshold(tau=tau)
    with pytest.raises(ValueError, match=r"Threshold.confidence='entropy'.*allowed"):
        Threshold(confidence="entropy")
    with pytest.raises(ValueError, match=r"Threshold.entropy_bound=-0.1: allowed range \[0, inf\)"):
        Threshold(confidence="entropy_bound", entropy_bound=-0.1)
    for factor in [0, -1.0, math.inf, None]:
        with pytest.raises(ValueError, match=r"Factor.factor=.*allowed range \(0, inf\)"):
            Factor(factor=factor)
