"""The causal attention option, the autoregressive loss and the generative-perplexity scorer.

Independent routes: a causal model's logits at position i must equal those of
the prefix x_<=i run alone (no later token can leak in); the loss and the
perplexity are recomputed by hand from those per-prefix logits; the unigram
entropy from a hand-worked histogram.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dllm import Layout, ModelConfig, Transformer, diffusion, evaluation

CAUSAL = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, mlp_hidden=64, token_shift=True,
                     attention="causal", max_seq_len=32)


@pytest.fixture(scope="module")
def causal_model():
    return Transformer(CAUSAL, rngs=nnx.Rngs(0))


def prefix_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Row by row, position by position: the logits of the last position of the prefix alone."""
    out = np.zeros((*tokens.shape, CAUSAL.vocab_size), np.float32)
    forward = nnx.jit(lambda m, t: m(t))
    for i in range(1, tokens.shape[1] + 1):  # every row's prefix of length i, in one batch
        out[:, i - 1] = np.asarray(forward(model, jnp.asarray(tokens[:, :i])))[:, -1]
    return out


def test_causal_logits_match_each_prefix_run_alone(causal_model):
    tokens = np.random.default_rng(0).integers(0, 32, (2, 9)).astype(np.int32)
    full = np.asarray(causal_model(jnp.asarray(tokens)))
    np.testing.assert_allclose(full, prefix_logits(causal_model, tokens), rtol=1e-5, atol=1e-5)
    bidirectional = Transformer(CAUSAL.replace(attention="bidirectional"), rngs=nnx.Rngs(0))
    assert not np.allclose(np.asarray(bidirectional(jnp.asarray(tokens)))[:, :-1], full[:, :-1], atol=1e-4)


def test_left_padding_does_not_change_a_causal_row(causal_model):
    row = np.random.default_rng(1).integers(3, 32, 7).astype(np.int32)
    padded = np.concatenate([np.zeros(3, np.int32), row])[None]
    mask = np.concatenate([np.zeros(3, np.int32), np.ones(7, np.int32)])[None]
    alone = np.asarray(causal_model(jnp.asarray(row[None])))
    with_pad = np.asarray(causal_model(jnp.asarray(padded), jnp.asarray(mask)))[:, 3:]
    # The first real token predicts nothing (token shift gives it a pad's hidden state); every later one matches.
    assert np.isfinite(with_pad).all()
    np.testing.assert_allclose(with_pad[:, 1:], alone[:, 1:], rtol=1e-5, atol=1e-5)


def test_autoregressive_loss_by_hand(causal_model):
    tokens = np.random.default_rng(2).integers(0, 32, (2, 6)).astype(np.int32)
    valid = np.ones_like(tokens)
    valid[1, :2] = 0  # row 1 left-padded by two: its first real token predicts nothing
    logits = prefix_logits(causal_model, tokens)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    terms = [-log_probs[b, i, tokens[b, i]] for b in range(2) for i in range(1, 6) if valid[b, i] and valid[b, i - 1]]
    loss, metrics = diffusion.autoregressive_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(valid))
    assert int(metrics["masked_tokens"]) == len(terms) == 5 + 3
    assert float(loss) == pytest.approx(float(np.mean(terms)), rel=1e-5)


def test_generative_perplexity_by_hand(causal_model):
    rng = np.random.default_rng(3)
    prompts = rng.integers(0, 32, (3, 4)).astype(np.int32)
    generations = rng.integers(0, 32, (3, 5)).astype(np.int32)
    generation_mask = np.ones_like(generations)
    generation_mask[2, 3:] = 0  # e.g. after an EOS
    tokens = np.concatenate([prompts, generations], axis=1)
    logits = prefix_logits(causal_model, tokens)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = [-log_probs[b, 4 + j, generations[b, j]] for b in range(3) for j in range(5) if generation_mask[b, j]]
    out = evaluation.generative_perplexity(causal_model, prompts, np.ones_like(prompts), generations,
                                           generation_mask, batch_size=2)
    assert out["scored_tokens"] == len(nll) == 5 + 5 + 3
    assert out["gen_ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)
    with pytest.raises(ValueError, match="autoregressive model"):
        evaluation.generative_perplexity(Transformer(CAUSAL.replace(attention="bidirectional"), rngs=nnx.Rngs(0)),
                                         prompts, np.ones_like(prompts), generations, generation_mask)
    with pytest.raises(ValueError, match="no generated token"):
        evaluation.generative_perplexity(causal_model, prompts, np.ones_like(prompts), generations,
                                         np.zeros_like(generations))


def test_unigram_entropy_by_hand():
    tokens = np.array([[1, 1, 2, 2], [5, 5, 5, 5], [1, 2, 3, 9]])
    assert evaluation.unigram_entropy(tokens) == pytest.approx((math.log(2) + 0 + math.log(4)) / 3)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)  # row 3 has nothing: skipped
    p = np.array([2 / 3, 1 / 3])
    assert evaluation.unigram_entropy(tokens, mask) == pytest.approx(float(-(p * np.log(p)).sum()) / 2)


def test_bad_attention_pattern_and_cached_causal_steps_are_refused(causal_model):
    with pytest.raises(ValueError, match=r"ModelConfig.attention='sideways'.*bidirectional.*causal"):
        CAUSAL.replace(attention="sideways")
    from dllm.models.transformer import attend

    q = jnp.zeros((1, 2, 4, 8))
    with pytest.raises(ValueError, match="causal.*cache='none'"):
        attend(q, q, q, None, CAUSAL, Layout(), window=True)

    pallas = Transformer(CAUSAL, Layout(window_attention_impl="pallas"), rngs=nnx.Rngs(0))
    cache = pallas.empty_cache(1, 8)
    tokens = jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="causal.*cache='none'"):  # refused before any kernel is chosen
        pallas.forward_window(tokens, tokens, cache, None, start=jnp.zeros((1,), jnp.int32), queries=2, logits_count=2,
                              key_length=8)


def test_autoregressive_objective_needs_a_causal_model(tmp_path):
    from dllm.data import DataConfig, make_data
    from dllm.training import TrainConfig, train

    data = make_data(DataConfig(source="tasks", tasks=("copy",), n_per_task=8, eval_n_per_task=0), 4)
    config = TrainConfig(steps=1, batch_size=4, warmup_steps=0, objective="autoregressive",
                         workdir=str(tmp_path), progress=False, tensorboard=False)
    with pytest.raises(ValueError, match="objective='autoregressive' needs ModelConfig.attention='causal'"):
        train(CAUSAL.replace(attention="bidirectional", vocab_size=64), config, data)
