"""The GPU tools (`experiments.benchmark`, `experiments.profile_decode`) run end to end on
CPU with a tiny model, and the Hydra `mesh=` group decodes the same tokens sharded.

The figures they print on CPU mean nothing; what is checked is that the entry points,
their JSON and the mesh wiring work (they are otherwise only run on the GPU machine).
"""

import json
import os
import subprocess
import sys

import dllm
import pytest
import jax
from experiments.benchmark import block_window_attention, cache_bytes, roofline_ms, step_flops, step_plan
from omegaconf import OmegaConf
from experiments.common import REPO_ROOT

TINY = ["model.vocab_size=1000", "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2",
        "model.head_dim=32", "model.mlp_hidden=128", "gen_length=32", "prompt_length=16", "block_length=8",
        "timed_steps=6", "dtype=float32", "floor_matmul_sizes=[64,128]", "floor_copy_mib=4"]


def run(module: str, *overrides: str, devices: int = 1) -> str:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", module, *TINY, *overrides], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_benchmark_rows_and_mesh_give_the_same_tokens(tmp_path):
    digests = {}
    for mesh in ("single", "data", "fsdp_tensor"):
        out = tmp_path / f"{mesh}.json"
        tensor = ["mesh.axes.tensor=2"] if mesh == "fsdp_tensor" else []  # the preset's 4 needs 4 devices
        run("experiments.benchmark", f"mesh={mesh}", *tensor, "batch_sizes=[2]", "caches=[none,dual]", f"out={out}",
            f"hydra.run.dir={tmp_path / mesh}", devices=2)
        written = json.loads(out.read_text())
        rows = written["rows"]
        assert [r["cache"] for r in rows] == ["none", "dual"]
        floors = written["measured_floors"]  # measured in the run, and the rows' floors come from them
        assert floors["peak_tflops"] > 0 and floors["peak_tb_s"] > 0 and written["peak_tflops_used"] == floors["peak_tflops"]
        assert all(r["floor_ms"] > 0 and r["over_floor"] > 0 for r in rows), rows
        # 6 timed steps of block 8: one refresh (taken as the no-cache step) and 5 window steps
        dual = rows[1]
        assert abs(dual["window_step_ms"] - (6 * dual["ms_per_nfe"] - rows[0]["ms_per_nfe"]) / 5) < 2e-3, dual
        assert all(r["nfe_timed"] == 6 and r["ms_per_nfe"] > 0 for r in rows), rows
        assert rows[0]["mesh"] == ({"devices": 1} if mesh == "single" else
                                   {"data": 2, "fsdp": 1, "tensor": 1} if mesh == "data" else
                                   {"data": 1, "fsdp": 1, "tensor": 2})
        digests[mesh] = [r["tokens_sha1"] for r in rows]
    assert digests["data"] == digests["single"] and digests["fsdp_tensor"] == digests["single"], digests


def test_floors_by_hand():
    """The FLOP count at LLaDA-8B geometry (reference/gpu.md: a 512-token
    forward), the K/V bytes of a cached step, and the roofline."""
    c = dllm.ModelConfig(vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden=12288)
    per_token = 2 * 32 * (3 * 4096 * 4096 + 4096 * 4096 + 3 * 4096 * 12288)  # q/k/v, o, gate/up/down
    attention = 4 * 32 * 4096 * 512                                          # QK^T and PV over 512 keys
    head = 2 * 4096 * 126464
    assert step_flops(c, 1, 512, 512) == 512 * (per_token + attention + head)  # 7.81 TFLOP
    assert step_flops(c, 2, 32, 512, 8) == 2 * (32 * (per_token + attention) + 8 * head)
    assert cache_bytes(c.replace(dtype="bfloat16"), 1, 512) == 2 * 32 * 512 * 32 * 128 * 2  # 268 MB
    assert roofline_ms(2e12, 1e9, 1000, 1) == 2.0 and roofline_ms(1e12, 4e9, 1000, 1) == 4.0


