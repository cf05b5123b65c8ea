"""DINGO constrained decoding (arXiv 2505.23061): the dynamic programme against brute force with
Python's `re` (an independent route from the DFA and its token lifting), and decodes of the trained
tiny-tasks model whose outputs all match the pattern."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

import dllm
from dllm.decoding.engine import pad_prompts
from dllm.tasks import get_task, suite_examples
from dllm.tokenizer import Tokenizer
from experiments.common import REPO_ROOT
from samplers import Dingo, LowConfidence, Threshold
from samplers.dingo import best_accepted, compile_pattern

WORDS = ["a", "b", "ab", "c"]  # "ab" spans two characters of the DFA
PAD, EOS, MASK = 0, 1, 2


def small_tokenizer(joined_by_spaces: bool) -> Tokenizer:
    specials = ["<pad>", "<eos>", "<mask>"]
    backend = Backend(models.WordLevel(vocab={w: i for i, w in enumerate(specials + WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False) if joined_by_spaces else decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return Tokenizer(backend, mask_id=MASK, eos_id=EOS, pad_id=PAD)


def text_of(tokenizer, tokens):
    """The answer text of a full canvas, or None when an ordinary token follows an EOS."""
    tokens = list(tokens)
    end = tokens.index(EOS) if EOS in tokens else len(tokens)
    if any(t != EOS for t in tokens[end:]):
        return None
    return tokenizer.decode(tokens[:end])


def brute_force(tokenizer, pattern, scores, kinds, fixed):
    """max over canvases of the sum of scores at the choosing positions, among those whose masked
    positions can be filled so that the text fully matches `pattern`; None when none can."""
    ordinary = [EOS] + [3 + i for i in range(len(WORDS))]
    options = [ordinary if kind in ("choose", "wildcard") else [fixed[j]] for j, kind in enumerate(kinds)]
    best = {}
    for canvas in itertools.product(*options):
        text = text_of(tokenizer, canvas)
        if text is None or not re.fullmatch(pattern, text):
            continue
        chosen = tuple(t for t, kind in zip(canvas, kinds) if kind == "choose")
        score = sum(float(scores[j, t]) for j, (t, kind) in enumerate(zip(canvas, kinds)) if kind == "choose")
        best[chosen] = score
    return max(best.values()) if best else None


@pytest.mark.parametrize("joined_by_spaces", [True, False])
@pytest.mark.parametrize("pattern", [r"(a|b)+c?", r"a( b)* c", r"(ab|c)*", r"c+ a|b"])
def test_programme_finds_the_best_accepted_canvas(joined_by_spaces, pattern):
    tokenizer = small_tokenizer(joined_by_spaces)
    automaton = compile_pattern(pattern, tokenizer)
    rng = np.random.default_rng(0)
    vocab = 3 + len(WORDS)
    for trial in range(6):
        kinds = rng.choice(["choose", "wildcard", "fixed"], size=4, p=[0.5, 0.3, 0.2])
        fixed = rng.choice([EOS, 3, 4, 5, 6], size=4)
        scores = rng.normal(size=(4, vocab)).astype(np.float32)
        expected = brute_force(tokenizer, pattern, scores, kinds, fixed)
        tokens, feasible = best_accepted(jnp.asarray(scores), jnp.asarray(kinds == "choose"),
                                         jnp.asarray(kinds == "wildcard"), jnp.asarray(fixed, jnp.int32),
                                         automaton, MASK)
        assert bool(feasible) == (expected is not None), (trial, kinds, fixed)
        if expected is None:
            continue
        tokens = np.asarray(tokens)
        got = sum(float(scores[j, t]) for j, t in enumerate(tokens) if kinds[j] == "choose")
        np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=f"{trial} {kinds} {tokens}")
        assert all(tokens[j] == MASK for j in range(4) if kinds[j] == "wildcard")
        assert all(tokens[j] == fixed[j] for j in range(4) if kinds[j] == "fixed")


def test_the_last_choice_decides_the_whole_match():
    """By hand: pattern "a c|b b" (space-joined), canvas [choose, choose]; the best single
    positions are "a" then "b" (a b: rejected), so the best accepted pair is the better of a c and b b."""
    tokenizer = small_tokenizer(True)
    automaton = compile_pattern(r"a c|b b", tokenizer)
    a, b, c = 3, 4, 6
    scores = np.full((2, 7), -5.0, np.float32)
    scores[0, a], scores[0, b] = -0.1, -1.0   # a c scores -0.1 - 2.0; b b scores -1.0 - 0.2
    scores[1, b], scores[1, c] = -0.2, -2.0
    tokens, feasible = best_accepted(jnp.asarray(scores), jnp.array([True, True]), jnp.array([False, False]),
                                     jnp.zeros(2, jnp.int32), automaton, MASK)
    assert bool(feasible) and np.asarray(tokens).tolist() == [b, b]


def test_bad_patterns_and_lengths_are_refused():
    tokenizer = small_tokenizer(True)
    with pytest.raises(ValueError, match=r"Dingo.pattern='\(a' does not parse"):
        Dingo(pattern="(a").bind(tokenizer)
    with pytest.raises(ValueError, match=r"Dingo.pattern is not set"):
        Dingo().bind(tokenizer)
    with pytest.raises(ValueError, match=r"accepts no string of this tokenizer's tokens"):
        Dingo(pattern="z").bind(tokenizer).validate(dllm.decoding.DecodeConfig(gen_length=8, block_length=8))
    with pytest.raises(ValueError, match=r"shortest match takes 5 tokens, gen_length=4; allowed: gen_length >= 5"):
        Dingo(pattern="a( a){4}").bind(tokenizer).validate(dllm.decoding.DecodeConfig(gen_length=4, block_length=4))


@pytest.fixture(scope="module")
def grids():
    """The trained tiny-tasks model and 10 held-out latin-square and sudoku prompts each."""
    model, tokenizer = dllm.from_pretrained(REPO_ROOT / "checkpoints" / "tiny-tasks")
    examples = [e for e in suite_examples("test", 10) if e.task in ("latin_square", "sudoku")]
    tokens, mask = pad_prompts([tokenizer.encode(e.prompt) for e in examples], tokenizer.pad_id, 24)
    return model, tokenizer, examples, tokens, mask


def decoded_texts(grids, sampler, **kw):
    model, tokenizer, _, tokens, mask = grids
    result = dllm.generate(model, tokens, sampler, gen_length=24, block_length=8, tokenizer=tokenizer,
                           attention_mask=mask, **kw)
    return [text_of(tokenizer, row) for row in np.asarray(result.tokens)], np.asarray(result.nfe)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_pattern_the_model_does_not_follow_is_followed(grids, temperature):
    """Grids of the digits 1-3 only (the model writes 1-4): unconstrained, no output matches; with
    DINGO over LowConfidence and over Threshold(0.5), every output does, and the task's own format
    (the 4x4 grid) is still kept."""
    _, _, examples, _, _ = grids
    only_1_to_3 = r"[1-3]( [1-3]){3}( / [1-3]( [1-3]){3}){3}"
    plain, _ = decoded_texts(grids, LowConfidence(), temperature=temperature)
    assert not any(re.fullmatch(only_1_to_3, t or "") for t in plain)
    for inner in (LowConfidence(), Threshold(tau=0.5)):
        texts, nfe = decoded_texts(grids, Dingo(pattern=only_1_to_3, inner=inner), temperature=temperature)
        assert all(re.fullmatch(only_1_to_3, t or "") for t in texts), texts
        if isinstance(inner, Threshold):
            assert nfe.mean() < 24


def test_a_pattern_that_holds_changes_nothing(grids):
    """The task's own format, which the model's greedy decodes already keep: the tokens of the inner rule."""
    _, _, examples, _, _ = grids
    pattern = get_task("latin_square").answer_pattern
    plain, plain_nfe = decoded_texts(grids, Threshold(tau=0.7))
    assert all(re.fullmatch(pattern, t or "") for t in plain)
    constrained, nfe = decoded_texts(grids, Dingo(pattern=pattern, inner=Threshold(tau=0.7)))
    assert constrained == plain and np.array_equal(nfe, plain_nfe)


def test_every_reference_answer_matches_its_task_format():
    for suite in ("tiny", "parallel"):
        for example in suite_examples("test", 5, suite=suite):
            task = get_task(example.task, suite)
            if task.answer_pattern is not None:
                assert task.format_valid(example.answer), (suite, example.task, example.answer)
                assert not task.format_valid(example.answer + " =>"), (suite, example.task)  # "=>" ends prompts only


def test_a_floored_token_ranks_after_every_path_without_one():
    """An EOS policy's -inf: pattern "a|b c" (space-joined) with position 1 allowing only EOS (a) or
    c (b c), both at -inf; a scores -0.01 and b -5 at position 0. Both paths hold one floored token,
    so the score decides: a EOS. Then with c alone floored and b scored far above a, a EOS still
    wins: it holds fewer floored tokens."""
    tokenizer = small_tokenizer(True)
    automaton = compile_pattern(r"a|b c", tokenizer)
    a, b, c = 3, 4, 6
    scores = np.full((2, 7), -3.0, np.float32)
    scores[0, a], scores[0, b] = -0.01, -5.0
    scores[1, EOS], scores[1, c] = -np.inf, -np.inf
    tokens, feasible = best_accepted(jnp.asarray(scores), jnp.array([True, True]), jnp.array([False, False]),
                                     jnp.zeros(2, jnp.int32), automaton, MASK)
    assert bool(feasible) and np.asarray(tokens).tolist() == [a, EOS]
    scores[1, EOS] = -0.5  # now only b c holds a floored token: a EOS wins on count alone
    scores[0, a], scores[0, b] = -9.0, -0.01
    tokens, _ = best_accepted(jnp.asarray(scores), jnp.array([True, True]), jnp.array([False, False]),
                              jnp.zeros(2, jnp.int32), automaton, MASK)
    assert np.asarray(tokens).tolist() == [a, EOS]
