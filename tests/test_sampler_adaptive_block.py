"""AdaBlock-dLLM's adaptive block size: hand-worked rule tests, then decoding end to end.

Golden values come from the rule in reference/samplers.md §7, worked by hand
in the comments: at a block start, look ahead int(lookahead * G) positions
(capped by what remains); among positions predicted as a delimiter take the
most confident; end the block at it (inclusive) if its confidence >= the
delimiter threshold, else use the default size (capped by what remains).
"""

import math

import hydra
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from omegaconf import OmegaConf

import dllm
from dllm.decoding import DecodeConfig, SpecialIds
from dllm.decoding.engine import initial_state, next_window
from samplers.adaptive_block import AdaptiveBlock
from samplers.early_commit import EarlyCommit
from samplers.low_confidence import LowConfidence
from samplers.threshold import Threshold
from tests.helpers import tiny_random_model

# ------------------------------------------------------------ hand-worked steps
# A tiny vocabulary: 0 pad, 1..3 words, 4 the delimiter "/", 5 "=>", 6 EOS, 7 [MASK].
V, SLASH, ARROW_ID, EOS_ID, MASK_ID, PAD_ID = 8, 4, 5, 6, 7, 0
SMALL = SpecialIds(mask=MASK_ID, eos=EOS_ID, eot=EOS_ID, pad=PAD_ID)
G = 16


def odds_logits(rows):
    """logits [B, G, V] from {position: (token, r)} per row: token gets logit
    ln r, the other six non-mask tokens 0, [MASK] -inf (as the engine hands
    them over), so softmax gives the token p = r / (r + 6). Positions not
    listed predict token 1 with r = 2: p = 2/8 = 0.25."""
    logits = np.zeros((len(rows), G, V), np.float32)
    for b, row in enumerate(rows):
        for j in range(G):
            token, r = row.get(j, (1, 2.0))
            logits[b, j, token] = math.log(r)
    logits[..., MASK_ID] = -np.inf
    return jnp.asarray(logits)


def make_state(n_rows, *, block_start, block_end, step_in_block, committed=None, block_length=4):
    """n_rows prompts "2 3", gen_length 16; `committed` {row: positions} hold token 3."""
    tokens = jnp.full((n_rows, 2), 2, jnp.int32).at[:, 1].set(3)
    config = DecodeConfig(gen_length=G, block_length=block_length)
    state = initial_state(tokens, jnp.ones_like(tokens), jax.random.key(0), config, SMALL)
    gen = np.array(state.gen_tokens)
    for row, js in (committed or {}).items():
        gen[row, list(js)] = 3
    return state.replace(tokens=state.tokens.at[:, 2:].set(jnp.asarray(gen)),
                         block_start=jnp.asarray(block_start, jnp.int32),
                         block_end=jnp.asarray(block_end, jnp.int32),
                         step_in_block=jnp.asarray(step_in_block, jnp.int32))


def at(*js):
    out = np.zeros(G, bool)
    out[list(js)] = True
    return out


# Delimiter "/" = 4; default block 4 (DecodeConfig.block_length); lookahead 0.5:
# a look-ahead window of int(0.5 * 16) = 8 positions. p values: r/(r + 6).
ROWS = [
    # A: "/" at 2 with p = 9/15 = 0.6 >= 0.3 -> block [0, 3). Position 3 (p = 60/66 = 0.91)
    #    lies outside the new window, so Threshold(0.9) commits only the best inside: 2.
    ({2: (SLASH, 9.0), 3: (1, 60.0)}, 0, 4, 0, (), 3, at(2)),
    # B: "/" at 2 with p = 1.5/7.5 = 0.2 < 0.3 -> default [0, 4); commits 3 (0.91 >= 0.9).
    ({2: (SLASH, 1.5), 3: (1, 60.0)}, 0, 4, 0, (), 4, at(3)),
    # C: "/" at 1 (0.4), 5 (0.6), 6 (0.5): the most confident is 5 -> [0, 6); commits 5.
    ({1: (SLASH, 4.0), 5: (SLASH, 9.0), 6: (SLASH, 6.0)}, 0, 4, 0, (), 6, at(5)),
    # D: no "/" predicted -> default [0, 4); commits 0 and 2 (both 0.91 >= 0.9).
    ({0: (1, 60.0), 2: (1, 60.0)}, 0, 4, 0, (), 4, at(0, 2)),
    # E: "/" at 8 (p = 54/60 = 0.9) is outside the look-ahead [0, 8); "/" at 7 has
    #    p = 2.8/8.8 = 0.318 >= 0.3 -> [0, 8); commits 7 (0.318 > 0.25 elsewhere).
    ({7: (SLASH, 2.8), 8: (SLASH, 54.0)}, 0, 4, 0, (), 8, at(7)),
    # F: block start 12 (0..11 decoded): look-ahead min(8, 16 - 12) = 4, "/" at 13 (0.4)
    #    and 14 (0.6) -> [12, 15); commits 14.
    ({13: (SLASH, 4.0), 14: (SLASH, 9.0)}, 12, 16, 0, range(12), 15, at(14)),
    # G: block start 14 (0..13 decoded), no "/": default min(4, 16 - 14) = 2 -> [14, 16),
    #    never beyond gen_length; commits 15 (0.4).
    ({15: (1, 4.0)}, 14, 16, 0, range(14), 16, at(15)),
    # H: inside a block (step_in_block 1, window [0, 3)): the window is kept although
    #    "/" at 1 has p = 0.6 (a block start would give [0, 2)); commits 1 (the best in [0, 3)).
    ({1: (SLASH, 9.0), 0: (1, 4.0)}, 0, 3, 1, (), 3, at(1)),
    # I: "/" predicted at 1 with p = 0.91, but position 1 is already decoded: not a
    #    candidate -> default [0, 4); commits 2 (0.6).
    ({1: (SLASH, 60.0), 2: (1, 9.0)}, 0, 4, 0, (1,), 4, at(2)),
]


