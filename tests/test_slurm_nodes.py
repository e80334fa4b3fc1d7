"""Sharded stages on a two-node SLURM (tests/slurm_cluster.py: two slurmd on this host, node1 and node2, LLN
scheduling, SlurmdTimeout=10 s): an extraction array spreads over both nodes, and a node lost in the middle of
an array costs only the shards that were running on it.

The module starts its own two-node cluster: the node-loss test kills node2 for good (its slurmd and every process
of its jobs, as when a machine dies), which the session's shared two-node cluster must not see. On one host the
jobs of a node outlive its slurmd (each batch job runs under its own slurmstepd, a daemon of its own), so "losing"
node2 means SIGKILLing its slurmd, the slurmstepd of each of its jobs and everything those run; nothing of node2 is
left to report back, and slurmctld learns of the loss only by its pings going unanswered. (Killing the slurmd alone
is no lost node: measured, its jobs ran to the end under their slurmstepd and reported COMPLETED themselves; they
stayed COMPLETING, and their dependents waited, until the node was declared DOWN.)

Measured here (Slurm 22.05, SlurmdTimeout=10 s, MessageTimeout=10 s): slurmctld declares node2 DOWN about 29 s after
the kill ("Not responding"), requeues each of its running batch jobs (the array tasks: --requeue) at once, and
starts them on node1 about 7 s later (a requeued job's BeginTime is cred_expire + 1 s). The requeue is automatic:
no second `fuse submit` is needed, and one finds nothing to do. On a real cluster the shard locks the lost runs held
name another host and carry a fresh heartbeat, so the test rewrites them so: the requeued run breaks them as an
earlier run of its own SLURM job (fuse.store), where it used to wait out LOCK_TTL_S, fail "busy" and cancel align.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fuse import slurm
from fuse.cli import main
from fuse.plan import stage_module
from fuse.recipe import load_recipe
from fuse.store import RunStore

from recipes import toy_recipe, write_recipe
from slurm_cluster import Cluster, start_cluster, stop_cluster, wait_for
from toy_stages import OVERRIDES, read_calls

TESTS = Path(__file__).parent
pytestmark = pytest.mark.slurm

SHARDS = 4
STAGES = {  # prepare -> extract.pivot, extract.a (4 shards each) -> align.a
    "extract": {"num_shards": SHARDS},
    **{s: {"enabled": False} for s in ("distill", "fpo", "merge", "evaluate", "publish")},
}
JOB_LINE = re.compile(r"^\[fuse\] \S+ \S+ (\S+): job (\d+) shard (\d+) on (\S+), restart (\d+)$", re.M)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """This module's own two-node cluster; SLURM_CONF points at it for the module's tests (and their jobs)."""
    cluster = start_cluster(tmp_path_factory.mktemp("slurm-nodes"), nodes=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(cluster.conf))
        try:
            yield cluster
        finally:
            daemons = {p.name: int(p.read_text() or 0) for p in cluster.run_dir.glob("*.pid")}
            stop_cluster(cluster)
            strays = _job_processes(cluster)  # none expected: the jobs ended, or were killed with node2
            _kill(strays)
            assert not strays, f"job processes left behind: {strays}"
            assert not [name for name, pid in daemons.items() if _alive(pid)], (
                "a daemon outlived stop-cluster"
            )


@pytest.fixture(autouse=True)
def toy(monkeypatch):
    """Toy stages in the jobs too: sbatch hands the submitting environment to each job."""
    monkeypatch.setenv("FUSE_STAGE_MODULES", OVERRIDES)
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    for name in ("TOY_SLEEP", "TOY_FAIL", "TOY_STEPS", "TOY_STEP_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    stage_module.cache_clear()
    yield
    stage_module.cache_clear()


# ------------------------------------------------------------------------------------------------ helpers


def _recipe(tmp_path: Path) -> Path:
    recipe = toy_recipe(tmp_path, sources=("a",))
    recipe["stages"] = STAGES
    return write_recipe(tmp_path, recipe)


def _submit(path: Path) -> dict[str, slurm.Submission]:
    return {s.instance: s for s in slurm.submit(load_recipe(path), path)}


def _runs(workdir: Path, instance: str) -> list[tuple[int, str, int]]:
    """Every start of an array task of `instance`, from the first line each start appends to its SLURM log:
    (shard, node, restart), in the order of the logs' names and then of their lines."""
    runs = []
    for log in sorted((workdir / instance / "logs").glob("slurm-*.out")):
        for name, _job, shard, node, restart in JOB_LINE.findall(log.read_text()):
            assert name == instance
            runs.append((int(shard), node, int(restart)))
    return runs


