"""Pass/fail scoring of generated code: the program a completion makes, run with its tests in a sandboxed
subprocess with a time limit.

The sandbox is a fresh interpreter in isolated mode (`python -I`: no user site, no PYTHON* variables, no current
directory on the path) in an empty temporary directory, with an empty environment, a wall-clock timeout and POSIX
limits on CPU time, address space, file size and open files. It does not cut the network or the file system: it
keeps a careless completion (an endless loop, a runaway allocation, a stray write) from hurting the run, not a
hostile one. Run untrusted models' code in a container as well.
"""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_mb: int = 16
    open_files: int = 64


def extract_code(completion: str) -> str:
    """The first fenced code block of a completion (an unclosed fence runs to the end), else the completion itself."""
    match = FENCE.search(completion)
    return match.group(1) if match else completion


def function_body(continuation: str) -> str:
    """A continuation of a function up to its first non-indented line (where the function ends: what a base model
    writes after it, tests or prints, is not part of the answer; HumanEval's stop sequences, by indentation)."""
    lines = continuation.split("\n")
    for number, line in enumerate(lines[1:], 1):
        if line.strip() and not line[0].isspace():
            return "\n".join(lines[:number]) + "\n"
    return continuation


def completion_program(prefix: str, completion: str, entry_point: str) -> str:
    """The code a completion stands for: its code block on its own when that defines `entry_point` (a chat model
    answers with the whole function), else `prefix` (the function as given) continued by the completion's code up
    to where the function ends."""
    code = extract_code(completion)
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.M):
        return code
    return prefix + function_body(code)


def with_tests(program: str, test: str, entry_point: str) -> str:
    """`program`, then the tests (HumanEval's form: a `check(candidate)` function), then the call."""
    return f"{program}\n\n{test}\n\ncheck({entry_point})\n"


def _limit(limits: Limits):  # pragma: no cover - runs in the child
    import resource

    def apply() -> None:
        cpu = math.ceil(limits.timeout_s)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        memory = limits.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        size = limits.file_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))

    return apply


def run_sandboxed(source: str, limits: Limits = Limits()) -> tuple[bool, str]:
    """(passed, why): passed when the program exits 0 within the limits; why is '' then, else 'timeout' (wall
    clock or CPU seconds), the signal that ended it, or the last line of its stderr (the exception)."""
    with tempfile.TemporaryDirectory(prefix="fuse-sandbox-") as folder:
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", source],
                cwd=folder,
                env={},
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=limits.timeout_s,
                preexec_fn=_limit(limits) if sys.platform != "win32" else None,
            )
        except subprocess.TimeoutExpired:
            return False, "timeout"
    if done.returncode == 0:
        return True, ""
    if done.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return False, "timeout"
    if done.returncode < 0:
        return False, signal.Signals(-done.returncode).name
    lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
    return False, lines[-1] if lines else f"exit status {done.returncode}"