def run_rows(sampler, rows):
    logits = odds_logits([r[0] for r in rows])
    state = make_state(len(rows), block_start=[r[1] for r in rows], block_end=[r[2] for r in rows],
                       step_in_block=[r[3] for r in rows], committed={i: r[4] for i, r in enumerate(rows)})
    commit, _ = jax.jit(sampler.step)(logits, state, sampler.init(state))  # compiles faster than eager ops
    return state, commit


def test_block_ends_and_commits_per_row():
    sampler = AdaptiveBlock(inner=Threshold(0.9), delimiter_ids=(SLASH,), lookahead=0.5)
    _, commit = run_rows(sampler, ROWS)
    assert np.asarray(commit.block_end).tolist() == [r[5] for r in ROWS]
    for i, row in enumerate(ROWS):
        np.testing.assert_array_equal(np.asarray(commit.commit[i]), row[6], err_msg=f"row {'ABCDEFGHI'[i]}")


def test_low_confidence_inner_commits_inside_the_new_window():
    """LLaDA's inner (16 steps over 4 blocks: 4 per block) sees the resized
    window: row A has 3 masked in [0, 3): k = 3 // 4 + (0 < 3 % 4) = 1, the
    most confident, 2. Row C has 6 masked in [0, 6): k = 1 + (0 < 2) = 2:
    positions 5 (0.6) and 1 (0.4)."""
    sampler = AdaptiveBlock(inner=LowConfidence(), delimiter_ids=(SLASH,), lookahead=0.5)
    _, commit = run_rows(sampler, [ROWS[0], ROWS[2]])
    assert np.asarray(commit.block_end).tolist() == [3, 6]
    np.testing.assert_array_equal(np.asarray(commit.commit), [at(2), at(1, 5)])


def test_threshold_boundaries_and_default_block_length():
    """A confidence exactly at the bar passes (>=). Position 2 has logit 0 on "/"
    and on one other token (5), -inf elsewhere: p("/") = 1/2 exactly, and "/"
    is the argmax (first of equals). With a third token (EOS, 6) at 0 too,
    p = 1/3 < 0.5 ("/" is still the argmax).
    default_block_length = 2 replaces the engine's 4 when no delimiter qualifies."""
    logits = np.array(odds_logits([{}, {}]))
    logits[:, 2, :] = -np.inf
    logits[:, 2, [SLASH, ARROW_ID]] = 0.0
    logits[1, 2, EOS_ID] = 0.0
    state = make_state(2, block_start=[0, 0], block_end=[4, 4], step_in_block=[0, 0])
    for default, expected in ((None, [3, 4]), (2, [3, 2])):
        sampler = AdaptiveBlock(inner=Threshold(0.9), delimiter_ids=(SLASH,), delimiter_threshold=0.5,
                                default_block_length=default)
        commit, _ = jax.jit(sampler.step)(jnp.asarray(logits), state, sampler.init(state))
        assert np.asarray(commit.tokens)[:, 2].tolist() == [SLASH, SLASH]
        assert np.asarray(commit.block_end).tolist() == expected


