"""lm-evaluation-harness adapter: a `LM` registered as `dllm` (optional: `pip install lm_eval`).

    python -m dllm.lm_eval_adapter --tasks <tasks> [--include_path <task YAML dir>] --batch_size 16 \\
        --model_args checkpoint=<folder>,sampler=threshold,sampler.tau=0.8,gen_length=256,block_length=32

runs lm_eval's own CLI with `--model dllm` registered (the plain `lm_eval`
command does not import this module, so it does not know the name). From
Python: `lm_eval.simple_evaluate(model=DllmLM(checkpoint=...), tasks=[...])`.

* `generate_until`: decodes every context with the engine and any sampler of
  configs/sampler/ (`sampler=<name>`, fields as `sampler.<field>=<value>`),
  `gen_length` / `block_length` / `cache` ... as `DecodeConfig`; the output is
  cut at the request's `until` strings. A masked-diffusion model decodes a
  fixed `gen_length` (the request's max_gen_toks is not used: set gen_length).
* `loglikelihood`: LLaDA's Monte Carlo estimate (Nie et al. 2025, arXiv
  2502.09992, Eq. 6 and Appendix B.6; `get_log_likelihood` in ML-GSAI/LLaDA
  `eval_llada.py`): for continuation a (L tokens) after context p, each sample
  draws l in {1..L}, masks l uniformly chosen tokens of a, and scores
  -(L / l) * sum over the masked i of log p(a_i | p, masked a). The estimate is
  the mean over `mc_num` samples (a lower bound on log p(a | p) in
  expectation). As in LLaDA, the l of a batch of `mc_batch` samples are
  evenly spread: l_j = ((round(k + j L / B) - 1) mod L) + 1 for one random
  k. `is_greedy` compares the continuation with a one-token-per-step
  low-confidence decode of L tokens (LLaDA's `suffix_greedy_prediction`).
* `loglikelihood_rolling` is not defined for a masked-diffusion model here
  (perplexity tasks): it raises NotImplementedError.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("dllm.lm_eval_adapter needs lm-evaluation-harness: pip install lm_eval") from error

import dllm
from dllm.decoding import DecodeConfig, generate
from dllm.decoding.engine import pad_prompts, prompt_keys
from dllm.decoding.sampler import build_sampler

REPO_ROOT = Path(__file__).resolve().parents[1]
DECODE_FIELDS = {"gen_length", "block_length", "temperature", "noise_dtype", "cfg_scale", "eos_policy", "max_steps",
                 "cache", "cache_refresh_every", "cache_window"}


@functools.partial(jax.jit, static_argnames=("graphdef", "samples", "mask_id"))
def _masked_nll(graphdef, params, tokens, attention_mask, is_target, key, *, samples: int, mask_id: int):
    """Sum over masked target positions of -log p, weighted by L / l, for `samples` maskings [samples]."""
    model = nnx.merge(graphdef, params)
    target_len = is_target.sum()
    k_key, order_key = jax.random.split(key)
    k = jax.random.randint(k_key, (), 1, target_len + 1)
    spread = jnp.round(k + jnp.arange(samples) * (target_len / samples)).astype(jnp.int32)
    count = (spread - 1) % target_len + 1                                     # l in 1..L per sample
    draws = jax.random.uniform(order_key, (samples, tokens.shape[0]))
    draws = jnp.where(is_target[None], draws, 2.0)                             # non-targets rank last
    rank = jnp.argsort(jnp.argsort(draws, axis=1), axis=1)
    masked = (rank < count[:, None]) & is_target[None]
    noisy = jnp.where(masked, mask_id, tokens[None])
    mask = jnp.broadcast_to(attention_mask[None], noisy.shape)
    logits = model(noisy, mask).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_log_probs = jnp.take_along_axis(log_probs, tokens[None, :, None].repeat(samples, 0), axis=-1)[..., 0]
    nll = -jnp.where(masked, token_log_probs, 0.0).sum(axis=1)
    return nll * target_len / count


@register_model("dllm")
class DllmLM(LM):
    """A dllm checkpoint (ours or an HF LLaDA / Dream folder) behind lm-eval's `LM` interface.

    Args:
      checkpoint: the model folder (relative paths resolve against the repo).
      model, tokenizer: an already-loaded pair instead of `checkpoint`.
      sampler: a name of configs/sampler/*.yaml or a `Sampler` (`dllm.decoding.sampler`);
        `sampler.<field>=<value>` keyword arguments override its fields.
      gen_length, block_length, temperature, cache, ...: `DecodeConfig` fields.
      batch_size: prompts decoded together by `generate_until` (on the CLI: --batch_size).
      continuous: continuous batching in `generate_until` (`dllm.generate(slots=batch_size)`): a
        finished row's slot takes the next request inside the compiled loop, in queues of
        16 x batch_size requests of similar width; the same answers as static batches.
      mc_num: Monte Carlo samples per loglikelihood request (LLaDA: 128), a
        multiple of `mc_batch`, the samples scored in one forward pass.
      greedy_check: compute `is_greedy` (one extra decode per request).
      max_length: longest context + continuation in tokens; longer inputs lose
        their oldest context tokens (default: the model's max_seq_len).
      seed: PRNG seed of the decodes and the Monte Carlo draws.
    """

    def __init__(self, checkpoint: str | None = "checkpoints/tiny-tasks", *, model=None, tokenizer=None,
                 sampler="low_confidence", batch_size: int | str = 16, mc_num: int = 128, mc_batch: int = 32,
                 greedy_check: bool = True, max_length: int | None = None, seed: int = 0, dtype: str | None = None,
                 device: str | None = None, max_batch_size: int | None = None, continuous: bool | str = False,
                 **kwargs):
        super().__init__()
        del device, max_batch_size  # jax picks the platform; lm_eval's CLI passes both
        sampler_overrides = {k.removeprefix("sampler."): v for k, v in kwargs.items() if k.startswith("sampler.")}
        decode_fields = {k: v for k, v in kwargs.items() if k in DECODE_FIELDS}
        unknown = sorted(set(kwargs) - set(decode_fields) - {f"sampler.{k}" for k in sampler_overrides})
        if unknown:
            raise ValueError(f"unknown argument(s) {unknown}; allowed: checkpoint, sampler, sampler.<field>, "
                             f"batch_size, continuous, mc_num, mc_batch, greedy_check, max_length, seed, dtype, "
                             f"{', '.join(sorted(DECODE_FIELDS))}")
        if model is None:
            path = Path(checkpoint)
            path = path if path.is_absolute() or path.exists() else REPO_ROOT / path
            model, tokenizer = dllm.from_pretrained(path, dtype=dtype)
            self._name = str(checkpoint)
        else:
            if tokenizer is None:
                raise ValueError("model= needs tokenizer= as well")
            self._name = "<memory>"
        self.model, self.tokenizer = model, tokenizer
        self.sampler = build_sampler(sampler, **sampler_overrides)
        decode_fields.setdefault("gen_length", 128)
        decode_fields.setdefault("block_length", decode_fields["gen_length"])
        self.decode = DecodeConfig(**{k: (int(v) if k in ("gen_length", "block_length") else v)
                                      for k, v in decode_fields.items()})
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.mc_num, self.mc_batch = int(mc_num), int(mc_batch)
        if self.mc_num < 1 or self.mc_batch < 1 or self.mc_num % self.mc_batch:
            raise ValueError(f"mc_num={mc_num}, mc_batch={mc_batch}: mc_num must be a positive multiple of mc_batch")
        self.greedy_check = str(greedy_check).lower() not in ("false", "0", "no")
        self.continuous = str(continuous).lower() in ("true", "1", "yes")
        if not self.continuous and str(continuous).lower() not in ("false", "0", "no"):
            raise ValueError(f"continuous={continuous!r}: allowed true or false")
        self.max_length = int(max_length or model.config.max_seq_len)
        self.key = jax.random.key(int(seed))
        self._graphdef, self._params = nnx.split(model)

    # ------------------------------------------------------------- lm-eval API

    @property
    def tokenizer_name(self) -> str:
        return self._name

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        from dllm.tasks.benchmarks import render_chat

        return render_chat(self.tokenizer.chat_template, chat_history, tokenizer=self.tokenizer,
                           add_generation_prompt=add_generation_prompt)

    def generate_until(self, requests) -> list[str]:
        contexts = [r.args[0] for r in requests]
        untils = []
        for r in requests:
            until = (r.args[1] or {}).get("until") or []
            untils.append([until] if isinstance(until, str) else list(until))
        keep = self.max_length - self.decode.gen_length
        if keep < 1:
            raise ValueError(f"gen_length={self.decode.gen_length} leaves no room for a prompt in "
                             f"max_length={self.max_length}")
        encoded = [self.tokenizer.encode(c)[-keep:] for c in contexts]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar widths batch together
        outputs: list[str] = [""] * len(requests)
        chunk = self.batch_size * (16 if self.continuous else 1)  # a queue of prompts, or a batch
        for start in range(0, len(order), chunk):
            index = order[start:start + chunk]
            width = max(len(encoded[i]) for i in index)
            batch = [encoded[i] for i in index]
            batch += [batch[0]] * (chunk - len(batch))  # one shape for every batch of this width
            tokens, mask = pad_prompts(batch, self.tokenizer.pad_id, width)
            queue = dict(slots=self.batch_size, count=len(index)) if self.continuous else {}  # fillers not decoded
            result = generate(self.model, tokens, self.sampler, gen_length=self.decode.gen_length,
                              block_length=self.decode.block_length, key=self._row_keys(index, chunk),
                              tokenizer=self.tokenizer, attention_mask=mask, **queue,
                              **{k: getattr(self.decode, k) for k in DECODE_FIELDS - {"gen_length", "block_length"}})
            generated = np.asarray(result.tokens)
            for row, i in enumerate(index):
                text = self._decode_until_eos(generated[row])
                for stop in untils[i]:
                    if stop and stop in text:
                        text = text[:text.index(stop)]
                outputs[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for number, request in enumerate(requests):
            context, continuation = request.args
            prompt, target = self._encode_pair(context, continuation)
            log_likelihood = self.mc_loglikelihood(prompt, target, jax.random.fold_in(self.key, number))
            greedy = self._is_greedy(prompt, target) if self.greedy_check else False
            results.append((log_likelihood, greedy))
            self.cache_hook.add_partial("loglikelihood", request.args, (log_likelihood, greedy))
        return results

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError("loglikelihood_rolling (perplexity tasks) is not implemented for the dllm adapter; "
                                  "use loglikelihood-based or generation tasks")

    # ------------------------------------------------------------- pieces

    def mc_loglikelihood(self, prompt: list[int], target: list[int], key) -> float:
        """LLaDA's Monte Carlo estimate of log p(target | prompt) (see the module docstring)."""
        if not target:
            raise ValueError("empty continuation: nothing to score")
        prompt = prompt[-(self.max_length - len(target)):] if len(prompt) + len(target) > self.max_length else prompt
        length = len(prompt) + len(target)
        width = min(self.max_length, -(-length // 32) * 32)  # bucketed: one compile per 32 tokens of width
        pad = width - length
        tokens = np.array([self.tokenizer.pad_id] * pad + prompt + target, np.int32)
        attention = np.array([0] * pad + [1] * length, np.int32)
        is_target = np.zeros(width, bool)
        is_target[width - len(target):] = True
        total = 0.0
        for batch in range(self.mc_num // self.mc_batch):
            nll = _masked_nll(self._graphdef, self._params, jnp.asarray(tokens), jnp.asarray(attention),
                              jnp.asarray(is_target), jax.random.fold_in(key, batch), samples=self.mc_batch,
                              mask_id=self.tokenizer.mask_id)
            total += float(nll.sum())
        return -total / self.mc_num

    def _is_greedy(self, prompt: list[int], target: list[int]) -> bool:
        one_per_step = build_sampler("low_confidence")  # configs/sampler/low_confidence.yaml: LLaDA's rule
        result = generate(self.model, [prompt], one_per_step, gen_length=len(target), block_length=len(target),
                          key=self.key, tokenizer=self.tokenizer)
        return np.asarray(result.tokens)[0].tolist() == list(target)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation; trailing spaces of the context move to the continuation."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation, context = context[-spaces:] + continuation, context[:-spaces]
        whole = self.tokenizer.encode(context + continuation)
        prompt = self.tokenizer.encode(context)
        return prompt, whole[len(prompt):]

    def _row_keys(self, index: list[int], rows: int) -> jax.Array:
        """One key per row of a batch of `rows`: request i draws from fold_in(key, i) in any batch (filler
        rows repeat the first), so a request's answer does not depend on its batch."""
        return prompt_keys(self.key, index + [index[0]] * (rows - len(index)))

    def _decode_until_eos(self, tokens) -> str:
        ids = []
        for t in tokens.tolist():
            if t in (self.tokenizer.eos_id, self.tokenizer.eot_id):
                break
            ids.append(t)
        return self.tokenizer.decode(ids)


def main(argv=None):  # pragma: no cover - thin wrapper over lm_eval's CLI
    """`python -m dllm.lm_eval_adapter <lm_eval CLI args>`: lm_eval's CLI with `--model dllm` registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" not in argv:
        argv = ["--model", "dllm", *argv]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
