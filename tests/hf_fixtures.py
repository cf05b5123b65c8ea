"""Writes small random checkpoints in the real LLaDA / Dream / SDAR / Fast-dLLM v2 HF layouts.

The weights come from PyTorch `transformers` models (LLaMA for LLaDA, Qwen2
for Dream and Fast-dLLM v2, Qwen3 for SDAR), so the same tensors drive an
independent reference forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

LLAMA_TO_LLADA = {
    "model.embed_tokens.weight": "model.transformer.wte.weight",
    "model.norm.weight": "model.transformer.ln_f.weight",
    "lm_head.weight": "model.transformer.ff_out.weight",
}
LLAMA_LAYER_TO_LLADA = {
    "self_attn.q_proj.weight": "q_proj.weight",
    "self_attn.k_proj.weight": "k_proj.weight",
    "self_attn.v_proj.weight": "v_proj.weight",
    "self_attn.o_proj.weight": "attn_out.weight",
    "mlp.gate_proj.weight": "ff_proj.weight",
    "mlp.up_proj.weight": "up_proj.weight",
    "mlp.down_proj.weight": "ff_out.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ff_norm.weight",
}


def write_tokenizer(folder: Path, vocab_size: int, specials: dict[str, int]) -> None:
    """A word-level tokenizer.json whose special tokens sit at the given ids."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    for text, idx in specials.items():
        vocab.pop(f"w{idx}")
        vocab[text] = idx
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(list(specials))
    tok.save(str(folder / "tokenizer.json"))


def write_shards(folder: Path, tensors: dict[str, torch.Tensor], n_shards: int) -> None:
    """Sharded safetensors with model.safetensors.index.json, as HF writes them."""
    names = list(tensors)
    if n_shards == 1:
        save_file({k: tensors[k].contiguous() for k in names}, str(folder / "model.safetensors"))
        return
    per = -(-len(names) // n_shards)
    weight_map, total = {}, 0
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        chunk = {k: tensors[k].contiguous() for k in names[s * per:(s + 1) * per]}
        save_file(chunk, str(folder / shard), metadata={"format": "pt"})
        for k, v in chunk.items():
            weight_map[k] = shard
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_llada(folder: Path, *, vocab=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
               mlp_hidden=160, rope_theta=500000.0, n_shards=2, seed=0):
    """A random LLaDA checkpoint; returns the torch LLaMA reference model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=mlp_hidden,
                      num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                      rope_theta=rope_theta, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      attention_bias=False, attn_implementation="eager")
    ref = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    tensors = {}
    for name, value in ref.state_dict().items():
        if name in LLAMA_TO_LLADA:
            tensors[LLAMA_TO_LLADA[name]] = value
            continue
        _, _, i, rest = name.split(".", 3)
        tensors[f"model.transformer.blocks.{i}.{LLAMA_LAYER_TO_LLADA[rest]}"] = value
    folder.mkdir(parents=True, exist_ok=True)
    write_shards(folder, tensors, n_shards)
    mask_id, eos_id, eot_id = vocab - 1, vocab - 3, vocab - 2
    config = {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu",
        "block_type": "llama", "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
        "n_kv_heads": n_kv_heads, "mlp_hidden_size": mlp_hidden, "mlp_ratio": 4, "rope_theta": rope_theta,
        "rms_norm_eps": 1e-5, "vocab_size": vocab, "embedding_size": vocab, "weight_tying": False,
        "include_bias": False, "include_qkv_bias": False, "layer_norm_type": "rms",
        "max_sequence_length": 4096, "mask_token_id": mask_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder, vocab, {"<|mdm_mask|>": mask_id, "<|endoftext|>": eos_id, "<|eot_id|>": eot_id})
    return ref


def _perturb(ref):
    with torch.no_grad():  # non-trivial norms and biases, so a swapped or missing one would show
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))


def qwen2_reference(*, vocab, d_model, n_layers, n_heads, n_kv_heads, mlp_hidden, rope_theta, seed):
    """A random torch Qwen2 model with non-trivial norms and biases (Dream's and Fast-dLLM v2's weights)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=d_model, intermediate_size=mlp_hidden,
                      num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                      rope_theta=rope_theta, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      attn_implementation="eager", use_sliding_window=False)
    ref = Qwen2ForCausalLM(cfg).eval()
    _perturb(ref)
    return ref


