"""Logits parity with PyTorch transformers, checkpoint round trips, bad input."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dllm
from dllm.models.layout import LAYOUT_FIELDS
from tests import hf_fixtures
from experiments.common import REPO_ROOT

PAD = 0


def batch_with_padding(vocab, mask_id, seed=0):
    """Row 0: 10 real tokens. Row 1: 3 pads, then 7 real tokens (some masked)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab - 4, size=(2, 10))
    tokens[1, :3] = PAD
    tokens[:, 6:8] = mask_id
    mask = np.ones((2, 10), np.int32)
    mask[1, :3] = 0
    return tokens, mask


def max_relative_error(ours, reference, keep):
    ours, reference = ours[keep], reference[keep]
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_llada_logits_match_transformers_llama(tmp_path, n_kv_heads):
    ref = hf_fixtures.make_llada(tmp_path, n_kv_heads=n_kv_heads)
    model, tokenizer = dllm.from_pretrained(tmp_path, dtype="float32")
    assert model.config.arch == "llada" and model.config.rope_theta == 500000.0
    tokens, mask = batch_with_padding(model.config.vocab_size, tokenizer.mask_id)
    expected = hf_fixtures.reference_logits(ref, tokens, mask)
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    assert max_relative_error(ours, expected, mask.astype(bool)) <= 1e-4
    # Without padding too, and the default arguments are the unpadded case.
    full = tokens[:1]
    expected = hf_fixtures.reference_logits(ref, full, np.ones_like(full))
    assert max_relative_error(np.asarray(model(jnp.asarray(full))), expected, np.ones(full.shape, bool)) <= 1e-4


def test_dream_logits_match_transformers_qwen2_shifted(tmp_path):
    ref = hf_fixtures.make_dream(tmp_path)
    model, tokenizer = dllm.from_pretrained(tmp_path, dtype="float32")
    assert model.config.token_shift and model.config.qkv_bias and model.config.n_kv_heads == 2
    tokens, mask = batch_with_padding(model.config.vocab_size, tokenizer.mask_id)
    unshifted = hf_fixtures.reference_logits(ref, tokens, mask)
    expected = np.concatenate([unshifted[:, :1], unshifted[:, :-1]], axis=1)
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    keep = mask.astype(bool)
    keep[1, 3] = False  # first real token of the padded row is predicted from a pad position
    assert max_relative_error(ours, expected, keep) <= 1e-4


def test_padded_row_equals_row_alone(tmp_path):
    hf_fixtures.make_llada(tmp_path)
    model, _ = dllm.from_pretrained(tmp_path)
    tokens, mask = batch_with_padding(model.config.vocab_size, 95)
    batched = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))[1, 3:]
    alone = np.asarray(model(jnp.asarray(tokens[1:, 3:])))[0]
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-5)


def test_logits_slice_matches_full(tmp_path):
    hf_fixtures.make_dream(tmp_path)
    model, _ = dllm.from_pretrained(tmp_path)
    tokens = jnp.arange(4, 16)[None]
    full = model(tokens)
    np.testing.assert_allclose(model(tokens, logits_start=5, logits_length=4), full[:, 5:9], rtol=1e-6)


def test_unrolled_layers_match_scanned(tmp_path):
    hf_fixtures.make_llada(tmp_path)
    scanned, _ = dllm.from_pretrained(tmp_path)
    unrolled, _ = dllm.from_pretrained(tmp_path, layout=dllm.Layout(scan_layers=False))
    tokens = jnp.arange(4, 14)[None]
    np.testing.assert_allclose(scanned(tokens), unrolled(tokens), rtol=1e-5, atol=1e-5)


def test_tokenizer_special_ids_come_from_the_checkpoint(tmp_path):
    hf_fixtures.make_llada(tmp_path / "llada")
    hf_fixtures.make_dream(tmp_path / "dream")
    _, llada = dllm.from_pretrained(tmp_path / "llada")
    _, dream = dllm.from_pretrained(tmp_path / "dream")
    assert llada.special_ids == {"mask": 95, "eos": 93, "eot": 94, "pad": 93}
    assert dream.special_ids == {"mask": 95, "eos": 93, "eot": 94, "pad": 92}
    assert llada.decode(llada.encode("w5 w7")) == "w5 w7"


