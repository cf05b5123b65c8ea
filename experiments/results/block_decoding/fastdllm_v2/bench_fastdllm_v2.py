#!/usr/bin/env python3
"""Benchmark Fast-dLLM v2's own PyTorch block-diffusion decoding with random weights.

Times the authors' code, unchanged:
  * fast_dllm_v2_7b/modeling.py, configuration.py : the model code shipped in the Hugging Face
    repo Efficient-Large-Model/Fast_dLLM_v2_7B (loaded there via trust_remote_code).
  * upstream_v2/generation_functions.py : NVlabs/Fast-dLLM v2/generation_functions.py, whose
    Fast_dLLM_QwenForCausalLM.batch_sample is what v2/eval.py binds as model.mdm_sample
    (the batched evaluation decoder).
See README.md for provenance and for every shim this harness applies (none edits their files).

Usage (from /work/main):
  python3 .gpu/fastdllm_v2/bench_fastdllm_v2.py                 # Qwen2.5-7B geometry, bf16, cuda
  python3 .gpu/fastdllm_v2/bench_fastdllm_v2.py --small         # tiny model, fp32, cpu (smoke test)
Prints one JSON line per configuration.
"""
import argparse
import json
import os
import statistics
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
SHIMS = []  # harness-side compatibility shims actually applied in this run (reported in the JSON)


def import_their_code():
    # Shim 1: their modeling.py does `from einops import rearrange, repeat` but never uses them.
    # If einops is missing (no internet), register an empty stand-in module.
    try:
        import einops  # noqa: F401
    except ImportError:
        stub = types.ModuleType("einops")

        def _unused(*a, **k):
            raise RuntimeError("einops stub: not expected to be called")

        stub.rearrange = _unused
        stub.repeat = _unused
        sys.modules["einops"] = stub
        SHIMS.append("einops_stub")

    # Shim 2: transformers 5.x dropped the "default" entry of ROPE_INIT_FUNCTIONS, which their
    # Fast_dLLM_QwenRotaryEmbedding looks up (rope_scaling is null -> rope_type "default").
    # Re-register the standard (unscaled) RoPE init, same formula as transformers 4.53's
    # _compute_default_rope_parameters, into the very dict their modeling.py imports.
    import torch
    from transformers import modeling_rope_utils as mru
    if "default" not in mru.ROPE_INIT_FUNCTIONS:
        def _default_rope(config=None, device=None, seq_len=None, **kw):
            base = getattr(config, "rope_theta", None)
            if base is None:
                base = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
            return inv_freq, 1.0
        mru.ROPE_INIT_FUNCTIONS["default"] = _default_rope
        SHIMS.append("rope_default")

    # Shim 4: their attention reads the prefix cache as `past_key_value[layer_idx][0/1]` (legacy
    # tuple-style indexing, transformers 4.53). transformers 5.x Cache objects store per-layer
    # `layers[i].keys/.values` and dropped __getitem__. Restore a read-only BC accessor.
    from transformers import cache_utils as cu
    if not hasattr(cu.Cache, "__getitem__") and not hasattr(cu.DynamicCache, "__getitem__"):
        def _getitem(self, layer_idx):
            layer = self.layers[layer_idx]
            return layer.keys, layer.values
        cu.Cache.__getitem__ = _getitem
        SHIMS.append("cache_getitem")

    sys.path.insert(0, HERE)
    from fast_dllm_v2_7b import modeling, configuration  # package import keeps their relative import

    # Shim 3: generation_functions.py decorates a plain (non-PreTrainedModel) class with
    # transformers' @auto_docstring; transformers 5.x raises ValueError for classes not registered
    # in its auto-doc tables. Make the decorator an identity only while importing that file.
    import transformers.utils as tu
    orig = tu.auto_docstring
    SHIMS.append("auto_docstring_identity_for_generation_functions")
    tu.auto_docstring = lambda obj=None, **kw: (obj if obj is not None else (lambda o: o))
    try:
        sys.path.insert(0, os.path.join(HERE, "upstream_v2"))
        import generation_functions
    finally:
        tu.auto_docstring = orig
    return modeling, configuration, generation_functions


