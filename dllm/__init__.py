"""dllm: masked-diffusion language models and parallel-decoding samplers in JAX."""

from dllm.checkpoints import from_pretrained, save_pretrained
from dllm.models import ModelConfig, Transformer
from dllm.tokenizer import Tokenizer

__all__ = ["ModelConfig", "Tokenizer", "Transformer", "from_pretrained", "save_pretrained"]
