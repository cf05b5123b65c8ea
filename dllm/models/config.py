"""Model configuration: one transformer covers LLaDA, Dream and the block-diffusion models.

`ModelConfig` is a frozen dataclass that Hydra fills (see `configs/model/`).
`from_hf_config` reads these Hugging Face layouts:

* LLaDA (`LLaDAModelLM`, OLMo-style field names: `d_model`, `n_layers`,
  `n_heads`, `n_kv_heads`, `mlp_hidden_size`, `rope_theta`, `embedding_size`,
  `mask_token_id`, ...).
* Dream (`DreamModel`, Qwen2-style: `hidden_size`, `num_hidden_layers`,
  `num_attention_heads`, `num_key_value_heads`, `intermediate_size`, ...).
* SDAR (`SDARForCausalLM`, model_type "sdar"; Cheng et al. 2025, arXiv
  2510.06303): Qwen3 blocks (q/k RMSNorm per head, no qkv bias), block-causal
  attention of `block_size`, logits at the token's own position.
* Fast-dLLM v2 (`Fast_dLLM_QwenForCausalLM`; Wu et al. 2025, arXiv
  2509.26328): Qwen2.5 blocks (qkv bias), block-causal attention of `bd_size`,
  token-shifted logits.
* Plain Qwen2 / Qwen3 (model_type "qwen2" / "qwen3"): causal attention with
  token shift, i.e. the autoregressive model such checkpoints are.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp

# Weight names and block type: "llada" (LLaMA blocks, LLaDA's names), "dream" and "qwen2"
# (Qwen2 blocks, Qwen2's names), "qwen3" (Qwen3 blocks: q/k RMSNorm, Qwen3's names).
ARCHITECTURES = ("llada", "dream", "qwen2", "qwen3")
# "bidirectional": every position attends to every real position (LLaDA, Dream).
# "block_causal": positions are cut into blocks of `block_size` (block b holds
#   RoPE positions [b * block_size, (b + 1) * block_size)); a query attends to
#   every key of its own and earlier blocks (BD3-LM, SDAR, Fast-dLLM v2).
# "causal": position i attends to positions <= i (block size 1: an
#   autoregressive model, e.g. the scorer of generative perplexity).
ATTENTION_PATTERNS = ("bidirectional", "block_causal", "causal")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the bidirectional transformer: what a checkpoint's config.json holds.
    How it runs (scanned layers, fused projections, attention kernels) is a
    `dllm.models.layout.Layout`, chosen per run and never saved.

    Attributes:
      arch: "llada" (LLaMA-style blocks, LLaDA's weight names), "dream" or
        "qwen2" (Qwen2's weight names), "qwen3" (Qwen3's names and q/k norms).
        Biases, norms, token shift and attention are the fields below.
      vocab_size: rows of the embedding and of the output head.
      d_model: residual width.
      n_layers: transformer blocks.
      n_heads: query heads.
      n_kv_heads: key/value heads (== n_heads for multi-head attention, fewer
        for grouped-query attention).
      head_dim: width of one head; defaults to d_model // n_heads.
      mlp_hidden: hidden width of the SwiGLU MLP.
      rope_theta: RoPE base frequency (500000 for LLaDA-8B, 1e6 for Dream-7B).
      rms_norm_eps: epsilon of every RMSNorm.
      qkv_bias: whether q/k/v projections carry a bias (Dream, Qwen2.5).
      qk_norm: RMSNorm of every query and key head (over head_dim, before
        RoPE), as Qwen3 and SDAR do; requires arch "qwen3".
      token_shift: position i is predicted from hidden state i-1 (Dream,
        Fast-dLLM v2); position 0 reuses its own hidden state.
      tie_embeddings: the output head is the transposed input embedding.
      attention: the attention pattern (`ATTENTION_PATTERNS`): "bidirectional"
        (LLaDA, Dream), "block_causal" (block diffusion; needs `block_size`) or
        "causal" (an autoregressive model: with `token_shift`, the logits at
        position i predict token i from the tokens before it).
      block_size: the block of "block_causal" attention (SDAR's `block_size`,
        Fast-dLLM v2's `bd_size`); None for the other patterns.
      max_seq_len: longest canvas (prompt + generation) the model accepts.
      dtype: compute dtype of activations ("float32" or "bfloat16").
      param_dtype: storage dtype of the parameters.
      mask_token_id / eos_token_id / pad_token_id: the ids stored in the
        checkpoint's config.json; the tokenizer wrapper is the one place the
        algorithms read special ids from.
    """

    arch: str = "llada"
    vocab_size: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_hidden: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    qk_norm: bool = False
    token_shift: bool = False
    tie_embeddings: bool = False
    attention: str = "bidirectional"
    block_size: int | None = None
    max_seq_len: int = 4096
    dtype: str = "float32"
    param_dtype: str = "float32"
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"ModelConfig.arch={self.arch!r}: allowed {ARCHITECTURES}")
        if self.attention not in ATTENTION_PATTERNS:
            raise ValueError(f"ModelConfig.attention={self.attention!r}: allowed {ATTENTION_PATTERNS}")
        if self.attention == "block_causal":
            if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size <= 0:
                raise ValueError(f"ModelConfig.block_size={self.block_size!r}: attention='block_causal' needs a "
                                 "positive int block size")
        elif self.block_size is not None:
            raise ValueError(f"ModelConfig.block_size={self.block_size!r} with attention={self.attention!r}: "
                             "a block size belongs to attention='block_causal' only (causal is block size 1); "
                             "set block_size=null")
        if self.qk_norm and self.arch != "qwen3":
            raise ValueError(f"ModelConfig.qk_norm=True with arch={self.arch!r}: q/k norms have weight names "
                             "in arch 'qwen3' only")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_hidden", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name}={value!r}: must be a positive int")
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: allowed {tuple(DTYPES)}")

    @property
    def is_autoregressive(self) -> bool:
        """Causal attention with token shift: the logits at position i predict token i from the tokens before it."""
        return self.attention == "causal" and self.token_shift

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(config: dict, path: Path, *names: str):
    """Returns the first present field among `names`, or raises naming them."""
    for name in names:
        if name in config and config[name] is not None:
            return config[name]
    raise ValueError(f"{path}: missing config field {' or '.join(repr(n) for n in names)}")