def test_lookahead_fraction_sets_the_window():
    """lookahead 0.25 (AdaBlock's): int(0.25 * 16) = 4 positions, so "/" at 7
    (row E) is outside -> default 4; "/" at 2 (row A) still ends the block at 3."""
    sampler = AdaptiveBlock(inner=Threshold(0.9), delimiter_ids=(SLASH,), lookahead=0.25)
    _, commit = run_rows(sampler, [ROWS[4], ROWS[0]])
    assert np.asarray(commit.block_end).tolist() == [4, 3]


def test_next_window_starts_where_an_adaptive_block_ended():
    """The engine moves a finished window [s, e) to [e, e + block_length): the
    next block starts at this rule's block end, whatever its length was."""
    state = make_state(2, block_start=[0, 0], block_end=[3, 6], step_in_block=[2, 4],
                       committed={0: range(3), 1: range(6)})
    start, end, step_in_block = next_window(state, state.gen_tokens, state.block_end)
    assert np.asarray(start).tolist() == [3, 6]
    assert np.asarray(end).tolist() == [7, 10]
    assert np.asarray(step_in_block).tolist() == [0, 0]


# ------------------------------------------------------------ config and bind


def test_yaml_instantiates_and_binds_to_the_task_tokenizer():
    from dllm.tasks.synthetic.vocab import build_task_tokenizer, task_words

    sampler = hydra.utils.instantiate(OmegaConf.load("configs/sampler/adaptive_block.yaml"))
    assert isinstance(sampler, AdaptiveBlock) and sampler.inner == Threshold(0.9)
    hash(sampler)  # a jit static argument
    tokenizer = build_task_tokenizer()
    # The task vocabulary: 4 special tokens, then the sorted task words.
    assert sampler.bind(tokenizer).delimiter_ids == (4 + task_words().index("/"),)
    with pytest.raises(ValueError, match=r"AdaptiveBlock.delimiters='\\n' is not a token of tokenizer"):
        AdaptiveBlock().bind(tokenizer)
    with pytest.raises(ValueError, match=r"delimiter_ids=99 lies outside the vocabulary of size 57"):
        AdaptiveBlock(delimiter_ids=(5, 99)).bind(tokenizer)
    # A wrapper binds its inner: early commit around adaptive blocks.
    nested = EarlyCommit(inner=AdaptiveBlock(delimiters=("/", "+"))).bind(tokenizer)
    assert nested.answer_delimiter_id == 4 + task_words().index("=>")
    assert nested.inner.delimiter_ids == (4 + task_words().index("/"), 4 + task_words().index("+"))


def test_unbound_sampler_is_refused_at_config_time():
    with pytest.raises(ValueError, match=r"not bound to a tokenizer: call sampler.bind\(tokenizer\)"):
        AdaptiveBlock().validate(DecodeConfig(gen_length=16, block_length=8))


@pytest.mark.parametrize("settings,message", [
    (dict(delimiter_threshold=1.5), r"delimiter_threshold=1.5: allowed range \[0, 1\]"),
    (dict(delimiter_threshold=-0.1), r"delimiter_threshold=-0.1: allowed range \[0, 1\]"),
    (dict(lookahead=0.0), r"lookahead=0.0: allowed range \(0, 1\]"),
    (dict(lookahead=1.5), r"lookahead=1.5: allowed range \(0, 1\]"),
    (dict(delimiters=(), delimiter_ids=()), "no delimiter"),
    (dict(delimiters=("",)), "must be non-empty token texts"),
    (dict(delimiter_ids=(-3,)), "must be ints >= 0"),
    (dict(default_block_length=0), "default_block_length=0: must be a positive int or None"),
    (dict(inner=None), "must be a samplers.base.Sampler"),
])
def test_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveBlock(**settings)


def test_delimiter_id_outside_the_model_vocabulary():
    sampler = AdaptiveBlock(inner=Threshold(0.9), delimiter_ids=(SLASH, 8))
    with pytest.raises(ValueError, match=r"delimiter_ids=8 lies outside the vocabulary of size 8"):
        run_rows(sampler, [ROWS[0]])


# ------------------------------------------------------------ end to end
VOCAB, MASK, EOS, PAD = 40, 39, 38, 0
SPECIAL = SpecialIds(mask=MASK, eos=EOS, eot=EOS, pad=PAD)


@pytest.fixture(scope="module")
def model():
    return tiny_random_model(VOCAB, MASK, EOS, PAD)