def test_block_cache_benchmark_row_and_step_plan(tmp_path):
    """A block-causal model's rows (cache none and block) decode the same tokens; the block cache's
    steps by hand: the prefill, one block of queries (+ the shifted position), two at a block start."""
    out = tmp_path / "block.json"
    run("experiments.benchmark", "model=fast_dllm_v2_7b", "model.block_size=8", "batch_sizes=[2]",
        "caches=[none,block]", "timed_steps=10", f"out={out}", f"hydra.run.dir={tmp_path}")
    rows = json.loads(out.read_text())["rows"]
    assert [r["cache"] for r in rows] == ["none", "block"] and rows[0]["tokens_sha1"] == rows[1]["tokens_sha1"]
    assert all(r["nfe_timed"] == 10 and r["floor_ms"] > 0 for r in rows), rows
    cfg = OmegaConf.create({"prompt_length": 16, "gen_length": 32, "block_length": 8})
    plan = step_plan(cfg, dllm.ModelConfig(token_shift=True), "block", 10)
    assert plan[0] == (49, 49, None) and plan[1] == (9, 49, 24) and plan[8] == (17, 49, 32) and plan[9] == (9, 49, 32)
    # dKV-Cache by hand (sizes 32, 16, 8): full at each block's steps 0 and 1, else the masked + the one
    # just decoded, rounded up, over the 48 canvas keys and the 33-column tail
    cfg = OmegaConf.create({**cfg, "cache_refresh_every": 0})
    plan = step_plan(cfg, dllm.ModelConfig(), "dkv", 32)
    assert plan[0] == plan[1] == plan[8] == plan[9] == (48, 48, None)
    assert plan[2] == plan[10] == (32, 81, 81) and plan[18] == (16, 81, 81) and plan[26] == (8, 81, 81)


def test_elastic_cache_benchmark_rows_and_step_plan(tmp_path):
    """Elastic-Cache's rows at the two ends of its drift bar (never / every step from layer 1) run, and
    its steps by hand: the full first forward, then 2 tracked + 2 windows of 4 = 10 gathered queries
    over the 48 canvas keys and the 2 + 4 + 32 = 38-column tail."""
    for gamma in ("-1", "2"):
        out = tmp_path / f"elastic{gamma}.json"
        run("experiments.benchmark", "batch_sizes=[1]", "caches=[elastic]", "sliding_window=4",
            f"elastic_gamma={gamma}", f"out={out}", f"hydra.run.dir={tmp_path / gamma}")
        rows = json.loads(out.read_text())["rows"]
        assert [r["cache"] for r in rows] == ["elastic"] and rows[0]["nfe_timed"] == 6 and rows[0]["floor_ms"] > 0
    cfg = OmegaConf.create({"prompt_length": 16, "gen_length": 32, "block_length": 8, "sliding_window": 4})
    plan = step_plan(cfg, dllm.ModelConfig(n_layers=2), "elastic", 9)
    assert plan[0] == (48, 48, None) and plan[1] == plan[8] == (10, 86, 86)


def test_benchmark_sets_and_records_the_window_kernels_plan(tmp_path):
    """pallas_splits / pallas_block_k / pallas_rows_per_program reach the kernel's module (the row
    records them); a value Triton cannot take is refused by name."""
    from experiments.benchmark import set_window_kernel_plan

    out = tmp_path / "plan.json"
    run("experiments.benchmark", "layout.window_attention_impl=pallas", "batch_sizes=[1]", "caches=[dual]",
        "pallas_splits=2", "pallas_block_k=16", "pallas_rows_per_program=16", f"out={out}", f"hydra.run.dir={tmp_path}")
    row = json.loads(out.read_text())["rows"][0]
    assert (row["pallas_splits"], row["pallas_block_k"], row["pallas_rows_per_program"]) == (2, 16, 16), row
    for key, value in (("pallas_rows_per_program", 24), ("pallas_block_k", 8), ("pallas_splits", 0)):
        with pytest.raises(ValueError, match=f"{key}={value}: must be"):
            set_window_kernel_plan(OmegaConf.create({key: value}))


def test_profile_decode_writes_trace_and_summary(tmp_path):
    stdout = run("experiments.profile_decode", "batch_sizes=[1]", "caches=[dual]", f"hydra.run.dir={tmp_path}",
                 "profile_hlo=true")
    summary = json.loads((tmp_path / "profile_1_dual.json").read_text())
    assert summary["steps"] == 6 and summary["cache"] == "dual"
    assert (tmp_path / "profile_1_dual.trace.json.gz").stat().st_size > 0
    assert "device busy" in stdout


