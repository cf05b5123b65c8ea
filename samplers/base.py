"""The sampler contract and the shared scoring helpers.

A sampler is an immutable config object (a frozen dataclass Hydra can build)
with two pure, jit-able functions:

* `init(state) -> carry`: its own memory (a pytree of fixed shape).
* `step(logits, state, carry) -> (Commit, carry)`: `logits` float32
  [B, gen_length, V] for the generation region of the canvas (or, for a
  sampler with `reads_only_window`, possibly [B, block_length, V] of each
  row's block at `state.window_offsets`: see `Sampler`); `Commit` says
  which masked positions of [B, gen_length] to fill with which tokens.

Contract: for every unfinished row, at least one masked position is committed
per step (so every decode terminates); the engine also bounds the loop by
`DecodeConfig.max_steps`. The engine ignores commits on positions that are not
masked and on finished rows.

Composition is by wrapping: a sampler may hold an `inner` sampler and call its
`step` (early commit, adaptive blocks), or reshape the logits it passes on
(credit).

Randomness: each row has its own key (`dllm.decoding.engine.row_keys`), and
step s of a decode draws from that row's `state.step_key` = fold_in(row key,
s): `sample_tokens` uses fold_in(step_key, 0) and random remasking
fold_in(step_key, 1), drawn per row, so a row's noise does not depend on the
batch around it and a reference implementation can reproduce the exact draws.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# The contract lives with the engine that calls it (so dllm never imports this package); re-exported here.
from dllm.decoding.sampler import Commit, Sampler
from dllm.decoding.cache import place_logits
from dllm.decoding.state import DecodeConfig, DecodeState

NEG_INF = -jnp.inf


# ----------------------------------------------------------------- token ids


def vocabulary_size(tokenizer) -> int:
    """Vocabulary size of a `dllm.Tokenizer` or a raw `tokenizers.Tokenizer`."""
    size = getattr(tokenizer, "vocab_size", None)
    return int(size if size is not None else tokenizer.get_vocab_size())


def describe_tokenizer(tokenizer) -> str:
    source = getattr(tokenizer, "source", type(tokenizer).__name__)
    return f"tokenizer {source} (vocabulary {vocabulary_size(tokenizer)})"


def text_to_id(tokenizer, text: str, where: str) -> int:
    """The id of the single token `text`; ValueError naming it and the tokenizer when absent."""
    token_id = tokenizer.token_to_id(text)
    if token_id is None:
        raise ValueError(f"{where}={text!r} is not a token of {describe_tokenizer(tokenizer)}; "
                         "allowed: a text that is one token of the vocabulary, or give the id directly")
    return int(token_id)


def check_id_in_vocabulary(token_id: int, size: int, where: str) -> None:
    if not 0 <= token_id < size:
        raise ValueError(f"{where}={token_id} lies outside the vocabulary of size {size}; allowed 0..{size - 1}")


def bind_inner(inner, tokenizer):
    bind = getattr(inner, "bind", None)
    return bind(tokenizer) if bind is not None else inner


# ----------------------------------------------------------------- proposals


def noise_dtype(state: DecodeState):
    return jnp.float64 if state.config.noise_dtype == "float64" else jnp.float32


def apply_eos_policy(logits: jax.Array, state: DecodeState) -> jax.Array:
    """`logits_eos_inf`: EOS can never be proposed (LLaDA generate.py)."""
    if state.config.eos_policy == "logits_eos_inf":
        logits = logits.at[..., state.special.eos].set(NEG_INF)
    return logits


def sample_tokens(logits: jax.Array, state: DecodeState, step_keys: jax.Array | None = None) -> jax.Array:
    """x0 = argmax of Gumbel-perturbed logits (LLaDA `add_gumbel_noise`).

    LLaDA computes argmax(exp(l) / (-log u)^T) in float64; we take the argmax
    of the monotone equivalent l - T * log(-log u), which cannot overflow in
    float32. u ~ U(0, 1) is drawn per row from fold_in(step_key, 0) in `noise_dtype`,
    over [G, V] also for window-only logits (their rows of it), so a
    position gets the same draw from either. `step_keys` [rows of `logits`] replace
    `state.step_key` (self-speculative decoding draws each canvas's noise from the key of the
    stepwise step that reaches it).
    """
    if state.config.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jnp.argmax(perturbed_logits(logits, state, step_keys), axis=-1).astype(jnp.int32)


def perturbed_logits(logits: jax.Array, state: DecodeState, step_keys: jax.Array | None = None) -> jax.Array:
    """l - T * log(-log u) in `noise_dtype`: the Gumbel-perturbed logits `sample_tokens` takes the argmax
    of (temperature > 0), with its noise."""
    temperature = state.config.temperature
    dtype = noise_dtype(state)
    _, length, vocab = logits.shape
    u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 0), (state.config.gen_length, vocab), dtype,
                                                minval=jnp.finfo(dtype).tiny, maxval=1.0))(
        state.step_key if step_keys is None else step_keys)
    if length != state.config.gen_length:
        u = jax.vmap(lambda rows, start: jax.lax.dynamic_slice_in_dim(rows, start, length))(u, state.window_offsets)
    return logits.astype(dtype) - temperature * jnp.log(-jnp.log(u))


def probabilities(logits: jax.Array, state: DecodeState) -> jax.Array:
    """softmax(logits) in `noise_dtype`, without temperature (LLaDA issue #37)."""
    return jax.nn.softmax(logits.astype(noise_dtype(state)), axis=-1)


def deprioritize_eos(confidence: jax.Array, tokens: jax.Array, state: DecodeState) -> jax.Array:
    """`confidence_eos_eot_inf`: proposals of EOS or end-of-turn get -inf confidence."""
    if state.config.eos_policy != "confidence_eos_eot_inf":
        return confidence
    is_end = (tokens == state.special.eos) | (tokens == state.special.eot)
    return jnp.where(is_end, NEG_INF, confidence)


# ----------------------------------------------------------------- confidences


def max_prob_confidence(probs: jax.Array, tokens: jax.Array) -> jax.Array:
    """p(x0) under the model: the confidence of LLaDA, Fast-dLLM, AdaBlock."""
    return jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]


