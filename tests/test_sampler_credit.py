"""CreditDecoding on hand-worked logits: credit accumulation, fusion, resets, adaptive variant.

The authors published no code; the expected numbers are computed here with
plain float arithmetic from the paper's formulas as quoted in
reference/samplers.md §5, in the product form
q = p (1 + C)^alpha / sum_u p_u (1 + C_u)^alpha (the sampler uses the logit
form l + alpha log(1 + C)), independent of the implementation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hydra.utils import instantiate
from omegaconf import OmegaConf

import dllm
from dllm.decoding import SpecialIds, pad_prompts
from samplers.credit import Credit, CreditHistory, credit_fused_logits
from samplers.threshold import Threshold
from tests import helpers
from tests.helpers import logits_of, marks, top

V, EOS, MASK = 6, 4, 5
M = MASK
SPECIAL = SpecialIds(mask=MASK, eos=EOS, eot=EOS, pad=0)
make_state = functools.partial(helpers.make_state, special=SPECIAL)
ALPHA, BETA, GAMMA, TAU = 0.65, 0.7, 0.2, 0.95


def dist(*probs):
    return list(probs) + [0.0] * (V - len(probs))


def fused_top(p, c, rest):
    """q of the token with probability p and credit c, when the other tokens
    contribute `rest` = sum_u p_u (1 + C_u)^alpha."""
    term = p * (1 + c) ** ALPHA
    return term / (term + rest)


def gain(p, gamma=GAMMA):
    return p ** gamma


# ------------------------------------------------------------ three hand steps

# Five positions, one block, two identical rows for steps 0 and 1.
#   pos 0: the slow token: top-1 is token 0 with p = 0.8, 0.9, 0.93 (never >= 0.95 raw)
#   pos 1: top-1 switches: token 0 (0.6), token 1 (0.6), token 0 (0.6)
#   pos 2, 3, 4: the decoys committed at steps 0, 1, 2 (p = 0.99)
STEPS = [
    [top(.8), dist(.6, .4), top(.99, 2), top(.5, 3), top(.5)],
    [top(.9), dist(.4, .6), top(.99, 2), top(.99, 3), top(.5)],
    [top(.93), dist(.6, .4), top(.99, 2), top(.99, 3), top(.99, 1)],
]
CANVAS = [[M, M, M, M, M], [M, M, 2, M, M], [M, M, 2, 3, M]]


def run_hand_steps(sampler, step_in_block_last):
    history = sampler.init(make_state([CANVAS[0]] * 2, 0, 5, block_length=5))
    out = []
    for s in range(3):
        step_in_block = step_in_block_last if s == 2 else s
        state = make_state([CANVAS[s]] * 2, 0, 5, block_length=5, step=s, step_in_block=step_in_block)
        commit, history = jax.jit(sampler.step)(logits_of([STEPS[s]] * 2), state, history)
        out.append((np.asarray(commit.commit), np.asarray(commit.confidence), np.asarray(history.dense(V))))
    return out


def test_credit_accumulates_and_crosses_tau_before_raw_probability():
    out = run_hand_steps(Credit(), step_in_block_last=2)
    # pos 0 credit (token 0 only): C = g(0.8); 0.7 C + g(0.9); 0.7 C + g(0.93)
    c0 = [gain(.8)]
    c0.append(BETA * c0[0] + gain(.9))
    c0.append(BETA * c0[1] + gain(.93))
    q0 = [fused_top(p, c, 1 - p) for p, c in zip([.8, .9, .93], c0)]
    assert q0[0] < TAU and q0[1] < TAU <= q0[2]                   # 0.861, 0.944, 0.965
    # pos 1: token 0 gains at steps 0 and 2, token 1 at step 1; both persist.
    c1_tok0 = [gain(.6), BETA * gain(.6), BETA * BETA * gain(.6) + gain(.6)]
    c1_tok1 = [0.0, gain(.6), BETA * gain(.6)]
    q1 = [fused_top(.6, c1_tok0[0], .4),
          fused_top(.6, c1_tok1[1], .4 * (1 + c1_tok0[1]) ** ALPHA),
          fused_top(.6, c1_tok0[2], .4 * (1 + c1_tok1[2]) ** ALPHA)]
    expected_commits = [marks("..1..")[0], marks("...1.")[0], marks("1...1")[0]]
    for s, (commit, confidence, credit) in enumerate(out):
        for row in range(2):
            np.testing.assert_array_equal(commit[row], expected_commits[s], err_msg=f"step {s}")
            np.testing.assert_allclose(credit[row, 0], [c0[s], 0, 0, 0, 0, 0], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(credit[row, 1], [c1_tok0[s], c1_tok1[s], 0, 0, 0, 0], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(confidence[row, :2], [q0[s], q1[s]], rtol=1e-5)
    # Plain threshold decoding at the same bar does not commit position 0 at step 2 (raw 0.93).
    state = make_state([CANVAS[2]], 0, 5, block_length=5, step=2, step_in_block=2)
    raw, _ = jax.jit(Threshold(tau=TAU).step)(logits_of([STEPS[2]]), state, ())
    np.testing.assert_array_equal(np.asarray(raw.commit), marks("....1"))


def test_credit_reset_per_block_and_per_sequence():
    """At step 2, row 1 starts a new block (step_in_block = 0), row 0 does not."""
    sequence_credit = BETA * (BETA * gain(.8) + gain(.9)) + gain(.93)
    for reset, row1_credit in [("block", gain(.93)), ("sequence", sequence_credit)]:
        sampler = Credit(reset=reset)
        history = sampler.init(make_state([CANVAS[0]] * 2, 0, 5, block_length=5))
        for s in range(3):
            state = make_state([CANVAS[s]] * 2, 0, 5, block_length=5, step=s,
                               step_in_block=[s, 0 if s == 2 else s])
            commit, history = sampler.step(logits_of([STEPS[s]] * 2), state, history)
        credit = np.asarray(history.dense(V))[:, 0, 0]
        np.testing.assert_allclose(credit, [sequence_credit, row1_credit], rtol=1e-5, err_msg=reset)
        expected_q = [fused_top(.93, sequence_credit, .07), fused_top(.93, row1_credit, .07)]
        np.testing.assert_allclose(np.asarray(commit.confidence)[:, 0], expected_q, rtol=1e-5)


def test_adaptive_variant_per_row():
    """gamma = 1, alpha = beta = 1 - mask_ratio per row."""
    sampler = Credit(adaptive=True)
    logits0 = logits_of([[top(.8), top(.5, 1), top(.5, 2), top(.5, 3), top(.5)]] * 2)
    state = make_state([[M] * 5] * 2, 0, 5, block_length=5)
    commit, history = sampler.step(logits0, state, sampler.init(state))
    # step 0: everything masked, alpha = beta = 0: credit = p, fused = raw probability
    np.testing.assert_allclose(np.asarray(history.dense(V))[:, 0, 0], [.8, .8], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(commit.confidence)[:, 0], [.8, .8], rtol=1e-5)
    # step 1: row 0 has 3 of 5 masked (alpha = beta = 0.4), row 1 has 1 of 5 (0.8)
    state = make_state([[M, M, 2, 3, M], [M, 1, 2, 3, 0]], 0, 5, block_length=5, step=1, step_in_block=1)
    logits1 = logits_of([[top(.9), top(.5, 1), top(.99, 2), top(.99, 3), top(.5)]] * 2)
    commit, history = sampler.step(logits1, state, history)
    credit = [0.4 * .8 + .9, 0.8 * .8 + .9]                          # 1.22, 1.54
    np.testing.assert_allclose(np.asarray(history.dense(V))[:, 0, 0], credit, rtol=1e-6)
    q = [.9 * (1 + credit[0]) ** 0.4 / (.9 * (1 + credit[0]) ** 0.4 + .1),    # 0.9253
         .9 * (1 + credit[1]) ** 0.8 / (.9 * (1 + credit[1]) ** 0.8 + .1)]    # 0.9585
    np.testing.assert_allclose(np.asarray(commit.confidence)[:, 0], q, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(commit.commit), marks("1....", "1...."))


def test_masked_positions_outside_the_window_gain_credit_but_never_commit():
    sampler = Credit()
    state = make_state([[M, M, M, M, M], [M, M, 1, M, M]], 0, 2, block_length=5, step=0)
    logits = logits_of([[top(.6), top(.7), top(.99), top(.99), top(.3)]] * 2)
    commit, history = sampler.step(logits, state, sampler.init(state))
    # window [0, 2): 0.99 at positions 2, 3 is outside it; best inside is position 1
    np.testing.assert_array_equal(np.asarray(commit.commit), marks(".1...", ".1..."))
    credit = np.asarray(history.dense(V))[:, :, 0]
    np.testing.assert_allclose(credit[0], [gain(p) for p in (.6, .7, .99, .99, .3)], rtol=1e-6)
    # a committed position gains no credit
    np.testing.assert_allclose(credit[1], [gain(.6), gain(.7), 0, gain(.99), gain(.3)], rtol=1e-6)


def test_positions_without_logits_keep_their_credit():
    """A cached step computes some positions only (`state.has_logits`): the others are neither decayed
    nor fed from the zeros in their place."""
    sampler = Credit(reset="sequence")
    state = make_state([[M, M, M, M, M]], 0, 5, block_length=5, step=0)
    logits = logits_of([[top(.6), top(.7), top(.8), top(.9), top(.5)]])
    _, history = sampler.step(logits, state, sampler.init(state))
    later = make_state([[M, M, M, M, M]], 0, 5, block_length=5, step=1, step_in_block=1)
    later = later.replace(has_logits=jnp.array([[True, True, False, False, True]]))
    _, history = sampler.step(logits_of([[top(.6), top(.7), top(.25), top(.25), top(.5)]]), later, history)
    credit = np.asarray(history.dense(V))[0, :, 0]
    np.testing.assert_allclose(credit[2:4], [gain(.8), gain(.9)], rtol=1e-6)  # as after step 0
    np.testing.assert_allclose(credit[[0, 1, 4]], [gain(p) * (1 + BETA) for p in (.6, .7, .5)], rtol=1e-6)


def test_fused_logits_dense_and_history_agree():
    logits = jnp.log(jnp.array([[[.5, .25, .25, 0, 0, 0]]], jnp.float32))
    history = CreditHistory(tokens=jnp.array([[[0, 1, 0]]], jnp.int32),
                            values=jnp.array([[[0.5, 2.0, 1.0]]], jnp.float32))
    dense = jnp.array([[[1.5, 2.0, 0, 0, 0, 0]]])                  # token 0: 0.5 + 1.0
    np.testing.assert_allclose(history.dense(V), dense)
    fused = credit_fused_logits(logits, history, 0.5)
    np.testing.assert_allclose(fused, credit_fused_logits(logits, dense, 0.5))
    q = jax.nn.softmax(fused, axis=-1)[0, 0]
    terms = np.array([.5 * 2.5 ** .5, .25 * 3.0 ** .5, .25])
    np.testing.assert_allclose(q[:3], terms / terms.sum(), rtol=1e-6)


# ------------------------------------------------------------ real decoding


VOCAB, DEC_MASK, DEC_EOS = 40, 39, 38
DEC_SPECIAL = SpecialIds(mask=DEC_MASK, eos=DEC_EOS, eot=DEC_EOS, pad=0)
PROMPTS = [[5, 6, 7, 8, 9], [12, 13]]


@pytest.fixture(scope="module")
def model():
    config = dllm.ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, mlp_hidden=64,
                              max_seq_len=64, mask_token_id=DEC_MASK, eos_token_id=DEC_EOS, pad_token_id=0)
    m = dllm.Transformer(config, rngs=nnx.Rngs(0))
    m.lm_head[...] = m.lm_head[...] * 40.0      # spread the logits (a fresh init is near uniform)
    return m


class UniformLogits(nnx.Module):
    """Every position predicts the uniform distribution."""

    def __init__(self):
        self.config = dllm.ModelConfig(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=1, mlp_hidden=8,
                                       max_seq_len=64)

    def __call__(self, tokens, attention_mask=None, *, logits_start=0, logits_length=None, logits_offsets=None):
        return jnp.zeros((tokens.shape[0], logits_length, VOCAB))


def test_generate_batch_rows_decode_as_alone(model):
    """Rows finish their blocks at different steps, so their credit resets differ."""
    sampler = Credit(tau=0.5)          # the random model's confidences sit near 0.2-0.4 (a few near 0.86)
    kw = dict(gen_length=16, block_length=8, special=DEC_SPECIAL)
    batch = dllm.generate(model, PROMPTS, sampler, **kw)
    assert not np.any(np.asarray(batch.tokens) == DEC_MASK)
    assert np.all(np.asarray(batch.nfe) <= 16) and np.any(np.asarray(batch.nfe) < 16)
    tokens, mask = pad_prompts(PROMPTS, pad_id=0)     # one width: one compile for both rows
    for i in range(len(PROMPTS)):
        alone = dllm.generate(model, tokens[i:i + 1], sampler, attention_mask=mask[i:i + 1], **kw)
        np.testing.assert_array_equal(np.asarray(batch.tokens[i]), np.asarray(alone.tokens[0]))
        assert int(batch.nfe[i]) == int(alone.nfe[0])


def test_generate_adaptive_sequence_with_temperature(model):
    sampler = Credit(tau=0.5, adaptive=True, reset="sequence")
    result = dllm.generate(model, PROMPTS, sampler, gen_length=16, block_length=8, special=DEC_SPECIAL,
                           temperature=1.0, key=jax.random.key(3))
    assert not np.any(np.asarray(result.tokens) == DEC_MASK)
    assert np.all(np.asarray(result.nfe) <= 16)


def test_uniform_logits_never_cross_tau():
    """Uniform p = 1/39: credit is bounded by g / (1 - beta) = 1.6, fused q stays near 0.05."""
    result = dllm.generate(UniformLogits(), [[1, 2, 3]], Credit(), gen_length=8, block_length=4,
                           special=DEC_SPECIAL)
    assert int(result.nfe[0]) == 8
    np.testing.assert_array_equal(np.asarray(result.trace.commit_step[0]), np.arange(8))


# -------------------------------------------------------------- configs, bad input


def test_yaml_instantiates():
    sampler = instantiate(OmegaConf.load("configs/sampler/credit.yaml"))
    assert type(sampler) is Credit and sampler.name == "credit"
    assert (sampler.alpha, sampler.beta, sampler.gamma, sampler.tau) == (ALPHA, BETA, GAMMA, TAU)
    assert (sampler.reset, sampler.adaptive) == ("block", False)


@pytest.mark.parametrize("field,value,allowed", [
    ("alpha", -0.1, r"\[0, inf\)"),
    ("beta", 1.1, r"\[0, 1\]"),
    ("beta", -0.1, r"\[0, 1\]"),
    ("gamma", 0, r"\(0, inf\)"),
    ("gamma", -1.0, r"\(0, inf\)"),
    ("tau", 0, r"\(0, 1\]"),
    ("tau", 1.01, r"\(0, 1\]"),
    ("reset", "never", r"\('block', 'sequence'\)"),
    ("adaptive", "yes", "True or False"),
])
def test_bad_input(field, value, allowed):
    with pytest.raises(ValueError, match=rf"Credit\.{field}={value!r}: allowed.*{allowed}"):
        Credit(**{field: value})
