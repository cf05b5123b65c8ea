"""Decoding configuration, the state the engine loop carries, and its result."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from dllm.decoding.cache import CACHE_MODES

EOS_POLICIES = ("none", "logits_eos_inf", "confidence_eos_eot_inf")
NOISE_DTYPES = ("float32", "float64")


def check_count(name: str, value, low: int, meaning: str) -> None:
    """ValueError unless `value` is an int (not a bool) >= low."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an int >= {low} ({meaning})")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Engine settings, independent of the sampler (hashable: a jit static).

    Attributes:
      gen_length: positions generated after the prompt.
      block_length: semi-autoregressive block size; gen_length means pure
        diffusion (one block). gen_length must be a multiple of it.
      temperature: 0 is greedy; > 0 samples x0 from softmax(logits / T) by
        Gumbel-max (LLaDA `add_gumbel_noise`).
      noise_dtype: dtype of the Gumbel noise and of the confidence softmax;
        "float64" (as LLaDA / Fast-dLLM) needs `jax.config.update("jax_enable_x64", True)`.
      cfg_scale: LLaDA's unsupervised classifier-free guidance; 0 disables it.
        logits = l_uncond + (cfg_scale + 1) * (l - l_uncond), where the
        unconditional canvas has every prompt token replaced by [MASK].
      eos_policy: "none"; "logits_eos_inf" (EOS can never be proposed);
        "confidence_eos_eot_inf" (EOS / end-of-turn may be proposed but get
        confidence -inf, so they are committed last: LLaDA Appendix B.4, as
        intended; the reference code only suppresses end-of-turn, issue #137).
      max_steps: bound on loop iterations (forward passes); default gen_length,
        enough for any sampler that commits >= 1 token per step.
      record_confidence: keep every step's confidence [max_steps, B, gen_length]
        in the trace (memory grows with max_steps).
      cache: KV caching (Fast-dLLM, arXiv 2505.22618, §3.2): "none"; "prefix"
        (between refreshes, recompute the active block and everything after
        it against cached K/V of the prefix); "dual" (recompute only the
        active window against cached prefix *and* suffix). Both are
        approximate: K/V outside the recomputed range are stale until the next
        refresh. "block": the exact cache of a block-causal model (each step
        forwards the active block over the finished blocks' K/V; the same
        tokens as "none"). "dkv": dKV-Cache-Decode (arXiv 2505.15781): a
        decoded token's K/V are cached from the step after it is decoded,
        and a step recomputes the masked and just-decoded positions only. "auto": "block" for a block-causal model (without
        classifier-free guidance), else "none"; `generate` resolves it from
        the model. One policy object per mode: `dllm/decoding/cache.py`.
      cache_refresh_every: besides the refresh at every block start, refresh
        every k-th step (0 = only at block starts; 1 = every step, which
        makes cached decoding exact). Counted in decode steps for "prefix"
        and "dual", in steps of the block for "dkv" (its reload period,
        the authors' `cache_reloading_step`).
      cache_window: queries recomputed per cached step in "dual" mode
        (default block_length); every window (adaptive blocks included) must
        fit in it.
      pipeline_blocks: D2F's pipelined decoding (Wang et al. 2025, arXiv
        2508.09192): up to this many blocks decode at once (1: one block at a
        time). A row's window grows by the next block once its last block has
        `pipeline_fraction` of its positions committed, and drops its first
        block when that one is complete; cache "none" or "block" only.
      pipeline_fraction: in (0, 1]; the share of the window's last block that
        must be committed before the next block joins.
      sliding_window: 0 (the active window is the block), or W > 0: Elastic-Cache's sliding
        window (arXiv 2510.14973, its `window_length`, 16 in the authors' runs): the active
        window runs from a row's first masked position to its W-th, inside that position's
        block; with block_length = gen_length (the authors' setting) the window is the first
        W masked positions of the whole generation. Cache "none" or "elastic" only.
      elastic_gamma: Elastic-Cache's drift bar (`gamma`, 0.9): a layer whose tracked tokens'
        attention has cosine similarity below it (old vs new, over heads, averaged) triggers
        the recompute of every position from the next layer on.
      elastic_track: most-attended tokens tracked per layer (`track_num`, 1).
      sub_block_cache: 0, or Fast-dLLM v2's `use_block_cache` with sub-blocks of this size (arXiv
        2509.26328 §3.3; v2's `small_block_size`, 8 in blocks of 32): over the exact block cache, a
        step whose current sub-block's first position is already decoded forwards that sub-block's
        queries only, over the cache, where the rest of the active block keeps the K/V of its last
        whole-block forward (approximate); a whole-block forward runs at the block's first step and
        whenever the current sub-block's first position is masked. cache='block' and the sub_blocks
        sampler of the same size only (its commits stay in the sub-block, where the logits are).
    """

    gen_length: int = 128
    block_length: int = 32
    temperature: float = 0.0
    noise_dtype: str = "float32"
    cfg_scale: float = 0.0
    eos_policy: str = "none"
    max_steps: int | None = None
    record_confidence: bool = False
    cache: str = "none"
    cache_refresh_every: int = 0
    cache_window: int | None = None
    pipeline_blocks: int = 1
    pipeline_fraction: float = 1.0
    sliding_window: int = 0
    elastic_gamma: float = 0.9
    elastic_track: int = 1
    sub_block_cache: int = 0

    def __post_init__(self):
        if not isinstance(self.gen_length, int) or self.gen_length <= 0:
            raise ValueError(f"gen_length={self.gen_length!r}: must be a positive int")
        if not isinstance(self.block_length, int) or self.block_length <= 0:
            raise ValueError(f"block_length={self.block_length!r}: must be a positive int")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length}; "
                f"allowed block lengths divide gen_length (e.g. {self.gen_length} or a divisor of it)"
            )
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale={self.cfg_scale}: must be >= 0")
        if self.eos_policy not in EOS_POLICIES:
            raise ValueError(f"eos_policy={self.eos_policy!r}: allowed {EOS_POLICIES}")
        if self.noise_dtype not in NOISE_DTYPES:
            raise ValueError(f"noise_dtype={self.noise_dtype!r}: allowed {NOISE_DTYPES}")
        if self.noise_dtype == "float64" and not jax.config.jax_enable_x64:
            raise ValueError('noise_dtype="float64" needs jax.config.update("jax_enable_x64", True)')
        if self.cache not in (*CACHE_MODES, "auto"):
            raise ValueError(f"cache={self.cache!r}: allowed {(*CACHE_MODES, 'auto')}")
        if self.cache not in ("none", "auto") and self.cfg_scale > 0:
            raise ValueError(f"cache={self.cache!r} with cfg_scale={self.cfg_scale}: classifier-free guidance "
                             "runs without a cache; allowed cache='none' when cfg_scale > 0")
        if not isinstance(self.cache_refresh_every, int) or self.cache_refresh_every < 0:
            raise ValueError(f"cache_refresh_every={self.cache_refresh_every!r}: must be an int >= 0")
        if self.cache_window is None:
            object.__setattr__(self, "cache_window", self.block_length)
        if not 0 < self.cache_window <= self.gen_length:
            raise ValueError(f"cache_window={self.cache_window}: allowed 1..gen_length={self.gen_length}")
        check_count("pipeline_blocks", self.pipeline_blocks, 1, "1: no pipelining")
        if not 0 < self.pipeline_fraction <= 1:
            raise ValueError(f"pipeline_fraction={self.pipeline_fraction!r}: allowed (0, 1]")
        if self.pipeline_blocks > 1 and self.cache not in ("none", "block", "auto"):
            raise ValueError(f"pipeline_blocks={self.pipeline_blocks} with cache={self.cache!r}: pipelined blocks "
                             "decode uncached or over the exact block cache; allowed cache 'none', 'block' or 'auto'")
        check_count("sliding_window", self.sliding_window, 0, "0: the window is the block")
        if self.sliding_window and self.cache not in ("none", "elastic", "auto"):
            raise ValueError(f"sliding_window={self.sliding_window} with cache={self.cache!r}: a sliding window decodes "
                             "uncached or over Elastic-Cache; allowed cache 'none' or 'elastic'")
        if self.sliding_window and self.pipeline_blocks > 1:
            raise ValueError(f"sliding_window={self.sliding_window} with pipeline_blocks={self.pipeline_blocks}: "
                             "a sliding window is one window; allowed pipeline_blocks=1")
        if self.cache == "elastic" and not self.sliding_window:
            raise ValueError("cache='elastic' needs sliding_window > 0 (Elastic-Cache decodes the first W masked "
                             "positions; the authors use 16)")
        check_count("elastic_track", self.elastic_track, 1, "tracked tokens per layer")
        check_count("sub_block_cache", self.sub_block_cache, 0, "0: off; else the sub-block size")
        if self.sub_block_cache:
            if self.cache not in ("block", "auto"):
                raise ValueError(f"sub_block_cache={self.sub_block_cache} with cache={self.cache!r}: Fast-dLLM v2's "
                                 "sub-block cache runs over the exact block cache; allowed cache 'block' (or 'auto' "
                                 "with a block-causal model)")
            if self.block_length % self.sub_block_cache:
                raise ValueError(f"sub_block_cache={self.sub_block_cache} does not divide block_length="
                                 f"{self.block_length}; allowed: a divisor of {self.block_length}")
            if self.pipeline_blocks > 1:
                raise ValueError(f"sub_block_cache={self.sub_block_cache} with pipeline_blocks={self.pipeline_blocks}: "
                                 "the sub-block cache decodes one block at a time; allowed pipeline_blocks=1")
        if isinstance(self.elastic_gamma, bool) or not isinstance(self.elastic_gamma, (int, float)) \
                or not -1.0 <= self.elastic_gamma <= 2.0:
            raise ValueError(f"elastic_gamma={self.elastic_gamma!r}: allowed [-1, 2] (a cosine similarity bar; "
                             "-1 never refreshes, above 1 always does)")
        if self.max_steps is None:
            object.__setattr__(self, "max_steps", self.gen_length)
        if self.max_steps <= 0:
            raise ValueError(f"max_steps={self.max_steps}: must be positive")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Token ids the engine needs, read from the tokenizer (never literals)."""

    mask: int
    eos: int
    eot: int
    pad: int


@struct.dataclass
class DecodeState:
    """Everything the jitted loop carries. Positions are in generation
    coordinates: column j is canvas column prompt_width + j.

    tokens:          int32 [B, prompt_width + gen_length], the canvas.
    attention_mask:  int32 [B, prompt_width + gen_length], 0 on left padding.
    block_start/end: int32 [B], the active window [start, end) of each row.
    step_in_block:   int32 [B], steps taken inside the current window.
    block_phase:     int32 [B], where blocks end: the positions p with p % block_length == block_phase
                     (0, or block_length - prompt_length % block_size for a block-causal model).
    step:            int32 [], loop iteration (= forward passes so far).
    nfe:             int32 [B], forward passes while the row was unfinished: also the row's own step
                     (`row_step`), which is `step` for a row that started with the batch.
    done:            bool [B], the row is finished (no mask left, or stopped).
    commit_step:     int32 [B, gen_length], the row step that committed each position (-1: never).
    committed_per_step: int32 [B, max_steps], tokens committed at each row step.
    confidence_history: float32 [max_steps, B, gen_length] or None, indexed by row step.
    key:             [B] PRNG keys, one per row; row r's step s draws from fold_in(key[r], s).

    Everything a row reads or records is counted in its own steps (`row_step`), never in the loop's
    `step`: under continuous batching (`generate(slots=...)`) a prompt enters a slot mid-loop and
    decodes as it does alone.
    cache:           the cache policy's buffer (`dllm.decoding.cache`): a `KVCache`, or None without one.
    has_logits:      bool [B, gen_length], positions whose logits this step's forward computed (all of
                     them, except in a cached window step); the sampler reads it, the engine commits
                     nowhere else.
    """

    tokens: jax.Array
    attention_mask: jax.Array
    block_start: jax.Array
    block_end: jax.Array
    step_in_block: jax.Array
    block_phase: jax.Array
    step: jax.Array
    nfe: jax.Array
    done: jax.Array
    commit_step: jax.Array
    committed_per_step: jax.Array
    confidence_history: jax.Array | None
    key: jax.Array
    cache: Any
    has_logits: jax.Array
    config: DecodeConfig = struct.field(pytree_node=False)
    special: SpecialIds = struct.field(pytree_node=False)
    prompt_width: int = struct.field(pytree_node=False)

    @property
    def gen_tokens(self) -> jax.Array:
        return self.tokens[:, self.prompt_width:]

    @property
    def is_masked(self) -> jax.Array:
        """bool [B, G]: generation positions still holding [MASK]."""
        return self.gen_tokens == self.special.mask

    @property
    def in_window(self) -> jax.Array:
        """bool [B, G]: positions inside each row's active block."""
        j = jnp.arange(self.config.gen_length)
        return (j >= self.block_start[:, None]) & (j < self.block_end[:, None])

    @property
    def window_offsets(self) -> jax.Array:
        """int32 [B]: first generation position of each row's active block,
        moved left where needed so [start, start + block_length) stays inside
        G: where window-only logits sit (`samplers.base.Sampler.reads_only_window`)."""
        g, w = self.config.gen_length, self.config.block_length
        return jnp.minimum(self.block_start, g - w).astype(jnp.int32)

    @property
    def row_step(self) -> jax.Array:
        """int32 [B]: each row's own step, the forwards it has run so far (`nfe`). For a row that
        started with the batch and is unfinished it equals `step`; a row that took a slot mid-loop
        (continuous batching) counts from 0 when it entered."""
        return self.nfe

    @property
    def step_key(self) -> jax.Array:
        """[B] keys: fold_in(row's key, row_step), the source of every random draw of this step."""
        return jax.vmap(jax.random.fold_in)(self.key, self.row_step)

    @property
    def progress(self) -> jax.Array:
        """float [B]: fraction of generation positions already committed."""
        return 1.0 - self.is_masked.mean(axis=-1)


@struct.dataclass
class Trace:
    """What happened during a decode.

    commit_step: int32 [B, G], the step at which each generation position was
      committed (-1 if never).
    committed_per_step: int32 [B, max_steps], tokens committed at each step.
    confidence: float32 [max_steps, B, G] per-step confidence, or None; indexed by each row's own
      step, and zero after the row finished (rows record nothing once done).
    """

    commit_step: jax.Array
    committed_per_step: jax.Array
    confidence: jax.Array | None = None


@struct.dataclass
class DecodeResult:
    """tokens: int32 [B, gen_length]; nfe: int32 [B]; trace: `Trace`."""

    tokens: jax.Array
    nfe: jax.Array
    trace: Trace

    @property
    def tokens_per_forward(self) -> jax.Array:
        committed = (self.trace.commit_step >= 0).sum(axis=-1)
        return committed / jnp.maximum(self.nfe, 1)
