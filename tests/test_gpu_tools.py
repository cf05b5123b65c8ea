"""The GPU tools (`experiments.benchmark`, `experiments.profile_decode`) run end to end on
CPU with a tiny model, and the Hydra `mesh=` group decodes the same tokens sharded.

The figures they print on CPU mean nothing; what is checked is that the entry points,
their JSON and the mesh wiring work (they are otherwise only run on the GPU machine).
"""

import json
import os
import subprocess
import sys

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
        for r in rows:
            floor = max(r["floor_ms_full_step"], r["floor_ms_weights"]) if r["cache"] == "none" else r["floor_ms_weights"]
            assert abs(r["over_floor"] - r["ms_per_nfe"] / floor) < 1e-2 * r["over_floor"], r
        assert all(r["nfe_timed"] == 6 and r["ms_per_nfe"] > 0 for r in rows), rows
        assert rows[0]["mesh"] == ({"devices": 1} if mesh == "single" else
                                   {"data": 2, "fsdp": 1, "tensor": 1} if mesh == "data" else
                                   {"data": 1, "fsdp": 1, "tensor": 2})
        digests[mesh] = [r["tokens_sha1"] for r in rows]
    assert digests["data"] == digests["single"] and digests["fsdp_tensor"] == digests["single"], digests


def test_profile_decode_writes_trace_and_summary(tmp_path):
    stdout = run("experiments.profile_decode", "batch_sizes=[1]", "caches=[dual]", f"hydra.run.dir={tmp_path}")
    summary = json.loads((tmp_path / "profile_1_dual.json").read_text())
    assert summary["steps"] == 6 and summary["cache"] == "dual"
    assert (tmp_path / "profile_1_dual.trace.json.gz").stat().st_size > 0
    assert "device busy" in stdout
