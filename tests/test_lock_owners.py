"""Who holds a lock, across PID namespaces and broken clocks: a pid from another namespace on the same host is not
looked up here (it is judged by its heartbeat), and a heartbeat from the future is no heartbeat."""

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
