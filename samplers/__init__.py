"""Pluggable commit rules: one file per rule, the contract in `base.py`."""

from samplers.base import Commit, Sampler
from samplers.adaptive_block import AdaptiveBlock
from samplers.credit import Credit
from samplers.early_commit import EarlyCommit
from samplers.end_of_text import EndOfText
from samplers.learned_filter import LearnedFilter
from samplers.low_confidence import LowConfidence
from samplers.threshold import Factor, Threshold

SAMPLERS = {
    "low_confidence": LowConfidence,
    "threshold": Threshold,
    "factor": Factor,
    "credit": Credit,
    "early_commit": EarlyCommit,
    "adaptive_block": AdaptiveBlock,
    "learned_filter": LearnedFilter,
    "end_of_text": EndOfText,
}


def get_sampler(name: str, **settings) -> Sampler:
    """Builds a sampler by name; unknown names list the allowed ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {sorted(SAMPLERS)}")
    return SAMPLERS[name](**settings)


__all__ = ["AdaptiveBlock", "Commit", "Credit", "EarlyCommit", "EndOfText", "LearnedFilter", "Factor", "LowConfidence", "SAMPLERS", "Sampler",
           "Threshold", "get_sampler"]
