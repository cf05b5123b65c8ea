"""Where the train step's time goes: the 300M geometry of experiments.benchmark_train timed under
several layouts and attention kernels, with and without the attention mask, and in parts (forward,
forward + backward, the whole update), plus a per-kernel profile of two variants.

    python experiments/results/speed2/train_variants.py [--out FILE] [--profile-dir DIR] [--only NAME ...]

One process; each variant compiles its own step. The update is `dllm.training.make_train_step`
(pretraining loss, AdamW over fp32 master weights, bf16 compute); "forward" and "grad" time
`dllm.training.training_loss` alone and under `jax.value_and_grad`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm import sharding
from dllm.evaluation import write_json_atomic
from dllm.models.config import ModelConfig
from dllm.models.layout import Layout
from dllm.models.transformer import Transformer
from dllm.training import TrainConfig, make_optimizer, make_train_step, training_loss
from experiments.benchmark_train import parameter_count

VOCAB, SEQ = 4096, 512
GEOMETRY = dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, mlp_hidden=2816)
VARIANTS = {  # name: (layout fields, masked batch, part, batch size, param dtype)
    "base": (dict(), True, "step", 32, "float32"),
    "cudnn": (dict(attention_impl="cudnn"), True, "step", 32, "float32"),
    "nomask": (dict(), False, "step", 32, "float32"),
    "nomask_cudnn": (dict(attention_impl="cudnn"), False, "step", 32, "float32"),
    "nomask_cudnn_unrolled": (dict(attention_impl="cudnn", scan_layers=False), False, "step", 32, "float32"),
    "nomask_cudnn_fused": (dict(attention_impl="cudnn", fused_projections=True), False, "step", 32, "float32"),
    "nomask_cudnn_unroll2": (dict(attention_impl="cudnn", scan_unroll=2), False, "step", 32, "float32"),
    "nomask_cudnn_unroll24": (dict(attention_impl="cudnn", scan_unroll=24), False, "step", 32, "float32"),
    "nomask_cudnn_b64": (dict(attention_impl="cudnn"), False, "step", 64, "float32"),
    "nomask_cudnn_forward": (dict(attention_impl="cudnn"), False, "forward", 32, "float32"),
    "nomask_cudnn_grad": (dict(attention_impl="cudnn"), False, "grad", 32, "float32"),
    "base_forward": (dict(), True, "forward", 32, "float32"),
    "base_grad": (dict(), True, "grad", 32, "float32"),
    "nomask_cudnn_bf16params": (dict(attention_impl="cudnn"), False, "step", 32, "bfloat16"),
}


def build(name):
    fields, masked, part, batch_size, param_dtype = VARIANTS[name]
    layout = Layout(**fields)
    config = ModelConfig(vocab_size=VOCAB, max_seq_len=SEQ, dtype="bfloat16", param_dtype=param_dtype,
                         mask_token_id=VOCAB - 1, **GEOMETRY)
    train = TrainConfig(steps=100, batch_size=batch_size, objective="pretrain", warmup_steps=0, progress=False,
                        tensorboard=False)
    placement = sharding.Placement.of(sharding.make_mesh(sharding.MeshConfig(num_devices=1)))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(config, layout, rngs=nnx.Rngs(0))))
    params = sharding.sharded_init(config, 0, placement, layout)()
    tokens = np.random.default_rng(0).integers(0, VOCAB - 1, (batch_size, SEQ), dtype=np.int32)
    batch = {"tokens": jnp.asarray(tokens)}
    if masked:
        batch["attention_mask"] = jnp.ones_like(batch["tokens"])
    loss = lambda p, b, key: training_loss(graphdef, p, b, key, objective="pretrain", mask_id=VOCAB - 1,
                                           time_eps=1e-3, low_discrepancy=True)
    key = jax.random.PRNGKey(0)
    if part == "step":
        optimizer = make_optimizer(train)
        opt_state = optimizer.init(params)
        step = jax.jit(make_train_step(graphdef, optimizer, train, VOCAB - 1), donate_argnums=(0, 1))
        state = [params, opt_state]

        def run(i):
            state[0], state[1], metrics = step(state[0], state[1], batch, np.int32(i))
            return metrics["loss"]
    elif part == "grad":
        grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
        run = lambda i: grad(params, batch, jax.random.fold_in(key, i))
    else:
        forward = jax.jit(loss)
        run = lambda i: forward(params, batch, jax.random.fold_in(key, i))
    return run, batch_size, parameter_count(params)


def time_variant(name, steps: int = 20):
    run, batch_size, n_params = build(name)
    keep = VARIANTS[name][2] == "step"  # an update returns its loss; grad/forward outputs are dropped as they come
    losses = []

    def steps_from(first, count):
        for i in range(first, first + count):
            out = run(i)
            if keep:
                losses.append(out)
        jax.block_until_ready(out)

    t0 = time.perf_counter()
    steps_from(0, 3)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps_from(3, steps)
    ms = 1000 * (time.perf_counter() - t0) / steps
    tokens_per_s = batch_size * SEQ / ms * 1000
    return {"variant": name, "layout": VARIANTS[name][0], "masked": VARIANTS[name][1], "part": VARIANTS[name][2],
            "batch_size": batch_size, "param_dtype": VARIANTS[name][4], "ms": round(ms, 2),
            "tokens_per_s": round(tokens_per_s), "model_tflops_6n": round(6 * n_params * tokens_per_s / 1e12, 1),
            "compile_s": round(compile_s, 1),
            # the update's loss at every step: the fixed-seed loss curve, equal across variants of the same batch
            # size, parameter dtype and parameter structure up to bf16 noise (a layout change must leave it so)
            **({"losses": [round(float(x), 5) for x in losses]} if keep else {})}, run


def kernel_profile(name, run, directory, top: int = 25):
    """Milliseconds per step of each GPU kernel and XLA op, over 5 steps, from a jax.profiler trace (None if unreadable)."""
    path = os.path.join(directory, name)
    with jax.profiler.trace(path):
        for i in range(100, 105):
            out = run(i)
        jax.block_until_ready(out)
    try:
        from jax.profiler import ProfileData
    except ImportError:
        return None
    files = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return None
    kernels, ops, lines = collections.Counter(), collections.Counter(), set()
    data = ProfileData.from_file(files[0])
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            lines.add(line.name)
            totals = ops if line.name.lower() == "xla ops" else kernels if "stream" in line.name.lower() else None
            if totals is None:
                continue
            for event in line.events:
                totals[event.name] += event.duration_ns / 5e6
    top_of = lambda totals: [(k, round(v, 3)) for k, v in totals.most_common(top)]
    return {"kernels": top_of(kernels), "kernels_total_ms": round(sum(kernels.values()), 2),
            "xla_ops": top_of(ops), "xla_ops_total_ms": round(sum(ops.values()), 2), "lines": sorted(lines)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="train_variants.json")
    parser.add_argument("--profile-dir", default=None)
    parser.add_argument("--profile", nargs="*", default=["base", "nomask_cudnn"])
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    rows, profiles = [], {}
    for name in args.only or VARIANTS:
        try:
            row, run = time_variant(name)
        except Exception as error:  # a variant that does not compile here is reported, not hidden
            row, run = {"variant": name, "error": f"{type(error).__name__}: {str(error)[:300]}"}, None
        print(json.dumps(row), flush=True)
        rows.append(row)
        if run is not None and args.profile_dir and name in args.profile:
            try:
                profiles[name] = kernel_profile(name, run, args.profile_dir)
            except Exception as error:
                profiles[name] = f"{type(error).__name__}: {str(error)[:300]}"
            print(json.dumps({"profile": name, "kernels_ms_per_step": profiles[name]}), flush=True)
        del run
    write_json_atomic(args.out, {"geometry": GEOMETRY, "seq_len": SEQ, "vocab": VOCAB, "rows": rows,
                                 "profiles": profiles,
                                 "environment": {"jax": jax.__version__, "device": jax.devices()[0].device_kind}})


if __name__ == "__main__":
    main()
