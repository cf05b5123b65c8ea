"""The exact block cache of block-causal models (cache='block', `dllm.decoding.cache.BlockCache`).

A finished block's K/V never change under block-causal attention, so decoding over the cache must
give the tokens of the uncached decode, where every step is a full forward over the canvas: for
every sampler, on the bundled trained tiny-block model, in a left-padded batch whose prompts end at
different offsets inside their model block (the prompt's tail shares the first generation block).
"""

from __future__ import annotations

import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hydra.utils import instantiate

import dllm
import samplers
from dllm import evaluation
from dllm.decoding import DecodeConfig, SpecialIds, engine, steps
from dllm.models.transformer import aligned_rows
from experiments.common import REPO_ROOT
from tests.helpers import GRID_PROMPTS, grid_sampler_specs

pytestmark = pytest.mark.usefixtures("release_after_each_test")  # see tests/conftest.py
# refused in a block-causal decode (tested below): adaptive_block and self_speculative with cache=block,
# early_commit always
SAMPLER_SPECS = grid_sampler_specs(exclude=("adaptive_block", "early_commit", "self_speculative"))
# 11, 11, 11, 11 and 15 tokens: 3 or 7 of them in the first generation block's model block of 8.
PROMPTS = GRID_PROMPTS
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def tiny_block():
    return dllm.from_pretrained(REPO_ROOT / "checkpoints/tiny-block")


def decoded(model, tokenizer, sampler, decode, batch_size):
    rows, _ = evaluation.decode_texts(model, tokenizer, sampler, PROMPTS, decode, batch_size=batch_size,
                                      key=jax.random.key(3), prompt_width=15, progress=False,
                                      compiler_options=FAST_COMPILE)
    return [(row["tokens"], row["nfe"]) for row in rows]


@pytest.mark.parametrize("name", list(SAMPLER_SPECS))
def test_block_cache_decodes_the_uncached_tokens(tiny_block, name):
    """Temperature 1 (every random draw in play): the cached batch equals the uncached batch, token
    for token and NFE for NFE; for the rules whose rows finish blocks at different steps, so that
    some steps start a block in some rows only, each row decoded alone over the cache too."""
    model, tokenizer = tiny_block
    sampler = instantiate(SAMPLER_SPECS[name], _convert_="all")
    settings = dict(gen_length=24, block_length=8, temperature=1.0)
    uncached = decoded(model, tokenizer, sampler, DecodeConfig(**settings), batch_size=5)
    cached = decoded(model, tokenizer, sampler, DecodeConfig(**settings, cache="block"), batch_size=5)
    assert cached == uncached
    if name in ("threshold", "credit", "end_of_text"):
        alone = decoded(model, tokenizer, sampler, DecodeConfig(**settings, cache="block"), batch_size=1)
        assert alone == cached
    assert any(nfe < 24 for _, nfe in cached) or name.startswith("low_confidence") or name == "dingo"  # over LowConfidence


def block_model(token_shift: bool, block_size: int = 4, window_attention_impl: str | None = None):
    """head_dim 8, or 16 for the Pallas window kernel (which needs a power of two >= 16)."""
    config = dllm.ModelConfig(arch="qwen3", qk_norm=True, vocab_size=40, d_model=32 if window_attention_impl is None
                              else 64, n_layers=3, n_heads=4, n_kv_heads=2, mlp_hidden=64, attention="block_causal",
                              block_size=block_size, token_shift=token_shift, max_seq_len=64)
    return dllm.Transformer(config, dllm.Layout(window_attention_impl=window_attention_impl), rngs=nnx.Rngs(1))


@pytest.mark.parametrize("token_shift, block_size, block_length, pipeline_blocks, impl",
                         [(False, 4, 8, 1, None), (True, 4, 4, 1, None), (True, 1, 4, 1, None), (True, 4, 4, 3, None),
                          (False, 4, 8, 1, "pallas"), (True, 4, 4, 3, "pallas")])
