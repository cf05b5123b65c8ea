"""Prophet's early commit: hand-worked rule tests, then decoding end to end.

Golden values come from the rule in reference/samplers.md §6, worked by hand
in the comments: gap = top-1 minus top-2 logit, mean over the answer span,
bar 7.5 / 5.0 / 2.5 while progress = (step + 1) / gen_length is < 0.33 /
< 0.67 / after.
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
from dllm.decoding.engine import apply_commit, initial_state
from samplers.early_commit import EarlyCommit
from samplers.low_confidence import LowConfidence
from tests.helpers import tiny_random_model

# ------------------------------------------------------------ hand-worked steps
# A tiny vocabulary: 0 pad, 1..4 words, 5 the answer delimiter "=>", 6 EOS, 7 [MASK].
V, DELIM, EOS_ID, MASK_ID, PAD_ID = 8, 5, 6, 7, 0
SMALL = SpecialIds(mask=MASK_ID, eos=EOS_ID, eot=EOS_ID, pad=PAD_ID)


def make_state(prompts, *, gen_length=12, block_length=4, attention_mask=None, **fields):
    tokens = jnp.asarray(prompts, jnp.int32)
    mask = jnp.ones_like(tokens) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    config = DecodeConfig(gen_length=gen_length, block_length=block_length)
    state = initial_state(tokens, mask, jax.random.key(0), config, SMALL)
    if "step" in fields:  # rows that started with the batch: their own step is the loop's
        fields.setdefault("nfe", [fields["step"]] * tokens.shape[0])
    return state.replace(**{k: jnp.asarray(v, jnp.int32) for k, v in fields.items()})


def with_committed(state, row_positions_tokens):
    """Commits {row: {position: token}} in the generation."""
    gen = np.array(state.gen_tokens)
    for row, positions in row_positions_tokens.items():
        for j, token in positions.items():
            gen[row, j] = token
    return state.replace(tokens=state.tokens.at[:, state.prompt_width:].set(jnp.asarray(gen)))


def gap_logits(gaps, tops):
    """logits [B, G, V]: 0 everywhere, `gaps[b][j]` on token `tops[b][j]`, -inf on [MASK]
    (as the engine hands them over). The top-1 minus top-2 logit is then exactly gaps[b][j]."""
    gaps, tops = np.asarray(gaps, np.float32), np.asarray(tops)
    logits = np.zeros(gaps.shape + (V,), np.float32)
    np.put_along_axis(logits, tops[..., None], gaps[..., None], axis=-1)
    logits[..., MASK_ID] = -np.inf
    return jnp.asarray(logits)


def run_step(sampler, logits, state, carry=None):
    """One jitted step (a jit compiles faster than the same ops run eagerly)."""
    carry = sampler.init(state) if carry is None else carry
    commit, _ = jax.jit(sampler.step)(logits, state, carry)
    stop = np.zeros(state.block_start.shape, bool) if commit.stop is None else np.asarray(commit.stop)
    return np.asarray(commit.tokens), np.asarray(commit.commit), stop


def positions(*js, g=12):
    out = np.zeros(g, bool)
    out[list(js)] = True
    return out


SAMPLER = EarlyCommit(inner=LowConfidence(), answer_delimiter_id=DELIM)


@pytest.mark.parametrize("step,bar", [(0, 7.5), (5, 5.0), (9, 2.5)])
@pytest.mark.parametrize("offset,all_in", [(-0.25, False), (0.0, True), (0.25, True)])
def test_bar_of_each_progress_phase(step, bar, offset, all_in):
    """G = 12: progress = (step + 1) / 12 is 1/12 = 0.083 (< 0.33: bar 7.5),
    6/12 = 0.5 (< 0.67: bar 5.0), 10/12 = 0.833 (bar 2.5).

    The prompt ends with "=>", so the span is generation positions 0..4. Their
    gaps are g, g, g + 1, g - 1, g: mean exactly g = bar + offset. The other
    positions predict token 3. All-in iff g >= bar.
    Otherwise LLaDA's inner commits one token (12 steps over 3 blocks of 4:
    4 steps per block, 4 masked -> 1 per step): the most confident masked
    position of window [0, 4), position 2 (the largest gap, g + 1).
    """
    g = bar + offset
    gaps = [[g, g, g + 1, g - 1, g] + [1.0] * 7]
    tops = [[1] * 5 + [3] * 7]
    state = make_state([[2, 3, DELIM]], step=step)
    tokens, commit, stop = run_step(SAMPLER, gap_logits(gaps, tops), state)
    if all_in:
        assert stop.tolist() == [True]
        assert commit[0].all()  # every masked position of all three blocks
        assert tokens[0].tolist() == [1] * 5 + [3] * 7
    else:
        assert stop.tolist() == [False]
        np.testing.assert_array_equal(commit[0], positions(2))
        assert tokens[0, 2] == 1


@pytest.mark.parametrize("step,gap,all_in", [
    (31, 5.0, False),  # progress 32/100 = 0.32 < 0.33: bar 7.5
    (32, 5.0, True),   # progress 33/100 = 0.33, not < 0.33: bar 5.0
    (65, 2.5, False),  # 66/100 = 0.66 < 0.67: bar 5.0
    (66, 2.5, True),   # 67/100 = 0.67: bar 2.5
])
def test_progress_exactly_at_a_bound_is_the_later_phase(step, gap, all_in):
    state = make_state([[2, DELIM]], gen_length=100, block_length=100, step=step)
    logits = gap_logits([[gap] * 100], [[1] * 100])
    _, _, stop = run_step(SAMPLER, logits, state)
    assert stop.tolist() == [all_in]


def test_all_in_fills_every_block_and_the_engine_stops_the_row():
    """Step 5 (bar 5.0), window = block 1 [4, 8), positions 0..3 and 5 already
    committed. Span 0..4 has gap 10 everywhere (committed positions count too,
    as in Prophet): mean 10 >= 5, so every masked position (4, 6..11) of every
    block is committed from this step's argmax, and the row stops."""
    state = make_state([[2, 3, DELIM]], step=5, block_start=[4], block_end=[8], step_in_block=[1])
    state = with_committed(state, {0: {0: 4, 1: 4, 2: 4, 3: 4, 5: 4}})
    tops = [[1, 1, 1, 1, 1, 2, 3, 1, 2, 3, 1, 2]]
    logits = gap_logits([[10.0] * 12], tops)
    carry = jnp.asarray([4], jnp.int32)  # LowConfidence: 4 masked at the block's start
    tokens, commit, stop = run_step(SAMPLER, logits, state, carry)
    assert stop.tolist() == [True]
    np.testing.assert_array_equal(commit[0], positions(4, 6, 7, 8, 9, 10, 11))
    np.testing.assert_array_equal(tokens[0][commit[0]], [1, 3, 1, 2, 3, 1, 2])
    inner_commit, _ = jax.jit(LowConfidence().step)(logits, state, carry)
    assert np.asarray(inner_commit.commit).sum() == 1  # the inner alone would commit one token
    after = jax.jit(lambda s: apply_commit(s, SAMPLER.step(logits, s, carry)[0]))(state)
    assert np.asarray(after.gen_tokens).tolist() == [[4, 4, 4, 4, 1, 4, 3, 1, 2, 3, 1, 2]]
    assert bool(after.done[0]) and int(after.nfe[0]) == int(state.nfe[0]) + 1  # one more forward


