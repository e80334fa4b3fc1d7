"""A toy training stage for the SLURM tests: counts to TOY_STEPS, one step per TOY_STEP_SECONDS, checkpointing the
counter after every step. On SIGUSR1 it stops at the step boundary (the preemption contract, fuse.preemption) and
its rerun resumes from the checkpoint. Plugged in as FUSE_STAGE_MODULES="...,distill=slurm_toy"."""

from __future__ import annotations

import os
import time

from fuse import preemption
from fuse.io import read_json, write_json_atomic

VERSION = 1


def _append(path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def run(ctx) -> None:
    steps = int(os.environ.get("TOY_STEPS", "8"))
    delay = float(os.environ.get("TOY_STEP_SECONDS", "0.5"))
    checkpoint = ctx.dir / "checkpoints" / "counter.json"
    start = read_json(checkpoint)["step"] if checkpoint.exists() else 0
    workdir = ctx.recipe.workdir
    _append(os.path.join(workdir, "calls.log"), f"{ctx.instance.name}@{start}")
    with preemption.checkpointing():
        for step in range(start, steps):
            time.sleep(delay)
            write_json_atomic(checkpoint, {"step": step + 1})
            _append(
                os.path.join(workdir, "steps.log"),
                f"{step + 1} restart={os.environ.get('SLURM_RESTART_COUNT', 0)}",
            )
            if preemption.requested():
                break
        preemption.raise_if_requested()
    write_json_atomic(ctx.out / "model.json", {"steps": steps, "resumed_from": start})
