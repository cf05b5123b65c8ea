"""One transformer for LLaDA, Dream and the block-diffusion models (SDAR, Fast-dLLM v2), in Flax NNX.

The network (Nie et al. 2025, "Large Language Diffusion Models", arXiv
2502.09992, §2.4 and Table 5; Ye et al. 2025, "Dream 7B", arXiv 2508.15487) is
a LLaMA/Qwen2 decoder with the causal mask removed:

    x = embed(tokens)
    for each block:  x += Attention(RMSNorm(x))  (RoPE, MHA or GQA, optional qkv bias)
                     x += SwiGLU(RMSNorm(x))     (silu(x W_gate) * (x W_up)) W_down
    logits = RMSNorm(x) W_head

Dream (and Fast-dLLM v2) predict position i from hidden state i-1 ("token
shift"): `logits = concat(h[:, :1], h[:, :-1]) W_head`. With
`ModelConfig.attention="causal"` and token shift the same network is a plain
autoregressive LM (the causal mask put back), which the framework trains to
score the generative perplexity of dLLM samples (`dllm.diffusion.autoregressive_loss`).
With `attention="block_causal"` a query attends its own block and every
earlier one (block diffusion: BD3-LM, SDAR, Fast-dLLM v2); blocks are cut by
RoPE position, so a left-padded row keeps its blocks. `qk_norm` adds Qwen3's
per-head RMSNorm of q and k (SDAR).

How the model runs is its `Layout` (`dllm.models.layout`, never part of a
checkpoint). Layer parameters are laid out as `Layout.scan_layers` says (as MaxText does): stacked
along a leading `layers` axis for `lax.scan` (fast compile, training), or one
`blocks[i]` dict per layer for unrolled layers (fastest decoding on GPU: no
per-step slice copies of stacked weights). With `fused_projections` the model
holds q/k/v as one `qkv_proj` [d, 3, heads, head_dim] (multi-head attention), or
with grouped-query attention as one `gqa_qkv_proj` [d, kv_heads, group + 2, head_dim]
(each KV head's group of query heads, then its k and its v), and gate/up as one `gate_up_proj` [d, 2, mlp]
(MaxText's `fused_qkv` and `fused_mlp`): one wide GEMM instead of three or two,
which at 32 tokens streams the weights faster. Checkpoints always hold the stacked, unfused ("canonical")
layout; `canonical_params` and `model_param_tree` convert. Every parameter
carries logical axis names in its `logical_axes` metadata; `dllm.sharding` maps
them to mesh axes (the new "qkv"/"gate_up"/"qkv_group" axes stay whole).

Padding: rows are left-padded. `attention_mask` hides padded keys, and RoPE
positions count only real tokens (`cumsum(mask) - 1`), so a padded row
computes exactly what it computes alone. (LLaDA's own modeling file uses
`arange` positions, which makes a left-padded row see shifted positions; we
deviate on purpose.)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dllm.models.config import ModelConfig
from dllm.models.layout import Layout
from dllm.models.quantize import (CONTRACTION_AXES, SCALE_SUFFIX, dequantize_weights, fp8_einsum, quantize_fp8,
                                  quantize_weights)
from dllm.models.window_attention import pad_axis, window_attention

# Name -> logical axes of every per-layer parameter (the leading "layers" axis
# is added when stacked). One table: the HF weight maps and the sharding rules
# read it.
LAYER_PARAM_AXES = {
    "attn_norm": ("embed",),
    "q_proj": ("embed", "heads", "head_dim"),
    "k_proj": ("embed", "kv_heads", "head_dim"),
    "v_proj": ("embed", "kv_heads", "head_dim"),
    "q_bias": ("heads", "head_dim"),
    "k_bias": ("kv_heads", "head_dim"),
    "v_bias": ("kv_heads", "head_dim"),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "o_proj": ("heads", "head_dim", "embed"),
    "mlp_norm": ("embed",),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "qkv_proj": ("embed", "qkv", "heads", "head_dim"),
    "gqa_qkv_proj": ("embed", "kv_heads", "qkv_group", "head_dim"),  # split over KV heads as k_proj is
    "gate_up_proj": ("embed", "gate_up", "mlp"),
}

# Fused parameter -> the canonical parameters it joins (`join_parts`).
FUSED_PARAMS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
                "gqa_qkv_proj": ("q_proj", "k_proj", "v_proj")}


def join_gqa_qkv(q, k, v, xp=jnp):
    """q [..., d, heads, head_dim], k, v [..., d, kv_heads, head_dim] -> [..., d, kv_heads, group + 2,
    head_dim]: KV head g holds its query heads g * group + [0, group), then its k, then its v (`xp`:
    jnp, or np for host arrays)."""
    q = q.reshape(*q.shape[:-2], k.shape[-2], -1, q.shape[-1])
    return xp.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2)


def split_gqa_qkv(w):
    """Inverse of `join_gqa_qkv`: (q, k, v) of a [..., kv_heads, group + 2, head_dim] array."""
    q = w[..., :-2, :]
    return q.reshape(*q.shape[:-3], -1, q.shape[-1]), w[..., -2, :], w[..., -1, :]


def layer_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each canonical per-layer parameter (without the layers axis),
    as checkpoints store them; `model_layer_shapes` gives the model's own."""
    d, h, kv, hd, f = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.mlp_hidden
    shapes = {
        "attn_norm": (d,),
        "q_proj": (d, h, hd),
        "k_proj": (d, kv, hd),
        "v_proj": (d, kv, hd),
        "o_proj": (h, hd, d),
        "mlp_norm": (d,),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }
    if config.qkv_bias:
        shapes.update(q_bias=(h, hd), k_bias=(kv, hd), v_bias=(kv, hd))
    if config.qk_norm:
        shapes.update(q_norm=(hd,), k_norm=(hd,))
    return shapes


def fused_groups(config: ModelConfig, layout: Layout) -> dict[str, tuple[str, ...]]:
    """The fused parameters a model of this config holds in this layout (see
    `Layout.fused_projections`): gate/up, and q/k/v as `qkv_proj` (multi-head
    attention) or `gqa_qkv_proj` (fewer KV heads)."""
    if not layout.fused_projections:
        return {}
    qkv = "qkv_proj" if config.n_kv_heads == config.n_heads else "gqa_qkv_proj"
    return {"gate_up_proj": FUSED_PARAMS["gate_up_proj"], qkv: FUSED_PARAMS[qkv]}