def test_rows_in_different_states():
    """Step 0, bar 7.5. One batch, four rows:

    row 0: prompt ends with "=>"; span 0..4 gaps 8, 9, 8, 8, 8: mean 8.2 -> all-in.
    row 1: the delimiter id sits only in the left padding (attention 0): no
           delimiter, never all-in (same gaps); the inner commits position 1
           (largest gap in window [0, 4)).
    row 2: "=>" ends the prompt, but generation position 6 holds a committed
           "=>": the span moves to 7..11, gaps 1.0 there: mean 1 < 7.5 -> inner
           (position 1), although span 0..4 would pass.
    row 3: prompt "=> 2 3": the span starts two columns before the generation
           and is clipped to positions 0..2: gaps 8, 9, 8, mean 8.33 -> all-in
           (the unclipped 0..4, with 0.5 at 3 and 4, would give 5.2 < 7.5).
    """
    prompts = [[2, 3, DELIM], [DELIM, DELIM, 4], [2, 3, DELIM], [DELIM, 2, 3]]
    attention = [[1, 1, 1], [0, 0, 1], [1, 1, 1], [1, 1, 1]]
    state = with_committed(make_state(prompts, attention_mask=attention), {2: {6: DELIM}})
    high = [8.0, 9.0, 8.0, 8.0, 8.0] + [1.0] * 7
    gaps = [high, high, high, [8.0, 9.0, 8.0, 0.5, 0.5] + [1.0] * 7]
    logits = gap_logits(gaps, [[1] * 12] * 4)
    tokens, commit, stop = run_step(SAMPLER, logits, state)
    assert stop.tolist() == [True, False, False, True]
    np.testing.assert_array_equal(commit[0], np.ones(12, bool))
    np.testing.assert_array_equal(commit[1], positions(1))
    np.testing.assert_array_equal(commit[2], positions(1))
    np.testing.assert_array_equal(commit[3], np.ones(12, bool))
    assert (tokens == 1).all()