def _default(config: dict, path: Path, name: str, value, source: str):
    """config[name], or `value` (the architecture's documented default, `source`) with a printed
    notice: a field that changes the numbers is never filled in silently."""
    if config.get(name) is not None:
        return config[name]
    warnings.warn(f"{path}: no {name!r}; using {value!r}, {source}", stacklevel=3)
    return value


# HF families: (model_type, a word of `architectures`) -> the family `from_hf_config` reads.
HF_FAMILIES = {"llada": "llada", "dream": "dream", "sdar": "sdar", "fast_dllm": "fast_dllm_v2",
               "qwen3": "qwen3", "qwen2": "qwen2"}


def detect_architecture(config: dict, path: Path) -> str:
    """The checkpoint family of an HF config.json dict ("llada", "dream", "sdar", "fast_dllm_v2",
    "qwen2", "qwen3", or "dllm" for our own), or a clear error."""
    names = [a.lower() for a in config.get("architectures") or []]
    model_type = str(config.get("model_type", "")).lower()
    if model_type == "dllm":  # our own config.json, written by save_hf / orbax export
        arch = _require(config, path, "arch")
        if arch not in ARCHITECTURES:
            raise ValueError(f"{path}: arch={arch!r}; allowed: {ARCHITECTURES}")
        return "dllm"
    for word, family in HF_FAMILIES.items():  # block-diffusion names before the Qwen bases they contain
        if model_type.startswith(word) or any(word in a for a in names):
            return family
    raise ValueError(
        f"{path}: unknown architecture (model_type={config.get('model_type')!r}, "
        f"architectures={config.get('architectures')!r}); allowed: LLaDA (model_type 'llada'), "
        "Dream ('Dream'), SDAR ('sdar'), Fast-dLLM v2 ('Fast_dLLM_QwenForCausalLM'), Qwen2 ('qwen2'), "
        "Qwen3 ('qwen3')"
    )