def _node_state(node: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "node", node], capture_output=True, text=True, check=True)
    return re.search(r"\bState=(\S+)", out.stdout).group(1)


def _tasks(job_id: str) -> dict[int, dict[str, str]]:
    """The scheduler's records of an array's tasks, by task id."""
    return {int(r["ArrayTaskId"]): r for r in slurm.Slurm().records(job_id)}


def _alive(pid: int) -> bool:
    """Runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return pid > 0 and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _processes() -> dict[int, tuple[int, str, list[bytes]]]:
    """pid -> (parent pid, command name, environment) of every live process on this host."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        comm, _, rest = stat[stat.index("(") + 1 :].rpartition(")")
        state, ppid = rest.split()[:2]
        if state != "Z":
            found[int(entry.name)] = (int(ppid), comm, environ)
    return found


def _job_processes(cluster: Cluster, node: str | None = None) -> list[int]:
    """The processes of this cluster's jobs (on `node`, or on any node), with the slurmstepd each batch job runs
    under and everything below those: what dies with a machine. A job's processes are found by their environment
    (SLURM_CONF of this cluster, which sbatch handed to the job, and SLURMD_NODENAME, which slurmd set); its
    slurmstepd is their ancestor of that name (its own environment is slurmd's)."""
    procs = _processes()
    conf = f"SLURM_CONF={cluster.conf}".encode()
    where = f"SLURMD_NODENAME={node}".encode() if node else b"SLURMD_NODENAME="
    tasks = {
        pid
        for pid, (_, _, environ) in procs.items()
        if conf in environ and any(v.startswith(where) for v in environ) and pid != os.getpid()
    }
    stepds = set()
    for pid in tasks:
        parent = procs[pid][0]
        while parent in procs and parent > 1:
            if procs[parent][1] == "slurmstepd":
                stepds.add(parent)
                break
            parent = procs[parent][0]
    below, grew = set(stepds | tasks), True
    while grew:  # and every descendant, whatever its environment
        more = {pid for pid, (ppid, _, _) in procs.items() if ppid in below} - below
        below |= more
        grew = bool(more)
    return sorted(below)


def _kill(pids: list[int]) -> None:
    """At once, as a machine dies: all stopped first (so none sees another die and reports it), then killed."""
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def _as_from_another_host(workdir: Path, pids: set[int], host: str) -> list[Path]:
    """Rewrite the run store's locks that the dead `pids` held as a lock taken on `host` (fresh heartbeat)."""
    rewritten = []
    for lock in workdir.rglob("*.lock"):
        owner = json.loads(lock.read_text())
        if owner.get("pid") in pids:
            lock.write_text(json.dumps({**owner, "host": host}))
            rewritten.append(lock)
    return rewritten


def lost_shards(workdir: Path, node: str) -> set[int]:
    """extract.a's shards whose first run was on `node`."""
    return {shard for shard, where, restart in _runs(workdir, "extract.a") if where == node and restart == 0}