@pytest.mark.parametrize("top_logit_exp,gap_kind,all_in", [
    (13.0, "prob", True),    # p1 - p2 = (13 - 1) / (13 + 6) = 12/19 = 0.632 >= 0.6
    (8.0, "prob", False),    # (8 - 1) / (8 + 6) = 7/14 = 0.5 < 0.6
    (13.0, "logit", False),  # the same logits in logit units: ln 13 = 2.56 < 5.0
])
def test_probability_gap_variant(top_logit_exp, gap_kind, all_in):
    """Each span position: token 1 has logit ln r, the six other non-mask tokens
    0, so p1 = r / (r + 6), p2 = 1 / (r + 6). Step 5: progress 0.5, the middle
    phase: bar 0.6 for thresholds (0.9, 0.6, 0.3), 5.0 for Prophet's."""
    thresholds = (0.9, 0.6, 0.3) if gap_kind == "prob" else (7.5, 5.0, 2.5)
    sampler = EarlyCommit(answer_delimiter_id=DELIM, gap=gap_kind, thresholds=thresholds)
    state = make_state([[2, 3, DELIM]], step=5)
    logits = gap_logits([[math.log(top_logit_exp)] * 12], [[1] * 12])
    _, _, stop = run_step(sampler, logits, state)
    assert stop.tolist() == [all_in]


def test_inner_carry_and_fields_pass_through():
    """Below the bar the commit is exactly the inner's (tokens, commit,
    confidence) and the carry is the inner's carry."""
    from samplers.adaptive_block import AdaptiveBlock

    inner = AdaptiveBlock(inner=LowConfidence(), delimiter_ids=(4,), lookahead=0.5)
    sampler = EarlyCommit(inner=inner, answer_delimiter_id=DELIM)
    state = make_state([[2, 3, DELIM]])
    # Position 2 predicts delimiter 4 with gap 3 (below 7.5): the adaptive inner ends the block at 2.
    logits = gap_logits([[1.0, 1.0, 3.0] + [1.0] * 9], [[1, 1, 4] + [1] * 9])
    ours, carry = jax.jit(sampler.step)(logits, state, sampler.init(state))
    theirs, inner_carry = jax.jit(inner.step)(logits, state, inner.init(state))
    assert np.asarray(ours.block_end).tolist() == np.asarray(theirs.block_end).tolist() == [3]
    np.testing.assert_array_equal(np.asarray(ours.commit), np.asarray(theirs.commit))
    np.testing.assert_array_equal(np.asarray(ours.tokens), np.asarray(theirs.tokens))
    np.testing.assert_array_equal(np.asarray(carry), np.asarray(inner_carry))
    assert np.asarray(ours.stop).tolist() == [False]


