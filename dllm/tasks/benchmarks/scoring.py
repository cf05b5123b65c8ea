"""Reading a benchmark answer out of a decoded text: GSM8K's number, a code block and its indent."""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation


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

