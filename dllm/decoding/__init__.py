"""The compiled decoding engine (semi-AR blocks, batching, pluggable samplers)."""

from dllm.decoding.engine import (Step, decode_step, generate, pad_prompts, prompt_keys, resolve_special_ids,
                                  row_keys, steps)
from dllm.decoding.state import DecodeConfig, DecodeResult, DecodeState, SpecialIds, Trace

__all__ = ["DecodeConfig", "DecodeResult", "DecodeState", "SpecialIds", "Step", "Trace", "decode_step", "generate",
           "pad_prompts", "prompt_keys", "resolve_special_ids", "row_keys", "steps"]
