"""Decoding speed at LLaDA-8B / Dream-7B geometry with random bf16 weights.

    python -m experiments.benchmark                       # LLaDA-8B, batch 1/8/32, cache none/prefix/dual
    python -m experiments.benchmark model=dream_7b batch_sizes=[1] caches=[dual]
    python -m experiments.benchmark mesh=data batch_sizes=[8]   # sharded over every GPU (configs/mesh/)
    python -m experiments.benchmark model=fast_dllm_v2_7b caches=[none,block] batch_sizes=[1,32,128]
    python -m experiments.benchmark caches=[none,prefix,dual,dkv] timed_steps=256 cache_refresh_every=8
    python -m experiments.benchmark caches=[none,dual,elastic] timed_steps=256 elastic_gamma=-1   # never refreshes

Each configuration decodes a batch of random prompts with a fixed
one-token-per-step schedule (LowConfidence, steps = gen_length, so NFE is
known) for `timed_steps` forward passes (max_steps; the first block: the
refresh step plus window steps), after one untimed compile run, `repeats`
times (ms per NFE is the median; every run is in the row). Prints one
JSON line per configuration: ms per NFE, tokens/s, achieved TFLOP/s (the
matmul FLOPs the engine executes) and weight-read bandwidth, against the
floors of this device measured in the same run (`measure_floors`: bf16
matmul TFLOP/s, and the fastest of a memory read, a copy, a weight-streaming
GEMM and the model's own GEMM shapes chained over its layers at 32 rows; `peak_tflops`
/ `peak_tb_s` fix them instead). Each row's `floor_ms` is the roofline of
the work it executes (`roofline_ms` per step: executed FLOPs at peak, or
weights plus attended K/V at the memory floor, whichever is slower,
averaged over its refresh and window steps) and `over_floor` its time over
that; `floor_ms_full_forward` (a 512-token forward with the head at every
position) and `floor_ms_weights` are the speed issue's yardsticks, and
cached rows get `window_step_ms`, their window steps alone (the same
batch's no-cache step taken as the refresh). The floors are one device's,
also for rows on a mesh. Each row also records the mesh and a digest
of the generated tokens, so runs on different meshes can be checked to decode
the same tokens. A configuration that runs out of device memory is printed
and recorded as a `{"skipped": ..., "reason": ...}` row; the others still run.
Layout (configs/layout/, default gpu_decode: `layout.<field>=...`): scan_layers,
fused_projections, fp8_weights, attention_impl, window_attention_impl; the Pallas window kernel's plan
(pallas_splits, pallas_block_k, pallas_rows_per_program); and the engine's XLA compiler_options. A block-causal model (model=fast_dllm_v2_7b) decodes
with cache none or block (the exact block cache; `step_plan` says what each step runs).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time

import hydra
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from omegaconf import DictConfig

import dllm
import samplers
from dllm.checkpoints import model_from_params
from dllm.decoding import SpecialIds, engine
from dllm.evaluation import environment, write_json_atomic
from dllm.models import window_attention as window_kernel
from dllm.models.transformer import canonical_params, window_attention_impl
from experiments.common import decode_mesh, model_config


def attention_impl(cfg: DictConfig, key: str = "attention_impl") -> str | None:
    """cfg.layout[key], except that cuDNN becomes XLA's choice off GPU (said so)."""
    if cfg.layout[key] == "cudnn" and jax.default_backend() != "gpu":
        print(f"layout.{key}=cudnn needs a GPU (backend {jax.default_backend()!r}): using null", flush=True)
        return None
    return cfg.layout[key]


def run_layout(cfg: DictConfig) -> dllm.Layout:
    return dllm.Layout(scan_layers=cfg.layout.scan_layers, scan_unroll=cfg.layout.get("scan_unroll", 1),
                       fused_projections=cfg.layout.fused_projections,
                       fp8_weights=cfg.layout.get("fp8_weights", False),
                       attention_impl=attention_impl(cfg),
                       window_attention_impl=attention_impl(cfg, "window_attention_impl"))