def test_block_cache_logits_equal_full_forwards(token_shift, block_size, block_length, pipeline_blocks, impl):
    """Step by step on a random 3-layer model (prompts of 3, 6 and 9 tokens, left-padded): the
    cached step's logits (each row's open blocks) equal the full forward's; the engine block spans
    one or two model blocks; with and without token shift; up to 3 blocks open at once (D2F); and
    through the Pallas window kernel (each query's column limit, `block_causal_key_limit`)."""
    model, special = block_model(token_shift, block_size, impl), SpecialIds(mask=39, eos=38, eot=37, pad=0)
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]
    # one token per step: LowConfidence, or (pipelined: its per-block schedule is refused) the top-1 of
    # a bar the random model never reaches
    sampler = samplers.LowConfidence() if pipeline_blocks == 1 else samplers.Threshold(tau=1.0, strict=True)
    run = lambda cache: list(steps(model, prompts, sampler, gen_length=16, block_length=block_length,
                                   special=special, cache=cache, pipeline_blocks=pipeline_blocks,
                                   pipeline_fraction=0.5))
    uncached, cached = run("none"), run("block")
    assert len(cached) == len(uncached) == 16
    for full, step in zip(uncached, cached):
        has = np.asarray(step.state.has_logits)
        np.testing.assert_array_equal(has, np.asarray(full.state.has_logits))
        np.testing.assert_allclose(step.logits, full.logits, rtol=1e-5, atol=1e-5)  # zeros outside the block
        np.testing.assert_array_equal(step.tokens, full.tokens)
    assert has.sum(-1).max() <= block_length * pipeline_blocks
    if pipeline_blocks > 1:  # several blocks were open at once
        assert max(np.asarray(step.state.has_logits).sum(-1).max() for step in cached) > block_length