def model_layer_shapes(config: ModelConfig, layout: Layout) -> dict[str, tuple[int, ...]]:
    """Shape of each per-layer parameter the model holds: the canonical ones,
    with every fused group replaced by one [d, parts, ...] parameter (gqa_qkv_proj: [d, kv_heads,
    group + 2, head_dim])."""
    shapes = layer_param_shapes(config)
    for fused, parts in fused_groups(config, layout).items():
        for part in parts:
            del shapes[part]
        shapes[fused] = _fused_shape(config, fused)
    return shapes


@functools.lru_cache(maxsize=64)
def _fused_shape(config: ModelConfig, fused: str) -> tuple[int, ...]:
    """One layer's shape of the fused parameter `fused` (`join_parts` of its parts' shapes)."""
    parts = [jax.ShapeDtypeStruct(layer_param_shapes(config)[part], jnp.float32) for part in FUSED_PARAMS[fused]]
    return tuple(jax.eval_shape(lambda arrays: join_parts(config, fused, arrays), parts).shape)


def model_layer_names(config: ModelConfig, layout: Layout) -> list[str]:
    """Every per-layer parameter the model holds: `model_layer_shapes`' names, and with
    `Layout.fp8_weights` the scale of each GEMM weight (`<name>_scale`)."""
    names = list(model_layer_shapes(config, layout))
    if layout.fp8_weights:
        names += [name + SCALE_SUFFIX for name in names if name in CONTRACTION_AXES]
    return names


def param_axes(name: str, axes: tuple) -> tuple:
    """Logical axes of parameter `name` whose weight has `axes`; an FP8 scale (`<weight>_scale`)
    keeps the weight's axes but its contracted ones, which have size 1 (replicated)."""
    if not name.endswith(SCALE_SUFFIX):
        return axes
    contracted = {len(axes) + a for a in CONTRACTION_AXES[name.removesuffix(SCALE_SUFFIX)]}
    return tuple(None if i in contracted else axis for i, axis in enumerate(axes))


def project(spec: str, x: jax.Array, p: dict, name: str, dtype) -> jax.Array:
    """`einsum(spec, x, p[name])` in `dtype`: a weight held in FP8 (`Layout.fp8_weights`, its scale at
    `p[name + "_scale"]`) goes through `quantize.fp8_einsum`."""
    if name + SCALE_SUFFIX in p:
        return fp8_einsum(spec, x.astype(dtype), p[name], p[name + SCALE_SUFFIX])
    return jnp.einsum(spec, x, p[name].astype(dtype))


def _stack_axis(config: ModelConfig, part: str) -> int:
    """Where a fused group's `parts` axis sits, counted from the end (right
    after the "embed" axis), so stacked [layers, ...] arrays work too."""
    return -len(layer_param_shapes(config)[part])


def join_parts(config: ModelConfig, fused: str, arrays, xp=jnp):
    """The fused parameter `fused` from its parts' arrays (one layer or stacked [layers, ...]; `xp`:
    jnp, or np for host arrays): stacked on a new axis after "embed" (`qkv_proj`, `gate_up_proj`) or
    grouped per KV head (`join_gqa_qkv`)."""
    if fused == "gqa_qkv_proj":
        return join_gqa_qkv(*arrays, xp=xp)
    return xp.stack(arrays, axis=_stack_axis(config, FUSED_PARAMS[fused][0]))


def split_parts(config: ModelConfig, fused: str, value) -> list:
    """Inverse of `join_parts`: the parts' arrays, in `FUSED_PARAMS` order."""
    if fused == "gqa_qkv_proj":
        return list(split_gqa_qkv(value))
    axis = _stack_axis(config, FUSED_PARAMS[fused][0])
    return [jnp.take(value, i, axis=axis) for i in range(len(FUSED_PARAMS[fused]))]


def fuse_params(config: ModelConfig, layout: Layout, params: dict) -> dict:
    """Canonical names -> the model's: stacks each fused group whose parts are
    all present (so already fused params pass through). Values may be arrays
    (one layer, or stacked layers) or per-layer lists of arrays."""
    params = dict(params)
    for fused, parts in fused_groups(config, layout).items():
        if not all(part in params for part in parts):
            continue
        values = [params.pop(part) for part in parts]
        if isinstance(values[0], (list, tuple)):
            params[fused] = [join_parts(config, fused, layer) for layer in zip(*values)]
        else:
            params[fused] = join_parts(config, fused, values)
    return params


def split_fused(config: ModelConfig, layout: Layout, params: dict) -> dict:
    """The model's names -> canonical ones (inverse of `fuse_params`)."""
    params = dict(params)
    for fused, parts in fused_groups(config, layout).items():
        params.update(zip(parts, split_parts(config, fused, params.pop(fused))))
    return params


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, cast back before the scale (as LLaMA and OLMo do)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, L, head_dim] in float32 for the rotate-half RoPE."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding (Su et al. 2021), rotate-half layout as in LLaMA/Qwen2."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions that count only real tokens of a left-padded row."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def default_positions(tokens: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """`positions_from_mask`, or 0..L-1 when there is no mask (no padding)."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return positions_from_mask(attention_mask)