def build_model(args, modeling, configuration, torch):
    if args.small:
        geo = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
    else:
        geo = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                   num_attention_heads=28, num_key_value_heads=4)
    if args.layers is not None:
        geo["num_hidden_layers"] = args.layers
    cfg = configuration.Fast_dLLM_QwenConfig(
        **geo,
        hidden_act="silu",
        max_position_embeddings=32768,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        rope_scaling=None,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=geo["num_hidden_layers"],
        attention_dropout=0.0,
        bd_size=args.block_size,
        bos_token_id=151643 if not args.small else 0,
        eos_token_id=151645 if not args.small else 1,
        pad_token_id=151645 if not args.small else 1,
    )
    # attention implementation: their attention hard-codes ALL_ATTENTION_FUNCTIONS["sdpa"] at eval
    cfg._attn_implementation = "sdpa"
    dtype = torch.float32 if args.small else torch.bfloat16
    device = torch.device(args.device)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = modeling.Fast_dLLM_QwenForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    # Parameters are created in `dtype` (default dtype set above), as from_pretrained(torch_dtype=bf16)
    # does; no .to(dtype) so the float32 RoPE inv_freq buffer stays float32 as in their real loading.
    model = model.to(device=device)
    # Random weights, explicitly (do not rely on post_init semantics that changed in transformers 5):
    g = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.eval()
    return model, cfg, dtype, device