def reference_adablock(model, prompt, *, gen_length, default_block_length, delimiter_ids, delimiter_threshold,
                       tau=0.9, lookahead=0.25):
    """AdaBlock's generate_adablock (no cache) for one row, written out plainly
    (reference/samplers.md §7), temperature 0. Returns (tokens, nfe, blocks)."""
    forward = jax.jit(lambda t: model(t))
    p = len(prompt)
    x = np.array(list(prompt) + [MASK] * gen_length, np.int64)

    def predict():
        logits = np.asarray(forward(jnp.asarray(x[None], jnp.int32)), np.float64)[0, p:]
        logits[:, MASK] = -np.inf  # the engine never proposes [MASK] (documented)
        x0 = np.argmax(logits, axis=-1)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return x0, probs[np.arange(gen_length), x0]

    def commit(x0, confidence, start, end):  # Fast-dLLM: conf >= tau, and always the best
        allowed = (x[p:] == MASK) & (np.arange(gen_length) >= start) & (np.arange(gen_length) < end)
        confidence = np.where(allowed, confidence, -np.inf)
        chosen = allowed & (confidence >= tau)
        chosen[np.argmax(confidence)] = True
        x[p:][chosen] = x0[chosen]

    generated, nfe, blocks = 0, 0, []
    while generated < gen_length:
        x0, confidence = predict()
        nfe += 1
        start, remaining = generated, gen_length - generated
        size = min(int(lookahead * gen_length), remaining)
        candidates = [j for j in range(start, start + size) if x0[j] in delimiter_ids]
        length = min(default_block_length, remaining)
        if candidates:
            best = max(candidates, key=lambda j: confidence[j])  # first of equals, as torch.max
            if confidence[best] >= delimiter_threshold:
                length = best - start + 1
        end = start + length
        blocks.append((start, end))
        commit(x0, confidence, start, end)
        while (x[p + start:p + end] == MASK).any():
            x0, confidence = predict()
            nfe += 1
            commit(x0, confidence, start, end)
        generated += length
    return x[p:], nfe, blocks


def test_engine_matches_a_plain_adablock_loop_and_keeps_its_windows(model):
    """Delimiter: the token the random model predicts most at the first step
    (10), so some blocks end at a delimiter and others take the default size.
    Rows padded to one width must each match their own single-row reference;
    the trace must decode the reference's blocks one after the other."""
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    settings = dict(delimiter_ids=(10,), delimiter_threshold=0.35)
    sampler = AdaptiveBlock(inner=Threshold(0.9), **settings)
    result = dllm.generate(model, prompts, sampler, gen_length=16, block_length=8, special=SPECIAL)
    adapted = []
    for i, prompt in enumerate(prompts):
        tokens, nfe, blocks = reference_adablock(model, prompt, gen_length=16, default_block_length=8,
                                                 **settings)
        np.testing.assert_array_equal(np.asarray(result.tokens[i]), tokens)
        assert int(result.nfe[i]) == nfe
        trace = np.asarray(result.trace.commit_step[i])
        for (s0, e0), (s1, e1) in zip(blocks, blocks[1:]):
            assert trace[s0:e0].max() < trace[s1:e1].min(), f"row {i}: block {(s1, e1)} began before {(s0, e0)} ended"
        adapted += [(start, end) for start, end in blocks if end - start != min(8, 16 - start)]
    assert adapted, "no block ended at a delimiter: the test would not exercise the rule"


@pytest.mark.parametrize("uniform,sampler", [
    (True, EarlyCommit(inner=AdaptiveBlock(delimiter_ids=(EOS,)), answer_delimiter_id=3)),
    (False, AdaptiveBlock(inner=EarlyCommit(inner=Threshold(0.9), answer_delimiter_id=3), delimiter_ids=(EOS,))),
])
def test_compositions_terminate_on_adversarial_logits(uniform, sampler):
    """Uniform logits (every delimiter guess ties, gap 0) and all-EOS logits
    (EOS, the delimiter here, predicted everywhere with gap 10 >= 7.5): every
    row finishes within gen_length forwards, early commit around adaptive
    blocks and adaptive blocks around early commit alike."""
    result = dllm.generate(ConstantLogits(uniform=uniform), [[1, 2, 3], [4]], sampler, gen_length=16,
                           block_length=8, special=SPECIAL)
    assert not np.any(np.asarray(result.tokens) == MASK)
    assert np.all(np.asarray(result.nfe) <= 16)


class ConstantLogits(nnx.Module):
    """A stand-in model: all-uniform logits, or EOS favoured at every position."""

    def __init__(self, uniform=False):
        self.config = dllm.ModelConfig(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=1, mlp_hidden=8,
                                       max_seq_len=64)
        self.uniform = uniform

    def __call__(self, tokens, attention_mask=None, *, logits_start=0, logits_length=None, logits_offsets=None):
        length = tokens.shape[1] - logits_start if logits_length is None else logits_length
        logits = jnp.zeros((tokens.shape[0], length, VOCAB))
        return logits if self.uniform else logits.at[..., EOS].set(10.0)
