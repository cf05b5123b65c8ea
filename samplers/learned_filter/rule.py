"""Learn2PD: a small learned filter decides which positions to commit.

Bao et al. 2025, "Learning to Parallel: Accelerating Diffusion LLMs via
Learnable Parallel Decoding" (arXiv 2509.25188), `generate_learn2parallel`
and `generate_l2p_eot` in ims-kdks/Learning-to-Parallel-Decoding
`llada/generate.py` @ 342293c:

    x0 = argmax(Gumbel(logits)); p = softmax(logits)[x0]        (no temperature)
    accept = sigmoid(filter(p[block])) > accept_threshold  AND  position masked
    commit = accept  OR  LLaDA's top-1 masked window position by p   (progress)

The filter (`samplers.learned_filter.filter.FilterMLP`) sees the confidence vector of
the whole active block, decoded positions included, and is trained on the
"Extremely Greedy Parallel" oracle's labels (`experiments/train_filter.py`).
With `eot_prediction` the sampler also cuts the row after a predicted EOS
(End-of-Text Prediction, see `samplers/end_of_text.py`), taking an EOS the
filter accepted first, else the most confident masked EOS proposal.

How we define each piece in our engine:

* Block: the active window [block_start, block_start + block_length) of each
  row (the engine's semi-AR blocks); the filter only runs with the
  block_length it was trained for.
* Baseline commit: LLaDA low confidence with steps = gen_length, i.e. k = 1
  per step; Learn2PD's schedule gives k = 1 at every step of its loop too.
  Ties go to the lower position (`base.rank_desc`).
* EOS policy: the proposals and the filter's features follow the engine's
  `eos_policy` as the other samplers do; with "confidence_eos_eot_inf" an
  EOS / end-of-turn proposal is never accepted by the filter and is ranked
  last for the top-1 (LLaDA's "commit EOS last").
* `>`: a probability equal to the threshold is not accepted (as the code).
* The oracle data are greedy decodes (T = 0, as Learn2PD's); with
  temperature > 0 the filter sees the confidence of the sampled x0, inputs
  it was not trained on.

The filter is read from `filter_path` when the sampler is built and kept in
the (frozen, hashable) sampler as tuples, so the sampler stays a valid jit
static and two samplers with different weights never share a compiled loop.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from dllm.decoding.cache import place_logits
from dllm.decoding.state import DecodeConfig, DecodeState
from samplers.learned_filter.filter import FilterWeights, feature_values, load_filter, stack_features
from samplers import base
from samplers.end_of_text import apply_truncation, truncation_point

DEFAULT_FILTER = "checkpoints/filters/tiny-tasks-block8"


@dataclasses.dataclass(frozen=True)
class LearnedFilter(base.Sampler):
    """Commit what a trained filter accepts, plus the most confident position.

    Attributes:
      filter_path: folder written by `samplers.learned_filter.save_filter`
        (`experiments/train_filter.py`); a relative path that does not exist
        from the working directory is read from the repository root.
      accept_threshold: commit a masked window position when the filter's
        probability is > this, in (0, 1) (Learn2PD: 0.96).
      eot_prediction: End-of-Text Prediction (Learn2PD "L2P+EoT").
    """

    filter_path: str = DEFAULT_FILTER
    accept_threshold: float = 0.96
    eot_prediction: bool = False
    name = "learned_filter"  # registry name: configs/sampler/learned_filter.yaml
    weights: FilterWeights = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        base.check_number("LearnedFilter", "accept_threshold", self.accept_threshold, 0, 1, low_open=True,
                          high_open=True, unit=", exclusive")
        if not isinstance(self.eot_prediction, bool):
            raise ValueError(f"LearnedFilter.eot_prediction={self.eot_prediction!r}: must be true or false")
        if not isinstance(self.filter_path, (str, os.PathLike)):
            raise ValueError(f"LearnedFilter.filter_path={self.filter_path!r}: must be a path")
        object.__setattr__(self, "filter_path", str(self.filter_path))
        object.__setattr__(self, "weights", load_filter(self.filter_path))  # FileNotFoundError names it

    def settings(self) -> dict:
        return {"name": self.name, "filter_path": self.filter_path, "accept_threshold": self.accept_threshold,
                "eot_prediction": self.eot_prediction, "filter_block_length": self.weights.block_length,
                "filter_features": list(self.weights.features)}

    def validate(self, config: DecodeConfig) -> None:
        if config.sliding_window:
            raise ValueError(f"LearnedFilter with sliding_window={config.sliding_window}: its features are read "
                             "over block-aligned windows, as it was trained; allowed: sliding_window=0")
        trained = self.weights.block_length
        if trained != config.block_length:
            raise ValueError(
                f"LearnedFilter: the filter {self.filter_path!r} was trained for block_length={trained}, "
                f"but the decode uses block_length={config.block_length}; decode with block_length={trained} "
                f"or train a filter for {config.block_length} (python -m experiments.train_filter "
                f"oracle.block_length={config.block_length})")

    def filter_probability(self, probs: jax.Array, tokens: jax.Array, state: DecodeState) -> jax.Array:
        """float32 [B, G]: the filter's acceptance probability of each window position (0 outside)."""
        values = feature_values(probs, tokens, state, self.weights.block_length)
        features = stack_features({k: values[k] for k in self.weights.features}, self.weights.features)
        probability = jax.nn.sigmoid(self.weights.mlp()(features))
        return place_logits(probability, state.block_start, state.config.gen_length, 0.0)  # [B, block] -> [B, G]

    def step(self, logits, state: DecodeState, carry):
        self.validate(state.config)
        logits = base.apply_eos_policy(logits, state)
        tokens = base.sample_tokens(logits, state)
        probs = base.probabilities(logits, state)
        confidence = base.max_prob_confidence(probs, tokens)
        ranked = base.deprioritize_eos(confidence, tokens, state)
        eligible = base.masked_in_window(state)
        accepted = eligible & (self.filter_probability(probs, tokens, state) > self.accept_threshold)
        accepted = accepted & (ranked > -jnp.inf)  # "confidence_eos_eot_inf": EOS is never accepted
        best = eligible & (base.rank_desc(ranked, eligible) == 0)
        commit = base.Commit(tokens=tokens, commit=accepted | best, confidence=confidence.astype(jnp.float32))
        if self.eot_prediction:
            accepted_eos = accepted & (tokens == state.special.eos)
            commit = apply_truncation(commit, truncation_point(tokens, confidence, accepted_eos, state))
        return commit, carry