def make_dream(folder: Path, *, vocab=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
               mlp_hidden=160, rope_theta=1000000.0, n_shards=3, seed=0):
    """A random Dream checkpoint (Qwen2 names); returns the torch Qwen2 reference."""
    ref = qwen2_reference(vocab=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                          mlp_hidden=mlp_hidden, rope_theta=rope_theta, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_shards(folder, dict(ref.state_dict()), n_shards)
    mask_id, eos_id, pad_id = vocab - 1, vocab - 3, vocab - 4
    config = {
        "architectures": ["DreamModel"], "model_type": "Dream", "hidden_size": d_model,
        "num_hidden_layers": n_layers, "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads,
        "intermediate_size": mlp_hidden, "rope_theta": rope_theta, "rms_norm_eps": 1e-6, "vocab_size": vocab,
        "tie_word_embeddings": False, "max_position_embeddings": 2048, "mask_token_id": mask_id,
        "eos_token_id": eos_id, "pad_token_id": pad_id, "hidden_act": "silu",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder, vocab, {"<|mask|>": mask_id, "<|endoftext|>": eos_id, "<|im_end|>": vocab - 2,
                                    "<|pad|>": pad_id})
    return ref


def make_sdar(folder: Path, *, vocab=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
              mlp_hidden=160, rope_theta=1000000.0, block_size=4, n_shards=2, seed=0):
    """A random SDAR checkpoint (Qwen3 names and q/k norms, config.json as JetLM's SDAR-1.7B-Chat:
    model_type 'sdar', block_size, mask_token_id); returns the torch Qwen3 reference."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=d_model, intermediate_size=mlp_hidden, head_dim=head_dim,
                      num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                      rope_theta=rope_theta, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                      attn_implementation="eager", use_sliding_window=False)
    ref = Qwen3ForCausalLM(cfg).eval()
    _perturb(ref)
    folder.mkdir(parents=True, exist_ok=True)
    write_shards(folder, dict(ref.state_dict()), n_shards)
    mask_id, eos_id = vocab - 1, vocab - 3
    config = {
        "architectures": ["SDARForCausalLM"], "model_type": "sdar", "attention_bias": False,
        "block_size": block_size, "mask_token_id": mask_id, "eos_token_id": eos_id, "bos_token_id": eos_id,
        "head_dim": head_dim, "hidden_act": "silu", "hidden_size": d_model, "intermediate_size": mlp_hidden,
        "max_position_embeddings": 2048, "num_attention_heads": n_heads, "num_hidden_layers": n_layers,
        "num_key_value_heads": n_kv_heads, "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": rope_theta,
        "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": vocab,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder, vocab, {"<|MASK|>": mask_id, "<|endoftext|>": eos_id, "<|im_end|>": vocab - 2})
    return ref


def make_fast_dllm_v2(folder: Path, *, vocab=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      mlp_hidden=160, rope_theta=1000000.0, bd_size=4, n_shards=2, seed=0):
    """A random Fast-dLLM v2 checkpoint (Qwen2.5 names with qkv bias; config.json as
    Efficient-Large-Model/Fast_dLLM_v2_7B: its architecture name and `bd_size`, no mask id, the
    tokenizer's '|<MASK>|' token); returns the torch Qwen2 reference."""
    ref = qwen2_reference(vocab=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                          mlp_hidden=mlp_hidden, rope_theta=rope_theta, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_shards(folder, dict(ref.state_dict()), n_shards)
    mask_id, eos_id, pad_id = vocab - 1, vocab - 3, vocab - 4
    config = {
        "architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen", "bd_size": bd_size,
        "hidden_size": d_model, "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads, "intermediate_size": mlp_hidden, "rope_theta": rope_theta,
        "rms_norm_eps": 1e-6, "vocab_size": vocab, "tie_word_embeddings": False, "max_position_embeddings": 2048,
        "eos_token_id": eos_id, "bos_token_id": eos_id, "hidden_act": "silu", "use_sliding_window": False,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder, vocab, {"|<MASK>|": mask_id, "<|endoftext|>": eos_id, "<|im_end|>": vocab - 2,
                                    "<|pad|>": pad_id})
    return ref


def reference_logits(ref, tokens, attention_mask, block_size=None):
    """Forward of the torch reference on a left-padded batch: bidirectional, or block-causal
    (query block >= key block, blocks cut by the positions that count real tokens) with `block_size`."""
    ids = torch.tensor(tokens, dtype=torch.long)
    mask = torch.tensor(attention_mask, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = mask[:, None, None, :] == 0
    if block_size is not None:
        block = positions // block_size
        hidden = hidden | (block[:, None, None, :] > block[:, None, :, None])
    additive = torch.zeros(ids.shape[0], 1, ids.shape[1], ids.shape[1])
    additive = additive.masked_fill(hidden, torch.finfo(torch.float32).min)
    with torch.no_grad():
        return ref(ids, attention_mask=additive, position_ids=positions).logits.numpy()
