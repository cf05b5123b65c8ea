"""The compiled decoding engine (semi-AR blocks, batching, pluggable samplers)."""

from dllm.decoding.engine import generate, pad_prompts, resolve_special_ids
from dllm.decoding.state import DecodeConfig, DecodeResult, DecodeState, SpecialIds, Trace

__all__ = ["DecodeConfig", "DecodeResult", "DecodeState", "SpecialIds", "Trace", "generate", "pad_prompts",
           "resolve_special_ids"]