def all_equations(jaxpr):
    """The equations of a jaxpr and of every jaxpr nested in it (jitted helpers, einsums)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from all_equations(sub)


def test_window_gemm_rows_are_what_xla_would_not_pad():
    """XLA pads each bf16 GEMM operand to a multiple of 8 rows on Ampere and later GPUs
    (cublas_padding_requirements.h): a pad kernel before the GEMM and a slice after, every layer.
    A window step pads its rows once instead, to `aligned_rows` (hand-worked below: a token-shifted
    block of 32 is 33 rows), and every GEMM (a dot without batch dimensions: the projections and the
    head, not attention) then has batch x rows a multiple of 8; the logits are unchanged (the
    cached-against-full tests above). More logits than window positions are refused: they would be
    padding rows."""
    assert [aligned_rows(b, 33) for b in (1, 2, 3, 4, 8, 32)] == [40, 36, 40, 34, 33, 33]
    assert aligned_rows(1, 32) == 32 and aligned_rows(2, 5) == 8
    model = block_model(token_shift=True)
    graphdef, state = nnx.split(model)
    for batch in (1, 2, 8):  # a block of 4 queries: 5 rows
        tokens, positions = jnp.zeros((batch, 16), jnp.int32), jnp.broadcast_to(jnp.arange(16), (batch, 16))
        window = lambda state, tokens: nnx.merge(graphdef, state).forward_window(
            tokens, positions, model.empty_cache(batch, 16), None, start=jnp.full((batch,), 8), queries=4,
            logits_count=4, key_length=12)
        gemm_rows = [math.prod(size for axis, size in enumerate(eqn.invars[0].aval.shape) if axis not in contracted)
                     for eqn in all_equations(jax.make_jaxpr(window)(state, tokens).jaxpr)
                     if eqn.primitive.name == "dot_general" and eqn.invars[0].aval.ndim >= 3
                     for (contracted, _), (batched, _) in [eqn.params["dimension_numbers"]] if not batched]
        # the scanned layer's q, k, v, output, gate, up and down projections, then the head
        assert len(gemm_rows) == 8 and all(rows % 8 == 0 for rows in gemm_rows), gemm_rows
    with pytest.raises(ValueError, match="logits_count=5: must lie in"):  # more logits than window positions
        model.forward_window(tokens, positions, model.empty_cache(8, 16), None, start=jnp.full((8,), 8), queries=4,
                             logits_count=5, key_length=12)


def test_block_cache_refuses_bidirectional_models_adaptive_blocks_and_early_commit(tiny_block):
    model, tokenizer = tiny_block
    bidirectional, _ = dllm.from_pretrained(REPO_ROOT / "checkpoints/tiny-full")
    prompt = [tokenizer.encode(PROMPTS[0])]
    with pytest.raises(ValueError, match=r"cache='block' with ModelConfig.attention='bidirectional': the exact "
                                         r"block cache needs a block-causal model"):
        dllm.generate(bidirectional, prompt, samplers.LowConfidence(), gen_length=24, block_length=8,
                      tokenizer=tokenizer, cache="block")
    with pytest.raises(ValueError, match=r"EarlyCommit with a block-causal model: it reads or fills positions "
                                         r"outside the active block"):
        dllm.generate(model, prompt, samplers.get_sampler("early_commit"), gen_length=24, block_length=8,
                      tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"AdaptiveBlock with cache='block': its windows end at delimiters"):
        dllm.generate(model, prompt, samplers.get_sampler("adaptive_block"), gen_length=24, block_length=8,
                      tokenizer=tokenizer, cache="block")
    with pytest.raises(ValueError, match=r"SelfSpeculative with cache='block': its forward verifies several"):
        dllm.generate(model, prompt, samplers.get_sampler("self_speculative"), gen_length=24, block_length=8,
                      tokenizer=tokenizer, cache="auto")  # "block" for this model


def test_auto_cache_follows_the_attention_pattern(tiny_block):
    """cache='auto' (the Hydra default) decodes a block-causal model over the exact block cache and a
    bidirectional one without a cache (with guidance, a block-causal one uncached too)."""
    model, tokenizer = tiny_block
    bidirectional, _ = dllm.from_pretrained(REPO_ROOT / "checkpoints/tiny-full")
    prompt = [tokenizer.encode(PROMPTS[0])]
    chosen = lambda m, **kw: next(steps(m, prompt, samplers.LowConfidence(), gen_length=24, block_length=8,
                                        tokenizer=tokenizer, cache="auto", **kw)).state.config.cache
    assert chosen(model) == "block" and chosen(bidirectional) == "none" and chosen(model, cfg_scale=1.0) == "none"


def test_pipelined_blocks_decode_the_uncached_tokens(tiny_block):
    """D2F pipelining (two blocks open, the next joining at half its predecessor) on the trained
    model at temperature 1: cached = uncached, and each row alone = the batch."""
    model, tokenizer = tiny_block
    sampler = samplers.Threshold(tau=0.99)
    settings = dict(gen_length=24, block_length=8, temperature=1.0, pipeline_blocks=2, pipeline_fraction=0.5)
    uncached = decoded(model, tokenizer, sampler, DecodeConfig(**settings), batch_size=5)
    cached = decoded(model, tokenizer, sampler, DecodeConfig(**settings, cache="block"), batch_size=5)
    alone = decoded(model, tokenizer, sampler, DecodeConfig(**settings, cache="block"), batch_size=1)
    assert cached == uncached and alone == cached


def test_pipeline_window_by_hand():
    """Blocks of 4 in a generation of 12, at most 2 open, the next joins at half (2 of 4) committed."""
    config = DecodeConfig(gen_length=12, block_length=4, pipeline_blocks=2, pipeline_fraction=0.5)
    m, x = True, False  # masked, committed
    masked = jnp.asarray([
        [x, x, m, m, m, m, m, m, m, m, m, m],   # [0, 4) half done: [4, 8) joins
        [x, m, m, m, m, m, m, m, m, m, m, m],   # a quarter: no change
        [x, x, x, x, x, m, m, m, m, m, m, m],   # [0, 8): first block done -> [4, 8); then 1 of 4: no join
        [x, x, x, x, x, x, m, m, m, m, m, m],   # [0, 8): first done -> [4, 8), half done -> [4, 12)
        [x, x, x, x, x, x, x, x, x, x, x, m],   # phase 3 (blocks end at 3, 7, 11): [7, 11) done -> [11, 12)
    ])
    start, end = jnp.asarray([0, 0, 0, 0, 7]), jnp.asarray([4, 4, 8, 8, 12])
    phase = jnp.asarray([0, 0, 0, 0, 3])
    got = engine.pipeline_window(config, masked, start, end, phase)
    np.testing.assert_array_equal(np.asarray(got[0]), [0, 0, 4, 4, 11])
    np.testing.assert_array_equal(np.asarray(got[1]), [8, 4, 8, 12, 12])


def test_bad_pipeline_settings_are_refused(tiny_block):
    model, tokenizer = tiny_block
    with pytest.raises(ValueError, match=r"pipeline_fraction=0: allowed \(0, 1\]"):
        DecodeConfig(gen_length=24, block_length=8, pipeline_blocks=2, pipeline_fraction=0)
    with pytest.raises(ValueError, match=r"pipeline_blocks=2 with cache='dual': .*allowed cache 'none', 'block'"):
        DecodeConfig(gen_length=24, block_length=8, pipeline_blocks=2, cache="dual")
    with pytest.raises(ValueError, match=r"LowConfidence with pipeline_blocks=2: its schedule plans"):
        dllm.generate(model, [tokenizer.encode(PROMPTS[0])], samplers.LowConfidence(), gen_length=24,
                      block_length=8, tokenizer=tokenizer, pipeline_blocks=2)