def block_window_attention(config, layout: dllm.Layout, batch: int, block_length: int, pipeline_blocks: int = 1) -> str:
    """What attends in an exact-block-cache step: the Pallas kernel with each query's column limit, or
    XLA's attention under the block-causal pair mask (`Transformer.forward_window`). The choice follows
    the step's query rows, batch x (queries + token shift): a step inside a block forwards
    `pipeline_blocks` blocks, a block's first step one more (`BlockCache.step_logits`), so the two
    can differ."""
    shift = 1 if config.token_shift else 0
    name = lambda blocks: ("pallas (column limit per query)" if window_attention_impl(
        config, layout, batch * (blocks * block_length + shift)) == "pallas" else "pairs mask: XLA")
    inside, first = name(pipeline_blocks), name(pipeline_blocks + 1)
    return inside if inside == first else f"{inside} inside a block; {first} at a block's first step"


def set_window_kernel_plan(cfg: DictConfig) -> None:
    """The Pallas window kernel's launch plan for this run: `pallas_splits`, `pallas_block_k` and
    `pallas_rows_per_program` set `window_attention.SPLITS`, `BLOCK_K` and `ROWS_PER_PROGRAM`
    (null keeps the module's default; rows record what ran). Once per process, before the first decode:
    the kernel's jit cache does not see the module's constants."""
    plans = (("pallas_splits", "SPLITS", 1, "an int >= 1 (programs per query tile over the keys)"),
             ("pallas_block_k", "BLOCK_K", 16, "a power of two >= 16 (a Triton block)"),
             ("pallas_rows_per_program", "ROWS_PER_PROGRAM", 16, "a power of two >= 16 (a Triton block)"))
    for key, name, least, allowed in plans:
        value = cfg.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or value < least or (least == 16 and value & (value - 1)):
            raise ValueError(f"{key}={value!r}: must be {allowed} or null")
        setattr(window_kernel, name, value)


def random_model(cfg: DictConfig) -> dllm.Transformer:
    config = model_config(cfg).replace(dtype=cfg.dtype, param_dtype=cfg.dtype,
                                       max_seq_len=cfg.prompt_length + cfg.gen_length)
    layout = run_layout(cfg)
    # Drawn stacked (the unrolled initializer takes long to compile at 8B), then
    # laid out per layer when scan_layers is off.
    stacked = nnx.jit(lambda: dllm.Transformer(config, layout.replace(scan_layers=True, fp8_weights=False),
                                               rngs=nnx.Rngs(0)))()
    if layout == stacked.layout:
        return stacked
    params = canonical_params(stacked)
    del stacked
    return model_from_params(config, params, layout)


def random_model_special_ids(config) -> SpecialIds:
    """Special ids for a random model: the last ids of its vocabulary (pad 0)."""
    return SpecialIds(mask=config.vocab_size - 1, eos=config.vocab_size - 2, eot=config.vocab_size - 2, pad=0)


def random_prompts(cfg: DictConfig, config, batch: int) -> np.ndarray:
    """[batch, prompt_length] random prompt ids clear of the special ids."""
    return np.random.default_rng(0).integers(1, config.vocab_size - 3, (batch, cfg.prompt_length))


def timed_decode_args(cfg: DictConfig, config, cache: str) -> dict:
    """`dllm.generate` arguments of the fixed schedule: one token per step
    (LowConfidence, steps = gen_length, so NFE is known) for `timed_steps` steps. Elastic-Cache
    decodes a sliding window (`sliding_window`), which LowConfidence's per-block schedule refuses:
    Threshold(tau=1), whose forced best token is one token per step on a random model."""
    args = dict(sampler=samplers.LowConfidence(steps=cfg.gen_length), gen_length=cfg.gen_length,
                block_length=cfg.block_length, special=random_model_special_ids(config), cache=cache,
                max_steps=cfg.timed_steps, key=jax.random.key(0), compiler_options=compiler_options(cfg),
                cache_refresh_every=cfg.get("cache_refresh_every", 0))
    if cache == "elastic":
        args.update(sampler=samplers.Threshold(tau=1.0), sliding_window=cfg.get("sliding_window", 16),
                    elastic_gamma=cfg.get("elastic_gamma", 0.9))
    return args


def compiler_options(cfg: DictConfig) -> dict | None:
    """cfg.compiler_options as a dict (None: the engine's `COMPILER_OPTIONS`)."""
    options = cfg.get("compiler_options")
    return None if options is None else dict(options)


