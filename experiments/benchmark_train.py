"""Training throughput: tokens/s and model FLOPs utilization (MFU) of the masked-diffusion train step.

    python -m experiments.benchmark_train                         # 90M and 300M geometries (configs/benchmark_train.yaml)
    python -m experiments.benchmark_train run=[m90] timed_steps=50

Each geometry trains on random tokens (seq_len positions, every one a real token, so the batch
has no attention_mask, as corpus batches) with the `dllm.training` step that `experiments.train`
runs (the same loss, AdamW with fp32 master weights, donated parameters; the attention kernel and
scan unroll of `attention_impl` and `scan_unroll`), on one device; the batch is placed on the device once, so data loading is
not timed. After `warmup_steps` untimed updates (the first compiles), `timed_steps` updates run
back to back with one host sync at the end. Printed per geometry: parameters, ms per step, tokens/s,
and MFU = 6 x parameters x tokens/s over the bf16 matmul peak measured in the same run (the
standard estimate: forward and backward matmuls, attention's score FLOPs left out), plus
`mfu_with_attention`, which adds attention's 12 x layers x d_model x seq_len FLOPs per token.
"""

from __future__ import annotations

import json
import time

import hydra
import jax
import numpy as np
from omegaconf import DictConfig

from dllm import sharding
from dllm.evaluation import environment, write_json_atomic
from dllm.models.config import ModelConfig
from dllm.models.layout import Layout
from dllm.training import TrainConfig, init_training
from experiments.benchmark import measure_floors


def parameter_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def time_geometry(cfg: DictConfig, name: str, peak_tflops: float) -> dict:
    geometry = dict(cfg.geometries[name])
    batch_size = geometry.pop("batch_size")
    model_config = ModelConfig(vocab_size=cfg.vocab_size, max_seq_len=cfg.seq_len, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype, mask_token_id=cfg.vocab_size - 1, **geometry)
    train_config = TrainConfig(steps=cfg.warmup_steps + cfg.timed_steps, batch_size=batch_size,
                               objective=cfg.objective, warmup_steps=0, progress=False, tensorboard=False)
    placement = sharding.Placement.of(sharding.make_mesh(sharding.MeshConfig(num_devices=1)))
    model_layout = Layout(attention_impl=cfg.attention_impl, scan_unroll=cfg.scan_unroll)
    _, params, opt_state, _, train_step, _ = init_training(model_config, train_config, cfg.vocab_size - 1, placement,
                                                           model_layout)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size - 1, (batch_size, cfg.seq_len), dtype=np.int32)
    batch = placement.put_batch({"tokens": tokens})  # no padding, as corpus batches (dllm.data.CorpusWindows)
    n_params = parameter_count(params)
    t0 = time.perf_counter()
    for step in range(cfg.warmup_steps):
        params, opt_state, metrics = train_step(params, opt_state, batch, np.int32(step))
    first_loss = float(metrics["loss"])
    compile_and_warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for step in range(cfg.warmup_steps, cfg.warmup_steps + cfg.timed_steps):
        params, opt_state, metrics = train_step(params, opt_state, batch, np.int32(step))
    last_loss = float(metrics["loss"])  # the host sync
    seconds = time.perf_counter() - t0
    tokens_per_s = batch_size * cfg.seq_len * cfg.timed_steps / seconds
    model_flops = 6 * n_params * tokens_per_s
    attention_flops = 12 * model_config.n_layers * model_config.d_model * cfg.seq_len * tokens_per_s
    return {"geometry": name, **dict(cfg.geometries[name]), "seq_len": cfg.seq_len, "vocab_size": cfg.vocab_size,
            "parameters": n_params, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
            "attention_impl": cfg.attention_impl, "scan_unroll": cfg.scan_unroll,
            "ms_per_step": round(1000 * seconds / cfg.timed_steps, 2), "tokens_per_s": round(tokens_per_s),
            "tflops": round(model_flops / 1e12, 1), "mfu": round(model_flops / 1e12 / peak_tflops, 3),
            "mfu_with_attention": round((model_flops + attention_flops) / 1e12 / peak_tflops, 3),
            "compile_and_warmup_s": round(compile_and_warmup_s, 1), "loss_first": first_loss, "loss_last": last_loss}


@hydra.main(config_path="../configs", config_name="benchmark_train", version_base=None)
def main(cfg: DictConfig) -> list[dict]:
    unknown = sorted(set(cfg.run) - set(cfg.geometries))
    if unknown:
        raise ValueError(f"run={list(cfg.run)}: unknown geometries {unknown}; allowed: {sorted(cfg.geometries)}")
    floors = None if cfg.peak_tflops else measure_floors(cfg.floor_matmul_sizes, copy_mib=16)
    peak = cfg.peak_tflops or floors["peak_tflops"]
    print(json.dumps({"peak_tflops_used": peak, "measured_floors": floors}), flush=True)
    rows = []
    for name in cfg.run:
        rows.append(time_geometry(cfg, name, peak))
        print(json.dumps(rows[-1]), flush=True)
    write_json_atomic(cfg.out, {"rows": rows, "peak_tflops_used": peak, "measured_floors": floors,
                                "environment": environment()})
    return rows


if __name__ == "__main__":
    main()
