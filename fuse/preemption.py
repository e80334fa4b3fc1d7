"""SIGUSR1 means "save and stop": SLURM sends it to a job's script shortly before a time limit or a preemption;
the script forwards it to `fuse run-stage` and requeues the job once the stage has exited (the signal contract).

Stages that checkpoint (training) wrap their loop in `checkpointing()`, poll `requested()` at step boundaries,
save, and call `raise_if_requested()`; every other stage is stopped at once by `Preempted`, and its rerun
continues from its finished shards. Either way the stage exits with PREEMPTED_EXIT_CODE and is not marked done.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", which is what a requeue does

_requested = threading.Event()
_deferring = 0


class Preempted(SystemExit):
    """Raised to stop a stage that was asked to; a SystemExit so the process exits with PREEMPTED_EXIT_CODE."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)

    def __str__(self) -> str:
        return "stopped by SIGUSR1 (time limit or preemption near); the job is requeued and resumes"


def _on_usr1(signum: int, frame: Any) -> None:
    _requested.set()
    if not _deferring:
        raise Preempted()


def install() -> None:
    """Handle SIGUSR1 in this (main) thread's process; `fuse run-stage` calls it before running a stage."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, _on_usr1)


def requested() -> bool:
    return _requested.is_set()


def raise_if_requested() -> None:
    """After a checkpoint was saved on request: stop here, so the stage is not recorded as done."""
    if _requested.is_set():
        raise Preempted()


@contextlib.contextmanager
def checkpointing() -> Iterator[None]:
    """Inside this block SIGUSR1 only sets the flag: the caller saves at its next step boundary and stops."""
    global _deferring
    install()
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


def trainer_callback() -> Any:
    """A transformers TrainerCallback that saves a checkpoint and stops training once SIGUSR1 has arrived (at any
    rank: every rank then saves at the same step, as a checkpoint is a collective)."""
    from transformers import TrainerCallback

    class StopOnPreemption(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if requested_by_any_rank(args.device):
                _requested.set()  # a rank whose own signal is still on its way stops as well
                control.should_save = True
                control.should_training_stop = True
            return control

    return StopOnPreemption()


def requested_by_any_rank(device: Any) -> bool:
    """Whether some rank was asked to stop. The launcher signals the ranks one after the other, and a step can end
    in between: a rank that saw the flag would wait in the checkpoint's collectives for one that did not."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _requested.is_set()
    import torch

    flag = torch.tensor([float(_requested.is_set())], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def reset() -> None:
    """Forget a request (tests; a process that runs several stages)."""
    _requested.clear()