class ForwardCounter:
    """Wraps model.forward (their decoders call self.forward(...) directly)."""

    def __init__(self, model):
        self.orig = model.forward
        self.reset()
        model.forward = self

    def reset(self):
        self.n = 0
        self.kinds = {}

    def __call__(self, *a, **kw):
        self.n += 1
        ids = kw.get("input_ids")
        L = ids.shape[1] if ids is not None else -1
        k = ("update" if kw.get("update_past_key_values") else "noupdate") + f"_len{L}"
        self.kinds[k] = self.kinds.get(k, 0) + 1
        return self.orig(*a, **kw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="tiny fp32 model on CPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--layers", type=int, default=None, help="override number of layers")
    ap.add_argument("--batch-sizes", default=None, help="comma list; default '1,32' (small: '1,4')")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--small-block-size", type=int, default=8, help="their default (eval.py, generate())")
    ap.add_argument("--threshold", type=float, default=1.0,
                    help="their rule: commit argmax + every masked pos with p > threshold; 1.0 => exactly 1/step")
    ap.add_argument("--use-block-cache", action="store_true", help="their use_block_cache (eval default False)")
    ap.add_argument("--decoders", default="batch_sample,generate",
                    help="batch_sample = v2/generation_functions.py (eval.py path, batched); "
                         "generate = modeling.py generate() (run_chatbot/HF README path), batch 1 only")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after the one untimed warm-up")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    if args.device is None:
        args.device = "cpu" if args.small else "cuda"
    if args.batch_sizes is None:
        args.batch_sizes = "1,4" if args.small else "1,32"
    if args.small:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(args.seed)

    modeling, configuration, genfn = import_their_code()
    t0 = time.time()
    model, cfg, dtype, device = build_model(args, modeling, configuration, torch)
    build_s = time.time() - t0
    # as v2/eval.py does:
    model.mdm_sample = types.MethodType(genfn.Fast_dLLM_QwenForCausalLM.batch_sample, model)
    counter = ForwardCounter(model)

    V = cfg.vocab_size
    mask_id = 151665 if not args.small else V - 1      # their MASK id (inside the 152064 vocab)
    pad_id = 151643 if not args.small else 0
    stop_token = -1  # never produced -> fixed-length generation (random weights could emit EOS 151645)
    tokenizer = types.SimpleNamespace(pad_token_id=pad_id)  # batch_sample only reads .pad_token_id
    hi = 151643 if not args.small else V - 2              # prompt ids: ordinary tokens, never mask_id

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    info = {"torch": torch.__version__,
            "param_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()}),
            "inv_freq_dtype": str(model.model.rotary_emb.inv_freq.dtype).replace("torch.", ""),
            "rope_base_check": float(1.0 / model.model.rotary_emb.inv_freq[1].double()
                                     ** (cfg.hidden_size // cfg.num_attention_heads / 2.0)),
            "n_params": sum(p.numel() for p in model.parameters())}
    import transformers
    info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)

    for dec in [d for d in args.decoders.split(",") if d]:
        for B in [int(b) for b in args.batch_sizes.split(",") if b]:
            if dec == "generate" and B != 1:
                continue  # modeling.generate's stop handling indexes row 0 only; eval uses batch_sample
            g = torch.Generator(device="cpu").manual_seed(args.seed + B)
            prompt = torch.randint(0, hi, (B, args.prompt_len), generator=g).to(device)

            def run():
                if dec == "batch_sample":
                    out = model.mdm_sample(
                        prompt.clone(), tokenizer=tokenizer, block_size=args.block_size,
                        max_new_tokens=args.gen_len, small_block_size=args.small_block_size,
                        min_len=args.prompt_len,
                        seq_len=torch.full((B,), args.prompt_len, device=device, dtype=torch.long),
                        mask_id=mask_id, threshold=args.threshold, stop_token=stop_token,
                        use_block_cache=args.use_block_cache)
                    seqs = torch.stack([out[i] for i in range(B)])
                else:
                    seqs = model.generate(
                        prompt.clone(), max_new_tokens=args.gen_len, mask_id=mask_id,
                        threshold=args.threshold, small_block_size=args.small_block_size,
                        block_size=args.block_size, stop_token=stop_token,
                        use_block_cache=args.use_block_cache)
                return seqs

            try:
                with torch.no_grad():
                    counter.reset()
                    run()  # untimed warm-up
                    sync()
                    walls, nfs, kinds, seqs = [], [], None, None
                    for _ in range(args.repeats):
                        counter.reset()
                        sync()
                        t = time.perf_counter()
                        seqs = run()
                        sync()
                        walls.append(time.perf_counter() - t)
                        nfs.append(counter.n)
                        kinds = dict(counter.kinds)
                    # prefill alone (same call their decoders make), for reference
                    pl = args.prompt_len // args.block_size * args.block_size
                    pre = []
                    for _ in range(3):
                        sync()
                        t = time.perf_counter()
                        counter.orig(input_ids=prompt[:, :pl], use_cache=True, update_past_key_values=True,
                                     block_size=args.block_size)
                        sync()
                        pre.append(time.perf_counter() - t)
                    prefill_ms = 1e3 * min(pre)
            except Exception as e:  # report and continue with the next configuration
                print(json.dumps({"decoder": dec, "batch": B, "error": f"{type(e).__name__}: {e}"}), flush=True)
                continue

            wall = statistics.median(walls)
            nf = nfs[walls.index(wall)] if wall in walls else nfs[-1]
            gen = seqs[:, args.prompt_len:]
            n_new = gen.shape[1]
            still_masked = int((gen[:, :args.gen_len] == mask_id).sum())
            rec = {
                "impl": "fast-dllm-v2-pytorch",
                "decoder": dec,
                "small": args.small,
                "device": str(device),
                "dtype": str(dtype).replace("torch.", ""),
                "layers": cfg.num_hidden_layers,
                "batch": B,
                "prompt_len": args.prompt_len,
                "gen_len": args.gen_len,
                "block_size": args.block_size,
                "small_block_size": args.small_block_size,
                "threshold": args.threshold,
                "use_block_cache": args.use_block_cache,
                "n_forwards": nf,
                "forward_kinds": kinds,
                "wall_s": round(wall, 4),
                "ms_per_forward": round(1e3 * wall / nf, 3),
                "prefill_ms": round(prefill_ms, 3),
                "ms_per_forward_excl_prefill": round((1e3 * wall - prefill_ms) / max(nf - 1, 1), 3),
                "tokens_per_s": round(B * args.gen_len / wall, 2),
                "tokens_per_s_per_seq": round(args.gen_len / wall, 2),
                "new_tokens_returned": int(n_new),
                "masked_left_in_gen": still_masked,
                "walls_s": [round(w, 4) for w in walls],
                "build_s": round(build_s, 1),
                "shims": SHIMS,
                **info,
            }
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