def test_hlo_fusions_names_each_fusion_kernel_and_its_ops(tmp_path):
    """`profile_decode.hlo_fusions` reads a real XLA dump (CPU here): the loop fusion of a pad of a
    transposed tanh, named as the profiler names kernels (no dots)."""
    snippet = ("import glob, json, jax, jax.numpy as jnp\n"
               "from experiments.profile_decode import hlo_fusions\n"
               "f = jax.jit(lambda x, w: jnp.pad(jnp.tanh(x @ w).T, ((0, 3), (0, 0))) * 2)\n"
               "f(jnp.ones((4, 8)), jnp.ones((8, 8))).block_until_ready()\n"
               f"print(json.dumps(hlo_fusions(glob.glob('{tmp_path}/*'))))\n")
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={tmp_path} --xla_dump_hlo_as_text", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", snippet], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    described = json.loads(done.stdout.splitlines()[-1])
    loops = [text for name, text in described.items() if text.startswith("kLoop") and "." not in name]
    assert any(all(op in text for op in ("pad", "tanh", "transpose")) for text in loops), described


def test_window_attention_benchmark_runs_every_variant_against_xla(tmp_path):
    out = tmp_path / "window.json"
    run("experiments.benchmark_window_attention", "batch_sizes=[1]", "window_splits=[1,2]", "window_block_k=[16]",
        f"window_out={out}", f"hydra.run.dir={tmp_path}")
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["xla", "pallas splits=1 block_k=16 warps=4 stages=2",
                                            "pallas splits=2 block_k=16 warps=4 stages=2", "pallas with key mask"]
    assert all(r["us_per_layer"] > 0 and r["max_abs_diff_vs_xla"] < 1e-5 for r in rows), rows


def test_chained_gemm_floor_reads_the_models_weights_once():
    """The chained floor's bytes are the model's GEMM weights (q/k/v, out, gate/up, down per layer, the head)
    in bf16, counted by hand."""
    from experiments.benchmark import chained_gemm_tb_s

    c = dllm.ModelConfig(vocab_size=100, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_hidden=48)
    per_layer = 32 * (4 + 2 * 2) * 8 + 4 * 8 * 32 + 32 * 2 * 48 + 48 * 32
    tb_s, gb = chained_gemm_tb_s(c, repeats=2)
    assert gb == 2 * (3 * per_layer + 32 * 100) / 1e9 and tb_s > 0


def test_training_benchmark_prints_tokens_per_second_and_mfu(tmp_path):
    out = tmp_path / "train.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "experiments.benchmark_train", "run=[m90]", "seq_len=32",
                           "geometries.m90={d_model:32,n_layers:2,n_heads:2,n_kv_heads:2,mlp_hidden:64,batch_size:2}",
                           "vocab_size=64", "warmup_steps=1", "timed_steps=2", "floor_matmul_sizes=[64]",
                           f"out={out}", f"hydra.run.dir={tmp_path}"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = json.loads(out.read_text())
    row = written["rows"][0]
    # parameters by hand: embedding and head (64 x 32 each), per layer q/k/v/o (4 x 32 x 32), SwiGLU (3 x 32 x 64),
    # two RMSNorm scales; the final norm
    assert row["parameters"] == 2 * 64 * 32 + 2 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32, row
    expected_mfu = 6 * row["parameters"] * row["tokens_per_s"] / 1e12 / written["peak_tflops_used"]
    assert abs(row["mfu"] - expected_mfu) < 2e-3 and row["tokens_per_s"] > 0 and row["ms_per_step"] > 0


def test_continuous_batching_benchmark_checks_identical_rows(tmp_path):
    out = tmp_path / "cb.json"
    done = subprocess.run([sys.executable, "-m", "experiments.benchmark_continuous", "--preset", "tiny-tasks", "--n",
                           "12", "--batch-size", "4", "--out", str(out)], cwd=REPO_ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = json.loads(out.read_text())
    assert written["identical_rows"] and written["n"] == 12 and written["speedup"] > 0
    assert written["static"]["batches"] == 3 and written["continuous"]["batches"] == 1


def test_block_benchmark_names_the_attention_of_both_step_kinds(monkeypatch):
    """experiments.benchmark's block-cache label follows forward_window's choice: batch x (queries +
    token shift) rows, one block inside a block and two at a block's first step (pipeline_blocks 1)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    config, layout = dllm.ModelConfig(head_dim=128), dllm.Layout()
    pallas, xla = "pallas (column limit per query)", "pairs mask: XLA"
    assert block_window_attention(config, layout, 1, 32) == pallas  # 32 and 64 rows
    mixed = f"{pallas} inside a block; {xla} at a block's first step"
    assert block_window_attention(config.replace(token_shift=True), layout, 1, 32) == mixed  # 33 and 65 rows
    assert block_window_attention(config, layout, 2, 32) == mixed  # 64 and 128 rows
    assert block_window_attention(config, layout, 4, 32) == xla
