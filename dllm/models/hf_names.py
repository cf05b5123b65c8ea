"""Hugging Face weight names of LLaDA, Dream/Qwen2 and Qwen3 (SDAR), mapped onto our parameters.

Every HF `nn.Linear` weight is stored [out, in]; ours are [in, out] reshaped
to the head layout (e.g. q_proj [d_model, heads, head_dim]). So a Linear
weight is transposed, then reshaped; norms and embeddings are copied; biases
are reshaped.
"""

from __future__ import annotations

LLADA_LAYER_NAMES = {
    "attn_norm": "model.transformer.blocks.{i}.attn_norm.weight",
    "q_proj": "model.transformer.blocks.{i}.q_proj.weight",
    "k_proj": "model.transformer.blocks.{i}.k_proj.weight",
    "v_proj": "model.transformer.blocks.{i}.v_proj.weight",
    "q_bias": "model.transformer.blocks.{i}.q_proj.bias",
    "k_bias": "model.transformer.blocks.{i}.k_proj.bias",
    "v_bias": "model.transformer.blocks.{i}.v_proj.bias",
    "o_proj": "model.transformer.blocks.{i}.attn_out.weight",
    "mlp_norm": "model.transformer.blocks.{i}.ff_norm.weight",
    "gate_proj": "model.transformer.blocks.{i}.ff_proj.weight",
    "up_proj": "model.transformer.blocks.{i}.up_proj.weight",
    "down_proj": "model.transformer.blocks.{i}.ff_out.weight",
}
LLADA_GLOBAL_NAMES = {
    "embed": "model.transformer.wte.weight",
    "final_norm": "model.transformer.ln_f.weight",
    "lm_head": "model.transformer.ff_out.weight",
}

DREAM_LAYER_NAMES = {
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q_proj": "model.layers.{i}.self_attn.q_proj.weight",
    "k_proj": "model.layers.{i}.self_attn.k_proj.weight",
    "v_proj": "model.layers.{i}.self_attn.v_proj.weight",
    "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "o_proj": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate_proj": "model.layers.{i}.mlp.gate_proj.weight",
    "up_proj": "model.layers.{i}.mlp.up_proj.weight",
    "down_proj": "model.layers.{i}.mlp.down_proj.weight",
}
DREAM_GLOBAL_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}

# Qwen3 (and SDAR, built on it): Qwen2's names plus one RMSNorm weight per q and k head dimension.
QWEN3_LAYER_NAMES = {
    **DREAM_LAYER_NAMES,
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
}

NAMES = {
    "llada": (LLADA_LAYER_NAMES, LLADA_GLOBAL_NAMES),
    "dream": (DREAM_LAYER_NAMES, DREAM_GLOBAL_NAMES),
    "qwen2": (DREAM_LAYER_NAMES, DREAM_GLOBAL_NAMES),
    "qwen3": (QWEN3_LAYER_NAMES, DREAM_GLOBAL_NAMES),
}

LINEAR_WEIGHTS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


def hf_shape(name: str, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the HF tensor must have for our parameter `name`."""
    if name in LINEAR_WEIGHTS:
        if name in ("o_proj",):
            heads, head_dim, d = our_shape
            return (d, heads * head_dim)
        if name in ("q_proj", "k_proj", "v_proj"):
            d, heads, head_dim = our_shape
            return (heads * head_dim, d)
        fan_in, fan_out = our_shape
        return (fan_out, fan_in)
    if name.endswith("bias"):
        heads, head_dim = our_shape
        return (heads * head_dim,)
    return our_shape


def hf_to_ours(name: str, array, our_shape: tuple[int, ...]):
    """Converts one HF tensor (numpy) into our layout."""
    if name in LINEAR_WEIGHTS:
        return array.T.reshape(our_shape)
    return array.reshape(our_shape)


def ours_to_hf(name: str, array):
    """Inverse of `hf_to_ours` (used by `save_hf`)."""
    if name in LINEAR_WEIGHTS:
        if name == "o_proj":
            heads, head_dim, d = array.shape
            return array.reshape(heads * head_dim, d).T
        if name in ("q_proj", "k_proj", "v_proj"):
            d = array.shape[0]
            return array.reshape(d, -1).T
        return array.T
    return array.reshape(-1) if name.endswith("bias") else array
