"""Training on two nodes, for real: a two-node SLURM cluster on this host (tests/slurm_cluster.py: two slurmd,
node1 and node2), `fuse submit` of distill and fpo instances with `nodes: 2`, one `accelerate launch` per node
through srun, one gloo process group across both nodes, DeepSpeed ZeRO-2 (distill) and ZeRO-3 (fpo). A SIGUSR1 mid-training
(what SLURM sends before a time limit) checkpoints, requeues and resumes; the result must equal a one-node run of
the same global batch (two processes on one node), which is the claim a team moving to more nodes relies on.

The upstream stages (prepare, extract, align, score) run locally first, on tiny models of different vocabularies,
so only the training jobs go to the cluster.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_distill import stores_ready, weights
from test_fpo import pairs

from fuse import slurm
from fuse.executor import run_stage
from fuse.store import RunStore

from slurm_cluster import two_node_cluster, wait_for  # noqa: F401  (the session's two-node cluster)

pytestmark = [pytest.mark.slurm, pytest.mark.multiprocess, pytest.mark.slow]

TRAIN = {  # per rank; two ranks in both layouts: 1 process x 2 nodes, 2 processes x 1 node
    "max_steps": 6,
    "save_steps": 50,
    "logging_steps": 1,
    "per_device_batch_size": 2,
    "learning_rate": 1e-3,
    "lr_scheduler": "constant",
    "max_length": 96,
    "seed": 7,
}
FPO = {
    "max_steps": 6,
    "save_steps": 50,
    "logging_steps": 1,
    "per_device_batch_size": 2,
    "learning_rate": 1e-3,
}
# Each training runs long enough for its signal to land mid-run: after the first logged step some 5 s remain
# (distill's steps take ~25 ms here; fpo's, under ZeRO-3 across two nodes, ~0.1 s); the signal takes well under one.
PREEMPTED_STEPS = {"distill": 240, "fpo": 60}
ATOL = 1e-5  # float32 on CPU; the two layouts reduce the same two gradients over gloo


@pytest.fixture(scope="module")
def cluster(two_node_cluster):  # noqa: F811
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(two_node_cluster.conf))
        yield two_node_cluster


ZERO = {"distill": 2, "fpo": 3}  # each training across the two nodes under its own ZeRO stage


def _recipe(tmp: Path, pivot_dir: Path, nodes: int, processes: int, ready: tuple[str, ...]):
    preference = tmp / "pref.jsonl"
    tmp.mkdir(parents=True, exist_ok=True)
    if not preference.exists():
        preference.write_text("".join(json.dumps(r) + "\n" for r in pairs(24, 3, "yes", "no", "p")))
    settings = {
        name: {
            "deepspeed": {"stage": ZERO[name]},
            "num_processes": processes,
            "max_steps": PREEMPTED_STEPS[name],
        }
        for name in ("distill", "fpo")
    }
    executor = {
        "kind": "slurm" if nodes > 1 else "local",
        "resources": {"distill": {"nodes": nodes}, "fpo": {"nodes": nodes}},
        "slurm": {"signal_grace_seconds": 60},
    }
    return stores_ready(
        tmp,
        pivot_dir,
        TRAIN | settings["distill"],
        0.25,
        16,
        later={"fpo": FPO | settings["fpo"], "score": {"enabled": True}},
        top={"data": {"preference": {"path": str(preference), "format": "preference"}}, "executor": executor},
        ready=ready,
    )


def _logged_steps(workdir: Path, instance: str) -> int:
    log = workdir / instance / "logs" / "train.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


@pytest.fixture(scope="module")
def pivot(tmp_path_factory) -> Path:
    from tiny_lm import build

    return build(tmp_path_factory.mktemp("multinode-pivot") / "pivot", arch="qwen2")


def test_two_node_trainings_preempted_and_resumed_equal_one_node(cluster, pivot, tmp_path):
    """Both trainings run on two nodes (distill under ZeRO-2, fpo under ZeRO-3), each preempted mid-training."""
    upstream = ("prepare", "extract.pivot", "extract.src", "align.src", "score.src")
    trainings = ("distill.src", "fpo.src")
    two = _recipe(tmp_path / "two", pivot, nodes=2, processes=1, ready=upstream)
    workdir = Path(two.workdir)
    jobs = {s.instance: s for s in slurm.submit(two, tmp_path / "two" / "recipe.yaml")}
    assert {name for name, s in jobs.items() if s.job_id} == {"distill.src", "score.target-src", "fpo.src"}
    assert "#SBATCH --nodes=2" in jobs["distill.src"].script.read_text()

    def log_of(instance: str) -> Path:
        return workdir / instance / "logs" / f"slurm-{jobs[instance].job_id}.out"

    for instance in trainings:  # fpo starts once distill (and the target's scoring) is done

        def a_step_or_ended(instance: str = instance) -> bool:
            ended = log_of(instance).is_file() and f"{instance}: exit" in log_of(instance).read_text()
            return ended or _logged_steps(workdir, instance) >= 1

        wait_for(a_step_or_ended, 600, f"a {instance} step on two nodes")
        planned = PREEMPTED_STEPS[instance.split(".")[0]]
        assert _logged_steps(workdir, instance) < planned, log_of(instance).read_text()[-4000:]
        subprocess.run(["scancel", "--batch", "--signal=USR1", jobs[instance].job_id], check=True)
    final = slurm.wait([s.job_id for s in jobs.values() if s.job_id], timeout=900, poll=1)
    states = {name: final[s.job_id] for name, s in jobs.items() if s.job_id}
    assert {s.state for s in states.values()} == {"COMPLETED"}, (
        f"{states}\n{log_of('fpo.src').read_text()[-4000:]}"
    )

    store = RunStore(workdir)
    assert {row.state for row in slurm.collect_status(two)} == {
        "done"
    }  # every output matches its recorded digest
    debris = [p for p in workdir.rglob("*") if p.name.endswith((".tmp", ".staging"))]
    assert not debris, debris  # no writer left a half-written file behind
    for instance in trainings:
        log = log_of(instance).read_text()
        assert states[instance].restarts == 1 and "requeueing job" in log and "restart 1" in log, log[-4000:]
        summary = json.loads((workdir / instance / "logs" / "summary.json").read_text())
        assert summary["ranks"] == ["node1", "node2"], summary  # one process group across both nodes
        manifest = store.manifest(instance)
        assert manifest["status"] == "done" and manifest["environment"]["slurm_node"] == "node1"
        planned = PREEMPTED_STEPS[instance.split(".")[0]]
        print(
            f"{instance}: preempted and resumed from {summary['resumed_from']} of {planned} steps"
        )  # the margin
        assert summary["resumed_from"]
        # one writer: rank 0 logs the steps, none missing across the requeue
        steps = [json.loads(line)["step"] for line in (workdir / instance / "logs" / "train.jsonl").open()]
        assert sorted(set(steps)) == list(range(1, planned + 1))

    # the same global batch on one node: two processes, run locally from a copy of the upstream stores
    one_dir = tmp_path / "one"
    one = _recipe(one_dir, pivot, nodes=1, processes=2, ready=upstream)
    for instance in ("distill.src", "score.target-src", "fpo.src"):
        run_stage(one, instance)
    for instance in trainings:
        a = weights(workdir / instance / "out" / "model")
        b = weights(Path(one.workdir) / instance / "out" / "model")
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        zero = ZERO[instance.split(".")[0]]
        print(
            f"ZeRO-{zero} {instance}: max |two nodes - one node| = {worst:.2e}"
        )  # the closing note's figure
        assert worst <= ATOL, f"{instance}: two nodes vs one node differ by {worst}"
        assert any(not torch.equal(a[k], weights(pivot)[k]) for k in a)
    shutil.rmtree(tmp_path, ignore_errors=True)  # checkpoints of tiny models, but four runs of them
