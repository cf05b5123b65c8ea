"""Sharding on 8 simulated CPU devices: meshes data=8 and fsdp=2 x tensor=4.

XLA_FLAGS must be set before jax is imported, and the rest of the suite runs
in this pytest process on one device, so the multi-device work runs in one
worker subprocess per mesh: this file is also a script,

    python tests/test_sharding.py MESH OUT.json    # MESH: data8 | fsdp2_tensor4

Both workers start together (module fixture; each is CPU-only, also on a GPU
machine) and the tests read their outputs. A worker runs every case twice:
unsharded (`mesh=None`, one device: the reference) and on its mesh. Tokens
and NFE must be equal; losses and parameters after two sharded updates are
compared with allclose (sharded reductions reassociate float sums).

Decoding cases: compiling the decode loop dominates the time (~2 s per case
and mesh on CPU), so by default each mesh runs half of the sampler x cache
mode grid, chosen so that each mesh covers every sampler and every cache
mode and the two meshes together cover every pair (`grid_cases`).
DLLM_SHARDING_FULL=1 runs the whole grid on both meshes (~3x slower).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER_ENV = {
    # Eight simulated devices; the last two flags cut the (dominant) CPU compile time by about a third
    # and apply equally to the sharded and the reference run.
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                 "--xla_llvm_disable_expensive_passes=true",
    "JAX_PLATFORMS": "cpu",  # simulated devices, also on a GPU machine
}
if __name__ == "__main__":
    os.environ.update(WORKER_ENV)
    sys.path.insert(0, str(REPO))

import contextlib
import dataclasses
import io
import json
import subprocess
import tempfile
import time

import jax
import numpy as np
import pytest
from flax import nnx

import dllm
import samplers
from dllm import sharding
from dllm.decoding import SpecialIds
from dllm.sharding import DEFAULT_RULES, MeshConfig
from jax.sharding import PartitionSpec as P
from tests.helpers import refusal, registered_samplers

MESHES = {
    "data8": {"data": 8, "fsdp": 1, "tensor": 1},
    "fsdp2_tensor4": {"data": 1, "fsdp": 2, "tensor": 4},
}
SPECIAL = SpecialIds(mask=63, eos=62, eot=62, pad=0)
MODEL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden=64, max_seq_len=48)
# Eight prompts of different lengths (left padding differs per row); 8 divides over data=8 and fsdp=2.
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [19, 20, 21], [22, 23, 24, 25],
           [26, 27, 28, 29, 30, 31], [32], [33, 34, 35, 36, 37]]
CACHE_MODES = ("none", "prefix", "dual")
BLOCK_CAUSAL_MODES = ("none", "block")
ELASTIC_LAYOUTS = {"scanned": dllm.Layout(), "unrolled": dllm.Layout(scan_layers=False)}
DECODE = dict(gen_length=16, block_length=8)  # two blocks; 8 is the block the bundled learned filter needs


def decode_model(mesh=None):
    """Dream-style (qkv biases, token shift), initialized by one jitted call (eager init compiles op by op)."""
    config = dllm.ModelConfig(arch="dream", qkv_bias=True, token_shift=True, **MODEL)
    mesh = mesh or sharding.make_mesh(MeshConfig(num_devices=1))
    model = sharding.init_model(config, mesh, DEFAULT_RULES, seed=3)
    model.lm_head[...] = model.lm_head[...] * 40.0  # spread logits away from ties
    return model


def all_samplers():
    return registered_samplers(delimiter_id=SPECIAL.eos, vocab_size=MODEL["vocab_size"], special=SPECIAL)


def grid_cases(mesh: str, full: bool = False):
    """(name, sampler, generate kwargs) that `mesh` decodes: sampler i with cache mode j where
    (i + j) is even on data8 and odd on fsdp2_tensor4 (all pairs if `full`); data8 also samples
    with temperature and CFG (the noise and the doubled batch under a split batch)."""
    parity = list(MESHES).index(mesh)
    cases = []
    for i, (name, sampler) in enumerate(all_samplers().items()):
        accepted = [(j, mode) for j, mode in enumerate(CACHE_MODES) if not refusal(sampler, **DECODE, cache=mode)]
        mine = [(j, mode) for j, mode in accepted if full or (i + j) % 2 == parity]
        # a sampler that runs fewer modes (self_speculative: uncached only) still runs on each mesh
        cases += [(f"{name}/{mode}", sampler, dict(cache=mode)) for _, mode in (mine or accepted[:1])]
    if mesh == "data8" or full:
        cases.append(("low_confidence/temperature+cfg", samplers.LowConfidence(),
                      dict(temperature=1.0, cfg_scale=1.0)))
    return cases


def full_grid() -> bool:
    return os.environ.get("DLLM_SHARDING_FULL", "0") not in ("", "0")


# --------------------------------------------------------------------------- #
# The worker (runs under 8 simulated devices)
# --------------------------------------------------------------------------- #


def reference_and_sharded(reference, sharded, mesh, sampler, **kw) -> dict:
    """{"reference": ..., "sharded": ...}: tokens, NFE and token sharding of one decode of PROMPTS
    by `reference` on one device and by `sharded` on `mesh`."""
    runs = {}
    for run, (m, on) in {"reference": (reference, None), "sharded": (sharded, mesh)}.items():
        result = dllm.generate(m, PROMPTS, sampler, **DECODE, special=SPECIAL, key=jax.random.key(7), mesh=on, **kw)
        runs[run] = {"tokens": np.asarray(result.tokens).tolist(), "nfe": np.asarray(result.nfe).tolist(),
                     "token_spec": str(getattr(result.tokens.sharding, "spec", None))}
    return runs


def run_worker(name: str) -> dict:
    from dllm.data import DataConfig, make_data
    from dllm.training import TrainConfig, init_training, params_of

    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.make_mesh(MeshConfig(axes=MESHES[name]))
    out: dict = {"decode": {}, "seconds": {}}
    model = decode_model()

    start = time.perf_counter()
    try:  # the check fails while the parameters are still on one device
        sharding.assert_sharded(model, mesh, DEFAULT_RULES)
        out["unsharded_passes"] = True
    except AssertionError as e:
        out["unsharded_passes"], out["unsharded_message"] = False, str(e)
    sharded_model = sharding.shard_model(decode_model(), mesh, DEFAULT_RULES)
    born = decode_model(mesh)  # initialized straight into the shards: same values, same layout
    assert sharding.assert_sharded(born, mesh, DEFAULT_RULES) == sharding.assert_sharded(sharded_model, mesh)
    for (name_, a), b in zip(params_of(born).items(), params_of(sharded_model).values()):
        np.testing.assert_array_equal(a, b, err_msg=name_)
    out["fraction_per_device"] = sharding.assert_sharded(sharded_model, mesh, DEFAULT_RULES)
    out["specs"] = {k: str(v.spec) for k, v in sharding.param_shardings(model, mesh, DEFAULT_RULES).items()}
    out["actual_specs"] = {k: str(v.sharding.spec) for k, v in nnx.to_pure_dict(nnx.state(sharded_model)).items()}

    for case, sampler, kw in grid_cases(name, full_grid()):
        out["decode"][case] = reference_and_sharded(model, sharded_model, mesh, sampler, **kw)
    # Unrolled layers (a parameter dict and a KV buffer per layer) decode sharded as the scanned model does.
    from dllm.checkpoints import model_from_params
    from dllm.models.transformer import canonical_params

    unrolled = sharding.shard_model(model_from_params(model.config, canonical_params(model),
                                                      dllm.Layout(scan_layers=False)), mesh, DEFAULT_RULES)
    for mode in ("none", "dual"):
        out["decode"][f"threshold/{mode}/unrolled-layers"] = reference_and_sharded(
            model, unrolled, mesh, samplers.Threshold(), cache=mode)
    # The same weights, block-causal (blocks of 4, token shift): uncached and over the exact block cache.
    block_config = dataclasses.replace(model.config, attention="block_causal", block_size=4)
    block_model = model_from_params(block_config, canonical_params(model))
    sharded_block = sharding.shard_model(model_from_params(block_config, canonical_params(model)), mesh,
                                         DEFAULT_RULES)
    for mode in BLOCK_CAUSAL_MODES:
        out["decode"][f"threshold/{mode}/block-causal"] = reference_and_sharded(
            block_model, sharded_block, mesh, samplers.Threshold(), cache=mode)
    # The same weights without token shift over Elastic-Cache (its buffer: queries and layer inputs too),
    # scanned and unrolled.
    plain_config = dataclasses.replace(model.config, token_shift=False)
    plain = model_from_params(plain_config, canonical_params(model))
    for layout_name, layout in ELASTIC_LAYOUTS.items():
        sharded_plain = sharding.shard_model(model_from_params(plain_config, canonical_params(model), layout), mesh,
                                             DEFAULT_RULES)
        out["decode"][f"threshold/elastic/{layout_name}"] = reference_and_sharded(
            plain, sharded_plain, mesh, samplers.Threshold(), cache="elastic", sliding_window=4)
    # Continuous batching: 16 prompts through 8 slots split over the mesh, against one static batch on one device.
    queue = PROMPTS + PROMPTS[::-1]
    out["continuous"] = {}
    for mode in ("none", "dual"):
        runs = {}
        for run, (m, on, slots) in {"reference": (model, None, None), "sharded": (sharded_model, mesh, 8)}.items():
            result = dllm.generate(m, queue, samplers.Threshold(), **DECODE, special=SPECIAL, key=jax.random.key(7),
                                   mesh=on, slots=slots, cache=mode)
            runs[run] = {"tokens": np.asarray(result.tokens).tolist(), "nfe": np.asarray(result.nfe).tolist()}
        out["continuous"][mode] = runs
    out["seconds"]["decode"] = time.perf_counter() - start

    start = time.perf_counter()  # the first two updates of `train` on the mesh (and on one device, once)
    config = TrainConfig(steps=2, batch_size=8, lr=1e-2, warmup_steps=1, progress=False, tensorboard=False)
    data = make_data(DataConfig(tasks=("copy", "reverse"), n_per_task=8, eval_n_per_task=4), 8, 0)
    model_config = dllm.ModelConfig(**MODEL)
    one_device = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    out["train"] = {}
    runs = {"reference": one_device, "sharded": mesh} if name == "data8" else {"sharded": mesh}
    for run, on in runs.items():
        layout = sharding.Placement.of(on, DEFAULT_RULES)
        _, params, opt_state, _, train_step, _ = init_training(model_config, config, data.tokenizer.mask_id, layout)
        losses = []
        for step in range(2):
            params, opt_state, metrics = train_step(params, opt_state, layout.put_batch(data.train.batch(step)),
                                                    np.int32(step))
            losses.append(float(metrics["loss"]))
        sharding.assert_sharded(nnx.eval_shape(lambda: dllm.Transformer(model_config, rngs=nnx.Rngs(0))), on,
                                DEFAULT_RULES, params=params)
        out["train"][run] = {"losses": losses, "params": {k: np.asarray(v).tolist() for k, v in params.items()},
                             "moments_follow_params": all(  # AdamW moments sharded as their parameter
                                 opt_state[1][0].mu[k].sharding.is_equivalent_to(v.sharding, v.ndim)
                                 for k, v in params.items())}
    out["seconds"]["train"] = time.perf_counter() - start

    if name == "fsdp2_tensor4":  # loading born sharded: HF-style host arrays, and our orbax folder
        from dllm.checkpoints import model_from_params
        from dllm.data import task_tokenizer

        placer = sharding.Placer(mesh, DEFAULT_RULES)
        host = {k: np.asarray(v) for k, v in params_of(sharded_model).items()}
        placed = model_from_params(sharded_model.config, {k: placer(k, v) for k, v in host.items()})
        folder = dllm.save_pretrained(sharded_model, task_tokenizer(), Path(tempfile.mkdtemp()) / "model")
        restored, _ = dllm.from_pretrained(folder, place=placer)
        # Unrolled layout: each layer's tensor placed on its own (Placer names blocks/{i}/{name}),
        # and our stacked orbax folder restored sharded, then split per layer.
        from dllm.models.transformer import canonical_params, layer_param_shapes

        unrolled = dllm.Layout(scan_layers=False)
        per_layer = {k: ([placer(f"blocks/{i}/{k}", v[i]) for i in range(len(v))]
                         if k in layer_param_shapes(sharded_model.config) else placer(k, v)) for k, v in host.items()}
        placed_unrolled = model_from_params(sharded_model.config, per_layer, unrolled)
        restored_unrolled, _ = dllm.from_pretrained(folder, place=placer, layout=unrolled)
        # Fused q/k/v and gate/up (fused_projections): stacked after the sharded restore, then placed.
        restored_fused, _ = dllm.from_pretrained(folder, place=placer, layout=unrolled.replace(fused_projections=True))
        assert "qkv_proj" in restored_fused.layer_params()[0]
        for loaded in (placed, restored, placed_unrolled, restored_unrolled, restored_fused):
            assert sharding.assert_sharded(loaded, mesh, DEFAULT_RULES) == out["fraction_per_device"]
            for k, v in canonical_params(loaded).items():
                np.testing.assert_array_equal(v, host[k], err_msg=k)
        out["loaded_sharded"] = True
    out["seconds"]["cpu"] = time.process_time()

    if name == "fsdp2_tensor4":  # bad input that needs a mesh with axes of size > 1
        errors = {}
        gqa = nnx.eval_shape(lambda: dllm.Transformer(dllm.ModelConfig(**{**MODEL, "n_kv_heads": 2}),
                                                      rngs=nnx.Rngs(0)))
        for what, fn in {
            "indivisible_param": lambda: sharding.shard_model(gqa, mesh, DEFAULT_RULES),
            "indivisible_batch": lambda: dllm.generate(model, PROMPTS[:3], samplers.LowConfidence(), **DECODE,
                                                       special=SPECIAL, mesh=mesh),
            "place_indivisible": lambda: sharding.Placer(mesh, DEFAULT_RULES)("embed", np.zeros((30, 32))),
        }.items():
            try:
                fn()
                errors[what] = None
            except ValueError as e:
                errors[what] = str(e)
        out["errors"] = errors
        notice = io.StringIO()
        with contextlib.redirect_stdout(notice):  # a preset's rules fitted to a model they cannot split
            fitted = sharding.fit_rules(DEFAULT_RULES, mesh, gqa)
        sharding.Placement.of(mesh, fitted).param_shardings(gqa)  # no error now
        out["fitted"] = {"rules": [[k, list(v) if v else None] for k, v in fitted], "notice": notice.getvalue()}
        # The train entry point fits a preset too: the GQA model trains on fsdp=2 x tensor=4 with kv_heads
        # replicated (and a notice), and the preset's fit_to_model=false refuses it naming the axis.
        from dllm.training import train

        gqa_config = dllm.ModelConfig(**{**MODEL, "n_kv_heads": 2})
        preset = MeshConfig(axes={"data": 1, "fsdp": 2, "tensor": 4}, fit_to_model=True)
        train_notice = io.StringIO()
        with contextlib.redirect_stdout(train_notice):
            trained = train(gqa_config, dataclasses.replace(config, workdir=tempfile.mkdtemp()), data,
                            devices=jax.devices(), mesh_config=preset)
        try:
            train(gqa_config, dataclasses.replace(config, workdir=tempfile.mkdtemp()), data, devices=jax.devices(),
                  mesh_config=dataclasses.replace(preset, fit_to_model=False))
            unfitted = None
        except ValueError as e:
            unfitted = str(e)
        out["fitted_train"] = {"notice": train_notice.getvalue(), "steps": trained.step, "unfitted": unfitted}
    return out


# --------------------------------------------------------------------------- #
# The tests
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module", autouse=True)
def started_workers(request, tmp_path_factory):
    """Starts one worker per mesh, all at once, when the module's first test runs (if any selected test
    needs them), so that the in-process tests overlap with them."""
    needed = any("workers" in getattr(item, "fixturenames", ()) and item.module is request.module
                 for item in request.session.items)
    if not needed:
        yield {}
        return
    folder = tmp_path_factory.mktemp("sharding")
    env = {**os.environ, **WORKER_ENV}
    running = {name: (subprocess.Popen([sys.executable, __file__, name, str(folder / f"{name}.json")], env=env,
                                       cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                      folder / f"{name}.json") for name in MESHES}
    yield running
    for process, _ in running.values():
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="module")
def workers(started_workers):
    """{mesh: output dict} of the finished workers."""
    outputs = {}
    for name, (process, path) in started_workers.items():
        log, _ = process.communicate(timeout=900)
        assert process.returncode == 0, f"worker {name} failed:\n{log[-5000:]}"
        outputs[name] = json.loads(path.read_text())
    return outputs


# ----------------------------------------------------------- in this process


def test_mesh_config_sizes_and_errors():
    assert MeshConfig(axes={"data": -1, "fsdp": 2, "tensor": 4}).sizes(16) == {"data": 2, "fsdp": 2, "tensor": 4}
    with pytest.raises(ValueError, match=r"mesh axes \{'data': 2, 'fsdp': 2, 'tensor': 1\} multiply to 4 "
                                         r"devices, but there are 8"):
        MeshConfig(axes={"data": 2, "fsdp": 2, "tensor": 1}).sizes(8)
    with pytest.raises(ValueError, match=r"mesh axes \{'data': -1, 'fsdp': 1, 'tensor': 3\} do not fit 8 devices"):
        MeshConfig(axes={"data": -1, "fsdp": 1, "tensor": 3}).sizes(8)
    with pytest.raises(ValueError, match=r"multiply to 2 devices, but there are 1"):
        sharding.make_mesh(MeshConfig(axes={"data": 2, "fsdp": 1, "tensor": 1}), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(axes={"data": -1, "fsdp": -1, "tensor": 1})
    with pytest.raises(ValueError, match=r"MeshConfig.axes\['tensor'\]=0: allowed an int >= 1, or -1"):
        MeshConfig(axes={"data": -1, "fsdp": 1, "tensor": 0})
    mesh = sharding.make_mesh(MeshConfig(axes={"data": 1, "fsdp": 1, "tensor": 1}, num_devices=1))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_rules_naming_an_unknown_mesh_axis_raise():
    with pytest.raises(ValueError, match=r"rule \('heads', \['model'\]\) names mesh axis 'model', which the mesh "
                                         r"does not have; mesh axes: \('data', 'fsdp', 'tensor'\)"):
        MeshConfig(rules=[["batch", "data"], ["heads", "model"]])
    with pytest.raises(ValueError, match="names mesh axis 'model'"):
        sharding.logical_to_spec(("heads",), [("heads", "model")], mesh_axes=("data",))
    with pytest.raises(ValueError, match=r"rules\[0\]=\['heads'\]: each rule is a pair"):
        sharding.normalize_rules([["heads"]])


def test_logical_to_spec_first_free_rule_wins():
    spec = sharding.logical_to_spec
    assert spec(("layers", "embed", "heads", "head_dim"), DEFAULT_RULES) == P(None, "fsdp", "tensor", None)
    assert spec(("batch", "length", "embed"), DEFAULT_RULES) == P(("data", "fsdp"), None, None)
    # A dimension cannot reuse a mesh axis: the second "mlp" falls through to its next rule.
    rules = [("mlp", "tensor"), ("mlp", "fsdp")]
    assert spec(("mlp", "mlp"), rules) == P("tensor", "fsdp")
    assert spec(("unknown", None), rules) == P(None, None)
    assert spec(("mlp",), [("mlp", None), ("mlp", "tensor")]) == P(None)  # an explicit null wins


def test_every_mesh_preset_builds():
    from omegaconf import OmegaConf

    presets = sorted((REPO / "configs" / "mesh").glob("*.yaml"))
    assert {p.stem for p in presets} == {"single", "data", "fsdp_tensor"}
    for path in presets:
        config = MeshConfig(**OmegaConf.to_container(OmegaConf.load(path)))
        assert config.rules == DEFAULT_RULES, path.name
    single = MeshConfig(**OmegaConf.to_container(OmegaConf.load(REPO / "configs/mesh/single.yaml")))
    assert dict(sharding.make_mesh(single).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    fsdp_tensor = MeshConfig(**OmegaConf.to_container(OmegaConf.load(REPO / "configs/mesh/fsdp_tensor.yaml")))
    assert fsdp_tensor.sizes(8) == {"data": 1, "fsdp": 2, "tensor": 4}


def test_the_two_meshes_cover_every_sampler_and_cache_mode_pair():
    for mesh in MESHES:  # each mesh alone: every sampler and every cache mode
        names = [case for case, _, _ in grid_cases(mesh)]
        assert {n.split("/")[0] for n in names} == set(samplers.sampler_names())
        assert {n.split("/")[1] for n in names} >= set(CACHE_MODES)
    together = {case for mesh in MESHES for case, _, _ in grid_cases(mesh)}
    accepted = {f"{name}/{mode}" for name, sampler in all_samplers().items() for mode in CACHE_MODES
                if not refusal(sampler, **DECODE, cache=mode)}
    assert together >= accepted
    # self_speculative runs uncached only (its prefix/dual refusals: tests/test_sampler_self_speculative.py)
    assert len(accepted) == len(CACHE_MODES) * len(samplers.sampler_names()) - 2


def test_one_device_mesh_is_the_plain_path():
    mesh = sharding.make_mesh(MeshConfig(num_devices=1))
    model = decode_model()
    kwargs = dict(**DECODE, special=SPECIAL)
    expected = dllm.generate(model, PROMPTS[:2], samplers.LowConfidence(), **kwargs)
    got = dllm.generate(model, PROMPTS[:2], samplers.LowConfidence(), mesh=mesh, **kwargs)
    np.testing.assert_array_equal(got.tokens, expected.tokens)


# ----------------------------------------------------------- in the workers


@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_generate_gives_the_tokens_of_one_device(workers, mesh):
    decoded = workers[mesh]["decode"]
    unrolled = {f"threshold/{mode}/unrolled-layers" for mode in ("none", "dual")}
    block_causal = {f"threshold/{mode}/block-causal" for mode in BLOCK_CAUSAL_MODES}
    elastic = {f"threshold/elastic/{layout}" for layout in ELASTIC_LAYOUTS}
    assert set(decoded) == {case for case, _, _ in grid_cases(mesh, full_grid())} | unrolled | block_causal | elastic
    # the exact block cache, sharded or not, gives the uncached block-causal tokens
    assert decoded["threshold/block/block-causal"]["reference"] == decoded["threshold/none/block-causal"]["reference"]
    for case, runs in decoded.items():
        reference, sharded = runs["reference"], runs["sharded"]
        np.testing.assert_array_equal(sharded["tokens"], reference["tokens"], err_msg=f"{mesh} {case}")
        np.testing.assert_array_equal(sharded["nfe"], reference["nfe"], err_msg=f"{mesh} {case}")
        assert sharded["token_spec"] == ("P('data',)" if mesh == "data8" else "P('fsdp',)")
        assert not np.any(np.asarray(reference["tokens"]) == SPECIAL.mask), case


@pytest.mark.parametrize("mesh", list(MESHES))
def test_continuous_batching_over_a_mesh_gives_the_tokens_of_one_static_batch(workers, mesh):
    """16 prompts through 8 slots on the mesh (rows refilled mid-loop) equal one static batch of 16 on one
    device, uncached and over the dual cache."""
    for mode, runs in workers[mesh]["continuous"].items():
        np.testing.assert_array_equal(runs["sharded"]["tokens"], runs["reference"]["tokens"], err_msg=f"{mesh} {mode}")
        np.testing.assert_array_equal(runs["sharded"]["nfe"], runs["reference"]["nfe"], err_msg=f"{mesh} {mode}")
        assert len(runs["reference"]["nfe"]) == 16 and not np.any(np.asarray(runs["reference"]["tokens"]) == SPECIAL.mask)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_train_steps_give_the_loss_of_one_device(workers, mesh):
    reference, sharded = workers["data8"]["train"]["reference"], workers[mesh]["train"]["sharded"]
    assert len(sharded["losses"]) == 2 and sharded["losses"][0] != sharded["losses"][1]
    np.testing.assert_allclose(sharded["losses"], reference["losses"], rtol=1e-5)
    for name, value in reference["params"].items():
        np.testing.assert_allclose(sharded["params"][name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    assert sharded["moments_follow_params"]


def test_parameters_are_sharded_as_the_rules_say(workers):
    out = workers["fsdp2_tensor4"]
    expected = {  # DEFAULT_RULES by hand: embed -> fsdp, heads/kv_heads/mlp/vocab -> tensor
        "embed": "P('tensor', 'fsdp')", "lm_head": "P('fsdp', 'tensor')", "final_norm": "P('fsdp',)",
        "q_proj": "P(None, 'fsdp', 'tensor', None)", "k_proj": "P(None, 'fsdp', 'tensor', None)",
        "q_bias": "P(None, 'tensor', None)", "o_proj": "P(None, 'tensor', None, 'fsdp')",
        "gate_proj": "P(None, 'fsdp', 'tensor')", "down_proj": "P(None, 'tensor', 'fsdp')",
        "attn_norm": "P(None, 'fsdp')",
    }
    for name, spec in expected.items():
        assert out["specs"][name] == spec, name
        assert out["actual_specs"][name] == spec, name
    # Norms are split 2 ways, everything else 8: each device holds a little over 1/8.
    assert 1 / 8 <= out["fraction_per_device"] < 0.15
    assert not out["unsharded_passes"]
    assert "q_proj: logical axes ('layers', 'embed', 'heads', 'head_dim') -> P(None, 'fsdp', 'tensor', None)" \
        in out["unsharded_message"]
    data = workers["data8"]  # data parallelism: the rules name only size-1 axes, so nothing is split,
    assert data["fraction_per_device"] == 1.0  # but the parameters must be on the mesh's 8 devices
    assert not data["unsharded_passes"] and "q_proj: logical axes" in data["unsharded_message"]


def test_indivisible_dimensions_name_the_parameter_axis_and_sizes(workers):
    errors = workers["fsdp2_tensor4"]["errors"]
    assert errors["indivisible_param"] == (
        "parameter 'k_proj': dimension 2 ('kv_heads') of size 2 does not divide over mesh axis tensor "
        "(tensor=4: 4 devices); shape (2, 32, 2, 8)")
    assert errors["indivisible_batch"] == (
        "the prompt batch of 3 rows does not divide over the 2 devices of mesh axes data x fsdp "
        "(data=1, fsdp=2); allowed: a multiple of 2 rows")
    assert "parameter 'embed': dimension 0 ('vocab') of size 30 does not divide over mesh axis tensor" \
        in errors["place_indivisible"]


def test_a_preset_fitted_to_a_model_replicates_the_axis_it_cannot_split(workers):
    trained = workers["fsdp2_tensor4"]["fitted_train"]  # the train entry point, sharded over 8 devices
    assert "replicating 'kv_heads' (the other rules hold)" in trained["notice"] and trained["steps"] == 2
    assert "dimension 2 ('kv_heads') of size 2 does not divide over mesh axis tensor" in trained["unfitted"]
    fitted = workers["fsdp2_tensor4"]["fitted"]
    rules = dict((k, v) for k, v in fitted["rules"])
    assert rules["kv_heads"] is None and rules["heads"] == ["tensor"] and rules["embed"] == ["fsdp"]
    assert fitted["notice"] == ("sharding: parameter 'k_proj' dimension 2 ('kv_heads') of size 2 does not divide "
                                "over 4 devices: replicating 'kv_heads' (the other rules hold)\n")




if __name__ == "__main__":
    name, out_path = sys.argv[1], Path(sys.argv[2])
    out_path.write_text(json.dumps(run_worker(name)))