def _qwen_fields(config: dict, path: Path, family: str) -> dict:
    """The fields every Qwen2/Qwen3-named family shares (Dream, SDAR, Fast-dLLM v2, Qwen)."""
    source = {"dream": "DreamConfig's (Qwen2's)", "qwen2": "Qwen2Config's", "fast_dllm_v2": "Qwen2Config's",
              "sdar": "SDARConfig's (Qwen3's)", "qwen3": "Qwen3Config's"}[family]
    n_heads = _require(config, path, "num_attention_heads")
    return dict(
        vocab_size=_require(config, path, "vocab_size"),
        d_model=_require(config, path, "hidden_size"),
        n_layers=_require(config, path, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=config.get("head_dim"),
        mlp_hidden=_require(config, path, "intermediate_size"),
        rope_theta=float(_default(config, path, "rope_theta", 10000.0, f"{source} default")),
        rms_norm_eps=float(_default(config, path, "rms_norm_eps", 1e-6, f"{source} default")),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_seq_len=int(config.get("max_position_embeddings", 32768)),
        mask_token_id=config.get("mask_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
    )


def _block_size(config: dict, path: Path, field: str) -> int:
    """A block-causal checkpoint's block size: it changes every logit, so it is never guessed."""
    value = config.get(field)
    if value is None:
        raise ValueError(f"{path}: a block-causal checkpoint without its block size: no {field!r} in "
                         f"config.json; add it (the block size the model was trained with)")
    return int(value)


def from_hf_config(config: dict, path: Path | str = "config.json", **overrides) -> ModelConfig:
    """Builds a `ModelConfig` from a Hugging Face config.json dict (see the module docstring)."""
    path = Path(path)
    family = detect_architecture(config, path)
    if family == "dllm":
        fields = {k: v for k, v in config.items() if k in {f.name for f in dataclasses.fields(ModelConfig)}}
    elif family == "llada":
        n_heads = _require(config, path, "n_heads")
        d_model = _require(config, path, "d_model")
        mlp_hidden = config.get("mlp_hidden_size") or _require(config, path, "mlp_ratio") * d_model
        fields = dict(
            arch="llada",
            vocab_size=config.get("embedding_size") or _require(config, path, "vocab_size"),
            d_model=d_model,
            n_layers=_require(config, path, "n_layers"),
            n_heads=n_heads,
            n_kv_heads=config.get("n_kv_heads") or n_heads,
            mlp_hidden=mlp_hidden,
            rope_theta=float(_default(config, path, "rope_theta", 10000.0, "LLaDAConfig's default")),
            rms_norm_eps=float(_default(config, path, "rms_norm_eps", 1e-5, "LLaDAConfig's default")),
            qkv_bias=bool(config.get("include_qkv_bias", False) or config.get("include_bias", False)),
            token_shift=False,
            tie_embeddings=bool(config.get("weight_tying", False)),
            max_seq_len=int(config.get("max_sequence_length", 4096)),
            mask_token_id=_require(config, path, "mask_token_id"),
            eos_token_id=config.get("eos_token_id"),
            pad_token_id=config.get("pad_token_id"),
        )
    elif family == "dream":
        fields = dict(arch="dream", qkv_bias=True, token_shift=True, **_qwen_fields(config, path, family))
    elif family == "fast_dllm_v2":  # Qwen2.5 weights, block-causal, token shift (arXiv 2509.26328, §3)
        fields = dict(arch="qwen2", qkv_bias=True, token_shift=True, attention="block_causal",
                      block_size=_block_size(config, path, "bd_size"), **_qwen_fields(config, path, family))
    elif family == "sdar":  # Qwen3 weights, block-causal, same-position logits (arXiv 2510.06303)
        fields = dict(arch="qwen3", qk_norm=True, qkv_bias=bool(config.get("attention_bias", False)),
                      token_shift=False, attention="block_causal",
                      block_size=_block_size(config, path, "block_size"), **_qwen_fields(config, path, family))
    else:  # plain Qwen2 / Qwen3: autoregressive
        fields = dict(arch=family, qk_norm=family == "qwen3",
                      qkv_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
                      token_shift=True, attention="causal", **_qwen_fields(config, path, family))
    fields.update(overrides)
    return ModelConfig(**fields)


def read_hf_config(folder: Path | str) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the checkpoint folder")
    return read_json(path)


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or one ValueError line naming the file and what is wrong."""
    try:
        value = json.loads(Path(path).read_text())
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (bad bytes); expected a JSON object") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, "
                         f"column {error.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value


def to_own_config_dict(config: ModelConfig) -> dict:
    """config.json payload for our own checkpoints (model_type 'dllm')."""
    return {"model_type": "dllm", **config.to_dict()}
