"""Attention of a short window of queries over the KV cache, as one Pallas
(Triton) kernel: the `window_attention_impl="pallas"` path of a cached
decoding step.

A dual-cache step (Fast-dLLM, Wu et al. 2025, arXiv 2505.22618, §3.2)
attends 32 queries per row to the ~512 cached keys of every layer. XLA runs
that as a batched Q·Kᵀ GEMM, a softmax and a batched P·V GEMM with one tile
per head, three kernels per layer for a few MB of K/V that the GPU could read
several times faster (profiles: experiments/results/benchmark/README.md); then
two more kernels write the window's K/V into the cache.

Here the queries that share a KV head (every window position, and every
query head of a GQA group) are the rows of one tile, and the keys are split
over `splits` programs per head (split-K "Flash-Decoding", Dao et al. 2023;
the online softmax of FlashAttention-2, Dao 2023, arXiv 2307.08691, Alg. 1).
Each program walks its keys in blocks of `block_k`, reading the cache where
it lies (no copy, no transposed cache), and writes its rows' normalised
partial output and log-sum-exp; `combine_splits` merges the splits (exact up to
float rounding):

    out = sum_s exp(lse_s - lse) * out_s,   lse = logsumexp_s(lse_s).

A KV head's query rows and, with the fused write, the window's fresh k and v
travel as one packed operand [B, KV, rows, D], which one XLA fusion builds
from the projections. Where the three differ in shape (grouped-query heads,
a window that is not a power of two), XLA built them as three fusions, a
kernel launch apiece per layer.

Keys are hidden by a [B, S] key mask and/or a static key length (the
canvas; the cache's tail past it is never read), and per query by an optional
column limit [B, Q] (query q attends columns < limit[b, q]): a block-causal
model's window (BD3-LM's M_BC over a cache whose columns run in position
order) is exactly such a prefix per query, so the exact block cache runs
through this kernel too (`transformer.block_causal_key_limit`). A query row with every key
hidden gets zeros (XLA's attention gives the mean of V there; the engine
never asks for such a row). Scores are float32; the
probabilities meet V in the cache's dtype with float32 accumulation, as in
`jax.nn.dot_product_attention`'s XLA path. On CPU the kernel runs in Pallas's
interpreter (the tests); on GPU it compiles through Triton.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

HIDDEN = -1e30  # score of a hidden key (finite: a fully hidden block must not give NaN)
ROWS_PER_PROGRAM = 64  # query rows per program; more rows share the KV head over row blocks
SPLITS = None  # programs per (row, KV head) over the keys; None: `default_splits`
TARGET_PROGRAMS = 128  # default_splits aims at about this many programs (the H100 has 132 SMs)
MAX_SPLITS = 8
BLOCK_K = 128  # default keys per inner step (H200 sweep: 128 beat 64 at every split count)


def _accumulate(carry, q, keys, values, valid, scale):
    """One online-softmax update (FlashAttention-2, Alg. 1, lines 8-10) of the
    rows' (output, running max, running sum) with a block of keys/values;
    `valid` [rows or 1, keys] says which keys each row may attend."""
    out, running_max, total = carry
    scores = plgpu.dot(q, keys, trans_b=True).astype(jnp.float32) * scale
    scores = jnp.where(valid, scores, HIDDEN)
    new_max = jnp.maximum(running_max, scores.max(axis=1))
    probs = jnp.where(valid, jnp.exp(scores - new_max[:, None]), 0.0)
    correction = jnp.exp(running_max - new_max)
    out = out * correction[:, None] + plgpu.dot(probs.astype(values.dtype), values).astype(jnp.float32)
    return out, new_max, total * correction + probs.sum(axis=1)


def _split_kernel(q_ref, k_ref, v_ref, *refs, key_length: int, split_length: int, block_k: int, splits: int,
                  scale: float, has_mask: bool, has_limit: bool, window: int | None):
    """One (row b, KV head g, row block r, split s) program: its query rows
    against cached keys [s * split_length, (s + 1) * split_length) ∩ [0, key_length).

    `window` (the fused write): the window's fresh K/V [W, D] start at cache
    column `start`; the program of split 0 attends to them from registers and
    the first program of each (b, g) stores them into the cache (aliased
    output); every split skips those columns of the cache, so no program
    reads what another is writing."""
    refs = list(refs)
    mask_ref = refs.pop(0) if has_mask else None
    limit = refs.pop(0)[...] if has_limit else None  # [rows]: each row's first column it may not attend
    if window is not None:
        new_k_ref, new_v_ref, start_ref = refs[:3]
        refs = refs[3:]
    out_ref, lse_ref = refs[:2]
    split = pl.program_id(2) % splits
    begin = split * split_length
    q = q_ref[...]
    rows, head_dim = q.shape

    def key_valid(first, in_bounds):
        """in_bounds, and'ed with the key mask of columns first + [0, len)."""
        if not has_mask:
            return in_bounds
        return in_bounds & (plgpu.load(mask_ref.at[pl.ds(first, in_bounds.shape[0])], mask=in_bounds, other=0) != 0)

    def row_valid(valid, columns):
        """valid [keys] as the [rows or 1, keys] mask of `_accumulate`, with each row's column limit."""
        return valid[None, :] if limit is None else valid[None, :] & (columns[None, :] < limit[:, None])

    carry = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), HIDDEN, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    if window is not None:
        start = start_ref[0]
        padded_window = new_k_ref.shape[0]
        columns = start + jnp.arange(padded_window)
        fresh = key_valid(start, (jnp.arange(padded_window) < window) & (columns < key_length) & (split == 0))
        new_k, new_v = new_k_ref[...], new_v_ref[...]
        carry = _accumulate(carry, q, new_k, new_v, row_valid(fresh, columns), scale)

        @pl.when(pl.program_id(2) == 0)
        def _():
            written = (jnp.arange(padded_window) < window)[:, None]
            k_out, v_out = refs[2:4]
            plgpu.store(k_out.at[pl.ds(start, padded_window), :], new_k, mask=written)
            plgpu.store(v_out.at[pl.ds(start, padded_window), :], new_v, mask=written)

    def body(i, carry):
        first = begin + i * block_k
        columns = first + jnp.arange(block_k)
        in_bounds = columns < key_length
        if window is not None:  # the window's columns come from the fresh K/V above
            in_bounds = in_bounds & ((columns < start) | (columns >= start + window))
        valid = key_valid(first, in_bounds)
        keys = plgpu.load(k_ref.at[pl.ds(first, block_k), :], mask=valid[:, None], other=0.0)
        values = plgpu.load(v_ref.at[pl.ds(first, block_k), :], mask=valid[:, None], other=0.0)
        return _accumulate(carry, q, keys, values, row_valid(valid, columns), scale)

    blocks = jnp.clip(pl.cdiv(key_length - begin, block_k), 0, split_length // block_k)
    out, running_max, total = jax.lax.fori_loop(0, blocks, body, carry)
    seen = total > 0
    out_ref[...] = (out / jnp.where(seen, total, 1.0)[:, None]).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(seen, running_max + jnp.log(jnp.where(seen, total, 1.0)), HIDDEN)


def combine_splits(out, lse):
    """Merges per-split attention: out [..., splits, R, D] normalised within
    each split, lse [..., splits, R] -> [..., R, D] float32 (exact up to rounding).

    One variadic `lax.reduce` over the splits whose step merges two partial softmaxes
    (FlashAttention-2's rescaling, Dao 2023, arXiv 2307.08691, Alg. 1):
    (lse_a, out_a) + (lse_b, out_b) = (lse, exp(lse_a - lse) out_a + exp(lse_b - lse) out_b),
    lse = logaddexp(lse_a, lse_b): one XLA kernel, where a softmax over the splits, then a
    weighted sum, took two per layer. A split that saw no key (lse `HIDDEN`) weighs nothing."""

    def merge(a, b):
        (lse_a, out_a), (lse_b, out_b) = a, b
        top = jnp.maximum(lse_a, lse_b)
        weight_a, weight_b = jnp.exp(lse_a - top), jnp.exp(lse_b - top)
        total = weight_a + weight_b
        return top + jnp.log(total), (out_a * weight_a + out_b * weight_b) / total

    out = out.astype(jnp.float32)
    lse = jnp.broadcast_to(lse[..., None], out.shape)
    init = (jnp.array(HIDDEN, jnp.float32), jnp.array(0.0, jnp.float32))
    return jax.lax.reduce((lse, out), init, merge, (out.ndim - 3,))[1]


def split_plan(key_length: int, splits: int, block_k: int) -> tuple[int, int]:
    """(programs per head, keys per program): `splits` programs at most, each a
    whole number of `block_k` blocks covering [0, key_length)."""
    per_split = pl.cdiv(pl.cdiv(key_length, splits), block_k) * block_k
    return pl.cdiv(key_length, per_split), per_split


def default_splits(tiles: int) -> int:
    """Splits per tile (a (row, KV head, row block) of queries) so that the
    grid has about `TARGET_PROGRAMS` programs, one per SM: 4 for LLaDA-8B's
    32 heads at batch 1 (the dual-cache step), 1 from batch 4 up, where the
    tiles alone fill the GPU. Measured at batch 1 only (H200, LLaDA-8B:
    1 split 13.8 us per layer, 4-8 splits 9.0-11.9 us;
    experiments/results/benchmark/README.md); larger batches take cuDNN by
    default (`transformer.window_attention_impl`)."""
    return max(1, min(MAX_SPLITS, pl.next_power_of_2(TARGET_PROGRAMS // tiles + 1) // 2))


def pad_axis(x, axis: int, size: int):
    """x zero-padded at the end of `axis` to `size`."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


@functools.partial(jax.jit, static_argnames=("key_length", "splits", "block_k", "num_warps", "num_stages",
                                             "interpret"))
def window_attention(q, k, v, key_mask=None, new_kv=None, start=None, *, key_length: int | None = None,
                     key_limit=None, splits: int | None = None, block_k: int | None = None, num_warps: int = 4, num_stages: int = 2,
                     interpret: bool | None = None):
    """Bidirectional attention of q [B, Q, H, D] over a KV cache k, v
    [B, S, KV, D] (H a multiple of KV; query head h reads KV head h // (H/KV)).

    Args:
      key_mask: optional [B, S], nonzero for keys that may be attended.
      new_kv, start: optional fused cache write: the window's fresh (k, v)
        [B, Q, KV, D] belong at cache columns start[b] + [0, Q) (start int32
        [B], clamped to [0, S - Q] as `transformer.write_rows` does). They
        are attended in place of those columns and written into the cache.
      key_length: static; only keys [0, key_length) are read (default S).
      key_limit: optional int [B, Q]: query q of row b attends only cache
        columns < key_limit[b, q] (with the key mask and key length).
      splits: programs per (row, KV head) over the keys (split-K); default
        `SPLITS`, else `default_splits` (about one program per SM).
      block_k: keys per inner step (a power of two, >= 16); default `BLOCK_K`.
      num_warps, num_stages: Triton launch parameters.
      interpret: run in Pallas's interpreter (default: on CPU).

    q is read in the cache's dtype (the packed operand's). Returns attention
    [B, Q, H, D] in q's dtype, scaled by 1/sqrt(D) as
    `jax.nn.dot_product_attention`; with `new_kv`, (attention, k, v) with the
    window written into the cache (in place when the cache is donated).
    """
    batch, queries, heads, head_dim = q.shape
    length, kv_heads = k.shape[1], k.shape[2]
    key_length = length if key_length is None else key_length
    block_k = BLOCK_K if block_k is None else block_k
    if not 0 < key_length <= length:
        raise ValueError(f"key_length={key_length}: must lie in [1, {length}] (the cache length)")
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k={block_k}: must be a power of two >= 16")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim={head_dim}: the Pallas window attention needs a power of two >= 16; "
                         "use window_attention_impl='xla' or 'cudnn'")
    if (new_kv is None) != (start is None):
        raise ValueError("new_kv and start go together (the fused cache write)")
    if v.dtype != k.dtype:
        raise ValueError(f"k cache {k.dtype} and v cache {v.dtype}: expected one dtype (the fresh k/v are packed in it)")
    if heads % kv_heads or k.shape[-1] != head_dim or v.shape != k.shape or k.shape[0] != batch:
        raise ValueError(f"q {q.shape} and k/v {k.shape}/{v.shape}: expected q [B, Q, H, D] and k, v [B, S, KV, D] "
                         "with H a multiple of KV")
    if new_kv is not None and (new_kv[0].shape != (batch, queries, kv_heads, head_dim)
                               or new_kv[1].shape != new_kv[0].shape or start.shape != (batch,)):
        raise ValueError(f"new_kv {new_kv[0].shape}/{new_kv[1].shape} and start {start.shape}: expected "
                         f"{(batch, queries, kv_heads, head_dim)} each and ({batch},)")
    if splits is not None and splits < 1:
        raise ValueError(f"splits={splits}: must be >= 1")
    if key_mask is not None and key_mask.shape != (batch, length):
        raise ValueError(f"key_mask shape {key_mask.shape}: expected (batch, cache length) = {(batch, length)}")
    if key_limit is not None and key_limit.shape != (batch, queries):
        raise ValueError(f"key_limit shape {key_limit.shape}: expected (batch, queries) = {(batch, queries)}")
    if key_limit is not None and not jnp.issubdtype(key_limit.dtype, jnp.integer):
        raise ValueError(f"key_limit dtype {key_limit.dtype}: expected an integer dtype (an exclusive column limit)")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    group = heads // kv_heads
    padded_queries = max(16, pl.next_power_of_2(queries))  # the fused write's block (Triton: a power of two)
    rows = group * queries
    block_rows = min(ROWS_PER_PROGRAM, max(16, pl.next_power_of_2(rows)))
    row_blocks = pl.cdiv(rows, block_rows)
    if splits is None:
        splits = SPLITS or default_splits(batch * kv_heads * row_blocks)
    # Rows of KV head g: its query heads' windows, head-major (row = j * Q + query), padded at the end only
    # (a GQA group of 7 heads over 33 queries fills 4 blocks of 64 rows, not 7 of one padded window each);
    # with the fused write the query rows are padded to `query_rows`, a multiple of `padded_queries`, and
    # the fresh k, then v, follow as one block of `padded_queries` rows each (the packed operand).
    tiles = q.astype(k.dtype).reshape(batch, queries, kv_heads, group, head_dim)
    tiles = tiles.transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, rows, head_dim)
    query_rows = row_blocks * block_rows
    if new_kv is not None:
        query_rows = pl.cdiv(query_rows, padded_queries) * padded_queries
    fresh = [] if new_kv is None else [x.astype(k.dtype).transpose(0, 2, 1, 3) for x in new_kv]
    packed = jnp.concatenate([pad_axis(tiles, 2, query_rows)] + [pad_axis(x, 2, padded_queries) for x in fresh],
                             axis=2)
    programs, per_split = split_plan(key_length, splits, block_k)
    kernel = functools.partial(
        _split_kernel, key_length=key_length, split_length=per_split, block_k=block_k,
        splits=programs, scale=1.0 / math.sqrt(head_dim), has_mask=key_mask is not None,
        has_limit=key_limit is not None, window=None if new_kv is None else queries)
    cache_spec = pl.BlockSpec((None, length, None, head_dim), lambda b, g, i: (b, 0, g, 0))
    in_specs = [pl.BlockSpec((None, None, block_rows, head_dim), lambda b, g, i: (b, g, i // programs, 0)),
                cache_spec, cache_spec]
    operands = [packed, k, v]
    if key_mask is not None:
        in_specs.append(pl.BlockSpec((None, length), lambda b, g, i: (b, 0)))
        operands.append(key_mask.astype(jnp.int32))
    if key_limit is not None:  # per tile row (head-major, as the query tiles): its query's limit
        row_limits = jnp.tile(key_limit.astype(jnp.int32), (1, group))
        in_specs.append(pl.BlockSpec((None, block_rows), lambda b, g, i: (b, i // programs)))
        operands.append(pad_axis(row_limits, 1, row_blocks * block_rows))
    out_specs = [pl.BlockSpec((None, None, None, block_rows, head_dim), lambda b, g, i: (b, g, i % programs, i // programs, 0)),
                 pl.BlockSpec((None, None, None, block_rows), lambda b, g, i: (b, g, i % programs, i // programs))]
    out_shape = [jax.ShapeDtypeStruct((batch, kv_heads, programs, row_blocks * block_rows, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, kv_heads, programs, row_blocks * block_rows), jnp.float32)]
    aliases = {}
    if new_kv is not None:  # the fresh k and v blocks of the packed operand
        fresh_block = query_rows // padded_queries
        in_specs += [pl.BlockSpec((None, None, padded_queries, head_dim), lambda b, g, i: (b, g, fresh_block, 0)),
                     pl.BlockSpec((None, None, padded_queries, head_dim), lambda b, g, i: (b, g, fresh_block + 1, 0)),
                     pl.BlockSpec((None, 1), lambda b, g, i: (b, 0))]
        operands += [packed, packed, jnp.clip(start.astype(jnp.int32), 0, length - queries)[:, None]]
        aliases = {1: 2, 2: 3}  # the cache k, v operands are the outputs 2, 3
        out_specs += [cache_spec, cache_spec]
        out_shape += [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    outputs = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, row_blocks * programs),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="window_attention",
    )(*operands)
    merged = combine_splits(outputs[0], outputs[1])[:, :, :rows].astype(q.dtype)
    merged = merged.reshape(batch, kv_heads, group, queries, head_dim)
    attended = merged.transpose(0, 3, 1, 2, 4).reshape(q.shape)
    return attended if new_kv is None else (attended, outputs[2], outputs[3])
