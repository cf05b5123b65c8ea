"""The absorbing (masking) forward process and the masked-diffusion losses.

Forward process (Austin et al. 2021, D3PM "absorbing" state; Sahoo et al. 2024,
MDLM, arXiv 2406.07524; Shi et al. 2024, MD4, arXiv 2406.04329; Nie et al.
2025, LLaDA, arXiv 2502.09992, §2.1): at time t in [0, 1] every token is
independently replaced by [MASK] with probability t, i.e. the linear schedule
alpha_t = 1 - t (alpha_t = probability a token is still clean).

Reverse model: a bidirectional transformer p_theta(x_0 | x_t) predicts every
masked token at once. The continuous-time negative ELBO of the linear
schedule is (MDLM Eq. 10, MD4 Eq. 5, LLaDA Eq. 3)

    -log p(x_0) <= E_{t ~ U(0,1)} E_{x_t} [ 1/t * sum_{i : x_t^i = MASK} -log p_theta(x_0^i | x_t) ]

The weight 1/t is -alpha'_t / (1 - alpha_t) for alpha_t = 1 - t. We sample
t ~ U(eps, 1) (eps = 1e-3, as LLaDA) to keep the weight bounded.

Everything here is a pure function of arrays; the model is called elsewhere
(`dllm.training`), so these functions are testable with hand-written logits.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp


def sample_times(key: jax.Array, batch: int, eps: float = 1e-3, low_discrepancy: bool = False) -> jax.Array:
    """Diffusion times t [batch] in [eps, 1], one per row.

    `low_discrepancy=True` uses the stratified sampler of VDM (Kingma et al.
    2021, Appendix I.1) and MDLM (§3.5): one u ~ U(0, 1), t_i = (u + i / B)
    mod 1, so the batch covers [0, 1) evenly; each t_i is still marginally
    uniform, so the loss stays unbiased with lower variance. Then t is mapped
    affinely into [eps, 1].
    """
    if low_discrepancy:
        u = jax.random.uniform(key, ())
        t = jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
    else:
        t = jax.random.uniform(key, (batch,))
    return eps + (1.0 - eps) * t


def mask_tokens(key: jax.Array, tokens: jax.Array, t: jax.Array, mask_id: int,
                maskable: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The forward process q(x_t | x_0): each maskable token becomes `mask_id` with probability t.

    Args:
      tokens: clean tokens x_0, int [B, L].
      t: per-row masking probability [B].
      maskable: bool [B, L]; positions that may be masked (the answer in SFT,
        every real token in pretraining). None means all positions.

    Returns:
      (noisy tokens x_t [B, L], masked bool [B, L]).
    """
    masked = jax.random.uniform(key, tokens.shape) < t[:, None]
    if maskable is not None:
        masked = masked & maskable.astype(bool)
    return jnp.where(masked, mask_id, tokens), masked


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per position, in float32: [B, L]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _metrics(logits, targets, masked) -> dict[str, jax.Array]:
    correct = (jnp.argmax(logits, axis=-1) == targets) & masked
    n_masked = jnp.sum(masked)
    return {
        "masked_accuracy": jnp.sum(correct) / jnp.maximum(n_masked, 1),
        "masked_tokens": n_masked,
    }


