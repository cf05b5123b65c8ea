"""Pluggable commit rules: one file per rule, the contract in `base.py`."""

from samplers.base import Commit, Sampler
from samplers.low_confidence import LowConfidence

SAMPLERS = {
    "low_confidence": LowConfidence,
}


def get_sampler(name: str, **settings) -> Sampler:
    """Builds a sampler by name; unknown names list the allowed ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {sorted(SAMPLERS)}")
    return SAMPLERS[name](**settings)


__all__ = ["Commit", "SAMPLERS", "Sampler", "get_sampler", "LowConfidence"]
