"""Block-diffusion models: block-causal attention, SDAR / Fast-dLLM v2 checkpoints (issue: block diffusion).

Independent routes: logits parity with `transformers`' own Qwen3 and Qwen2 under the same
block-causal mask (built in torch from the positions), and the 2L training forward against each
noised block run alone after its clean prefix.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dllm
from dllm import diffusion, training
from dllm.decoding import SpecialIds
from samplers import get_sampler
from tests import hf_fixtures
from tests.test_models import batch_with_padding, max_relative_error


def test_sdar_logits_match_transformers_qwen3_block_causal(tmp_path):
    ref = hf_fixtures.make_sdar(tmp_path, block_size=4)
    model, tokenizer = dllm.from_pretrained(tmp_path, dtype="float32")
    c = model.config
    assert (c.arch, c.attention, c.block_size, c.qk_norm, c.token_shift, c.head_dim) == (
        "qwen3", "block_causal", 4, True, False, 16)
    assert tokenizer.mask_id == 95
    tokens, mask = batch_with_padding(c.vocab_size, tokenizer.mask_id)
    expected = hf_fixtures.reference_logits(ref, tokens, mask, block_size=4)
    assert max_relative_error(np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask))), expected,
                              mask.astype(bool)) <= 1e-4
    full = tokens[:1]  # no padding: the unmasked path
    expected = hf_fixtures.reference_logits(ref, full, np.ones_like(full), block_size=4)
    assert max_relative_error(np.asarray(model(jnp.asarray(full))), expected, np.ones(full.shape, bool)) <= 1e-4
    # The pattern matters: the bidirectional reference differs.
    bidirectional = hf_fixtures.reference_logits(ref, full, np.ones_like(full))
    assert max_relative_error(np.asarray(model(jnp.asarray(full))), bidirectional, np.ones(full.shape, bool)) > 1e-2


def test_fast_dllm_v2_logits_match_transformers_qwen2_block_causal_shifted(tmp_path):
    ref = hf_fixtures.make_fast_dllm_v2(tmp_path, bd_size=4)
    model, tokenizer = dllm.from_pretrained(tmp_path, dtype="float32")
    c = model.config
    assert (c.arch, c.attention, c.block_size, c.qkv_bias, c.token_shift, c.qk_norm) == (
        "qwen2", "block_causal", 4, True, True, False)
    assert tokenizer.mask_id == 95  # from the tokenizer's |<MASK>| token: config.json names none
    tokens, mask = batch_with_padding(c.vocab_size, tokenizer.mask_id)
    unshifted = hf_fixtures.reference_logits(ref, tokens, mask, block_size=4)
    expected = np.concatenate([unshifted[:, :1], unshifted[:, :-1]], axis=1)
    keep = mask.astype(bool)
    keep[1, 3] = False  # the padded row's first real token is predicted from a pad position
    assert max_relative_error(np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask))), expected, keep) <= 1e-4
    full = tokens[:1]
    unshifted = hf_fixtures.reference_logits(ref, full, np.ones_like(full), block_size=4)
    expected = np.concatenate([unshifted[:, :1], unshifted[:, :-1]], axis=1)
    assert max_relative_error(np.asarray(model(jnp.asarray(full))), expected, np.ones(full.shape, bool)) <= 1e-4


def test_block_causal_checkpoint_round_trips(tmp_path):
    hf_fixtures.make_sdar(tmp_path / "hf", block_size=4)
    model, tokenizer = dllm.from_pretrained(tmp_path / "hf")
    dllm.save_pretrained(model, tokenizer, tmp_path / "ours")
    again, _ = dllm.from_pretrained(tmp_path / "ours")
    assert again.config == model.config
    tokens = jnp.arange(3, 15)[None]
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(again(tokens)))


def test_block_causal_checkpoint_without_its_block_size_is_refused(tmp_path):
    hf_fixtures.make_sdar(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["block_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: a block-causal checkpoint without its block size: no 'block_size'"):
        dllm.from_pretrained(tmp_path)


@pytest.mark.parametrize("fields, message", [
    (dict(attention="block_causal"), r"ModelConfig.block_size=None: attention='block_causal' needs a positive int"),
    (dict(attention="block_causal", block_size=0), r"ModelConfig.block_size=0: .*positive int"),
    (dict(attention="bidirectional", block_size=8), r"ModelConfig.block_size=8 with attention='bidirectional'"),
    (dict(arch="llada", qk_norm=True), r"ModelConfig.qk_norm=True with arch='llada'"),
])
def test_bad_block_fields_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        dllm.ModelConfig(**fields)


def block_model(block_size=4, token_shift=False, seed=0):
    config = dllm.ModelConfig(arch="qwen3", qk_norm=True, vocab_size=40, d_model=32, n_layers=2, n_heads=4,
                              n_kv_heads=2, mlp_hidden=64, attention="block_causal", block_size=block_size,
                              token_shift=token_shift, max_seq_len=64)
    return dllm.Transformer(config, rngs=nnx.Rngs(seed))


def test_block_causal_left_padded_row_equals_row_alone():
    model = block_model()
    row = np.arange(3, 13)[None]
    padded = np.concatenate([np.zeros((1, 3), int), row], axis=1)
    mask = (padded > 0).astype(np.int32)
    alone = np.asarray(model(jnp.asarray(row)))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(padded), jnp.asarray(mask)))[:, 3:], alone,
                               rtol=1e-5, atol=1e-5)


def test_decoding_a_block_causal_model_refuses_caches_and_misaligned_blocks():
    model, special = block_model(), SpecialIds(mask=39, eos=38, eot=37, pad=0)
    with pytest.raises(ValueError, match=r"cache='dual' with a block-causal model .*allowed: cache='block' "
                                         r"\(exact\) or 'none'"):
        dllm.generate(model, [[3, 4, 5]], get_sampler("low_confidence"), gen_length=8, block_length=4,
                      cache="dual", special=special)
    with pytest.raises(ValueError, match=r"block_length=6 with a block-causal model of block_size=4: allowed "
                                         r"block lengths are multiples"):
        dllm.generate(model, [[3, 4, 5]], get_sampler("low_confidence"), gen_length=12, block_length=6,
                      special=special)
    causal = dllm.Transformer(dataclasses.replace(model.config, attention="causal", block_size=None),
                              rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"attention='causal': cached window steps .*cache='none'"):
        causal.forward_window(jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), jnp.int32), model.empty_cache(1, 8),
                             None, start=jnp.zeros((1,), jnp.int32), queries=4, logits_count=4, key_length=8)


def test_first_block_completes_the_prompts_model_block():
    """Prompts of 3 and 6 tokens, block 4: one token per step, the first block covers generation
    positions [0, 1) and [0, 2) (completing model blocks [0, 4) and [4, 8)), then blocks of 4."""
    model, special = block_model(), SpecialIds(mask=39, eos=38, eot=37, pad=0)
    result = dllm.generate(model, [[3, 4, 5], [3, 4, 5, 6, 7, 8]], get_sampler("low_confidence"), gen_length=8,
                           block_length=4, special=special)
    order = np.argsort(np.asarray(result.trace.commit_step), axis=-1)
    assert set(order[0, :1]) == {0} and set(order[0, 1:5]) == {1, 2, 3, 4}
    assert set(order[1, :2]) == {0, 1} and set(order[1, 2:6]) == {2, 3, 4, 5}


@pytest.mark.parametrize("token_shift", [False, True])
def test_two_l_forward_equals_each_noised_block_after_its_clean_prefix(token_shift):
    """The 2L forward [x_t ; x_0] against the direct route: for every block j, the model run on
    (clean blocks < j, noised block j) alone, with its ordinary block-causal forward."""
    block, mask_id = 4, 39
    model = block_model(block, token_shift)
    rng = np.random.default_rng(0)
    clean = rng.integers(3, 35, size=(2, 14))
    pad = 3
    clean[1, :pad] = 0
    attention_mask = np.ones((2, 14), np.int32)
    attention_mask[1, :pad] = 0
    noisy = np.where(rng.random((2, 14)) < 0.5, mask_id, clean)
    noisy[1, :pad] = 0
    two_l = np.asarray(jax.jit(lambda n, c, m: training.block_diffusion_logits(model, n, c, m))(
        jnp.asarray(noisy), jnp.asarray(clean), jnp.asarray(attention_mask)))
    for row, start in ((0, 0), (1, pad)):
        real_clean, real_noisy = clean[row, start:], noisy[row, start:]
        for j in range(-(-len(real_clean) // block)):
            lo, hi = j * block, min((j + 1) * block, len(real_clean))
            direct = np.asarray(model(jnp.asarray(np.concatenate([real_clean[:lo], real_noisy[lo:hi]])[None])))
            ours = two_l[row, start + lo:start + hi]
            if token_shift and row == 1 and j == 0:  # the first real token reads a pad column: skip it
                direct, ours = direct[:, 1:], ours[1:]
            np.testing.assert_allclose(ours, direct[0, -len(ours):], rtol=2e-5, atol=2e-5)


def test_block_noise_and_complementary_copy_by_hand():
    positions = jnp.asarray([[0, 1, 2, 3, 4, 5, 6, 7, 8]])
    t = diffusion.block_times(jax.random.key(0), positions, 4)
    assert t[0, 0] == t[0, 3] and t[0, 4] == t[0, 7] and len({float(x) for x in t[0, ::4]}) == 3
    tokens = jnp.asarray([[5, 6, 7, 8]])
    masked = jnp.asarray([[True, False, False, True]])
    maskable = jnp.asarray([[False, True, True, True]])
    copy, masked_copy, t_copy = diffusion.complementary_copy(tokens, masked, jnp.asarray([0.25]), 9, maskable)
    np.testing.assert_array_equal(copy, [[5, 9, 9, 8]])
    np.testing.assert_array_equal(masked_copy, [[False, True, True, False]])
    assert float(t_copy[0]) == 0.75


@pytest.mark.parametrize("options", [dict(), dict(complementary_mask=True),
                                     dict(block_noise="per_block", complementary_mask=True)])
def test_block_diffusion_training_loss_reads_the_two_l_forward(options):
    """A hand-built loss on the 2L logits: SFT cross-entropy over masked answer tokens, 1/t weighted."""
    model = block_model(4)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, 35, size=(3, 12)))
    batch = dict(tokens=tokens, attention_mask=jnp.ones((3, 12), jnp.int32),
                 answer_mask=jnp.asarray(np.arange(12) >= 5)[None].repeat(3, 0))
    key = jax.random.key(3)
    loss, _ = training.training_loss(graphdef, params, batch, key, objective="sft", mask_id=39,
                                          time_eps=1e-3, low_discrepancy=False, **options)
    time_key, mask_key = jax.random.split(key)
    positions = jnp.broadcast_to(jnp.arange(12), (3, 12))
    if options.get("block_noise") == "per_block":
        t = diffusion.block_times(time_key, positions, 4, 1e-3)
    else:
        t = jnp.broadcast_to(diffusion.sample_times(time_key, 3, 1e-3)[:, None], (3, 12))
    masked = (jax.random.uniform(mask_key, (3, 12)) < t) & batch["answer_mask"]
    rows = [(jnp.where(masked, 39, tokens), masked, t)]
    if options.get("complementary_mask"):
        rows.append((jnp.where(batch["answer_mask"] & ~masked, 39, tokens), batch["answer_mask"] & ~masked,
                     jnp.maximum(1 - t, 1e-3)))
    per_row = []
    for noisy, m, tt in rows:
        for b in range(3):
            logits = np.asarray(training.block_diffusion_logits(
                model, noisy[b:b + 1], tokens[b:b + 1], batch["attention_mask"][b:b + 1]))[0]
            log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            ce = -log_p[np.arange(12), np.asarray(tokens[b])]
            per_row.append(float(np.sum(np.where(m[b], ce / np.asarray(tt[b]), 0.0)) / 7))
    np.testing.assert_allclose(float(loss), np.mean(per_row), rtol=1e-5)


def test_block_options_on_a_bidirectional_model_are_refused(tmp_path):
    from dllm.data import DataConfig, make_data
    config = dllm.ModelConfig(vocab_size=57, d_model=32, n_layers=1, n_heads=2, mlp_hidden=64, max_seq_len=48)
    train = training.TrainConfig(steps=2, warmup_steps=0, batch_size=4, complementary_mask=True,
                                      workdir=str(tmp_path), progress=False, tensorboard=False)
    with pytest.raises(ValueError, match=r"complementary_mask=True are block-diffusion options; .*'bidirectional'"):
        training.train(config, train, make_data(DataConfig(n_per_task=4, eval_n_per_task=2), 4))