def pretrain_loss(logits: jax.Array, targets: jax.Array, masked: jax.Array, t: jax.Array,
                  valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pretraining loss: the Monte Carlo negative ELBO per token, in nats.

    LLaDA Eq. (3) / MDLM Eq. (11):

        loss = 1 / (B * L) * sum_{b, i masked} CE(logits[b, i], x_0[b, i]) / t_b

    1/t is the ELBO weight of the linear schedule alpha_t = 1 - t (see the
    module docstring). The sum is over masked positions only; the normalizer
    is the number of tokens B * L (or the number of `valid` tokens when some
    positions are padding), not the number of masked tokens, so the estimate
    is an unbiased bound on -log p(x_0) per token.

    Args:
      logits: float [B, L, V].
      targets: clean tokens x_0, int [B, L].
      masked: bool [B, L], positions that were masked in x_t.
      t: [B] masking probability of each row.
      valid: optional bool [B, L]: real tokens (the normalizer).

    Returns:
      (loss scalar, metrics: masked_accuracy, masked_tokens).
    """
    ce = token_cross_entropy(logits, targets)
    weighted = jnp.where(masked, ce / t[:, None], 0.0)
    n_tokens = targets.size if valid is None else jnp.maximum(jnp.sum(valid), 1)
    return jnp.sum(weighted) / n_tokens, _metrics(logits, targets, masked)


def sft_loss(logits: jax.Array, targets: jax.Array, masked: jax.Array, t: jax.Array,
             answer_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Supervised fine-tuning loss of LLaDA (Eq. 5 and Appendix B.1 of arXiv 2502.09992).

    The prompt p_0 is left clean and only the response r_0 is masked (the
    caller masks with `maskable=answer_mask`). Per row b,

        loss_b = 1 / |r_0^b| * sum_{i in response, masked} CE(logits[b, i], r_0^b[i]) / t_b

    and the loss is the mean of loss_b over rows. |r_0^b| is the length of the
    row's response *including* its trailing |EOS| padding, as in LLaDA's SFT
    (EOS is an ordinary token during training, so the model learns where the
    answer ends; GUIDELINES.md: `answer_lengths = sum(1 - prompt_mask)`).

    Args:
      logits: float [B, L, V]; targets: clean tokens [B, L].
      masked: bool [B, L] (a subset of `answer_mask`).
      t: [B] masking probability of each row.
      answer_mask: bool [B, L], the response positions (answer + EOS padding).

    Returns:
      (loss scalar, metrics: masked_accuracy, masked_tokens).
    """
    ce = token_cross_entropy(logits, targets)
    masked = masked & answer_mask.astype(bool)
    weighted = jnp.where(masked, ce / t[:, None], 0.0)
    answer_length = jnp.maximum(jnp.sum(answer_mask, axis=-1), 1)
    per_row = jnp.sum(weighted, axis=-1) / answer_length
    return jnp.mean(per_row), _metrics(logits, targets, masked)


def autoregressive_loss(logits: jax.Array, targets: jax.Array,
                        valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy per predicted token, in nats, for a causal model with token shift.

    With `ModelConfig.attention="causal"` and `token_shift=True` the logits at
    position i are p(x_i | x_<i) (hidden state i-1 under the causal mask), so

        loss = sum_{i >= 1, x_{i-1} and x_i real} -log p(x_i | x_<i) / (number of such i)

    Position 0 predicts nothing (it has no left context), nor does the first
    real token of a left-padded row.

    Args:
      logits: float [B, L, V] of the clean tokens; targets: tokens [B, L].
      valid: optional bool [B, L], real (non-padding) tokens.

    Returns:
      (loss scalar, metrics: masked_accuracy = next-token accuracy, masked_tokens = predicted tokens).
    """
    valid = jnp.ones(targets.shape, bool) if valid is None else valid.astype(bool)
    predicted = valid & jnp.pad(valid[:, :-1], ((0, 0), (1, 0)))
    ce = token_cross_entropy(logits, targets)
    loss = jnp.sum(jnp.where(predicted, ce, 0.0)) / jnp.maximum(jnp.sum(predicted), 1)
    return loss, _metrics(logits, targets, predicted)


def elbo_bits_per_token(logits_fn: Callable[[jax.Array], jax.Array], tokens: jax.Array, key: jax.Array,
                        *, mask_id: int, n_samples: int = 8, valid: jax.Array | None = None,
                        eps: float = 1e-3) -> jax.Array:
    """Monte Carlo negative ELBO of a batch, in bits per token (an upper bound on -log2 p per token).

    Averages `pretrain_loss` over `n_samples` draws of (t, x_t) per row, t
    stratified over the batch (`low_discrepancy`), then divides by ln 2.
    Ignoring t in [0, eps) drops a term of order eps from the bound.

    Args:
      logits_fn: tokens [B, L] -> logits [B, L, V] (e.g. a bound model).
      tokens: clean tokens [B, L]; `valid` marks real tokens (default all).
    """
    maskable = None if valid is None else valid.astype(bool)

    def one_sample(sample_key):
        time_key, mask_key = jax.random.split(sample_key)
        t = sample_times(time_key, tokens.shape[0], eps, low_discrepancy=True)
        noisy, masked = mask_tokens(mask_key, tokens, t, mask_id, maskable)
        loss, _ = pretrain_loss(logits_fn(noisy), tokens, masked, t, valid)
        return loss

    nats = jax.lax.map(one_sample, jax.random.split(key, n_samples))
    return jnp.mean(nats) / math.log(2.0)