def top2(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    best2 = jax.lax.top_k(values, 2)[0]
    return best2[..., 0], best2[..., 1]


def margin_confidence(probs: jax.Array) -> jax.Array:
    """Top-1 minus top-2 probability (Dream `margin_confidence`, ParallelBench `topk_margin`)."""
    first, second = top2(probs)
    return first - second


def neg_entropy_confidence(probs: jax.Array) -> jax.Array:
    """Negative entropy in nats (Dream `alg=entropy`); 0 is a one-hot prediction."""
    return jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-30)), axis=-1)


def top2_logit_gap(logits: jax.Array) -> jax.Array:
    """Top-1 minus top-2 raw logit (Prophet's early-commit signal)."""
    first, second = top2(logits)
    return first - second


# The one confidence table every rule scores positions with: name -> (probs, proposed tokens) -> score,
# higher is more confident. A rule takes a `confidence` setting naming one of these.
CONFIDENCES = {
    "max_prob": max_prob_confidence,
    "margin": lambda probs, tokens: margin_confidence(probs),
    "neg_entropy": lambda probs, tokens: neg_entropy_confidence(probs),
}


def check_confidence(owner: str, name, allowed=tuple(CONFIDENCES)) -> None:
    if name not in allowed:
        raise ValueError(f"{owner}.confidence={name!r}: allowed {tuple(allowed)}")


def check_number(owner: str, field: str, value, low=None, high=None, *, low_open=False, high_open=False,
                 integer=False, unit="") -> None:
    """ValueError naming `owner.field`, the value and the allowed range unless `value` is a number
    (an int with `integer`; never a bool) in [low, high] (open ends as asked; None: unbounded)."""
    kinds = (int,) if integer else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, kinds) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{owner}.{field}={value!r}: allowed range {span}{unit}" + (" (an int)" if integer else ""))


# ----------------------------------------------------------------- selection


def on_generation(values: jax.Array, state: DecodeState, fill) -> jax.Array:
    """Per-position values [B, L, ...] computed from `step`'s logits -> [B, G, ...]:
    as they are when L = G; from window-only logits (L = block_length), placed
    at `state.window_offsets` with `fill` elsewhere (positions no window-only
    rule may commit)."""
    if values.shape[1] == state.config.gen_length:
        return values
    return place_logits(values, state.window_offsets, state.config.gen_length, fill)


def masked_in_window(state: DecodeState) -> jax.Array:
    """bool [B, G]: positions a block-restricted sampler may commit now."""
    return state.is_masked & state.in_window


def rank_desc(scores: jax.Array, eligible: jax.Array) -> jax.Array:
    """int32 [B, G]: rank of each eligible position by descending score
    (ties broken by lower position first); ineligible positions rank last."""
    # Primary key: eligible first; secondary: score descending (-inf last
    # among the eligible); lexsort is stable, so ties keep position order.
    order = jnp.lexsort((-scores, ~eligible), axis=-1)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    return jnp.where(eligible, ranks, scores.shape[-1]).astype(jnp.int32)


def top_k_commit(scores: jax.Array, eligible: jax.Array, k: jax.Array) -> jax.Array:
    """bool [B, G]: the k[b] highest-scoring eligible positions of each row."""
    return (rank_desc(scores, eligible) < k[:, None]) & eligible


def threshold_commit(scores: jax.Array, eligible: jax.Array, threshold, strict: bool = False) -> jax.Array:
    """Every eligible position with score >= threshold (> when `strict`), plus the single best
    one so every row with an eligible position makes progress (Fast-dLLM v1; v2 is strict)."""
    best = rank_desc(scores, eligible) == 0
    passes = scores > threshold if strict else scores >= threshold
    return eligible & (passes | best)
