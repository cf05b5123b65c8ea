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

Block diffusion (Arriola et al. 2025, BD3-LM, arXiv 2503.09573; SDAR, arXiv
2510.06303; Fast-dLLM v2, arXiv 2509.26328): a block-causal model is trained
on the "2L" input [x_t ; x_0] (`two_l_inputs`): each noised block sees itself
and the clean earlier blocks, and the loss reads the x_t half. The same losses
apply with t per row or per position (`block_times`: one t per block).

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
      t: masking probability per row [B], or per position [B, L] (`block_times`).
      maskable: bool [B, L]; positions that may be masked (the answer in SFT,
        every real token in pretraining). None means all positions.

    Returns:
      (noisy tokens x_t [B, L], masked bool [B, L]).
    """
    masked = jax.random.uniform(key, tokens.shape) < per_position(t)
    if maskable is not None:
        masked = masked & maskable.astype(bool)
    return jnp.where(masked, mask_id, tokens), masked


def per_position(t: jax.Array) -> jax.Array:
    """t per row [B] -> [B, 1] (broadcasts over positions); t per position [B, L] as is."""
    return t if t.ndim == 2 else t[:, None]


def block_times(key: jax.Array, positions: jax.Array, block_size: int, eps: float = 1e-3,
                low_discrepancy: bool = False) -> jax.Array:
    """t per position [B, L], one draw per block of `block_size` RoPE positions (BD3-LM, arXiv
    2503.09573, §4: a masking rate per block); stratified over all blocks of the batch with
    `low_discrepancy` (BD3-LM's antithetic sampling is the two-stratum case)."""
    batch, length = positions.shape
    n_blocks = -(-length // block_size)
    t = sample_times(key, batch * n_blocks, eps, low_discrepancy).reshape(batch, n_blocks)
    return jnp.take_along_axis(t, jnp.clip(positions // block_size, 0, n_blocks - 1), axis=1)


def complementary_copy(tokens: jax.Array, masked: jax.Array, t: jax.Array, mask_id: int, maskable: jax.Array,
                       eps: float = 1e-3) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fast-dLLM v2's complementary mask (arXiv 2509.26328, §3.2): the copy of x_t that masks the
    maskable tokens x_t kept, so every maskable token is supervised once per pair.
    Returns (noisy copy, its masked positions, its masking rate 1 - t, floored at eps)."""
    masked_copy = maskable.astype(bool) & ~masked
    return jnp.where(masked_copy, mask_id, tokens), masked_copy, jnp.maximum(1.0 - t, eps)


def two_l_inputs(noisy: jax.Array, clean: jax.Array, attention_mask: jax.Array, positions: jax.Array,
                 block_size: int, token_shift: bool = False) -> dict[str, jax.Array]:
    """The block-diffusion training input of length 2L: [x_t ; x_0] and its three-part mask.

    BD3-LM's `block_diff_mask` (arXiv 2503.09573, §3.2; the same in SDAR and Fast-dLLM v2), with
    block b = RoPE positions [b * block_size, (b + 1) * block_size) in both halves:
      * block diagonal: a query attends its own block in its own half (x_t or x_0);
      * offset block-causal: an x_t query attends the x_0 blocks strictly before its own;
      * block-causal: an x_0 query attends x_0 blocks up to its own.
    Both halves use the token positions 0..L-1 for RoPE; padded keys stay hidden.

    `token_shift` (Fast-dLLM v2): position i is predicted from hidden state i - 1; the first
    position of a noised block reads the clean half's previous position, as in decoding, where
    the block before the active one is finished. (A choice of ours: read from the noised half
    instead, the block's first token would be predicted from a possibly masked position.)

    Returns the keyword arguments of `Transformer.forward` (tokens, attention_mask, positions,
    pair_mask, logits_length=L, and shift_from with `token_shift`).
    """
    length = noisy.shape[1]
    positions2 = jnp.concatenate([positions, positions], axis=1)
    block = positions2 // block_size
    clean_half = jnp.arange(2 * length) >= length
    q_clean, k_clean = clean_half[None, :, None], clean_half[None, None, :]
    q_block, k_block = block[:, :, None], block[:, None, :]
    pairs = (((q_block == k_block) & (q_clean == k_clean))
             | ((k_block < q_block) & k_clean & ~q_clean)
             | ((k_block <= q_block) & k_clean & q_clean))
    inputs = dict(tokens=jnp.concatenate([noisy, clean], axis=1),
                  attention_mask=jnp.concatenate([attention_mask, attention_mask], axis=1),
                  positions=positions2, pair_mask=pairs, logits_length=length)
    if token_shift:
        column = jnp.arange(length)
        block_start = (positions % block_size == 0) & (column > 0)[None, :]
        noisy_from = jnp.where(block_start, length + column - 1, jnp.maximum(column - 1, 0))
        clean_from = jnp.broadcast_to(length + jnp.maximum(column - 1, 0), positions.shape)
        inputs["shift_from"] = jnp.concatenate([noisy_from, clean_from], axis=1).astype(jnp.int32)
    return inputs


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
      t: [B] masking probability of each row, or [B, L] per position (`block_times`).
      valid: optional bool [B, L]: real tokens (the normalizer).

    Returns:
      (loss scalar, metrics: masked_accuracy, masked_tokens).
    """
    ce = token_cross_entropy(logits, targets)
    weighted = jnp.where(masked, ce / per_position(t), 0.0)
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
      t: [B] masking probability of each row, or [B, L] per position.
      answer_mask: bool [B, L], the response positions (answer + EOS padding).

    Returns:
      (loss scalar, metrics: masked_accuracy, masked_tokens).
    """
    ce = token_cross_entropy(logits, targets)
    masked = masked & answer_mask.astype(bool)
    weighted = jnp.where(masked, ce / per_position(t), 0.0)
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