def test_round_trip_hf_orbax_gives_identical_logits(tmp_path):
    hf_fixtures.make_dream(tmp_path / "hf")
    model, tokenizer = dllm.from_pretrained(tmp_path / "hf")
    dllm.save_pretrained(model, tokenizer, tmp_path / "ours")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"
    again, tokenizer2 = dllm.from_pretrained(tmp_path / "ours")
    assert again.config == model.config
    assert tokenizer2.special_ids == tokenizer.special_ids
    tokens = jnp.arange(3, 15)[None]
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(again(tokens)))


def test_bfloat16_load(tmp_path):
    hf_fixtures.make_llada(tmp_path)
    model, _ = dllm.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert model.q_proj[...].dtype == jnp.bfloat16
    assert model(jnp.arange(4, 10)[None]).dtype == jnp.float32


# ---------------------------------------------------------------- bad input


def test_missing_shard_names_the_file(tmp_path):
    hf_fixtures.make_llada(tmp_path, n_shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        dllm.from_pretrained(tmp_path)


def test_wrong_shape_names_tensor_expected_and_found(tmp_path):
    hf_fixtures.make_llada(tmp_path, n_shards=1)
    config = json.loads((tmp_path / "config.json").read_text())
    config["mlp_hidden_size"] = 128  # tensors hold 160
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"ff_proj.weight.*\(160, 64\).*expected \(128, 64\)"):
        dllm.from_pretrained(tmp_path)