def step_flops(config, batch: int, queries: int, keys: int, head_positions: int | None = None) -> float:
    """Matmul FLOPs of one forward over `queries` positions attending to
    `keys`, with the output head at `head_positions` of them (default all)."""
    d, f, layers = config.d_model, config.mlp_hidden, config.n_layers
    qkv = d * (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
    per_token = 2 * layers * (qkv + config.n_heads * config.head_dim * d + 3 * d * f)
    attention = 4 * layers * config.n_heads * config.head_dim * keys
    head = 2 * d * config.vocab_size * (queries if head_positions is None else head_positions)
    return batch * (queries * (per_token + attention) + head)


def step_plan(cfg: DictConfig, config, cache: str, nfe: int) -> list[tuple[int, int, int | None]]:
    """(queries, keys executed, cached keys attended or None) of each of `nfe` one-token-per-step steps.

    none: full forwards. prefix / dual: a refresh (full forward) at each block's first step, then
    window steps over the whole cache. dkv: full forwards at the first two steps of each block (and
    every `cache_refresh_every`-th), else the masked and just-decoded positions, rounded up to the
    policy's query size, over the whole cache. block (a block-causal model): the prefill, then one block of
    queries per step and two at each later block's first step (the finished block's K/V are written
    then), plus the position before them with token shift; the attention runs over the whole cache
    (masked), while the floor counts the K/V of the prompt and the blocks up to the active one.
    elastic: a full forward first, then the usual gathered query count (`elastic_query_sizes`) over
    the whole buffer; a drift refresh also runs every position through the layers after it, which
    the plan does not count (bound it with elastic_gamma=-1: never, 2: from layer 1 at every step)."""
    total, block = cfg.prompt_length + cfg.gen_length, cfg.block_length
    plan = []
    for n in range(nfe):
        first = n % block == 0
        if cache == "none" or (cache in ("prefix", "dual") and first):
            plan.append((total, total, None))
        elif cache in ("prefix", "dual"):
            plan.append((cfg.gen_length if cache == "prefix" else block, total, total))
        elif cache == "dkv":
            plan.append(dkv_step(cfg, config, n))
        elif cache == "elastic":
            plan.append(elastic_step(cfg, config, n))
        elif n == 0:
            plan.append((total + 1, total + 1, None))
        else:
            shift = 1 if config.token_shift else 0
            queries = (2 if first else 1) * block + shift
            plan.append((queries, total + 1, cfg.prompt_length + (n // block + 1) * block))
    return plan


def elastic_step(cfg: DictConfig, config, n: int) -> tuple[int, int, int | None]:
    """(queries, keys, attended) of step n of an Elastic-Cache decode (`step_plan`)."""
    from dllm.decoding.cache import ElasticCache, elastic_query_sizes
    from dllm.decoding.state import DecodeConfig

    total = cfg.prompt_length + cfg.gen_length
    if n == 0:
        return total, total, None
    decode = DecodeConfig(gen_length=cfg.gen_length, block_length=cfg.block_length, cache="elastic",
                          sliding_window=cfg.get("sliding_window", 16))
    keys = ElasticCache().length(total, decode, config.n_layers)  # the attention runs over the whole buffer
    return elastic_query_sizes(decode, config.n_layers)[-1], keys, keys


def dkv_step(cfg: DictConfig, config, n: int) -> tuple[int, int, int | None]:
    """(queries, keys, attended) of step n of a one-token-per-step dKV-Cache decode (`step_plan`)."""
    from dllm.decoding.cache import DKVCache, dkv_query_sizes
    from dllm.decoding.state import DecodeConfig

    total, i, every = cfg.prompt_length + cfg.gen_length, n % cfg.block_length, cfg.cache_refresh_every
    if i < 2 or (every and i % every == 0):
        return total, total, None
    shift = 1 if config.token_shift else 0
    decode = DecodeConfig(gen_length=cfg.gen_length, block_length=cfg.block_length)
    sizes = dkv_query_sizes(decode, shift)
    recomputed = cfg.gen_length - n + 1 + shift  # the masked, the one decoded last step, the predictor column
    keys = DKVCache().length(total, decode)  # the attention runs over the whole cache, its hidden tail too
    return min(size for size in sizes if size >= recomputed), keys, keys


def best_seconds(fn, *args, repeats: int) -> float:
    """The fastest of `repeats` timed runs of `fn(*args)` (a jitted function), after one untimed run."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_shapes(config) -> dict[str, tuple[int, int]]:
    """[K, N] of each GEMM of one layer as a window step runs it: fused q/k/v, attention output, fused
    gate/up, down."""
    d, h, kv, hd, f = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.mlp_hidden
    return {"qkv": (d, (h + 2 * kv) * hd), "out": (h * hd, d), "gate_up": (d, 2 * f), "down": (f, d)}


def gemm_chain(x, layers, head, *, attention_width: int, matmul=jnp.matmul):
    """The layers' GEMMs (`gemm_shapes`, one dict per layer, unrolled) and then the head, chained on
    x [rows, d] with the residual adds and SwiGLU between them, each product `matmul(x, w)`; the
    attention output reads the first `attention_width` (heads x head_dim) columns of q/k/v."""
    for w in layers:  # unrolled, as the model is (a scan over stacked weights was 2.6x slower)
        qkv = matmul(x, w["qkv"])
        x = x + matmul(qkv[:, :attention_width], w["out"])
        gate, up = jnp.split(matmul(x, w["gate_up"]), 2, axis=-1)
        x = x + matmul(jax.nn.silu(gate) * up, w["down"])
    return matmul(x, head)


def chained_gemm_seconds(config, rows: int, repeats: int = 10) -> tuple[float, int]:
    """(seconds, weight bytes) of the model's own GEMMs at `rows` rows, chained over every layer and
    then the head as a forward runs them (`gemm_chain`), with bf16 weights of the model's shapes. The
    layers are unrolled as the benchmarked model's are (`scan_layers=False`): on the H100 a scan over
    stacked weights ran 0.95-0.97 TB/s at 32 rows."""
    fill = jax.jit(lambda shape: jnp.full(shape, 1e-3, jnp.bfloat16), static_argnums=0)
    layers = [{name: fill(shape) for name, shape in gemm_shapes(config).items()} for _ in range(config.n_layers)]
    head = fill((config.d_model, config.vocab_size))
    chain = jax.jit(functools.partial(gemm_chain, attention_width=config.n_heads * config.head_dim))
    seconds = best_seconds(chain, jnp.ones((rows, config.d_model), jnp.bfloat16), layers, head, repeats=repeats)
    return seconds, sum(a.size * a.dtype.itemsize for a in jax.tree.leaves((layers, head)))


def chained_gemm_tb_s(config, rows: int = 32, repeats: int = 10) -> tuple[float, float]:
    """(TB/s, GB) of `chained_gemm_seconds` at a window step's `rows`, each weight read once: the memory
    floor of a cached step measured on the work it is made of (the speed issue's chained floor)."""
    seconds, nbytes = chained_gemm_seconds(config, rows, repeats)
    return nbytes / seconds / 1e12, nbytes / 1e9


def measure_floors(matmul_sizes, copy_mib: int, repeats: int = 10, config=None) -> dict:
    """This device's floors, each the best of `repeats` timed jitted runs:
    bf16 matmul TFLOP/s (the best over chains of eight [n, n] x [n, n]
    matmuls, n in `matmul_sizes`), and memory bandwidth over `copy_mib` MiB
    read by a sum (read TB/s), by x * 2 (copy TB/s, bytes read + written) and
    by a [32, 4096] x [4096, N] GEMM over them (stream TB/s: a window step's
    kind of work). `peak_tb_s` is the fastest: a step that streams its
    weights only reads them, and on the H200 the output head's GEMM read
    faster than the sum (4.3 vs 3.96 TB/s). On the H100 the copy gave
    the ~3.0 TB/s the H100 copy floor measured. With a model `config`, also the
    model's own GEMM shapes chained over its layers at 32 rows (`chained_gemm_tb_s`,
    chained TB/s), which joins the best-of."""

    timed = lambda fn, *args: best_seconds(fn, *args, repeats=repeats)

    chain, matmul_tflops = 8, {}
    for n in matmul_sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
        w = (jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / np.sqrt(n)).astype(jnp.bfloat16)
        matmuls = jax.jit(lambda x, w: jax.lax.fori_loop(0, chain, lambda _, x: x @ w, x))
        # three significant digits: a loaded CPU's few GFLOP/s must not round to a zero floor
        matmul_tflops[n] = float(f"{chain * 2 * n ** 3 / timed(matmuls, a, w) / 1e12:.3g}")
        del a, w
    x = jnp.ones((copy_mib * 2 ** 19,), jnp.bfloat16)
    nbytes = x.size * x.dtype.itemsize
    read_tb_s = nbytes / timed(jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), x) / 1e12
    copy_tb_s = 2 * nbytes / timed(jax.jit(lambda x: x * 2), x) / 1e12
    # the operation a window step is made of: 32 rows against a weight matrix read once
    rows, weight = jnp.ones((32, 4096), jnp.bfloat16), x.reshape(4096, -1)
    stream_tb_s = nbytes / timed(jax.jit(lambda a, w: a @ w), rows, weight) / 1e12
    del x, rows, weight
    chained_tb_s, chained_gb = chained_gemm_tb_s(config, repeats=repeats) if config is not None else (0.0, 0.0)
    best = max(read_tb_s, copy_tb_s, stream_tb_s, chained_tb_s)
    return {"peak_tflops": max(matmul_tflops.values()), "peak_tb_s": float(f"{best:.3g}"),
            "matmul_tflops": matmul_tflops, "read_tb_s": round(read_tb_s, 3), "copy_tb_s": round(copy_tb_s, 3),
            "stream_tb_s": round(stream_tb_s, 3), "chained_gemm_tb_s": round(chained_tb_s, 3),
            "chained_gemm_gb": round(chained_gb, 3), "copy_mib": copy_mib}


def roofline_ms(flops: float, bytes_read: float, peak_tflops: float, peak_tb_s: float) -> float:
    """Floor of a step that executes `flops` and reads `bytes_read`: the slower
    of its compute at `peak_tflops` and its memory traffic at `peak_tb_s`."""
    return max(flops / peak_tflops, bytes_read / peak_tb_s) / 1e9


def cache_bytes(config, batch: int, keys: int) -> int:
    """Bytes of K/V a cached step attends to: keys and values of every layer at `keys` positions."""
    itemsize = jnp.dtype(config.compute_dtype).itemsize
    return 2 * config.n_layers * batch * keys * config.n_kv_heads * config.head_dim * itemsize


def weight_bytes(model) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@hydra.main(config_path="../configs", config_name="benchmark", version_base=None)
def main(cfg: DictConfig) -> list[dict]:
    set_window_kernel_plan(cfg)
    fixed = cfg.peak_tflops and cfg.peak_tb_s  # (one device's floors, also for mesh rows)
    floors = None if fixed else measure_floors(cfg.floor_matmul_sizes, cfg.floor_copy_mib,
                                               config=model_config(cfg) if cfg.floor_chained_gemm else None)
    peak_tflops = cfg.peak_tflops or floors["peak_tflops"]
    peak_tb_s = cfg.peak_tb_s or floors["peak_tb_s"]
    print(json.dumps({"measured_floors": floors, "peak_tflops_used": peak_tflops, "peak_tb_s_used": peak_tb_s}),
          flush=True)
    began = time.perf_counter()  # deadline_s counts from here
    model = random_model(cfg)
    c = model.config
    mesh, rules = decode_mesh(cfg)
    mesh_axes = {"devices": 1} if mesh is None else dict(mesh.shape)
    if mesh is not None:  # placed once, so the timed calls move no weights
        from dllm import sharding

        sharding.shard_model(model, mesh, rules)
    total_len = cfg.prompt_length + cfg.gen_length
    weights = weight_bytes(model)
    rows = []
    for batch in cfg.batch_sizes:
        prompts = random_prompts(cfg, c, batch)
        for cache in cfg.caches:
            if time.perf_counter() - began > cfg.deadline_s:
                print(json.dumps({"skipped": {"batch": batch, "cache": cache}, "reason": "deadline"}), flush=True)
                continue
            kwargs = dict(timed_decode_args(cfg, c, cache), mesh=mesh, rules=rules)
            t0 = time.perf_counter()
            try:
                jax.block_until_ready(dllm.generate(model, prompts, **kwargs).tokens)
            except jax.errors.JaxRuntimeError as e:  # reported as a row; the other configurations still run
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                skipped = {"skipped": {"batch": batch, "cache": cache}, "reason": str(e).splitlines()[0][:300]}
                print(json.dumps(skipped), flush=True)
                rows.append(skipped)
                continue
            compile_s = time.perf_counter() - t0
            runs = []  # seconds of each timed decode; the median is reported
            for _ in range(cfg.repeats):
                t0 = time.perf_counter()
                result = dllm.generate(model, prompts, **kwargs)
                jax.block_until_ready(result.tokens)
                runs.append(time.perf_counter() - t0)
            seconds = float(np.median(runs))
            nfe = int(np.asarray(result.nfe).max())
            ms = 1000 * seconds / nfe
            flops, floor = 0.0, 0.0
            for queries, keys, attended in step_plan(cfg, c, cache, nfe):
                # executed FLOPs: LowConfidence reads only the active block's logits, so the head runs there only
                flops += step_flops(c, batch, queries, keys, cfg.block_length)
                read = weights + (0 if attended is None else cache_bytes(c, batch, attended))
                floor += roofline_ms(step_flops(c, batch, queries, attended or keys, cfg.block_length), read,
                                     peak_tflops, peak_tb_s) / nfe
            row = {
                "model": cfg.model.get("arch"), "batch": batch, "cache": cache, "nfe_timed": nfe,
                "ms_per_nfe": round(ms, 3), "ms_per_nfe_runs": [round(1000 * r / nfe, 3) for r in runs],
                "tokens_per_s": round(batch * nfe / seconds, 1),
                "tflops": round(flops / seconds / 1e12, 1),
                "fraction_of_peak": round(flops / seconds / 1e12 / peak_tflops, 3),
                "weight_tb_s": round(weights * nfe / seconds / 1e12, 3),
                "floor_ms": round(floor, 3), "over_floor": round(ms / floor, 3),
                # the yardsticks: a 512-token forward with the head everywhere, and the weight read
                "floor_ms_full_forward": round(step_flops(c, batch, total_len, total_len) / peak_tflops / 1e9, 3),
                "floor_ms_weights": round(weights / peak_tb_s / 1e9, 3),
                # the weights read at the rate of the model's own chained GEMMs (the speed issue's floor)
                **({"floor_ms_chained_weights": round(weights / floors["chained_gemm_tb_s"] / 1e9, 3),
                    "over_chained_weights": round(ms / (weights / floors["chained_gemm_tb_s"] / 1e9), 3)}
                   if floors and floors.get("chained_gemm_tb_s") else {}),
                "compile_s": round(compile_s, 1), "scan_layers": model.layout.scan_layers,
                "fused_projections": model.layout.fused_projections, "fp8_weights": model.layout.fp8_weights,
                "attention_impl": model.layout.attention_impl,
                "window_attention_impl": (None if cache == "none" else block_window_attention(c, model.layout, batch,
                                                                                                cfg.block_length)
                                          if cache == "block" else "gathered columns: layout.attention_impl"
                                          if cache == "dkv" else "gathered columns: explicit softmax"
                                          if cache == "elastic" else window_attention_impl(
                                              c, model.layout, batch * (cfg.gen_length if cache == "prefix"
                                                                        else cfg.block_length))),
                "pallas_block_k": window_kernel.BLOCK_K, "pallas_splits": window_kernel.SPLITS,  # None: default_splits
                "pallas_rows_per_program": window_kernel.ROWS_PER_PROGRAM,
                "mesh": mesh_axes,
                "compiler_options": engine.COMPILER_OPTIONS if kwargs["compiler_options"] is None
                else kwargs["compiler_options"],
                "tokens_sha1": hashlib.sha1(np.asarray(result.tokens).tobytes()).hexdigest()[:16],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    ratios = {}
    for batch in cfg.batch_sizes:
        by_cache = {r["cache"]: r["ms_per_nfe"] for r in rows if r.get("batch") == batch}
        for r in rows:  # window steps alone: a refresh (full forward) costs about a no-cache step
            plan = step_plan(cfg, model.config, r.get("cache", "none"), r.get("nfe_timed", 0))
            refreshes = sum(attended is None for _, _, attended in plan)
            if r.get("batch") == batch and r["cache"] != "none" and "none" in by_cache and r["nfe_timed"] > refreshes:
                r["window_step_ms"] = round((r["ms_per_nfe"] * r["nfe_timed"] - refreshes * by_cache["none"])
                                            / (r["nfe_timed"] - refreshes), 3)
                print(f"batch {batch} {r['cache']}: window steps alone {r['window_step_ms']} ms", flush=True)
        if "none" in by_cache:
            ratios[batch] = {f"none/{k}": round(by_cache["none"] / v, 2) for k, v in by_cache.items() if k != "none"}
            print(f"batch {batch}: ms per NFE {by_cache}; speedup of the caches over no cache {ratios[batch]}")
    write_json_atomic(cfg.out, {"rows": rows, "cache_speedup": ratios, "measured_floors": floors,
                                "peak_tflops_used": peak_tflops, "peak_tb_s_used": peak_tb_s,
                                "environment": environment()})
    return rows


if __name__ == "__main__":
    main()
