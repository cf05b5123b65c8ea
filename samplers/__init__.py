"""Pluggable commit rules: one file per rule, the contract in `base.py`.

The registry is configs/sampler/*.yaml (`dllm.decoding.sampler`): `get_sampler(name, **overrides)`
builds a sampler from its YAML, `sampler_names()` lists them.
"""

from dllm.decoding.sampler import build_sampler as get_sampler
from dllm.decoding.sampler import sampler_names
from samplers.base import Commit, Sampler
from samplers.adaptive_block import AdaptiveBlock
from samplers.credit import Credit
from samplers.dingo import Dingo
from samplers.dynamic_low_confidence import DynamicLowConfidence
from samplers.early_commit import EarlyCommit
from samplers.end_of_text import EndOfText
from samplers.learned_filter import LearnedFilter
from samplers.local_leap import LocalLeap
from samplers.low_confidence import LowConfidence
from samplers.self_speculative import SelfSpeculative
from samplers.sub_blocks import SubBlocks
from samplers.threshold import Factor, Threshold

__all__ = ["AdaptiveBlock", "Commit", "Credit", "Dingo", "DynamicLowConfidence", "EarlyCommit", "EndOfText", "LearnedFilter", "Factor", "LocalLeap", "LowConfidence",
           "Sampler", "SelfSpeculative", "SubBlocks", "Threshold", "get_sampler", "sampler_names"]
