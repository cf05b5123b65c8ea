"""dllm: masked-diffusion language models and parallel-decoding samplers in JAX."""

from dllm.checkpoints import from_pretrained, save_pretrained
from dllm.decoding import DecodeConfig, DecodeResult, generate
from dllm.models import Layout, ModelConfig, Transformer
from dllm.tokenizer import Tokenizer

__all__ = ["DecodeConfig", "DecodeResult", "generate", "Layout", "ModelConfig", "Tokenizer", "Transformer", "from_pretrained", "save_pretrained"]
