"""Toy stage implementations for testing the DAG engine: each records its call and writes a small output.

Plugged in through FUSE_STAGE_MODULES, e.g. "extract=toy_stages:extract". TOY_SLEEP="distill.a=30" makes an
instance sleep (to be killed mid-stage); TOY_FAIL="align.b" makes one fail.
"""

from __future__ import annotations

import json
import os
import time

from fuse.io import write_json_atomic


class ToyStage:
    VERSION = 1

    def __init__(self, stage: str):
        self.stage = stage

    def run(self, ctx) -> None:
        name = ctx.instance.name
        calls = os.path.join(ctx.recipe.workdir, "calls.log")
        with open(calls, "a", encoding="utf-8") as handle:
            handle.write(f"{name}{'' if ctx.shard is None else f'#{ctx.shard}'}\n")
        sleeps = dict(p.split("=") for p in os.environ.get("TOY_SLEEP", "").split(",") if p)
        if name in sleeps:
            time.sleep(float(sleeps[name]))
        if name in os.environ.get("TOY_FAIL", "").split(","):
            raise RuntimeError(f"toy failure in {name}")
        ctx.progress(1, 1, "toy step")
        inputs = {p: sorted(os.listdir(path)) for p, path in ctx.inputs.items()}
        payload = {"instance": name, "shard": ctx.shard, "inputs": inputs}
        suffix = "" if ctx.shard is None else f"-{ctx.shard:05d}"
        write_json_atomic(ctx.out / f"result{suffix}.json", payload)


def read_calls(workdir) -> list[str]:
    path = os.path.join(workdir, "calls.log")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


STAGES = ("prepare", "extract", "score", "align", "distill", "fpo", "merge", "evaluate", "publish")
globals().update({stage: ToyStage(stage) for stage in STAGES})
OVERRIDES = ",".join(f"{s}=toy_stages:{s}" for s in STAGES)

if __name__ == "__main__":
    print(json.dumps(OVERRIDES))
