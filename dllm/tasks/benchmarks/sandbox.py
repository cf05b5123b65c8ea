"""Run untrusted Python (generated code plus its tests) in a separate, limited process.

    result = run_python("def f(x):\\n    return x\\nassert f(1) == 1\\n", timeout_s=5)
    result.passed, result.status          # True, "passed"
    run_many(programs, workers=2)         # a thread pool of such subprocesses

Nothing is ever executed in the calling process. Each program runs as
`python -I -S runner.py` (standard library only, unless `site_packages=True`)
in a fresh temporary directory (its cwd, HOME and
TMPDIR), deleted afterwards. What confines it:

* **time**: the wall-clock `timeout_s`; on expiry the whole process group is
  killed (SIGKILL). `RLIMIT_CPU` backs it up inside the child.
* **memory**: `RLIMIT_AS` (`memory_mb`, default 1024 MiB of address space), so
  a runaway allocation raises MemoryError or kills the child.
* **files**: `RLIMIT_FSIZE` caps every file it writes (stdout and stderr go to
  files in the temp dir, not to our memory), `RLIMIT_CORE` = 0.
* **network**: when `unshare` can create a network namespace here (root, or
  unprivileged user namespaces enabled), the child runs in a fresh namespace
  with no interfaces up: no connection can leave the machine. Always, in
  addition: an empty environment (no proxy variables, no credentials), `-I`
  (no PYTHON* variables, no user site), and the runner replaces
  `socket.socket`, `socket.create_connection`, `socket.getaddrinfo` with
  functions that raise. Without the namespace that last layer is a guard
  against accidents, not a security boundary (ctypes can get around it);
  `network_isolation()` says which level this machine gets.
* **exit**: a run passes only if the program ran to its end *and* the runner
  then printed a random nonce that only it knows (read from stdin before the
  program starts), so `exit(0)` or `os._exit(0)` in generated code is a fail.

Not confined: the number of processes it forks (`RLIMIT_NPROC` counts every
process of the user, so it cannot be set per program without breaking the
caller); children that escape the process group with setsid are not killed.
For hostile code use a container or VM on top.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 1024
MAX_FILE_MB = 16
OUTPUT_TAIL = 2000  # characters of stdout/stderr kept in a result

# The program the child runs first: limits, then the network guard, then the candidate.
RUNNER = r'''
import os, resource, sys
nonce = sys.stdin.readline().strip()
sys.stdin.close()
sys.stdin = open(os.devnull)
memory, cpu_s, fsize = (int(a) for a in sys.argv[2:5])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if sys.argv[5] == "1":
    import socket
    def _no_network(*args, **kwargs):
        raise OSError("network access is disabled in the sandbox")
    socket.socket = socket.create_connection = socket.getaddrinfo = socket.socketpair = _no_network
path = sys.argv[1]
with open(path) as f:
    source = f.read()
namespace = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
try:
    exec(compile(source, path, "exec"), namespace)
except BaseException:
    import traceback
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
sys.stdout.write("\n" + nonce + "\n")
sys.stdout.flush()
os._exit(0)
'''


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What one run did.

    Attributes:
      status: "passed"; "failed" (an exception, e.g. a failed assert, or a
        non-zero exit); "timeout" (killed after timeout_s); "memory" (hit the
        memory limit); "exited" (stopped early with a zero status and no nonce).
      passed: status == "passed".
      returncode: the child's exit status (negative: killed by that signal).
      seconds: wall time of the run.
      stdout, stderr: the last `OUTPUT_TAIL` characters of each.
    """

    status: str
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def unshare_prefix() -> tuple[str, ...]:
    """The command prefix that puts a child in an empty network namespace, or () if none works here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for prefix in ((unshare, "--net"), (unshare, "--user", "--map-root-user", "--net")):
        try:
            done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return prefix
    return ()


def network_isolation() -> str:
    """'namespace' when children get an empty network namespace, else 'socket-guard' (see module doc)."""
    return "namespace" if unshare_prefix() else "socket-guard"


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4 * OUTPUT_TAIL))
            return f.read().decode("utf-8", "replace")[-OUTPUT_TAIL:]
    except OSError:
        return ""


def run_python(program: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
               network: bool = False, site_packages: bool = False) -> SandboxResult:
    """Runs `program` (Python source) in a sandboxed subprocess; see the module docstring.

    Args:
      program: the whole program; it passes if it runs to the end.
      timeout_s: wall-clock limit in seconds (> 0).
      memory_mb: address-space limit of the child in MiB (>= 64).
      network: False (default) isolates it from the network as well as this
        machine allows; True skips only the network namespace and the socket guard.
      site_packages: False (default) starts the interpreter with -S: the
        standard library only, and ~4x faster start-up (the `site` step of a
        virtual environment costs ~0.15 s); True lets the program import
        installed packages.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r}: must be > 0")
    if memory_mb < 64:
        raise ValueError(f"memory_mb={memory_mb!r}: must be >= 64 (the interpreter itself needs ~30 MiB)")
    workdir = Path(tempfile.mkdtemp(prefix="dllm-sandbox-"))
    nonce = secrets.token_hex(16)
    try:
        (workdir / "program.py").write_text(program)
        (workdir / "runner.py").write_text(RUNNER)
        command = [*(() if network else unshare_prefix()), sys.executable, "-I", *(() if site_packages else ("-S",)),
                   str(workdir / "runner.py"),
                   str(workdir / "program.py"), str(memory_mb * 2**20), str(max(1, int(timeout_s) + 1)),
                   str(MAX_FILE_MB * 2**20), "0" if network else "1"]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        began = time.perf_counter()
        with open(workdir / ".stdout", "wb") as out, open(workdir / ".stderr", "wb") as err:
            child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir, env=env,
                                     start_new_session=True)
            timed_out = False
            try:
                child.communicate(input=(nonce + "\n").encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(child.pid, signal.SIGKILL)  # the child and anything it started in its group
                except (ProcessLookupError, PermissionError):
                    pass
                child.wait()
        seconds = time.perf_counter() - began
        stdout, stderr = _tail(workdir / ".stdout"), _tail(workdir / ".stderr")
        code = child.returncode
        if timed_out or code in (-signal.SIGXCPU, -signal.SIGKILL):
            status = "timeout"
        elif "MemoryError" in stderr or (code is not None and code < 0 and "Cannot allocate memory" in stderr):
            status = "memory"
        elif code == 0 and stdout.rstrip().endswith(nonce):
            status = "passed"
        elif code == 0:
            status = "exited"
        else:
            status = "failed"
        return SandboxResult(status=status, returncode=code, seconds=seconds,
                             stdout=stdout.replace(nonce, "<nonce>"), stderr=stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_many(programs: Sequence[str], *, workers: int | None = None, **kwargs) -> list[SandboxResult]:
    """`run_python` over many programs, `workers` at a time (default: the CPU count), results in order."""
    workers = max(1, workers or os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_python(p, **kwargs), programs))
