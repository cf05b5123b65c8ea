"""Prophet's early-commit ("all-in") rule, wrapped around any inner sampler.

"Diffusion Language Models Know the Answer Before Decoding" (arXiv
2508.19982), as implemented in pixeli99/Prophet `generate_earlyexit.py`
(HEAD 460afe4). At every step, before the normal
commit:

    gap_j = top1(logits[j]) - top2(logits[j])        for j in the answer span
    g     = mean_j gap_j
    progress = global_step / steps                   (global_step counts from 1)
    tau   = 7.5 if progress < 0.33 else 5.0 if progress < 0.67 else 2.5
    if g >= tau: fill EVERY masked position of the generation (all blocks)
                 with x0 = argmax(Gumbel(logits)) and stop
    else:        the inner sampler's commit

How we define each piece in our engine:

* progress = (state.row_step + 1) / gen_length. Prophet's global_step is the
  1-based forward count over all blocks and `steps` is LLaDA's step budget;
  its evaluation runs steps = gen_length (one token per step), so
  gen_length is the planned number of steps whatever the inner sampler is.
  With an inner sampler that commits several tokens per step, progress is the
  fraction of that one-token-per-step budget used so far. (This is not
  `DecodeState.progress`, the fraction of positions already committed.)
  The phase test progress < bound is done exactly, on integers: step + 1 <
  ceil(bound * gen_length) with the bound read as its decimal, so 33/100 is
  in the 0.33 phase as in Prophet's float64 arithmetic (float32 may round
  33/100 below 0.33).
* The gap is taken on the logits the proposals are drawn from (after the
  engine's EOS policy; [MASK] is never a candidate), at every span position
  whether or not it is already committed, as Prophet does. `gap="prob"`
  uses top-1 minus top-2 probability instead (softmax without temperature);
  its thresholds then lie in [0, 1].
* The fill uses x0 from `base.sample_tokens` (Prophet's Gumbel argmax; the
  plain argmax at temperature 0), not the inner sampler's proposal.
* The answer span is found from the task's answer delimiter instead of
  Prophet's forced template (below).

Deviations from Prophet:

* Answer span. Prophet forces the tokens of " The answer is" at fixed
  generation offsets (`constraints_text`, re-imposed after every step) and
  monitors the 5 positions starting 2 after the last forced token; without
  constraints early exit is off. We force nothing: the span starts right
  after the last occurrence of the answer delimiter in the canvas (prompt or
  committed generation; left padding excluded) and covers `answer_length`
  positions from there, clipped to the generation. For our task suite every
  prompt ends with "=>", so the span is generation positions
  [0, answer_length). A row whose canvas holds no delimiter yet (or whose
  span falls outside the generation) never commits early.
* `answer_length` is a setting; Prophet hard-codes 5 inside `generate` (the
  CLI value is parsed but never passed on).
* Batches: the decision is per row (Prophet handles one row). A stopped row
  is finished; the other rows go on.
* Thresholds and progress bounds are settings of any length n + 1 and n
  (Prophet's three phases are the default).

Under a KV cache (DecodeConfig.cache != "none") a window step between
refreshes has logits only for the recomputed positions (`state.has_logits`;
zeros elsewhere, gap 0); the engine keeps commits only there and ignores
`stop` until a step that has them all: the test is exact at refresh steps; at
the other steps it sees a deflated gap and an all-in fill reaches only the
recomputed positions.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import jax
import jax.numpy as jnp

from dllm.decoding.state import DecodeConfig, DecodeState
from samplers import base
from samplers.low_confidence import LowConfidence

GAPS = ("logit", "prob")


def phase_starts(progress_bounds, gen_length: int) -> tuple[int, ...]:
    """For each progress bound b, the first 1-based step n whose progress
    n / gen_length reaches it: ceil(b * gen_length), computed exactly with b
    read as the decimal it is written as (so 33 / 100 reaches 0.33, as in
    Prophet's float64 test, where a float32 division may round below)."""
    return tuple(math.ceil(Fraction(repr(float(b))) * gen_length) for b in progress_bounds)


def answer_span(state: DecodeState, delimiter_id: int, length: int) -> jax.Array:
    """bool [B, G]: the `length` generation positions right after the last
    delimiter of each row's canvas (prompt or generation), clipped to the
    generation; all False for a row with no delimiter."""
    columns = jnp.arange(state.tokens.shape[1])
    hit = (state.tokens == delimiter_id) & (state.attention_mask == 1)
    last = jnp.max(jnp.where(hit, columns, -1), axis=-1)
    start = last + 1 - state.prompt_width  # generation coordinates; may be < 0
    j = jnp.arange(state.config.gen_length)[None, :]
    return (last >= 0)[:, None] & (j >= start[:, None]) & (j < start[:, None] + length)


def _as_floats(value, where: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}={value!r}: must be a sequence of numbers") from None
    if any(math.isnan(v) for v in values):
        raise ValueError(f"{where}={value!r}: NaN is not allowed")
    return values


@dataclasses.dataclass(frozen=True)
class EarlyCommit(base.Sampler):
    """Prophet: commit everything at once when the answer is already decided.

    Attributes:
      inner: the sampler that commits whenever the early-commit test fails
        (default LLaDA's one token per step, as Prophet); its carry is ours.
      answer_delimiter: text of the token after which the answer starts
        ("=>" in our task suite), resolved by `bind(tokenizer)`.
      answer_delimiter_id: its id given directly; when set it wins over the
        text (bind only checks it lies in the vocabulary).
      answer_length: span positions whose mean gap is tested (Prophet: 5).
      thresholds: the bar on the mean gap in each progress phase, one more
        than progress_bounds, non-increasing, >= 0 (Prophet: 7.5, 5.0, 2.5
        logits). With gap="prob" they must lie in [0, 1].
      progress_bounds: phase boundaries on progress = (step + 1) / gen_length,
        increasing, in (0, 1) (Prophet: 0.33, 0.67). Phase k applies while
        progress < progress_bounds[k]; a progress equal to a bound is in the
        later phase.
      gap: "logit" (top-1 minus top-2 raw logit, Prophet) or "prob" (top-1
        minus top-2 probability).
    """

    inner: base.Sampler = dataclasses.field(default_factory=LowConfidence)
    answer_delimiter: str | None = "=>"
    answer_delimiter_id: int | None = None
    answer_length: int = 5
    thresholds: tuple[float, ...] = (7.5, 5.0, 2.5)
    progress_bounds: tuple[float, ...] = (0.33, 0.67)
    gap: str = "logit"
    needs_whole_canvas = True  # not a field: its all-in fill reaches every block (see Sampler)
    name = "early_commit"  # registry name: configs/sampler/early_commit.yaml

    def __post_init__(self):
        if not isinstance(self.inner, base.Sampler):
            raise ValueError(f"EarlyCommit.inner={self.inner!r}: must be a samplers.base.Sampler")
        if not self.answer_delimiter and self.answer_delimiter_id is None:
            raise ValueError("EarlyCommit: an early-commit task with no answer delimiter "
                             f"(answer_delimiter={self.answer_delimiter!r}, answer_delimiter_id=None); "
                             "set answer_delimiter to the token text the answer follows (e.g. '=>') "
                             "or answer_delimiter_id to its id")
        if self.answer_delimiter is not None and not isinstance(self.answer_delimiter, str):
            raise ValueError(f"EarlyCommit.answer_delimiter={self.answer_delimiter!r}: must be a string or None")
        delimiter_id = self.answer_delimiter_id
        if delimiter_id is not None and (isinstance(delimiter_id, bool) or not isinstance(delimiter_id, int)
                                         or delimiter_id < 0):
            raise ValueError(f"EarlyCommit.answer_delimiter_id={delimiter_id!r}: must be an int >= 0 or None")
        length = self.answer_length
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise ValueError(f"EarlyCommit.answer_length={length!r}: must be a positive int")
        if self.gap not in GAPS:
            raise ValueError(f"EarlyCommit.gap={self.gap!r}: allowed {GAPS}")
        bounds = _as_floats(self.progress_bounds, "EarlyCommit.progress_bounds")
        thresholds = _as_floats(self.thresholds, "EarlyCommit.thresholds")
        object.__setattr__(self, "progress_bounds", bounds)
        object.__setattr__(self, "thresholds", thresholds)
        if any(not 0 < b < 1 for b in bounds) or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"EarlyCommit.progress_bounds={bounds}: must be increasing, each in (0, 1)")
        if len(thresholds) != len(bounds) + 1:
            raise ValueError(f"EarlyCommit.thresholds={thresholds}: need one per progress phase, "
                             f"{len(bounds) + 1} for progress_bounds={bounds}")
        if any(not 0 <= t < math.inf for t in thresholds):
            raise ValueError(f"EarlyCommit.thresholds={thresholds}: each must be finite and >= 0")
        if any(a < b for a, b in zip(thresholds, thresholds[1:])):
            raise ValueError(f"EarlyCommit.thresholds={thresholds}: must be non-increasing "
                             "(the bar falls as decoding progresses)")
        if self.gap == "prob" and any(t > 1 for t in thresholds):
            raise ValueError(f"EarlyCommit.thresholds={thresholds} with gap='prob': a probability gap lies "
                             "in [0, 1]; allowed thresholds in [0, 1] (e.g. (0.9, 0.6, 0.3))")

    # ------------------------------------------------------------ config time

    def bind(self, tokenizer) -> EarlyCommit:
        """A copy with answer_delimiter_id filled from `tokenizer` (and the inner bound)."""
        inner = base.bind_inner(self.inner, tokenizer)
        size = base.vocabulary_size(tokenizer)
        if self.answer_delimiter_id is not None:
            base.check_id_in_vocabulary(self.answer_delimiter_id, size, "EarlyCommit.answer_delimiter_id")
            delimiter_id = self.answer_delimiter_id
        else:
            delimiter_id = base.text_to_id(tokenizer, self.answer_delimiter, "EarlyCommit.answer_delimiter")
        return dataclasses.replace(self, inner=inner, answer_delimiter_id=delimiter_id)

    def validate(self, config: DecodeConfig) -> None:
        self.inner.validate(config)
        if config.cache == "elastic":
            raise ValueError("EarlyCommit with cache='elastic': its all-in fill reads every position's logits, and "
                             "an Elastic-Cache step computes the window's only (its one full forward is the "
                             "first); allowed: cache='none' over the same sliding window")
        if self.answer_delimiter_id is None:
            raise ValueError(f"EarlyCommit(answer_delimiter={self.answer_delimiter!r}) is not bound to a "
                             "tokenizer: call sampler.bind(tokenizer) or set answer_delimiter_id")

    # ------------------------------------------------------------ the rule

    def init(self, state: DecodeState):
        return self.inner.init(state)

    def threshold(self, state: DecodeState) -> jax.Array:
        """float32 [B]: each row's bar in its current phase: phase k while progress = (row step + 1) /
        gen_length < progress_bounds[k] (Prophet's global step, counted per row: the same in a
        batch that starts together, and what a row that takes a slot mid-loop sees alone)."""
        starts = jnp.asarray(phase_starts(self.progress_bounds, state.config.gen_length), jnp.int32)
        phase = jnp.sum(state.row_step[:, None] + 1 >= starts, axis=-1)
        return jnp.asarray(self.thresholds, jnp.float32)[phase]

    def gaps(self, logits: jax.Array, state: DecodeState) -> jax.Array:
        """float32 [B, G]: top-1 minus top-2 logit (or probability) per position."""
        if self.gap == "logit":
            return base.top2_logit_gap(logits).astype(jnp.float32)
        return base.margin_confidence(base.probabilities(logits, state)).astype(jnp.float32)

    def all_in(self, logits: jax.Array, state: DecodeState) -> jax.Array:
        """bool [B]: rows whose mean answer-span gap reaches this phase's bar."""
        span = answer_span(state, self.answer_delimiter_id, self.answer_length)
        count = span.sum(-1)
        mean_gap = jnp.where(span, self.gaps(logits, state), 0.0).sum(-1) / jnp.maximum(count, 1)
        return (count > 0) & (mean_gap >= self.threshold(state))

    def step(self, logits, state: DecodeState, carry):
        delimiter_id = self.answer_delimiter_id
        if delimiter_id is None:
            self.validate(state.config)
        base.check_id_in_vocabulary(delimiter_id, logits.shape[-1], "EarlyCommit.answer_delimiter_id")
        if delimiter_id == state.special.mask:
            raise ValueError(f"EarlyCommit.answer_delimiter_id={delimiter_id} is the mask id")
        commit, carry = self.inner.step(logits, state, carry)
        logits = base.apply_eos_policy(logits, state)
        all_in = self.all_in(logits, state)
        tokens = base.sample_tokens(logits, state)
        stop = all_in if commit.stop is None else all_in | commit.stop
        return commit.replace(
            tokens=jnp.where(all_in[:, None], tokens, commit.tokens),
            commit=jnp.where(all_in[:, None], state.is_masked, commit.commit),
            stop=stop,
        ), carry
