"""The engine against an independent step-by-step reference of LLaDA's generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dllm
import samplers
from dllm.decoding import SpecialIds
from tests.helpers import registered_samplers, tiny_random_model

VOCAB, MASK, EOS, PAD = 40, 39, 38, 0
SPECIAL = SpecialIds(mask=MASK, eos=EOS, eot=EOS, pad=PAD)


@pytest.fixture(scope="module")
def model():
    return tiny_random_model(VOCAB, MASK, EOS, PAD)


def reference_generate(model, prompt, *, steps, gen_length, block_length, temperature=0.0, cfg_scale=0.0,
                       key=None):
    """LLaDA generate.py, written out plainly for one row (reference/samplers.md §1).

    Noise: the engine's documented draws, u = uniform(fold_in(fold_in(key, step), 0)),
    fed to LLaDA's own formula exp(l) / (-log u)^T in float64.
    """
    forward = jax.jit(lambda t: model(t))
    p = len(prompt)
    x = np.array(list(prompt) + [MASK] * gen_length, np.int64)
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    step = 0
    for b in range(n_blocks):
        lo, hi = p + b * block_length, p + (b + 1) * block_length
        n = int((x[lo:hi] == MASK).sum())
        schedule = [n // per_block + (1 if i < n % per_block else 0) for i in range(per_block)]
        for i in range(per_block):
            if cfg_scale > 0:
                unconditional = x.copy()
                unconditional[:p] = MASK
                both = np.asarray(forward(jnp.asarray(np.stack([x, unconditional]), jnp.int32)), np.float64)
                logits = both[1] + (cfg_scale + 1) * (both[0] - both[1])
            else:
                logits = np.asarray(forward(jnp.asarray(x[None], jnp.int32)), np.float64)[0]
            logits = logits[p:]
            logits[:, MASK] = -np.inf  # the engine never proposes [MASK] (documented)
            if temperature > 0:
                row_key = jax.random.fold_in(key, 0)  # one prompt: row 0 of the engine's per-row keys
                step_key = jax.random.fold_in(jax.random.fold_in(row_key, step), 0)
                u = np.asarray(jax.random.uniform(step_key, (gen_length, VOCAB), jnp.float32,
                                                  minval=np.finfo(np.float32).tiny, maxval=1.0), np.float64)
                x0 = np.argmax(np.exp(logits) / (-np.log(u)) ** temperature, axis=-1)
            else:
                x0 = np.argmax(logits, axis=-1)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            confidence = probs[np.arange(gen_length), x0]
            positions = np.arange(gen_length) + p
            allowed = (x[p:] == MASK) & (positions < hi)
            confidence = np.where(allowed, confidence, -np.inf)
            chosen = np.argsort(-confidence, kind="stable")[:schedule[i]]
            x[p + chosen] = x0[chosen]
            step += 1
    return x[p:]


@pytest.mark.parametrize("block_length,temperature,cfg_scale,steps", [
    (16, 0.0, 0.0, 16),   # pure diffusion, one token per step
    (8, 0.0, 0.0, 16),    # semi-AR blocks
    (8, 0.0, 0.0, 6),     # 3 steps per block of 8: remainder front-loaded (3, 3, 2)
    (8, 1.0, 0.0, 8),     # temperature sampling
    (16, 0.0, 1.5, 8),    # classifier-free guidance
    (8, 0.7, 1.0, 10),    # both
])
def test_engine_matches_reference_llada(model, block_length, temperature, cfg_scale, steps):
    key = jax.random.key(7)
    prompt = [5, 6, 7, 8, 9]
    ours = dllm.generate(model, [prompt], samplers.LowConfidence(steps=steps), gen_length=16,
                         block_length=block_length, key=key, special=SPECIAL, temperature=temperature,
                         cfg_scale=cfg_scale)
    expected = reference_generate(model, prompt, steps=steps, gen_length=16, block_length=block_length,
                                  temperature=temperature, cfg_scale=cfg_scale, key=key)
    np.testing.assert_array_equal(np.asarray(ours.tokens[0]), expected)
    assert int(ours.nfe[0]) == steps
    trace = np.asarray(ours.trace.commit_step[0])
    assert trace.min() == 0 and trace.max() == steps - 1
    assert np.asarray(ours.trace.committed_per_step[0, :steps]).sum() == 16


def test_trace_follows_blocks(model):
    result = dllm.generate(model, [[3, 4, 5]], samplers.LowConfidence(), gen_length=16, block_length=4,
                           special=SPECIAL)
    trace = np.asarray(result.trace.commit_step[0])
    for b in range(4):  # block b is decoded during steps 4b .. 4b+3
        assert sorted(trace[4 * b:4 * b + 4]) == list(range(4 * b, 4 * b + 4))
    assert np.all(np.asarray(result.trace.committed_per_step[0]) == 1)


def test_padded_batch_rows_decode_as_alone(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    sampler = samplers.LowConfidence(steps=8)
    batch = dllm.generate(model, prompts, sampler, gen_length=16, block_length=8, special=SPECIAL)
    for i, prompt in enumerate(prompts):
        alone = dllm.generate(model, [prompt], sampler, gen_length=16, block_length=8, special=SPECIAL)
        np.testing.assert_array_equal(np.asarray(batch.tokens[i]), np.asarray(alone.tokens[0]))
        assert int(batch.nfe[i]) == int(alone.nfe[0])


def test_same_key_same_tokens_different_key_different_tokens(model):
    kwargs = dict(gen_length=16, block_length=8, special=SPECIAL, temperature=1.0)
    sampler = samplers.LowConfidence()
    a = dllm.generate(model, [[5, 6, 7]], sampler, key=jax.random.key(1), **kwargs)
    b = dllm.generate(model, [[5, 6, 7]], sampler, key=jax.random.key(1), **kwargs)
    c = dllm.generate(model, [[5, 6, 7]], sampler, key=jax.random.key(2), **kwargs)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_confidence_eos_policy_commits_eos_last(model):
    """confidence_eos_eot_inf: EOS may be proposed but is committed only when
    nothing else is left in the block (LLaDA Appendix B.4, fixed per issue #137)."""
    eos_model = ConstantLogits(eos_favoured=True)
    result = dllm.generate(eos_model, [[1, 2]], samplers.LowConfidence(), gen_length=8, block_length=8,
                           special=SPECIAL, eos_policy="confidence_eos_eot_inf")
    tokens = np.asarray(result.tokens[0])
    trace = np.asarray(result.trace.commit_step[0])
    is_eos = tokens == EOS
    assert is_eos.any() and (~is_eos).any()
    assert trace[is_eos].min() > trace[~is_eos].max()
    banned = dllm.generate(eos_model, [[1, 2]], samplers.LowConfidence(), gen_length=8, block_length=8,
                           special=SPECIAL, eos_policy="logits_eos_inf")
    assert not np.any(np.asarray(banned.tokens) == EOS)


def test_confidence_history_recorded(model):
    result = dllm.generate(model, [[5, 6]], samplers.LowConfidence(), gen_length=8, block_length=8,
                           special=SPECIAL, record_confidence=True)
    history = np.asarray(result.trace.confidence)
    assert history.shape == (8, 1, 8)
    assert np.all(history[0] > 0)


# ---------------------------------------------------------- adversarial logits


class ConstantLogits(nnx.Module):
    """A stand-in model: all-uniform logits, or all-EOS with some other tokens."""

    def __init__(self, uniform=False, eos_favoured=False):
        self.config = dllm.ModelConfig(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=1, mlp_hidden=8,
                                       max_seq_len=64)
        self.uniform, self.eos_favoured = uniform, eos_favoured

    def __call__(self, tokens, attention_mask=None, *, logits_start=0, logits_length=None, logits_offsets=None):
        length = tokens.shape[1] - logits_start if logits_length is None else logits_length
        logits = jnp.zeros((tokens.shape[0], length, VOCAB))
        if self.uniform:
            return logits
        logits = logits.at[..., EOS].set(10.0)
        if self.eos_favoured:  # every other position prefers token 5 over EOS
            logits = logits.at[:, ::2, 5].set(20.0)
        return logits


def adversarial_samplers():
    """Every registered sampler with its YAML defaults (token texts bound to ids)."""
    return list(registered_samplers(delimiter_id=EOS, vocab_size=VOCAB, special=SPECIAL).items())


@pytest.mark.parametrize("fake", ["uniform", "all_eos"])
@pytest.mark.parametrize("name,sampler", adversarial_samplers())
def test_every_sampler_terminates_on_adversarial_logits(name, sampler, fake):
    fake_model = ConstantLogits(uniform=fake == "uniform")
    result = dllm.generate(fake_model, [[1, 2, 3], [4]], sampler, gen_length=16, block_length=8,
                           special=SPECIAL, max_steps=16)
    tokens = np.asarray(result.tokens)
    assert not np.any(tokens == MASK), f"{name} left masks on {fake} logits"
    assert np.all(np.asarray(result.nfe) <= 16)


# ------------------------------------------------------------------- bad input


def test_bad_input_errors(model):
    sampler = samplers.LowConfidence()
    kw = dict(special=SPECIAL)
    with pytest.raises(ValueError, match="gen_length=20 is not a multiple of block_length=8"):
        dllm.generate(model, [[5]], sampler, gen_length=20, block_length=8, **kw)
    with pytest.raises(ValueError, match="steps=6 does not divide over 4 blocks"):
        dllm.generate(model, [[5]], samplers.LowConfidence(steps=6), gen_length=16, block_length=4, **kw)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        dllm.generate(model, [[5] * 60], sampler, gen_length=16, block_length=8, **kw)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        dllm.generate(model, [[5], []], sampler, gen_length=16, block_length=8, **kw)
    with pytest.raises(ValueError, match="temperature=-0.5: must be >= 0"):
        dllm.generate(model, [[5]], sampler, gen_length=16, block_length=8, temperature=-0.5, **kw)
    with pytest.raises(ValueError, match=r"unknown sampler 'fastest'; allowed: .*low_confidence"):
        samplers.get_sampler("fastest")
    with pytest.raises(ValueError, match="remasking='lowest'"):
        samplers.LowConfidence(remasking="lowest")
    with pytest.raises(ValueError, match=r"prompt token ids must lie in \[0, 40\)"):
        dllm.generate(model, [[5, 99]], sampler, gen_length=16, block_length=8, **kw)


def test_compiler_options_reach_the_compiled_loop(model):
    """`generate(compiler_options=...)` compiles the loop with those XLA options:
    XLA's defaults decode the default's tokens, and an unknown option is refused
    by XLA, naming it (so the options are not dropped on the way)."""
    kwargs = dict(gen_length=16, block_length=8, special=SPECIAL, key=jax.random.key(0))
    default = dllm.generate(model, [[5, 6, 7]], samplers.LowConfidence(), **kwargs)
    xla_defaults = dllm.generate(model, [[5, 6, 7]], samplers.LowConfidence(), compiler_options={}, **kwargs)
    np.testing.assert_array_equal(np.asarray(default.tokens), np.asarray(xla_defaults.tokens))
    with pytest.raises(Exception, match="xla_no_such_option"):
        dllm.generate(model, [[5, 6, 7]], samplers.LowConfidence(), compiler_options={"xla_no_such_option": True},
                      **kwargs)


WINDOW_ONLY = [samplers.LowConfidence(), samplers.LowConfidence(remasking="random"), samplers.Threshold(tau=0.7),
               samplers.Threshold(tau=0.7, confidence="margin"), samplers.Threshold(confidence="entropy_bound"),
               samplers.Threshold(tau=0.5, confidence="neg_entropy"), samplers.Factor(factor=1.0)]


WITH_NOISE = [WINDOW_ONLY[0], WINDOW_ONLY[2], WINDOW_ONLY[3]]  # the confidences that read the sampled token or not


@pytest.mark.parametrize("sampler,temperature", [(s, 0.0) for s in WINDOW_ONLY] + [(s, 0.8) for s in WITH_NOISE],
                         ids=lambda v: repr(v))
def test_window_only_logits_decode_as_the_whole_canvas(model, sampler, temperature):
    """Window-only samplers get their blocks' logits alone; with record_confidence
    the engine passes all of G instead. Both give the same tokens and NFE (also
    with Gumbel noise: a position's draw is the same), with and without a cache
    (also one window longer than a block), on a left-padded batch."""
    assert sampler.reads_only_window
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    for cache in ({"cache": "none"}, {"cache": "dual"}, {"cache": "prefix"}, {"cache": "dual", "cache_window": 8}):
        runs = [dllm.generate(model, prompts, sampler, gen_length=16, block_length=4, special=SPECIAL, **cache,
                              temperature=temperature, key=jax.random.key(3), record_confidence=record)
                for record in (False, True)]
        np.testing.assert_array_equal(np.asarray(runs[0].tokens), np.asarray(runs[1].tokens), err_msg=str(cache))
        np.testing.assert_array_equal(np.asarray(runs[0].nfe), np.asarray(runs[1].nfe), err_msg=str(cache))


def test_window_only_logits_with_dreams_token_shift():
    """Dream predicts position i from hidden i - 1 (and has qkv biases): the
    window-only logits stay aligned in every cache mode."""
    from tests.test_cache import SPECIAL as CACHE_SPECIAL, make_model

    dream = make_model("dream", 2)
    for cache in ("none", "dual", "prefix"):
        runs = [dllm.generate(dream, [[5, 6, 7, 8, 9], [10, 11]], samplers.Threshold(tau=0.7), gen_length=16,
                              block_length=4, special=CACHE_SPECIAL, cache=cache, record_confidence=record)
                for record in (False, True)]
        np.testing.assert_array_equal(np.asarray(runs[0].tokens), np.asarray(runs[1].tokens), err_msg=cache)


class LogitShapes(samplers.Threshold):
    """Threshold that records the shape of the logits it is given (at trace time)."""

    seen = []

    def step(self, logits, state, carry):
        LogitShapes.seen.append(logits.shape)
        return super().step(logits, state, carry)


def test_window_only_samplers_get_the_blocks_logits_only(model):
    """[B, block_length, V] for the full step, the refresh and the cached window
    steps; all of G when the trace records every position's confidence or the
    cache window is shorter than a block."""
    def shapes(**kw):
        LogitShapes.seen = []
        dllm.generate(model, [[5, 6, 7]], LogitShapes(tau=0.7), gen_length=16, block_length=8, special=SPECIAL,
                      key=jax.random.key(0), **kw)
        return set(LogitShapes.seen)

    assert shapes() == {(1, 8, VOCAB)}
    assert shapes(cache="dual") == {(1, 8, VOCAB)} and shapes(cache="prefix") == {(1, 8, VOCAB)}
    assert shapes(cache="dual", cache_window=12) == {(1, 8, VOCAB)}
    assert shapes(record_confidence=True) == {(1, 16, VOCAB)}
    assert shapes(cache="dual", cache_window=4) == {(1, 16, VOCAB)}