def _shard_of(pid: int) -> tuple[str, int] | None:
    """(instance, shard) of a `fuse run-stage RECIPE INSTANCE --shard K` process."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None
    if "run-stage" in argv and "--shard" in argv:
        return argv[argv.index("run-stage") + 2], int(argv[argv.index("--shard") + 1])
    return None


# ------------------------------------------------------------------------------------------------ tests


def test_extraction_arrays_spread_over_both_nodes(cluster, tmp_path, capsys):
    assert {_node_state(n) for n in cluster.nodes} <= {"IDLE", "MIXED", "ALLOCATED"}, "both nodes up"
    path = _recipe(tmp_path)
    workdir = tmp_path / "run"
    jobs = _submit(path)
    assert jobs["extract.pivot"].shards == jobs["extract.a"].shards == list(range(SHARDS))
    final = slurm.wait([s.job_id for s in jobs.values() if s.job_id], timeout=120, poll=0.5)
    assert {s.state for s in final.values()} == {"COMPLETED"}, final

    for instance in ("extract.pivot", "extract.a"):
        runs = _runs(workdir, instance)
        assert sorted(shard for shard, _, _ in runs) == list(range(SHARDS)), runs  # each task started once
        assert {node for _, node, _ in runs} == {"node1", "node2"}, runs  # LLN: spread, not node1 first
        assert {restart for _, _, restart in runs} == {0}
        assert RunStore(workdir).shards_done(instance, SHARDS) == list(range(SHARDS))
        results = sorted((workdir / instance / "out").glob("result-*.json"))
        assert [p.name for p in results] == [f"result-{i:05d}.json" for i in range(SHARDS)]
    calls = read_calls(workdir)
    assert len(calls) == len(set(calls)) == 2 + 2 * SHARDS  # prepare, 8 shards, align.a: each exactly once

    rows = slurm.collect_status(load_recipe(path))
    assert {r.state for r in rows} == {"done"} and {r.job.state for r in rows} == {"COMPLETED"}
    assert main(["status", str(path)]) == 0
    status = capsys.readouterr().out
    assert status.count(" done ") == 4 and status.count("COMPLETED") == 4, status


def test_node_lost_mid_array_requeues_only_its_shards(cluster, tmp_path, monkeypatch):
    """node2 dies while it runs extract.a shards; extract.pivot's shards (on both nodes) are done by then, and
    extract.a's shards on node1 run on. SLURM declares node2 DOWN and requeues its tasks onto node1: only those
    shards run again, and the run completes without a second `fuse submit`."""
    path = _recipe(tmp_path)
    workdir = tmp_path / "run"
    store = RunStore(workdir)
    # extract.a's shards (8 s each) still run when extract.pivot's (no sleep) are done: node2 dies in the middle
    monkeypatch.setenv("TOY_SLEEP", "extract.a=8")
    started = time.monotonic()
    jobs = _submit(path)
    pivot, extract = jobs["extract.pivot"].job_id, jobs["extract.a"].job_id

    def pivot_over_and_a_running() -> bool:
        return not slurm.Slurm().status(pivot).active and len(_runs(workdir, "extract.a")) == SHARDS

    wait_for(pivot_over_and_a_running, 60, "extract.pivot done and every extract.a shard started")
    wait_for(lambda: sum(c.startswith("extract.a#") for c in read_calls(workdir)) == SHARDS, 30, "a's calls")
    victims = _job_processes(cluster, "node2")
    running = {shard for pid in victims if (shard := _shard_of(pid))}
    on_node1 = {shard for pid in _job_processes(cluster, "node1") if (shard := _shard_of(pid))}
    slurmd = int((cluster.run_dir / "slurmd-node2.pid").read_text())
    _kill([slurmd, *victims])
    killed_at = time.monotonic()
    wait_for(lambda: not any(_alive(p) for p in [slurmd, *victims]), 10, "node2's processes to die")
    assert _job_processes(cluster, "node2") == []  # nothing of node2 runs on
    # On a real cluster the locks node2's runs held name node2's host, where no pid can be looked up, and their last
    # heartbeat is seconds old: only the requeued run of the same SLURM job may break them. Make them so here.
    foreign = _as_from_another_host(workdir, set(victims), "node2.cluster")
    assert {p.name for p in foreign} == {f"{s:05d}.lock" for s in lost_shards(workdir, "node2")}, foreign

    pivot_runs = _runs(workdir, "extract.pivot")
    assert {node for _, node, _ in pivot_runs} == {"node1", "node2"}  # shards done on the lost node, too
    assert store.shards_done("extract.pivot", SHARDS) == list(range(SHARDS))
    a_runs = _runs(workdir, "extract.a")
    lost = {shard for shard, node, _ in a_runs if node == "node2"}
    assert lost and running == {("extract.a", s) for s in lost}, (running, a_runs)  # killed mid-shard
    assert on_node1 == {("extract.a", s) for s in range(SHARDS)} - running  # these run on
    finished = set(store.shards_done("extract.a", SHARDS))
    assert not lost & finished, f"node2's extract.a shards {sorted(lost & finished)} finished before the kill"

    # slurmctld hears nothing from node2: NOT_RESPONDING, then DOWN, and its tasks requeued
    wait_for(lambda: _node_state("node2").startswith("DOWN"), 60, "node2 to be declared DOWN", poll=0.5)
    down_after = time.monotonic() - killed_at
    node = subprocess.run(["scontrol", "-o", "show", "node", "node2"], capture_output=True, text=True).stdout
    assert "Reason=Not responding" in node, node
    final = slurm.wait([s.job_id for s in jobs.values() if s.job_id], timeout=90, poll=0.5)
    completed_after = time.monotonic() - killed_at
    assert {s.state for s in final.values()} == {"COMPLETED"}, final
    for shard, record in _tasks(extract).items():  # the lost tasks requeued (same job ids), onto node1
        restarts, host = (1, "node1") if shard in lost else (0, record["BatchHost"])
        assert (int(record["Restarts"]), record["BatchHost"]) == (restarts, host), record
    assert {r["Restarts"] for r in _tasks(pivot).values()} == {"0"}  # done shards are never requeued

    # each lost shard ran again, on node1, appending to its log; nothing else ran twice
    a_runs = _runs(workdir, "extract.a")
    assert sorted(s for s, _, restart in a_runs if restart == 0) == list(range(SHARDS))
    assert sorted(r for r in a_runs if r[2] > 0) == [(s, "node1", 1) for s in sorted(lost)], a_runs
    calls = read_calls(workdir)
    again = [c for c in calls if calls.count(c) > 1]
    assert sorted(set(again)) == sorted(f"extract.a#{s}" for s in lost) and len(again) == 2 * len(lost)
    assert sorted(calls) == sorted(
        ["prepare", "align.a", *(f"extract.{i}#{s}" for i in ("pivot", "a") for s in range(SHARDS))]
        + [f"extract.a#{s}" for s in lost]
    )
    assert calls[-1] == "align.a"  # afterok held it through the requeue

    # the stores are complete, as if nothing had happened
    for instance in ("extract.pivot", "extract.a"):
        assert store.shards_done(instance, SHARDS) == list(range(SHARDS))
        manifest = store.manifest(instance)
        assert manifest["status"] == "done" and len(manifest["job_ids"]) == 1  # one submission, no second
        for shard in range(SHARDS):
            result = (workdir / instance / "out" / f"result-{shard:05d}.json").read_text()
            assert f'"shard": {shard}' in result
    rows = slurm.collect_status(load_recipe(path))
    assert {r.state for r in rows} == {"done"} and {r.job.state for r in rows} == {"COMPLETED"}
    assert {s.action for s in _submit(path).values()} == {"skip"}  # a second `fuse submit`: nothing to do
    assert _job_processes(cluster) == []  # no stray job process on either node
    print(
        f"\nnode2 lost {killed_at - started:.1f} s after the submission; DOWN after "
        f"{down_after:.1f} s; shards {sorted(lost)} requeued onto node1; run complete {completed_after:.1f} s "
        f"after the loss"
    )