def attention_qkv(x, p, config: ModelConfig, cos, sin):
    """Projects x [B, L, d] to rotated q [B,L,H,D] and k, v [B,L,KV,D]."""
    dtype = config.compute_dtype
    h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
    if "qkv_proj" in p:  # fused_projections: one GEMM
        qkv = project("bld,dchk->blchk", h, p, "qkv_proj", dtype)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    elif "gqa_qkv_proj" in p:  # the same, grouped per KV head
        q, k, v = split_gqa_qkv(project("bld,dgck->blgck", h, p, "gqa_qkv_proj", dtype))
    else:
        q, k, v = _separate_qkv(h, p, dtype)
    if config.qkv_bias:
        q = q + p["q_bias"].astype(dtype)
        k = k + p["k_bias"].astype(dtype)
        v = v + p["v_bias"].astype(dtype)
    if config.qk_norm:  # Qwen3 / SDAR: each head normalised over head_dim, before RoPE
        q = rms_norm(q, p["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], config.rms_norm_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _separate_qkv(h, p, dtype):
    # Three distinct values for the three projections: XLA's dot merger would
    # otherwise fuse q and k into one Triton GEMM over concatenated weights,
    # which ran well below cuBLAS on the H100 (the full LLaDA-8B step got faster
    # with this barrier; experiments/results/benchmark/README.md).
    hq, hk, hv = jax.lax.optimization_barrier((h, h, h))
    q = project("bld,dhk->blhk", hq, p, "q_proj", dtype)
    k = project("bld,dhk->blhk", hk, p, "k_proj", dtype)
    v = project("bld,dhk->blhk", hv, p, "v_proj", dtype)
    return q, k, v


def attention_out_and_mlp(x, attended, p, config: ModelConfig):
    """Residual adds of the attention output and the SwiGLU MLP."""
    dtype = config.compute_dtype
    x = x + project("blhk,hkd->bld", attended, p, "o_proj", dtype)
    h = rms_norm(x, p["mlp_norm"], config.rms_norm_eps)
    if "gate_up_proj" in p:  # fused_projections: one GEMM
        gate_up = project("bld,dcf->blcf", h, p, "gate_up_proj", dtype)
        gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
    else:
        gate = project("bld,df->blf", h, p, "gate_proj", dtype)
        up = project("bld,df->blf", h, p, "up_proj", dtype)
    return x + project("blf,fd->bld", jax.nn.silu(gate) * up, p, "down_proj", dtype)


SHORT_WINDOW = 64  # query rows (batch x window); at most this many, a window step's attention has its own default


def window_attention_impl(config: ModelConfig, layout: Layout, query_rows: int) -> str | None:
    """The attention implementation of a cached window step with `query_rows`
    = batch x window queries in all (see `Layout.window_attention_impl`)."""
    if layout.window_attention_impl is not None:
        return layout.window_attention_impl
    if query_rows > SHORT_WINDOW:
        return layout.attention_impl
    # The Pallas kernel is one unpartitioned custom call: the default keeps it to one-device runs.
    pallas_fits = config.head_dim >= 16 and not config.head_dim & (config.head_dim - 1)
    one_gpu = jax.default_backend() == "gpu" and jax.device_count() == 1
    return "pallas" if one_gpu and pallas_fits else "xla"


def block_causal_pairs(query_positions, key_positions, block_size: int) -> jax.Array:
    """bool [B, T, S]: query t may attend key s, block-causally (BD3-LM's M_BC, Arriola et al. 2025,
    arXiv 2503.09573, §3.1): key block <= query block, block b holding RoPE positions
    [b * block_size, (b + 1) * block_size)."""
    return (key_positions[:, None, :] // block_size) <= (query_positions[:, :, None] // block_size)


def attention_pairs(config: ModelConfig, positions, attention_mask, pair_mask=None):
    """The [B, L, L] query-key mask of a full forward, or None where the pattern needs none
    (bidirectional: the key mask alone; causal: the kernels' own causal flag).
    `pair_mask` (e.g. the 2L training mask) replaces the pattern; padded keys stay hidden."""
    if pair_mask is None and config.attention != "block_causal":
        return None
    pairs = block_causal_pairs(positions, positions, config.block_size) if pair_mask is None else pair_mask
    if attention_mask is not None:
        pairs = pairs & attention_mask[:, None, :].astype(bool)
    return pairs


def refuse_window_steps(config: ModelConfig) -> None:
    """Cached window steps attend bidirectionally (Fast-dLLM's prefix/dual caches, the fused Pallas
    kernel) or block-causally (the exact block cache, `window_pairs`); a causal model runs full
    forwards only."""
    if config.attention == "causal":
        raise ValueError(f"ModelConfig.attention={config.attention!r}: cached window steps attend "
                         "bidirectionally or block-causally, which this pattern cannot; decode it with cache='none'")


def window_pairs(config: ModelConfig, window_positions, positions, key_mask, key_length: int | None):
    """bool [B, Q, S]: which cached keys each window query may attend under a block-causal model
    (`block_causal_pairs` with the hidden keys folded in), or None for a bidirectional model (the
    key mask alone)."""
    if config.attention != "block_causal":
        return None
    pairs = block_causal_pairs(window_positions, positions, config.block_size)
    if key_mask is not None:
        return pairs & key_mask[:, None, :].astype(bool)
    if key_length is not None:
        return pairs & (jnp.arange(positions.shape[1]) < key_length)[None, None, :]
    return pairs


def block_causal_key_limit(pairs) -> jax.Array:
    """int32 [B, Q]: one past the last cache column each window query may attend under `pairs`
    [B, Q, S] (`window_pairs`), the column limit of the Pallas window kernel.

    Exact for the block-causal pattern: a row's positions rise with its columns (left padding,
    then the canvas), so the keys a query sees, in blocks up to its own, are every visible column
    below the limit; the kernel takes the key mask beside it for the padding."""
    columns = jnp.arange(1, pairs.shape[-1] + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(pairs, columns, 0), axis=-1)


def attend(q, k, v, key_mask, config: ModelConfig, layout: Layout, key_length: int | None = None, *,
           window: bool = False, pairs=None):
    """Attention of q over k/v; key_mask [B, S] hides padding.

    Bidirectional; causal (query i sees keys <= i) for `config.attention`
    "causal" in full forwards; or `pairs` [B, T, S] (`attention_pairs`: the
    block-causal pattern, a training mask) with the padding folded in.
    Cached window steps refuse a model that is not bidirectional.

    key_mask None: no key is padding, or (`key_length`) only the keys from
    `key_length` on, which the fused kernels take as sequence lengths instead
    of a [B, 1, T, S] bias (cuDNN's fast path). `window`: a cached window step
    (`window_attention_impl(config, layout, batch x queries)` instead of `layout.attention_impl`;
    its "pallas" kernel is called by `Transformer.forward_window`, with the cache write)."""
    impl = window_attention_impl(config, layout, q.shape[0] * q.shape[1]) if window else layout.attention_impl
    if window:
        refuse_window_steps(config)
    if pairs is not None:
        mask = pairs[:, None, :, :]
        if window:  # a block-causal window step outside the Pallas kernel (forward_window's): XLA
            impl = None
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    causal = config.attention == "causal"
    if key_mask is None:
        lengths = None if key_length is None else jnp.full((q.shape[0],), key_length, jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=impl,
                                            is_causal=causal)
    mask = key_mask[:, None, None, :].astype(bool)
    if impl == "cudnn":  # cuDNN takes the mask as a bias of shape [B, 1, T, S]
        mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl, is_causal=causal)


def run_layers(block_fn, x, layer_params, layout: Layout, per_layer=None):
    """Applies `x, out_i = block_fn(x, params_i, per_layer_i)` for every layer.

    Scanned (`layout.scan_layers`): `layer_params` is a dict of stacked
    [layers, ...] arrays, `per_layer` a pytree of stacked arrays (or None), and
    the outputs come back stacked. Unrolled: `layer_params` is a list of
    per-layer dicts, `per_layer` a list of per-layer items (or None), and the
    outputs come back as a list. Unrolled layers never slice or stack a
    [layers, ...] array: on GPU each such slice feeding a matmul is a copy,
    which inside a decode loop re-copied every weight at every step.
    """
    if layout.scan_layers:
        return jax.lax.scan(lambda carry, xs: block_fn(carry, *xs), x, (layer_params, per_layer),
                            unroll=layout.scan_unroll)
    outputs = []
    for i, params_i in enumerate(layer_params):
        x, out = block_fn(x, params_i, None if per_layer is None else per_layer[i])
        outputs.append(out)
    return x, outputs


@struct.dataclass
class KVCache:
    """Per-layer keys (after RoPE) and values of every canvas position.

    Scanned layers: k, v are [layers, B, S, kv_heads, head_dim] arrays, logical
    axes `CACHE_AXES`. Unrolled layers: k, v are tuples of one
    [B, S, kv_heads, head_dim] array per layer (`CACHE_AXES[1:]`), so a layer
    reads and writes its own buffer in place. S may exceed the canvas by a
    padding tail that is never attended to.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config: ModelConfig, layout: Layout, batch: int, length: int) -> "KVCache":
        """An empty cache of `length` positions for a model of `config` run in `layout`."""
        shape = (batch, length, config.n_kv_heads, config.head_dim)
        if layout.scan_layers:
            empty = jnp.zeros((config.n_layers, *shape), config.compute_dtype)
            return cls(empty, empty)
        empty = tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.n_layers))
        return cls(empty, empty)

    @classmethod
    def from_layers(cls, outputs, layout: Layout) -> "KVCache":
        """From `run_layers` outputs of (k, v) per layer (stacked or a list)."""
        if layout.scan_layers:
            return cls(*outputs)
        return cls(tuple(k for k, _ in outputs), tuple(v for _, v in outputs))

    def per_layer(self, layout: Layout):
        """The `per_layer` argument of `run_layers`: (k, v) of every layer."""
        return (self.k, self.v) if layout.scan_layers else list(zip(self.k, self.v))


CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


def written_before_next_layer(x, cache_k, cache_v):
    """(x, (cache_k, cache_v)) tied by an optimization barrier, so the next layer
    starts only after this layer's cache writes. Without it XLA's GPU scheduler
    left every layer's K/V (with fused projections, the whole q/k/v output)
    alive until the end of the forward, which more than doubled the temporaries
    of a batch-32 LLaDA-8B dual-cache decode."""
    x, cache_k, cache_v = jax.lax.optimization_barrier((x, cache_k, cache_v))
    return x, (cache_k, cache_v)


GEMM_ROW_MULTIPLE = 8  # XLA pads bf16 (and f16) GEMM dimensions to multiples of 8 on Ampere and later GPUs


def aligned_rows(batch: int, rows: int) -> int:
    """The fewest rows >= `rows` per canvas row for which batch x rows is a multiple of
    `GEMM_ROW_MULTIPLE`. XLA's GPU compiler pads every bf16 GEMM operand to such a multiple
    (`CublasPadForGemms`, XLA's cublas_padding_requirements.h): a token-shifted block step's 33 rows
    at batch 1 cost a pad kernel before each GEMM and a slice after it, every layer. A window whose
    rows are padded once, before the first layer, runs its GEMMs unpadded. `batch` is the whole
    batch: with the batch sharded over a mesh, a device's share may still be padded by XLA."""
    step = GEMM_ROW_MULTIPLE // math.gcd(batch, GEMM_ROW_MULTIPLE)
    return -(-rows // step) * step


def take_positions(hidden, start: int, length: int, offsets=None):
    """hidden[:, start:start + length], shifted per row by `offsets` [B] when given."""
    if offsets is None:
        return jax.lax.slice_in_dim(hidden, start, start + length, axis=1)
    return jax.vmap(lambda h, o: jax.lax.dynamic_slice_in_dim(h, start + o, length, axis=0))(hidden, offsets)


def write_rows(cache_layer, update, start):
    """Writes update [B, Q, ...] into cache_layer [B, S, ...] at per-row offsets
    `start` [B], clamped to [0, S - Q] as `dynamic_update_slice` does.

    One scatter whose indices are promised in bounds (they are, after the
    clamp). A vmapped `dynamic_update_slice` became a scatter with
    out-of-bounds checks, which XLA lowered to a copy of the old rows plus a
    select per layer: two extra kernels per layer in every cached step."""
    batch, queries, length = update.shape[0], update.shape[1], cache_layer.shape[1]
    start = jnp.clip(start, 0, length - queries)
    columns = start[:, None] + jnp.arange(queries)[None, :]
    return cache_layer.at[jnp.arange(batch)[:, None], columns].set(
        update, mode="promise_in_bounds", indices_are_sorted=True, unique_indices=True)


def write_columns(cache_layer, update, columns):
    """Writes update [B, Q, ...] into cache_layer [B, S, ...] at per-row columns [B, Q]: ascending
    and distinct within a row, and in bounds (`Transformer.forward_columns`'s contract)."""
    rows = jnp.arange(update.shape[0])[:, None]
    return cache_layer.at[rows, columns].set(update, mode="promise_in_bounds", indices_are_sorted=True,
                                             unique_indices=True)


def attention_weights(q, k, key_mask) -> jax.Array:
    """float32 [B, H, Q, S]: softmax(q k^T / sqrt(head_dim)) of queries q [B, Q, H, D] over keys
    k [B, S, KV, D] where key_mask [B, S] is 1 (grouped-query heads read their KV head)."""
    k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
    scores = jnp.einsum("bqhd,bshd->bhqs", q.astype(jnp.float32), k.astype(jnp.float32)) / q.shape[-1] ** 0.5
    return jax.nn.softmax(jnp.where(key_mask[:, None, None, :] > 0, scores, -jnp.inf), axis=-1)


def attend_with(weights, v, config: ModelConfig) -> jax.Array:
    """[B, Q, H, D]: the attention output of `attention_weights` over values v [B, S, KV, D]."""
    v = jnp.repeat(v, weights.shape[1] // v.shape[2], axis=2)
    return jnp.einsum("bhqs,bshd->bqhd", weights, v.astype(jnp.float32)).astype(config.compute_dtype)


def attention_similarity(old, new, tracked, key_mask, eps: float = 1e-8) -> jax.Array:
    """float32 [B]: Elastic-Cache's drift statistic (arXiv 2510.14973; the authors'
    `F.cosine_similarity(past, att_weight, dim=1).mean()`): for each tracked query t and real key
    s, the cosine between the head vectors old[:, h, t, s] and new[:, h, t, s] (norms floored at
    eps, as torch does), averaged over the tracked queries (`tracked` bool [B, Q]) and the keys
    where key_mask [B, S] is 1. 1.0 for a row that tracks nothing."""
    dot = jnp.sum(old * new, axis=1)
    norms = (jnp.maximum(jnp.sqrt(jnp.sum(old * old, axis=1)), eps)
             * jnp.maximum(jnp.sqrt(jnp.sum(new * new, axis=1)), eps))
    where = tracked[:, :, None] & (key_mask[:, None, :] > 0)
    total = jnp.sum(jnp.where(where, dot / norms, 0.0), axis=(1, 2))
    return jnp.where(jnp.any(tracked, -1), total / jnp.maximum(jnp.sum(where, axis=(1, 2)), 1), 1.0)


@struct.dataclass
class ElasticBuffer:
    """Elastic-Cache's buffer: per layer the K/V (after RoPE), queries (after RoPE) and layer inputs
    of every column, in `KVCache`'s layout (stacked [layers, B, S, ...] when scanned, else one array
    per layer), and `tracked` bool [B, S], the columns to re-forward and test at the next step."""

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    q: jax.Array | tuple[jax.Array, ...]
    x: jax.Array | tuple[jax.Array, ...]
    tracked: jax.Array

    @classmethod
    def zeros(cls, config: ModelConfig, layout: Layout, batch: int, length: int) -> "ElasticBuffer":
        kv = KVCache.zeros(config, layout, batch, length)
        queries = KVCache.zeros(dataclasses.replace(config, n_kv_heads=config.n_heads), layout, batch, length).k
        shape = (batch, length, config.d_model)
        if layout.scan_layers:
            inputs = jnp.zeros((config.n_layers, *shape), config.compute_dtype)
        else:
            inputs = tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.n_layers))
        return cls(kv.k, kv.v, queries, inputs, jnp.zeros((batch, length), bool))

    @classmethod
    def from_layers(cls, outputs, layout: Layout) -> "ElasticBuffer":
        """From `run_layers` outputs of (k, v, q, x, tracked) per layer; tracked is their union."""
        if layout.scan_layers:
            k, v, q, x, tracked = outputs
            return cls(k, v, q, x, jnp.any(tracked, axis=0))
        k, v, q, x, tracked = (tuple(parts) for parts in zip(*outputs))
        return cls(k, v, q, x, functools.reduce(jnp.logical_or, tracked))

    def per_layer(self, layout: Layout):
        """The `per_layer` argument of `run_layers`: (k, v, q, x) of every layer."""
        if layout.scan_layers:
            return (self.k, self.v, self.q, self.x)
        return list(zip(self.k, self.v, self.q, self.x))

    def logical_axes(self):
        """Logical axis names of every leaf (the engine's sharding constraint): K/V and queries as
        `CACHE_AXES`, layer inputs (layers, batch, length, -) (the model width unsplit: "embed" may share
        the batch's mesh axis), tracked (batch, length)."""
        heads = lambda a: jax.tree.map(lambda leaf: CACHE_AXES[-leaf.ndim:], a)
        inputs = jax.tree.map(lambda leaf: ("layers", "batch", "length", None)[-leaf.ndim:], self.x)
        return ElasticBuffer(heads(self.k), heads(self.v), heads(self.q), inputs, ("batch", "length"))


class Transformer(nnx.Module):
    """Bidirectional LLaDA/Dream transformer: `model(tokens) -> logits`.

    `config` is the architecture (what a checkpoint's config.json says); `layout`
    how it runs (default `Layout()`: scanned, unfused, XLA attention)."""

    def __init__(self, config: ModelConfig, layout: Layout | None = None, *, rngs: nnx.Rngs):
        self.config = config
        self.layout = layout = Layout() if layout is None else layout
        c = config
        pdt = c.weight_dtype
        normal = jax.nn.initializers.normal(0.02)
        # Output projections scaled down with depth (GPT-2 / nanoGPT init).
        out_std = 0.02 / (2 * c.n_layers) ** 0.5

        def param(value, axes):
            return nnx.Param(value.astype(pdt), logical_axes=axes)

        def params_of(name, value, axes) -> dict:
            """{name: Param}, or with `fp8_weights` a GEMM weight's FP8 values and scale."""
            if not (layout.fp8_weights and name in CONTRACTION_AXES):
                return {name: param(value, axes)}
            w8, scale = quantize_fp8(value.astype(pdt), CONTRACTION_AXES[name])
            scale_name = name + SCALE_SUFFIX
            return {name: nnx.Param(w8, logical_axes=axes),
                    scale_name: nnx.Param(scale, logical_axes=param_axes(scale_name, axes))}

        self.embed = param(normal(rngs.params(), (c.vocab_size, c.d_model)), ("vocab", "embed"))

        def init(name, shape, key=None):
            if name.endswith("norm"):
                return jnp.ones(shape)
            if name.endswith("bias"):
                return jnp.zeros(shape)
            if name in ("o_proj", "down_proj"):
                return jax.random.normal(key, shape) * out_std
            return normal(key, shape)

        # Scanned: one [layers, ...] parameter per name. Unrolled: blocks[i][name],
        # each layer drawn on its own (slicing stacked draws made XLA compile the
        # 8B initializer for minutes). The two layouts draw different values for
        # one seed; `model_from_params(config, canonical_params(model))` converts.
        shapes = model_layer_shapes(c, layout)
        keys = {name: rngs.params() for name in shapes if not name.endswith(("norm", "bias"))}
        if layout.scan_layers:
            for name, shape in shapes.items():
                value = init(name, (c.n_layers, *shape), keys.get(name))
                for key, value in params_of(name, value, ("layers", *LAYER_PARAM_AXES[name])).items():
                    setattr(self, key, value)
        else:
            self.blocks = nnx.List([
                nnx.Dict({key: value for name, shape in shapes.items() for key, value in params_of(
                    name, init(name, shape, keys.get(name) if name not in keys else jax.random.fold_in(keys[name], i)),
                    LAYER_PARAM_AXES[name]).items()})
                for i in range(c.n_layers)])
        self.final_norm = param(jnp.ones((c.d_model,)), ("embed",))
        if not c.tie_embeddings:
            for key, value in params_of("lm_head", normal(rngs.params(), (c.d_model, c.vocab_size)),
                                        ("embed", "vocab")).items():
                setattr(self, key, value)

    def layer_params(self) -> dict[str, jax.Array] | list[dict[str, jax.Array]]:
        """Stacked {name: [layers, ...]} when scanned, else one dict per layer (see `run_layers`)."""
        names = model_layer_names(self.config, self.layout)
        if self.layout.scan_layers:
            return {name: getattr(self, name)[...] for name in names}
        return [{name: block[name][...] for name in names} for block in self.blocks]

    def empty_cache(self, batch: int, length: int) -> "KVCache":
        """A zero `KVCache` of `length` positions in this model's layout."""
        return KVCache.zeros(self.config, self.layout, batch, length)

    def head_params(self) -> dict[str, jax.Array]:
        """{"lm_head": [d, vocab]} (the embedding's transpose when tied), with `Layout.fp8_weights` in
        FP8 with its "lm_head_scale" beside it: `project`'s operand."""
        if self.config.tie_embeddings:
            return {"lm_head": self.embed[...].T}
        if self.layout.fp8_weights:
            return {"lm_head": self.lm_head[...], "lm_head" + SCALE_SUFFIX: self.lm_head_scale[...]}
        return {"lm_head": self.lm_head[...]}

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens, axis=0).astype(self.config.compute_dtype)

    def hidden_to_logits(self, hidden: jax.Array) -> jax.Array:
        """Final norm and output head, logits in float32."""
        h = rms_norm(hidden, self.final_norm[...], self.config.rms_norm_eps)
        logits = project("bld,dv->blv", h, self.head_params(), "lm_head", self.config.compute_dtype)
        return logits.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                 *, logits_start: int = 0, logits_length: int | None = None,
                 logits_offsets: jax.Array | None = None) -> jax.Array:
        """tokens int32[B, L] -> float32 logits [B, logits_length or L, V]: `forward` without a cache."""
        return self.forward(tokens, attention_mask, positions, logits_start=logits_start,
                            logits_length=logits_length, logits_offsets=logits_offsets)[0]

    def forward(self, tokens: jax.Array, attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                *, logits_start: int = 0, logits_length: int | None = None, logits_offsets: jax.Array | None = None,
                cache: KVCache | None = None, pair_mask: jax.Array | None = None,
                shift_from: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """The full forward over every position: (logits, cache).

        Args:
          tokens: int32 [B, L].
          attention_mask: [B, L], 1 for real tokens, 0 for left padding; None
            when no row is padded (attention then runs without a mask, which
            the fused cuDNN kernel does about 2x faster at 512 tokens).
          positions: RoPE positions [B, L]; default counts real tokens only.
          logits_start, logits_length: static slice of positions whose logits
            are computed (the output head dominates at large vocabularies, so
            the decoder asks only for the generation region); default all.
          logits_offsets: int32 [B], optional per-row shift of that slice
            (row b gets positions logits_start + offsets[b] + [0, length)).
          cache: a `KVCache` of S >= L positions to write every position's K/V
            (after RoPE) into, in place from column 0 (a cache refresh; its tail
            beyond L is left as it was and must be hidden from attention). None:
            no K/V are kept, and the returned cache is None.
          pair_mask: bool [B, L, L], which keys each query may attend, replacing
            the config's attention pattern (the block-diffusion 2L training
            forward, `dllm.diffusion.two_l_inputs`); padded keys stay hidden.
          shift_from: int32 [B, L], with `token_shift`: the column whose hidden
            state predicts each position (default i - 1; the 2L forward points
            a noised block's first position at the clean half).

        Returns (logits float32 [B, logits_length, V], the written cache or None).
        The logits of position i come from hidden state i, or i - 1 with `token_shift`.
        """
        c = self.config
        if positions is None:
            positions = default_positions(tokens, attention_mask)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
        pairs = attention_pairs(c, positions, attention_mask, pair_mask)

        def block(x, p, layer_cache):
            q, k, v = attention_qkv(x, p, c, cos, sin)
            x = attention_out_and_mlp(x, attend(q, k, v, attention_mask, c, self.layout, pairs=pairs), p, c)
            if layer_cache is None:
                return x, None
            write = lambda buffer, a: jax.lax.dynamic_update_slice_in_dim(buffer, a, 0, axis=1)
            return written_before_next_layer(x, write(layer_cache[0], k), write(layer_cache[1], v))

        per_layer = None if cache is None else cache.per_layer(self.layout)
        hidden, kv = run_layers(block, self.embed_tokens(tokens), self.layer_params(), self.layout, per_layer)
        if c.token_shift and shift_from is not None:
            hidden = jnp.take_along_axis(hidden, shift_from[:, :, None], axis=1)
        elif c.token_shift:
            hidden = jnp.concatenate([hidden[:, :1], hidden[:, :-1]], axis=1)
        length = tokens.shape[1] - logits_start if logits_length is None else logits_length
        logits = self.hidden_to_logits(take_positions(hidden, logits_start, length, logits_offsets))
        return logits, None if cache is None else KVCache.from_layers(kv, self.layout)

    def forward_window(self, tokens, positions, cache: KVCache, key_mask, *, start, queries: int, logits_count: int,
                       key_length: int | None = None):
        """Recomputes a window of positions against cached K/V (Fast-dLLM's caches; under a
        block-causal model each query sees the keys of its block and the blocks before, the exact
        block cache).

        Args:
          tokens, positions: [B, S] the canvas (padded to the cache's length S)
            and its RoPE positions.
          cache: K/V of every position; the window's fresh K/V are written into
            it (in place, as DualCache's replace_position).
          key_mask: [B, S] 1 for keys that may be attended (real, non-padding);
            or None with `key_length`: every row attends to keys [0, key_length).
          start: int32 [B], the canvas column of each row's first window position.
          queries: static window length: positions start + [0, queries) are
            recomputed (with `token_shift`, from start - 1, whose hidden state
            predicts position start).
          logits_count: logits for window positions start + [0, logits_count).

        Returns (logits [B, logits_count, V], updated cache).
        """
        c = self.config
        refuse_window_steps(c)
        if not 0 < logits_count <= queries:
            raise ValueError(f"logits_count={logits_count}: must lie in [1, queries={queries}] "
                             "(the window's positions)")
        shift = 1 if c.token_shift else 0  # position i is predicted from hidden i - 1
        first = start - shift
        rows = queries + shift
        take = jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, rows))
        window_positions = take(positions, first)
        pairs = window_pairs(c, window_positions, positions, key_mask, key_length)
        tokens = take(tokens, first)
        # the GEMMs run on `gemm_rows` rows per canvas row: the window's, then zero rows whose outputs are
        # dropped (FP8 weights: their Pallas GEMM pads its rows itself)
        aligned = (lambda n: n) if self.layout.fp8_weights else functools.partial(aligned_rows, tokens.shape[0])
        gemm_rows = aligned(rows)
        cos, sin = (pad_axis(table, 1, gemm_rows) for table in rope_tables(window_positions, c.head_dim, c.rope_theta))

        fused_write = window_attention_impl(c, self.layout, tokens.shape[0] * rows) == "pallas"
        key_limit = None if pairs is None or not fused_write else block_causal_key_limit(pairs)

        def block(x, p, layer_cache):
            cache_k, cache_v = layer_cache
            q, k, v = (a[:, :rows] for a in attention_qkv(x, p, c, cos, sin))
            if fused_write:  # one kernel attends and writes the window's K/V into the cache
                attended, cache_k, cache_v = window_attention(q, cache_k, cache_v, key_mask, (k, v), first,
                                                              key_length=key_length, key_limit=key_limit)
            else:
                cache_k, cache_v = write_rows(cache_k, k, first), write_rows(cache_v, v, first)
                attended = attend(q, cache_k, cache_v, key_mask, c, self.layout, key_length, window=True,
                                  pairs=pairs)
            x = attention_out_and_mlp(x, pad_axis(attended, 1, gemm_rows), p, c)
            return written_before_next_layer(x, cache_k, cache_v)

        hidden, kv = run_layers(block, pad_axis(self.embed_tokens(tokens), 1, gemm_rows), self.layer_params(),
                                self.layout, cache.per_layer(self.layout))
        logits = self.hidden_to_logits(hidden[:, :aligned(logits_count)])  # <= gemm_rows: logits_count <= rows
        return logits[:, :logits_count], KVCache.from_layers(kv, self.layout)


    def forward_columns(self, tokens, positions, cache: KVCache, key_mask, *, columns, logits_at=None):
        """Recomputes any set of canvas columns against cached K/V (dKV-Cache's step: the masked and
        the just-decoded positions, `dllm.decoding.cache.DKVCache`).

        Args:
          tokens, positions: [B, S] the canvas (padded to the cache's length S) and its RoPE positions.
          cache: K/V of every column; the recomputed columns' fresh K/V are written into it before
            the attention, so the recomputed queries see one another's fresh K/V and the cache elsewhere.
          key_mask: [B, S] 1 for keys that may be attended (real, non-padding; 0 on the tail).
          columns: int32 [B, Q], ascending and distinct within each row and < S; a slot with nothing
            to recompute points at a distinct tail column (hidden by `key_mask`).
          logits_at: int32 [B, L], the slots (indices into `columns`) whose logits are computed;
            default all Q (the output head dominates at large vocabularies).

        Returns (logits [B, L, V] of the hidden state at those slots (with `token_shift` a column's
        hidden state predicts the next column), updated cache). Bidirectional models only (XLA or cuDNN attention, never the
        fused Pallas window kernel, which writes one contiguous window)."""
        c = self.config
        refuse_window_steps(c)
        if c.attention != "bidirectional":
            raise ValueError(f"ModelConfig.attention={c.attention!r}: a gathered-columns step attends "
                             "bidirectionally; decode a block-causal model with cache='block' or 'none'")
        take = lambda a: jnp.take_along_axis(a, columns, axis=1)
        query_positions = take(positions)
        cos, sin = rope_tables(query_positions, c.head_dim, c.rope_theta)

        def block(x, p, layer_cache):
            q, k, v = attention_qkv(x, p, c, cos, sin)
            cache_k, cache_v = write_columns(layer_cache[0], k, columns), write_columns(layer_cache[1], v, columns)
            x = attention_out_and_mlp(x, attend(q, cache_k, cache_v, key_mask, c, self.layout), p, c)
            return written_before_next_layer(x, cache_k, cache_v)

        hidden, kv = run_layers(block, self.embed_tokens(take(tokens)), self.layer_params(), self.layout,
                                cache.per_layer(self.layout))
        if logits_at is not None:
            hidden = jnp.take_along_axis(hidden, logits_at[:, :, None], axis=1)
        return self.hidden_to_logits(hidden), KVCache.from_layers(kv, self.layout)


    def forward_elastic(self, tokens, positions, buffer: "ElasticBuffer", key_mask, *, columns, tracked_slots,
                        window_slots, full_rows, masked_columns, gamma: float, track: int, logits_at,
                        canvas: int | None = None):
        """Elastic-Cache's step (Nguyen-Tri et al. 2025, "Attention Is All You Need for KV Cache in Diffusion
        LLMs", arXiv 2510.14973, §3; the rule as the authors' LLaDA code runs it, `LLaDABlock.attention`):
        the gathered `columns` are recomputed layer by layer against the cached K/V; at each layer the
        tracked tokens' attention (their fresh query over the fresh keys) is compared with the one their
        cached query gave over the cached keys, and where the cosine similarity drops below `gamma` the
        row recomputes every position from the next layer on (depth-aware refresh).

        Args:
          tokens, positions: [B, S] the canvas (padded to the buffer's length S) and its RoPE positions.
          buffer: per layer, K/V, post-RoPE queries and layer inputs of every column, and the tracked
            columns (`ElasticBuffer`); the recomputed columns are written into it.
          key_mask: [B, S] 1 for keys that may be attended (real, non-padding; 0 on the tail).
          columns: int32 [B, Q], ascending and distinct within each row; padding slots point at
            distinct tail columns (`dllm.decoding.cache.gathered_step`).
          tracked_slots, window_slots: bool [B, Q], slots of the tracked tokens (their drift is
            tested) and of the window's masked positions (their attention picks the next tracked tokens).
          full_rows: bool [B], rows that recompute every position from layer 0 (their first step).
          masked_columns: bool [B, S], columns still masked (never tracked).
          gamma: the drift bar; track: most-attended tokens tracked per layer.
          logits_at: int32 [B, L], the slots whose logits are computed.
          canvas: static, the columns [0, canvas) that a refreshing layer recomputes (the hidden tail
            after them keeps what the gathered steps wrote there); default all S.

        Per row and layer l (not yet refreshing): similarity = mean over the tracked tokens and the
        real keys s of cos_h(a_old[h, t, s], a_new[h, t, s]), the cosine taken over the head axis
        (the authors' `F.cosine_similarity(past, att_weight, dim=1).mean()`); below `gamma`, layers
        l + 1 ... L - 1 recompute every column, their input the cached layer input with the gathered
        columns' fresh values written in (the authors' `x_cache[:, query_position] = x`). Each layer
        tracks the `track` columns, not masked, that the window's queries attend most (summed over
        heads and queries); the union over layers is tracked at the next step.

        Deviations: attention weights in float32 (the authors': bf16); the decision is per row and the
        mean runs over the row's real keys (theirs: over the batch and every key, the same at batch 1
        without padding); the gathered columns are deduplicated. Bidirectional models without token
        shift only.

        Returns (logits [B, L, V], buffer with the new tracked columns).
        """
        c = self.config
        refuse_window_steps(c)
        if c.attention != "bidirectional" or c.token_shift:
            raise ValueError(f"ModelConfig.attention={c.attention!r}, token_shift={c.token_shift}: Elastic-Cache is "
                             "built for bidirectional models without token shift (LLaDA); allowed: another cache")
        take = lambda a: jnp.take_along_axis(a, columns.reshape(columns.shape + (1,) * (a.ndim - 2)), axis=1)
        canvas = tokens.shape[1] if canvas is None else canvas
        cos_c, sin_c = rope_tables(take(positions), c.head_dim, c.rope_theta)
        cos_f, sin_f = rope_tables(positions[:, :canvas], c.head_dim, c.rope_theta)
        put = lambda whole, part: jax.lax.dynamic_update_slice_in_dim(whole, part.astype(whole.dtype), 0, axis=1)
        embedded = self.embed_tokens(tokens)
        rows = jnp.arange(tokens.shape[0])[:, None]

        def select(chosen, a, b):
            return jnp.where(chosen.reshape(chosen.shape + (1,) * (a.ndim - 1)), a, b)

        def block(carry, p, layer):
            h_cols, h_full, full_valid, refreshing = carry
            k_c, v_c, q_c, x_c = layer
            x_cols = write_columns(x_c, h_cols, columns)  # this layer's inputs with the fresh columns
            q, k, v = attention_qkv(h_cols, p, c, cos_c, sin_c)
            k_new, v_new, q_new = (write_columns(k_c, k, columns), write_columns(v_c, v, columns),
                                   write_columns(q_c, q, columns))
            weights = attention_weights(q, k_new, key_mask)
            out_cols = attention_out_and_mlp(h_cols, attend_with(weights, v_new, c), p, c)
            similarity = attention_similarity(attention_weights(take(q_c), k_c, key_mask), weights,
                                              tracked_slots, key_mask)

            def full(_):  # every canvas column; the tail keeps its gathered values
                x_in = select(full_valid, h_full, x_cols)
                x_canvas = x_in[:, :canvas]
                qf, kf, vf = attention_qkv(x_canvas, p, c, cos_f, sin_f)
                attended = attend(qf, kf, vf, key_mask[:, :canvas], c, self.layout)
                out = attention_out_and_mlp(x_canvas, attended, p, c)
                qf, kf, vf, out = put(q_new, qf), put(k_new, kf), put(v_new, vf), put(x_in, out)
                pick = functools.partial(select, refreshing)
                return (pick(kf, k_new), pick(vf, v_new), pick(qf, q_new), pick(x_in, x_cols),
                        pick(take(out), out_cols), pick(out, h_full),
                        pick(attention_weights(take(qf), kf, key_mask), weights))

            def cached(_):
                return k_new, v_new, q_new, x_cols, out_cols, h_full, weights

            k_o, v_o, q_o, x_o, h_cols, h_full, weights = jax.lax.cond(jnp.any(refreshing), full, cached, None)
            score = jnp.einsum("bhqs,bq->bs", weights, window_slots.astype(weights.dtype))
            score = jnp.where(masked_columns | (key_mask == 0), -1.0, score)
            top_score, top = jax.lax.top_k(score, track)  # a row with fewer eligible keys tracks fewer
            tracked = jnp.zeros(score.shape, bool).at[rows, top].set(top_score >= 0)
            drifted = ~refreshing & jnp.any(tracked_slots, -1) & (similarity < gamma)
            h_cols, (k_o, v_o) = written_before_next_layer(h_cols, k_o, v_o)
            return (h_cols, h_full, refreshing, refreshing | drifted), (k_o, v_o, q_o, x_o, tracked)

        start = (take(embedded), embedded, full_rows, full_rows)
        (hidden, *_), outputs = run_layers(block, start, self.layer_params(), self.layout,
                                           buffer.per_layer(self.layout))
        hidden = jnp.take_along_axis(hidden, logits_at[:, :, None], axis=1)
        return self.hidden_to_logits(hidden), ElasticBuffer.from_layers(outputs, self.layout)


