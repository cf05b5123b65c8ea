"""Issue 19 CPU probe (1.1M-parameter LLaDA, addition only, same seed): does zero-padding addition operands to a fixed width let a small model learn the sum?

python experiments/results/models/addition_format_probe.py padded|unpadded STEPS
"""
import dataclasses, functools, sys, time
import dllm
from dllm.tasks.synthetic import parallel as P
from dllm.tasks.base import curriculum, ANSWER_DELIMITER
from dllm.data import DataConfig, make_data
from dllm.models.config import ModelConfig
from dllm.training import TrainConfig, train
from dllm import evaluation
import samplers
from dllm.decoding import DecodeConfig

mode, steps = sys.argv[1], int(sys.argv[2])
if mode not in ("padded", "unpadded"):
    raise SystemExit(f"mode {mode!r}: allowed padded (the suite's format) or unpadded (the old one)")
WIDTH = 12

def sample(rng, digits=(8, 12)):
    if mode == "padded":  # the suite's own format, at width 12
        return P.sample_addition(rng, digits, width=WIDTH)
    n = int(rng.integers(digits[0], digits[1] + 1))  # the old format: each number at its own length
    a, b = P.draw_operand(rng, n), P.draw_operand(rng, n)
    return f"add : {P.spell(a, n)} + {P.spell(b, n)} {ANSWER_DELIMITER}", P.spell(a + b, n + 1)

task = dataclasses.replace(P.PARALLEL_TASKS["addition"], sample=sample,
                           train_sample=curriculum(functools.partial(sample, digits=(2, 7)), sample, 0.25),
                           max_answer_tokens=WIDTH + 1, answer_pattern=None)
P.PARALLEL_TASKS["addition"] = task
import dllm.tasks as T
T.SUITES["parallel"]["addition"] = task

data = make_data(DataConfig(source="tasks", suite="parallel", tasks=("addition",), n_per_task=20000,
                            eval_n_per_task=32, prompt_width=32, gen_length=16), 64, 0)
tok = data.tokenizer
mc = ModelConfig(arch="llada", vocab_size=tok.vocab_size, d_model=128, n_layers=4, n_heads=4, mlp_hidden=512,
                 max_seq_len=48, dtype="float32", param_dtype="float32",
                 mask_token_id=tok.mask_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
tc = TrainConfig(steps=steps, batch_size=64, lr=2e-3, warmup_steps=min(100, steps // 2), objective="sft", log_every=500,
                 eval_every=0, checkpoint_every=0, workdir=f"/tmp/addition_probe/{mode}", progress=False,
                 tensorboard=False, resume=False)
t0 = time.time()
res = train(mc, tc, data)
print("train s", time.time() - t0, flush=True)
model, tok = dllm.from_pretrained(res.model_path)
ex = task.examples("test", 200)
out = evaluation.evaluate_examples(model, tok, samplers.LowConfidence(), ex, DecodeConfig(gen_length=16, block_length=16),
                                   batch_size=200, prompt_width=32)
print(mode, steps, "accuracy", out["summary"]["accuracy"])
for r in out["rows"][:3]:
    print(r["answer"], "|", r["output"])