def test_unknown_architecture(tmp_path):
    hf_fixtures.make_llada(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown architecture.*gpt2"):
        dllm.from_pretrained(tmp_path)


def test_missing_config_field(tmp_path):
    hf_fixtures.make_llada(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["n_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: missing config field 'n_layers'"):
        dllm.from_pretrained(tmp_path)


def test_tokenizer_without_mask_token(tmp_path):
    hf_fixtures.make_dream(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["mask_token_id"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf_fixtures.write_tokenizer(tmp_path, 96, {"<|endoftext|>": 93})
    with pytest.raises(ValueError, match="no mask token"):
        dllm.from_pretrained(tmp_path)


def test_orbax_checkpoint_of_another_shape(tmp_path):
    hf_fixtures.make_llada(tmp_path / "hf")
    model, tokenizer = dllm.from_pretrained(tmp_path / "hf")
    dllm.save_pretrained(model, tokenizer, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    config["d_model"] = 32
    config["head_dim"] = 8
    (tmp_path / "ours" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape .*config.json expects"):
        dllm.from_pretrained(tmp_path / "ours")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dllm.from_pretrained(tmp_path / "nope")
    shutil.rmtree(tmp_path)


def test_unrolled_layout_holds_one_dict_per_layer_and_converts_both_ways(tmp_path):
    """scan_layers=False: parameters blocks[i][name] (no [layers, ...] arrays to slice in a
    decode loop); checkpoints stay stacked, and conversions round-trip exactly."""
    from dllm.checkpoints import model_from_params
    from dllm.models.transformer import canonical_params

    hf_fixtures.make_dream(tmp_path / "hf")
    scanned, tokenizer = dllm.from_pretrained(tmp_path / "hf")
    unrolled = model_from_params(scanned.config, canonical_params(scanned), dllm.Layout(scan_layers=False))
    assert len(unrolled.blocks) == scanned.config.n_layers and not hasattr(unrolled, "q_proj")
    assert unrolled.blocks[1]["q_proj"][...].shape == scanned.q_proj[...].shape[1:]
    for name, value in canonical_params(unrolled).items():
        np.testing.assert_array_equal(value, canonical_params(scanned)[name], err_msg=name)
    dllm.save_pretrained(unrolled, tokenizer, tmp_path / "ours")  # written stacked, no layout in config.json
    assert not set(json.loads((tmp_path / "ours" / "config.json").read_text())) & set(LAYOUT_FIELDS)
    again, _ = dllm.from_pretrained(tmp_path / "ours", layout=dllm.Layout(scan_layers=False))
    assert again.layout.scan_layers is False
    tokens = jnp.arange(3, 15)[None]
    np.testing.assert_array_equal(np.asarray(again(tokens)), np.asarray(unrolled(tokens)))
    np.testing.assert_allclose(unrolled(tokens), scanned(tokens), rtol=1e-5, atol=1e-5)


def test_scan_unroll_keeps_the_parameters_and_the_logits(tmp_path):
    """Layout.scan_unroll runs several stacked layers per scan iteration: same parameters (stacked), same
    logits and cache as one layer per iteration; a bad value is refused."""
    from dllm.checkpoints import model_from_params
    from dllm.models.transformer import canonical_params

    hf_fixtures.make_llada(tmp_path)
    model, _ = dllm.from_pretrained(tmp_path)
    unrolled = model_from_params(model.config, canonical_params(model), dllm.Layout(scan_unroll=model.config.n_layers))
    assert unrolled.q_proj[...].shape == model.q_proj[...].shape  # still stacked [layers, ...]
    tokens = jnp.arange(4, 16)[None]
    np.testing.assert_allclose(unrolled(tokens), model(tokens), rtol=1e-6, atol=1e-6)
    _, cache_a = unrolled.forward(tokens, None, cache=unrolled.empty_cache(1, 12))
    _, cache_b = model.forward(tokens, None, cache=model.empty_cache(1, 12))
    np.testing.assert_allclose(cache_a.k, cache_b.k, rtol=1e-6, atol=1e-6)
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="Layout.scan_unroll=.*must be an int >= 1"):
            dllm.Layout(scan_unroll=bad)


def test_no_attention_mask_equals_an_all_ones_mask(tmp_path):
    """attention_mask=None (no padding anywhere) runs unmasked attention: same logits."""
    hf_fixtures.make_llada(tmp_path)
    model, _ = dllm.from_pretrained(tmp_path)
    tokens = jnp.arange(4, 16)[None]
    np.testing.assert_allclose(model(tokens), model(tokens, jnp.ones_like(tokens)), rtol=1e-6, atol=1e-6)
    empty = model.empty_cache(1, 12)
    _, cache_a = model.forward(tokens, None, logits_start=4, logits_length=8, cache=empty)
    _, cache_b = model.forward(tokens, jnp.ones_like(tokens), logits_start=4, logits_length=8, cache=empty)
    np.testing.assert_allclose(cache_a.k, cache_b.k, rtol=1e-6, atol=1e-6)


def test_window_key_length_equals_a_key_mask(tmp_path):
    """A cached window step with no prompt padding hides the cache tail by key length
    (the fused kernels' native padding mask) instead of a [B, S] mask: same logits."""
    hf_fixtures.make_llada(tmp_path)
    model, _ = dllm.from_pretrained(tmp_path)
    tokens = jnp.arange(4, 16)[None]
    _, cache = model.forward(tokens, None, logits_start=4, logits_length=8, cache=model.empty_cache(1, 15))
    key_mask = jnp.pad(jnp.ones_like(tokens), ((0, 0), (0, 3)))
    canvas = jnp.pad(tokens, ((0, 0), (0, 3)))
    window = dict(tokens=canvas, positions=jnp.arange(15)[None], start=jnp.array([6]), cache=cache, queries=4)
    masked, cache_a = model.forward_window(**window, key_mask=key_mask, logits_count=4)
    by_length, cache_b = model.forward_window(**window, key_mask=None, logits_count=4, key_length=12)
    np.testing.assert_allclose(masked, by_length, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(cache_a.k), np.asarray(cache_b.k))


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_fused_projections_load_from_hf_and_orbax_and_match_transformers(tmp_path, arch):
    """fused_projections: q/k/v as one qkv_proj [d, 3, heads, head_dim] (multi-head attention;
    Dream's GQA: one gqa_qkv_proj [d, kv_heads, group + 2, head_dim]) and gate/up as one
    gate_up_proj [d, 2, mlp], stacked on the host at load (also when placed per layer),
    unfused again in checkpoints."""
    from dllm.checkpoints import model_from_params
    from dllm.models.transformer import canonical_params
    from dllm.sharding import MeshConfig, Placer, make_mesh

    make = hf_fixtures.make_llada if arch == "llada" else hf_fixtures.make_dream
    ref = make(tmp_path / "hf")
    plain, tokenizer = dllm.from_pretrained(tmp_path / "hf", dtype="float32")
    tokens, mask = batch_with_padding(plain.config.vocab_size, tokenizer.mask_id)
    expected = np.asarray(plain(jnp.asarray(tokens), jnp.asarray(mask)))
    if arch == "llada":  # and against transformers itself
        reference = hf_fixtures.reference_logits(ref, tokens, mask)
    placer = Placer(make_mesh(MeshConfig(), devices=jax.devices()[:1]))
    for scan_layers in (True, False):
        fused, _ = dllm.from_pretrained(tmp_path / "hf", dtype="float32", place=placer,
                                        layout=dllm.Layout(scan_layers=scan_layers, fused_projections=True))
        layers = fused.layer_params()
        first = layers[0] if not scan_layers else jax.tree.map(lambda a: a[0], layers)
        assert not {"gate_proj", "up_proj", "q_proj", "k_proj", "v_proj"} & set(first)
        assert first["gate_up_proj"].shape == (64, 2, 160)
        if arch == "llada":
            assert first["qkv_proj"].shape == (64, 3, 4, 16)
        else:  # per KV head g: query heads 2g and 2g + 1, then k head g, then v head g
            assert first["gqa_qkv_proj"].shape == (64, 2, 2 + 2, 16)
            canonical = canonical_params(plain)
            np.testing.assert_array_equal(first["gqa_qkv_proj"][:, 1, 1], canonical["q_proj"][0][:, 3])
            np.testing.assert_array_equal(first["gqa_qkv_proj"][:, 1, 2], canonical["k_proj"][0][:, 1])
            np.testing.assert_array_equal(first["gqa_qkv_proj"][:, 0, 3], canonical["v_proj"][0][:, 0])
            assert placer.logical_axes("gqa_qkv_proj") == ("layers", "embed", "kv_heads", "qkv_group", "head_dim")
        ours = np.asarray(fused(jnp.asarray(tokens), jnp.asarray(mask)))
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
        if arch == "llada":
            assert max_relative_error(ours, reference, mask.astype(bool)) <= 1e-4
        for name, value in canonical_params(fused).items():  # unfused exactly
            np.testing.assert_array_equal(value, canonical_params(plain)[name], err_msg=name)
    dllm.save_pretrained(fused, tokenizer, tmp_path / "ours")
    again, _ = dllm.from_pretrained(tmp_path / "ours", place=placer, layout=fused.layout)
    assert again.layout.fused_projections and not again.layout.scan_layers
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(tokens), jnp.asarray(mask))), ours)
    # A canonical dict whose q/k/v shapes disagree is refused with the name and both shapes.
    bad = canonical_params(plain)
    bad["up_proj"] = bad["up_proj"][:, :, :8]
    with pytest.raises(ValueError, match=r"'up_proj' has shape \(2, 64, 8\), the config expects \(2, 64, 160\)"):
        model_from_params(plain.config, bad, dllm.Layout(fused_projections=True))


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_fused_projections_decode_the_same_tokens(tmp_path, arch):
    """The engine with fused GEMMs (cached and uncached) commits the tokens of the unfused model
    (Dream: grouped-query attention, q/k/v joined on the heads axis)."""
    import samplers
    from dllm.decoding import SpecialIds

    (hf_fixtures.make_llada if arch == "llada" else hf_fixtures.make_dream)(tmp_path)
    plain, tokenizer = dllm.from_pretrained(tmp_path, dtype="float32")
    fused, _ = dllm.from_pretrained(tmp_path, dtype="float32", layout=dllm.Layout(scan_layers=False,
                                                                                   fused_projections=True))
    special = SpecialIds(mask=tokenizer.mask_id, eos=1, eot=1, pad=PAD)
    prompts = np.arange(5, 17).reshape(2, 6)
    for cache in ("none", "dual"):
        runs = [dllm.generate(m, prompts, samplers.Threshold(tau=0.5), gen_length=8, block_length=4,
                              special=special, cache=cache, key=jax.random.key(0)) for m in (plain, fused)]
        np.testing.assert_array_equal(np.asarray(runs[0].tokens), np.asarray(runs[1].tokens), err_msg=cache)


def test_window_attention_impl_defaults_to_xla_for_short_windows_only():
    """None: XLA's attention for steps of <= 64 query rows (batch x window: the dual
    cache's block at batch 1), the full forwards' `attention_impl` for more;
    an explicit value always wins; a bad one is refused naming the allowed ones."""
    from dllm.models.transformer import window_attention_impl

    config, layout = dllm.ModelConfig(), dllm.Layout(attention_impl="cudnn")
    assert window_attention_impl(config, layout, 32) == "xla" and window_attention_impl(config, layout, 256) == "cudnn"
    assert window_attention_impl(config, layout.replace(window_attention_impl="cudnn"), 32) == "cudnn"
    with pytest.raises(ValueError, match="window_attention_impl='flash': allowed None, 'xla', 'cudnn'"):
        dllm.Layout(window_attention_impl="flash")
    with pytest.raises(ValueError, match=r"from_pretrained\(scan_layers=...\): these are Layout fields"):
        dllm.from_pretrained(REPO_ROOT / "checkpoints" / "tiny-tasks", scan_layers=False)