def canonical_params(model: Transformer) -> dict[str, jax.Array]:
    """The parameters as checkpoints store them: {name: array}, layer parameters
    stacked [layers, ...] and unfused, whatever the model's layout."""
    config, layout = model.config, model.layout
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if not layout.scan_layers:
        blocks = params.pop("blocks")
        for name in model_layer_names(config, layout):
            params[name] = jnp.stack([blocks[i][name] for i in range(config.n_layers)])
    return split_fused(config, layout, dequantize_weights(params, config.weight_dtype))


def model_param_tree(config: ModelConfig, layout: Layout, params: dict) -> dict:
    """Canonical parameters -> the pure-dict structure of `Transformer(config, layout)`.

    A layer parameter may be stacked [layers, ...] or a list of per-layer
    arrays, under canonical or fused names; a tree that already has `blocks`
    (an unrolled model's own structure) is returned as is.
    """
    if "blocks" in params:
        return params
    params = fuse_params(config, layout, params)
    if layout.fp8_weights:
        params = quantize_weights(params)
    names = model_layer_names(config, layout)
    tree = {k: v for k, v in params.items() if k not in names}
    per_name = {n: params[n] for n in names if n in params}
    if layout.scan_layers:
        tree.update({n: jnp.stack(v) if isinstance(v, (list, tuple)) else v for n, v in per_name.items()})
    else:
        tree["blocks"] = {i: {n: v[i] for n, v in per_name.items()} for i in range(config.n_layers)}
    return tree


def count_params(model: Transformer) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
