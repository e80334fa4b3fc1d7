"""Child processes that cannot outlive fuse: a command (a training launcher and its ranks) runs in a process group
of its own, gets the SIGTERM, SIGINT and SIGUSR1 that fuse gets, and is terminated when fuse stops for any reason.

A SIGKILL of fuse leaves no chance to clean up, so the child also asks the kernel for SIGTERM when fuse dies
(Linux's parent-death signal). It asks before it becomes the command, in a small interpreter that then execs it
(`python -m fuse.process_group PARENT_PID COMMAND...`): Python code between fork and exec (`preexec_fn`) is not safe
in a process with threads, and fuse has them (torch, tokenizers).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
STOPPING = (signal.SIGTERM, signal.SIGINT)  # once forwarded, the group is already being stopped
GRACE_S = 30.0  # after SIGTERM, before SIGKILL
PR_SET_PDEATHSIG = 1


class Terminated(SystemExit):
    """Raised for a forwarded signal whose default action is to end this process: the group is ended first, then
    this process exits with 128 + the signal, as a shell reports a process killed by it."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


def run_in_group(
    command: Sequence[str], env: Mapping[str, str] | None = None, grace_s: float = GRACE_S
) -> int:
    """Run `command` to its end in a new session (its own process group) and return its exit status (negative:
    the signal that ended it). A forwarded signal goes to the whole group, then to this process's own handler
    (preemption's SIGUSR1 flag, Ctrl-C's KeyboardInterrupt). However this call is left, what is left of the group
    is terminated (SIGTERM, SIGKILL after `grace_s`) and the command is reaped."""
    # Forwarding is in place before the start: a signal that came between the start and the handlers would stop this
    # process and leave the new group running. One that comes before the group is known waits, and is passed on
    # (and acted on) once it is.
    forwarded: list[int] = []
    group: list[int] = []
    with forwarding(group, forwarded) as early:
        process = subprocess.Popen(dying_with_this_process(command), env=env, start_new_session=True)
        try:
            group.append(process.pid)
            early.replay()
            return process.wait()
        finally:
            end_group(process, grace_s, asked=any(s in STOPPING for s in forwarded))


def dying_with_this_process(command: Sequence[str]) -> list[str]:
    """`command`, started through the interpreter that sets the parent-death signal (Linux; unchanged elsewhere)."""
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-m", "fuse.process_group", str(os.getpid()), *command]


class _Early:
    """Signals that came while the group was not yet known: `replay` passes them on and acts on them."""

    def __init__(self, group: list[int], act: Callable[[int, object], None]) -> None:
        self.group, self.act, self.waiting = group, act, []

    def replay(self) -> None:
        while self.waiting:
            signum = self.waiting.pop(0)
            signal_group(self.group[0], signum)
            self.act(signum, None)


@contextlib.contextmanager
def forwarding(group: list[int], forwarded: list[int]) -> Iterator[_Early]:
    """Inside this block the FORWARDED signals (those this process does not ignore) also go to the process group
    `group[0]`; until the caller has put it there, they wait for the caller's `replay()`. Python runs signal
    handlers in the main thread only: elsewhere, signals are left as they are."""
    previous: dict[int, object] = {}

    def act(signum: int, frame: object) -> None:
        handler = previous.get(signum)
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:
            raise Terminated(signum)

    early = _Early(group, act)
    if threading.current_thread() is not threading.main_thread():
        yield early
        return

    def forward(signum: int, frame: object) -> None:
        forwarded.append(signum)
        if not group:
            early.waiting.append(signum)
            return
        signal_group(group[0], signum)
        act(signum, frame)

    for signum in FORWARDED:
        if signal.getsignal(signum) not in (signal.SIG_IGN, None):
            previous[signum] = signal.signal(signum, forward)
    try:
        yield early
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def end_group(process: subprocess.Popen, grace_s: float, asked: bool = False) -> None:
    """Terminate whatever is left of `process`'s group: SIGTERM (unless it was `asked` to stop already), up to
    `grace_s` for it to go, then SIGKILL; reap `process`. A group that has already ended gets no signal."""
    pgid = process.pid
    if not asked:
        signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        process.poll()  # reaps the leader: a zombie would keep the group alive
        if not group_alive(pgid):
            break
        time.sleep(0.05)
    else:
        signal_group(pgid, signal.SIGKILL)
    process.wait()


def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_parent(parent: int | None = None) -> None:
    """Have the kernel send this process SIGTERM when its parent dies, even of SIGKILL (Linux; a no-op elsewhere).
    `parent`: the pid the parent had (default: now); if it is gone already, this process is ended at once."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid() if parent is None else parent
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    if os.getppid() != parent:  # it died before the kernel was asked: what the kernel would have sent
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> None:
    """python -m fuse.process_group PARENT_PID COMMAND...: die with PARENT_PID, then become COMMAND."""
    if len(argv) < 2 or not argv[0].isdigit():
        raise SystemExit("usage: python -m fuse.process_group PARENT_PID COMMAND [ARGS...]")
    die_with_parent(int(argv[0]))
    os.execvp(argv[1], argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