# ------------------------------------------------------------ config and bind


def test_yaml_instantiates_and_binds_to_the_task_tokenizer():
    from dllm.tasks.synthetic.vocab import build_task_tokenizer, task_words

    sampler = hydra.utils.instantiate(OmegaConf.load("configs/sampler/early_commit.yaml"))
    assert isinstance(sampler, EarlyCommit) and isinstance(sampler.inner, LowConfidence)
    assert sampler.thresholds == (7.5, 5.0, 2.5) and sampler.progress_bounds == (0.33, 0.67)
    hash(sampler)  # a jit static argument
    tokenizer = build_task_tokenizer()
    bound = sampler.bind(tokenizer)
    # The task vocabulary: 4 special tokens, then the sorted task words.
    assert bound.answer_delimiter_id == 4 + task_words().index("=>")
    with pytest.raises(ValueError, match=r"answer_delimiter='=/=' is not a token of tokenizer"):
        EarlyCommit(answer_delimiter="=/=").bind(tokenizer)
    with pytest.raises(ValueError, match=r"answer_delimiter_id=57 lies outside the vocabulary of size 57"):
        EarlyCommit(answer_delimiter_id=57).bind(tokenizer)


def test_unbound_sampler_is_refused_at_config_time():
    with pytest.raises(ValueError, match=r"not bound to a tokenizer: call sampler.bind\(tokenizer\)"):
        EarlyCommit().validate(DecodeConfig(gen_length=16, block_length=8))


@pytest.mark.parametrize("settings,message", [
    (dict(thresholds=(2.5, 5.0, 7.5)), "must be non-increasing"),
    (dict(thresholds=(7.5, -1.0, -2.0)), r"each must be finite and >= 0"),
    (dict(thresholds=(7.5, 5.0)), "need one per progress phase, 3"),
    (dict(progress_bounds=(0.0, 0.67)), r"progress_bounds=\(0.0, 0.67\): must be increasing, each in \(0, 1\)"),
    (dict(progress_bounds=(0.33, 1.0)), r"each in \(0, 1\)"),
    (dict(progress_bounds=(0.67, 0.33)), "must be increasing"),
    (dict(answer_delimiter=None), "an early-commit task with no answer delimiter"),
    (dict(answer_delimiter=""), "an early-commit task with no answer delimiter"),
    (dict(answer_length=0), "answer_length=0: must be a positive int"),
    (dict(gap="entropy"), r"gap='entropy': allowed \('logit', 'prob'\)"),
    (dict(gap="prob"), r"with gap='prob': a probability gap lies in \[0, 1\]"),
    (dict(answer_delimiter_id=-1), "answer_delimiter_id=-1: must be an int >= 0"),
    (dict(inner="low_confidence"), "must be a samplers.base.Sampler"),
])
def test_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        EarlyCommit(**settings)


def test_delimiter_id_outside_the_model_vocabulary():
    state = make_state([[2, 3, DELIM]])
    with pytest.raises(ValueError, match=r"answer_delimiter_id=8 lies outside the vocabulary of size 8"):
        run_step(EarlyCommit(answer_delimiter_id=8), gap_logits([[1.0] * 12], [[1] * 12]), state)


# ------------------------------------------------------------ end to end
VOCAB, MASK, EOS, PAD = 40, 39, 38, 0
SPECIAL = SpecialIds(mask=MASK, eos=EOS, eot=EOS, pad=PAD)
ARROW = 9  # the answer delimiter in the end-to-end prompts


@pytest.fixture(scope="module")
def model():
    return tiny_random_model(VOCAB, MASK, EOS, PAD)


