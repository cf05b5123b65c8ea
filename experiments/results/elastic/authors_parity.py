"""Elastic-Cache parity: our `cache="elastic"` decode against the authors' PyTorch code, on CPU.

The authors' files (VILA-Lab/Elastic-Cache, read from the mirror yxu-dev/Elastic-Cache @ 46c0bc3:
`llada/generate.py`, `llada/model/modeling_llada.py`, and the stock `configuration_llada.py` it
imports) are NOT part of this repository; pass the folder that holds them:

    python experiments/results/elastic/authors_parity.py --ref /tmp/elastic_ref

`--ref` is the folder with `llada/generate.py` (or that `llada` folder itself). Their code runs
unchanged; the run-time shims (listed in the JSON under "shims") only make it importable here and
record what it does (wrappers that call the original and log its arguments / results).

A tiny random LLaDA checkpoint in the real HF layout is written first (4 layers, d_model 64,
vocabulary 126464 with the authors' hard-coded ids: mask 126336, EOS 126081), its output head scaled
so confidences spread over (0, 1) (a mix of steps committing one and several tokens), and the head
rows of [MASK] and EOS set to zero (logit exactly 0 while the other tokens' maxima are ~ +10 or more,
so neither is ever proposed; the JSON reports whether either occurred).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MASK_ID, EOS_ID, EOT_ID = 126336, 126081, 126348  # the authors' defaults (generate.py); LLaDA's <|eot_id|>
VOCAB = 126464
GEN_LENGTH = 32
SHIMS = []


# ------------------------------------------------------------------ checkpoint

def build_checkpoint(folder: Path, *, seed: int, head_scale: float, qk_scale: float, d_model=64, n_layers=4,
                     n_heads=4, mlp_hidden=160, rope_theta=500000.0) -> dict:
    """A random LLaDA checkpoint (LLaMA weights under LLaDA's names, tests/hf_fixtures.py), with the
    real LLaDA-8B config.json fields (rope, no flash attention, no dropout) at tiny sizes."""
    from safetensors.torch import load_file, save_file
    from tests.hf_fixtures import make_llada, write_tokenizer

    make_llada(folder, vocab=VOCAB, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
               mlp_hidden=mlp_hidden, rope_theta=rope_theta, n_shards=1, seed=seed)
    tensors = load_file(str(folder / "model.safetensors"))
    for name in tensors:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            tensors[name] = tensors[name] * qk_scale  # sharper attention: positions (RoPE) matter more
    head = tensors["model.transformer.ff_out.weight"] * head_scale
    head[MASK_ID] = 0.0  # logit exactly 0: never the argmax (other maxima are large and positive)
    head[EOS_ID] = 0.0
    tensors["model.transformer.ff_out.weight"] = head
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config = {  # LLaDA-8B-Instruct's config.json fields, tiny sizes
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu", "alibi": False,
        "alibi_bias_max": 8.0, "attention_dropout": 0.0, "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False, "block_group_size": 1,
        "block_type": "llama", "d_model": d_model, "embedding_dropout": 0.0, "embedding_size": VOCAB,
        "eos_token_id": EOS_ID, "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
        "init_cutoff_factor": None, "init_device": "cpu", "init_fn": "mitchell", "init_std": 0.02,
        "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "mask_token_id": MASK_ID, "max_sequence_length": 4096, "mlp_hidden_size": mlp_hidden, "mlp_ratio": 4,
        "multi_query_attention": None, "n_heads": n_heads, "n_kv_heads": n_heads, "n_layers": n_layers,
        "pad_token_id": EOS_ID, "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05,
        "rope": True, "rope_full_precision": True, "rope_theta": rope_theta, "scale_logits": False,
        "vocab_size": VOCAB, "weight_tying": False, "use_cache": False,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder, VOCAB, {"<|mdm_mask|>": MASK_ID, "<|endoftext|>": EOS_ID, "<|eot_id|>": EOT_ID})
    return config


# ------------------------------------------------------------------ the authors' code

def load_authors(ref: Path):
    """Imports their generate.py (which imports model.modeling_llada) with the shims below."""
    llada = ref / "llada" if (ref / "llada" / "generate.py").is_file() else ref
    if not (llada / "generate.py").is_file():
        raise SystemExit(f"--ref {ref}: no llada/generate.py there")
    try:
        import einops  # noqa: F401
    except ImportError:  # imported by both files for `rearrange`, which no path we run calls
        stub = types.ModuleType("einops")

        def rearrange(*args, **kwargs):
            raise RuntimeError("einops stub: rearrange is not available")

        stub.rearrange = rearrange
        sys.modules["einops"] = stub
        SHIMS.append("einops is not installed: a stub module `einops` with a `rearrange` that raises is put in "
                     "sys.modules (both files import it; no code path run here calls it)")
    sys.path.insert(0, str(llada))  # generate.py does `from model.modeling_llada import LLaDAModelLM`
    SHIMS.append(f"sys.path gets {llada} so generate.py's `from model.modeling_llada import ...` resolves "
                 "(model/ is a namespace package: no __init__.py in the authors' tree)")
    spec = importlib.util.spec_from_file_location("authors_generate", llada / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    modeling = sys.modules["model.modeling_llada"]
    return gen, modeling


def authors_model(modeling, folder: Path):
    from safetensors.torch import load_file

    config = modeling.LLaDAConfig(**json.loads((folder / "config.json").read_text()))
    model = modeling.LLaDAModelLM(config, init_params=False)
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=True)
    SHIMS.append("the model is built as LLaDAModelLM(LLaDAConfig(**config.json)) and its weights loaded with "
                 "load_state_dict(strict=True) from model.safetensors, instead of LLaDAModelLM.from_pretrained "
                 "(same class and weights; avoids transformers 5's loader around their 4.x-era class)")
    return model.float().eval()


class Recorder:
    """Logs what their loop does, calling their functions unchanged: the positions each step commits
    (a wrapper around `get_decoded_token_confident`), the layer from which each forward recomputed
    every position (`lengths[1]` after the forward, via a forward hook) and each layer's similarity
    (a wrapper around torch.nn.functional.cosine_similarity)."""

    def __init__(self, gen, model):
        self.gen, self.model = gen, model
        self.steps, self.reset, self.sims, self._sims_now = [], [], [], []
        original = gen.get_decoded_token_confident

        def confident(logits, query_masked_position, x, threshold=None, eos_id=EOS_ID):
            out = original(logits, query_masked_position, x, threshold, eos_id)
            self.steps.append(out[1].tolist())
            return out

        gen.get_decoded_token_confident = confident
        self._cos = torch.nn.functional.cosine_similarity

        def cos(*args, **kwargs):
            value = self._cos(*args, **kwargs)
            self._sims_now.append(float(value.mean()))
            return value

        torch.nn.functional.cosine_similarity = cos

        def hook(module, args, kwargs, output):
            self.reset.append(int(kwargs["lengths"][1]))
            self.sims.append(self._sims_now)
            self._sims_now = []

        model.register_forward_hook(hook, with_kwargs=True)
        SHIMS.append("recording only: generate.get_decoded_token_confident and torch.nn.functional."
                     "cosine_similarity are wrapped (the wrapper calls the original and logs its result), and a "
                     "forward hook reads lengths[1] (the refresh layer) after each model call")

    def run(self, prompt, **kwargs):
        self.steps, self.reset, self.sims = [], [], []
        x, nfe, ratio = self.gen.generate_with_elastic_cache(self.model, torch.tensor([prompt]), **kwargs)
        return x[0, len(prompt):].tolist(), nfe, ratio, self.steps, self.reset, self.sims


# ------------------------------------------------------------------ ours

def ours(dllm, samplers, model, tok, special, prompt, *, tau, window, gamma, cache):
    kwargs = dict(cache=cache, sliding_window=window)
    if cache == "elastic":
        kwargs.update(elastic_gamma=gamma, elastic_track=1)
    result = dllm.generate(model, [prompt], samplers.Threshold(tau=tau), gen_length=GEN_LENGTH,
                           block_length=GEN_LENGTH, tokenizer=tok, special=special, **kwargs)
    return (np.asarray(result.tokens)[0].tolist(), int(np.asarray(result.nfe)[0]),
            np.asarray(result.trace.commit_step)[0].tolist())


def commit_steps_from_sets(steps, prompt_len):
    out = [-1] * GEN_LENGTH
    for s, positions in enumerate(steps):
        for p in positions:
            out[p - prompt_len] = s
    return out


def first_divergence(a, b):
    """The first step whose committed set differs between two commit_step lists."""
    n = max(max(a), max(b)) + 1
    for s in range(n):
        if {j for j, t in enumerate(a) if t == s} != {j for j, t in enumerate(b) if t == s}:
            return s
    return None


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", required=True, type=Path, help="folder with the authors' llada/generate.py")
    parser.add_argument("--ckpt", type=Path, default=Path("/tmp/elastic_parity_ckpt"))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("authors_parity.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head-scale", type=float, default=60.0)
    parser.add_argument("--qk-scale", type=float, default=20.0)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--windows", default="4,8")
    parser.add_argument("--taus", default="0.9,0.5")
    parser.add_argument("--gammas", default="0.9,0.5,0.99,0.8")
    parser.add_argument("--quick", action="store_true", help="one prompt, one setting (smoke test)")
    args = parser.parse_args()

    import jax
    import dllm
    import samplers
    from dllm.decoding import SpecialIds

    t0 = time.time()
    config = build_checkpoint(args.ckpt, seed=args.seed, head_scale=args.head_scale, qk_scale=args.qk_scale)
    gen, modeling = load_authors(args.ref)
    theirs_model = authors_model(modeling, args.ckpt)
    model, tok = dllm.from_pretrained(args.ckpt, dtype="float32")
    special = SpecialIds(mask=MASK_ID, eos=EOS_ID, eot=EOT_ID, pad=EOS_ID)
    assert (tok.mask_id, tok.eos_id) == (MASK_ID, EOS_ID), (tok.mask_id, tok.eos_id)
    recorder = Recorder(gen, theirs_model)

    rng = np.random.default_rng(args.seed + 1)
    lengths = [8, 10, 12, 9][:args.prompts]
    prompts = [rng.integers(100, 126000, size=n).tolist() for n in lengths]

    # forward parity: the authors' first (full) forward vs ours, on prompt 0's first canvas
    p0 = prompts[0]
    canvas = p0 + [MASK_ID] * GEN_LENGTH
    full = torch.arange(len(canvas))
    lengths_arg = [len(canvas), -1, 0.9, 1]
    with torch.no_grad():
        their_logits = theirs_model(torch.tensor([canvas]), use_cache=True, lengths=lengths_arg,
                                    positions=[full, full[:0], full[len(p0):len(p0) + 4], full[len(p0):]]).logits
    recorder.reset, recorder.sims = [], []
    our_logits = np.asarray(model(jax.numpy.asarray([canvas], dtype=jax.numpy.int32)))
    their_logits = their_logits.numpy()
    probs = torch.softmax(torch.tensor(their_logits[0, len(p0):], dtype=torch.float64), -1).max(-1).values.numpy()
    forward = {"max_abs_logit_diff": float(np.abs(their_logits - our_logits).max()),
               "max_abs_logit": float(np.abs(their_logits).max()),
               "argmax_equal": bool((their_logits.argmax(-1) == our_logits.argmax(-1)).all()),
               "first_step_confidences": [round(float(p), 4) for p in probs]}
    print(f"forward parity: max |dlogit| {forward['max_abs_logit_diff']:.2e} (max |logit| "
          f"{forward['max_abs_logit']:.1f}), argmax equal {forward['argmax_equal']}")
    print("first-step confidences:", forward["first_step_confidences"])

    windows = [int(w) for w in args.windows.split(",")]
    taus = [float(t) for t in args.taus.split(",")]
    gammas = [float(g) for g in args.gammas.split(",")]
    settings = [(w, t, g) for w in windows for t in taus for g in gammas]
    settings += [(windows[0], taus[0], 2.0), (windows[0], taus[0], -1.0)]  # always / never refresh
    if args.quick:
        settings, prompts = settings[:1], prompts[:1]

    runs = []
    header = f"{'W':>2} {'tau':>4} {'gamma':>5} {'p':>2} | {'tokens':>6} {'nfe':>9} {'order':>5} | " \
             f"{'first div':>9} | {'refresh layers (theirs, per step)':<40} | {'vs none':>7}"
    print(header)
    print("-" * len(header))
    for window, tau, gamma in settings:
        for i, prompt in enumerate(prompts):
            t_tokens, t_nfe, ratio, t_steps, t_reset, t_sims = recorder.run(
                prompt, gen_length=GEN_LENGTH, window_length=window, mask_id=MASK_ID, eos_id=EOS_ID,
                threshold=tau, gamma=gamma, track_num=1, block_caching=True)
            o_tokens, o_nfe, o_commit = ours(dllm, samplers, model, tok, special, prompt, tau=tau, window=window,
                                             gamma=gamma, cache="elastic")
            n_tokens, n_nfe, n_commit = ours(dllm, samplers, model, tok, special, prompt, tau=tau, window=window,
                                             gamma=gamma, cache="none")
            t_commit = commit_steps_from_sets(t_steps, len(prompt))
            row = dict(window=window, tau=tau, gamma=gamma, prompt=i, prompt_tokens=prompt,
                       tokens_match=t_tokens == o_tokens, nfe_theirs=t_nfe, nfe_ours=o_nfe,
                       order_match=t_commit == o_commit, first_divergent_step=first_divergence(t_commit, o_commit),
                       theirs_tokens=t_tokens, ours_tokens=o_tokens, theirs_commit_step=t_commit,
                       ours_commit_step=o_commit, theirs_commits_per_step=[len(s) for s in t_steps],
                       theirs_refresh_from_layer=t_reset, theirs_layer_similarity=t_sims,
                       theirs_computed_ratio=ratio, none_tokens=n_tokens, none_nfe=n_nfe,
                       ours_matches_none=o_tokens == n_tokens, theirs_matches_none=t_tokens == n_tokens,
                       eos_or_mask_in_output=any(t in (EOS_ID, MASK_ID) for t in t_tokens + o_tokens + n_tokens))
            runs.append(row)
            print(f"{window:>2} {tau:>4} {gamma:>5} {i:>2} | {'ok' if row['tokens_match'] else 'DIFF':>6} "
                  f"{t_nfe:>4}/{o_nfe:<4} {'ok' if row['order_match'] else 'DIFF':>5} | "
                  f"{str(row['first_divergent_step']):>9} | {str(t_reset[1:])[:40]:<40} | "
                  f"{'same' if row['ours_matches_none'] else 'differs':>7}", flush=True)

    # sensitivity: their code with gamma 2 (refresh from layer 1 at every step) vs -1 (never)
    sens = {}
    for i in range(len(prompts)):
        always = [r for r in runs if r["prompt"] == i and r["gamma"] == 2.0]
        never = [r for r in runs if r["prompt"] == i and r["gamma"] == -1.0]
        if always and never:
            sens[i] = {"theirs_always_vs_never_tokens_differ": always[0]["theirs_tokens"] != never[0]["theirs_tokens"],
                       "ours_always_vs_never_tokens_differ": always[0]["ours_tokens"] != never[0]["ours_tokens"]}
    commits = [c for r in runs for c in r["theirs_commits_per_step"]]
    summary = {
        "tokens_match": sum(r["tokens_match"] for r in runs), "nfe_match": sum(r["nfe_theirs"] == r["nfe_ours"]
                                                                             for r in runs),
        "order_match": sum(r["order_match"] for r in runs), "runs": len(runs),
        "steps_committing_1": sum(c == 1 for c in commits), "steps_committing_more": sum(c > 1 for c in commits),
        "eos_or_mask_produced": any(r["eos_or_mask_in_output"] for r in runs),
        "forced_refresh_sensitivity": sens,
    }
    print(json.dumps(summary, indent=1))
    data = {
        "what": "Elastic-Cache: dllm cache='elastic' vs the authors' generate_with_elastic_cache (PyTorch, CPU, fp32)",
        "authors_source": "yxu-dev/Elastic-Cache @ 46c0bc329f8e4ebc5fae34405b05cc6933e1a9e0 (mirror of VILA-Lab/"
                          "Elastic-Cache): llada/generate.py, llada/model/modeling_llada.py; configuration_llada.py "
                          "not in that mirror's index: the stock Fast-dLLM/LLaDA one (RohitNagraj/Fast-dLLM @ 71ec2e7)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "checkpoint": {"seed": args.seed, "head_scale": args.head_scale, "qk_scale": args.qk_scale,
                       "d_model": config["d_model"], "n_layers": config["n_layers"], "n_heads": config["n_heads"],
                       "vocab_size": VOCAB, "mask_id": MASK_ID, "eos_id": EOS_ID,
                       "note": "head rows of [MASK] and EOS zeroed"},
        "shims": SHIMS, "forward_parity": forward, "summary": summary, "runs": runs,
        "seconds": round(time.time() - t0, 1), "versions": {"torch": torch.__version__, "jax": jax.__version__},
    }
    write_json(args.out, data)
    print(f"wrote {args.out} ({data['seconds']} s)")


if __name__ == "__main__":
    main()
