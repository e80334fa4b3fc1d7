"""Who holds a lock, across PID namespaces, broken clocks and requeued SLURM jobs: a pid from another namespace on
the same host is not looked up here (it is judged by its heartbeat), a heartbeat from the future is no heartbeat, and
an earlier run of this process's own SLURM job is gone."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from fuse.store import LOCK_TTL_S, FileLock, LockHeld, owner_alive, pid_namespace


def write_lock(path, **owner) -> None:
    path.write_text(json.dumps({"since": time.time(), "command": "fuse run", **owner}))


def test_a_lock_from_another_pid_namespace_on_this_host_is_judged_by_its_heartbeat(tmp_path):
    assert pid_namespace(), "Linux records the PID namespace of every process"
    lock = tmp_path / "instance.lock"
    # `unshare --pid` on this host: its fuse is pid 1 there; pid 1 here is init, started at another time
    write_lock(lock, pid=1, host=socket.gethostname(), start="12345", pidns="pid:[1]")
    assert owner_alive(lock, json.loads(lock.read_text()))
    with pytest.raises(LockHeld, match="PID namespace pid:\\[1\\]"):
        FileLock(lock, "the instance").acquire()
    old = time.time() - LOCK_TTL_S - 5  # its heartbeat stopped: abandoned, like a lock from another host
    os.utime(lock, (old, old))
    assert not owner_alive(lock, json.loads(lock.read_text()))
    FileLock(lock, "the instance").acquire().release()


def test_a_lock_in_this_namespace_is_still_judged_by_its_pid(tmp_path):
    lock = tmp_path / "instance.lock"
    write_lock(lock, pid=os.getpid(), host=socket.gethostname(), pidns=pid_namespace(), start="1")
    assert not owner_alive(lock, json.loads(lock.read_text()))  # our pid, but another start time: reused pid


def test_a_heartbeat_from_the_future_is_no_heartbeat(tmp_path):
    lock = tmp_path / "instance.lock"
    write_lock(lock, pid=4242, host="another-node")
    future = time.time() + 2 * LOCK_TTL_S
    os.utime(lock, (future, future))
    assert not owner_alive(lock, json.loads(lock.read_text()))
    near = time.time() + 60  # a clock a minute off is still a live heartbeat
    os.utime(lock, (near, near))
    assert owner_alive(lock, json.loads(lock.read_text()))


def test_a_lock_from_an_earlier_run_of_this_slurm_job_is_gone_on_any_host(tmp_path, monkeypatch):
    """A job requeued off a lost node finds the lock its first run took there: another host, a fresh heartbeat. SLURM
    starts a requeued run only once the previous one is over, so that owner is gone; anyone else's lock is not."""
    lock = tmp_path / "shard.lock"
    first_run = {"slurm_job": "812", "slurm_cluster": "gpu", "slurm_restart": 0}
    write_lock(lock, pid=4242, host="node2", **first_run)
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "gpu")
    monkeypatch.setenv("SLURM_JOB_ID", "812")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert owner_alive(lock, json.loads(lock.read_text()))  # the same run (restart 0): as any foreign lock
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert not owner_alive(lock, json.loads(lock.read_text()))
    held = FileLock(lock, "the shard").acquire()  # broken and taken, recording this run
    taken = json.loads(lock.read_text())
    assert (taken["pid"], taken["slurm_job"], taken["slurm_restart"]) == (os.getpid(), "812", 1)
    held.release()
    for other in ({"slurm_job": "813"}, {"slurm_cluster": "cpu"}, {"slurm_restart": 1}, {"slurm_job": None}):
        write_lock(lock, pid=4242, host="node2", **{**first_run, **other})
        assert owner_alive(lock, json.loads(lock.read_text())), other  # another job or cluster, or this run
