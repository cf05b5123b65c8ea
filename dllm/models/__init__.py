"""LLaDA/Dream-architecture models (one bidirectional transformer)."""

from dllm.models.config import ModelConfig, from_hf_config
from dllm.models.function import LogitsFunction
from dllm.models.layout import Layout
from dllm.models.transformer import Transformer, count_params

__all__ = ["Layout", "LogitsFunction", "ModelConfig", "Transformer", "count_params", "from_hf_config"]