class ConstantLogits(nnx.Module):
    """A stand-in model: the same logits at every position: token 5 at
    `top`, EOS at 10, the rest 0 (so the top-1 minus top-2 gap is top - 10)."""

    def __init__(self, top=30.0):
        self.config = dllm.ModelConfig(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=1, mlp_hidden=8,
                                       max_seq_len=64)
        self.top = top

    def __call__(self, tokens, attention_mask=None, *, logits_start=0, logits_length=None):
        length = tokens.shape[1] - logits_start if logits_length is None else logits_length
        logits = jnp.zeros((tokens.shape[0], length, VOCAB))
        return logits.at[..., EOS].set(10.0).at[..., 5].set(self.top)


def test_early_commit_cuts_nfe_on_a_decided_answer():
    """Gap 30 - 10 = 20 >= 7.5 at the first step: the row whose prompt ends with
    the delimiter is filled in one forward (NFE 1); the row without one decodes
    one token per step (NFE 16), exactly as LowConfidence alone."""
    result = dllm.generate(ConstantLogits(), [[1, 2, ARROW], [1, 2]], EarlyCommit(answer_delimiter_id=ARROW),
                           gen_length=16, block_length=8, special=SPECIAL)
    assert np.asarray(result.nfe).tolist() == [1, 16]
    assert (np.asarray(result.tokens) == 5).all()
    trace = np.asarray(result.trace.commit_step)
    assert (trace[0] == 0).all() and sorted(trace[1]) == list(range(16))


def reference_prophet(model, prompt, *, gen_length, block_length, thresholds, answer_start, answer_length=5):
    """Prophet's generate_earlyexit.py for one row, written out plainly
    (reference/samplers.md §6): LLaDA low-confidence with steps = gen_length,
    temperature 0, and the early-exit check before each step's commit."""
    forward = jax.jit(lambda t: model(t))
    p = len(prompt)
    x = np.array(list(prompt) + [MASK] * gen_length, np.int64)
    global_step = 0
    for b in range(gen_length // block_length):
        hi = p + (b + 1) * block_length
        for _ in range(block_length):  # steps per block = block_length: one token per step
            global_step += 1
            logits = np.asarray(forward(jnp.asarray(x[None], jnp.int32)), np.float64)[0, p:]
            logits[:, MASK] = -np.inf  # the engine never proposes [MASK] (documented)
            x0 = np.argmax(logits, axis=-1)
            top = np.sort(logits, axis=-1)
            span = range(answer_start, min(gen_length, answer_start + answer_length))
            gap = np.mean([top[j, -1] - top[j, -2] for j in span])
            progress = global_step / gen_length
            bar = thresholds[0] if progress < 0.33 else thresholds[1] if progress < 0.67 else thresholds[2]
            if gap >= bar:
                masked = x[p:] == MASK
                x[p:][masked] = x0[masked]
                return x[p:], global_step
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            confidence = np.where((x[p:] == MASK) & (np.arange(gen_length) + p < hi),
                                  probs[np.arange(gen_length), x0], -np.inf)
            j = int(np.argmax(confidence))
            x[p + j] = x0[j]
    return x[p:], global_step


def test_engine_matches_a_plain_prophet_loop(model):
    """The random model, thresholds chosen so the exit falls mid-decode; rows
    padded to one width must each match their own single-row reference."""
    thresholds = (1.2, 0.8, 0.4)
    prompts = [[5, 6, 7, ARROW], [11, 12, 13, 14, 15, 16, ARROW]]
    sampler = EarlyCommit(answer_delimiter_id=ARROW, thresholds=thresholds)
    result = dllm.generate(model, prompts, sampler, gen_length=16, block_length=8, special=SPECIAL)
    exits = []
    for i, prompt in enumerate(prompts):
        tokens, steps = reference_prophet(model, prompt, gen_length=16, block_length=8, thresholds=thresholds,
                                          answer_start=0)
        np.testing.assert_array_equal(np.asarray(result.tokens[i]), tokens)
        assert int(result.nfe[i]) == steps
        exits.append(steps)
    assert all(1 < s < 16 for s in exits), f"no early exit in the middle of decoding: {exits}"
