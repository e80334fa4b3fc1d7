"""Private SLURM clusters for the tests, started by slurm/local/start-cluster.sh (which installs the Debian
packages if sbatch is missing) and stopped by stop-cluster.sh, which stops only what it started.

Use: `from slurm_cluster import slurm_cluster  # noqa: F401` in a test module, then ask for the `slurm_cluster`
fixture (one node, once per session). It sets SLURM_CONF for the session, so sbatch/squeue/scontrol in the tests and
in fuse talk to it. `two_node_cluster` is a second cluster of two compute nodes (node1, node2) on this host, for
the multi-node tests: ask for it in a module-scoped fixture that sets SLURM_CONF for that module.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
START = REPO / "slurm" / "local" / "start-cluster.sh"
STOP = REPO / "slurm" / "local" / "stop-cluster.sh"


@dataclass(frozen=True)
class Cluster:
    run_dir: Path
    conf: Path
    nodes: tuple[str, ...] = ("localhost",)

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.3) -> None:
    """Poll `predicate` until it holds; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def _free_ports(count: int) -> int:
    """The first of `count` consecutive ports nobody listens on (slurmctld's, then one for each slurmd), so a
    cluster already running on this host (6817/6818) is left alone."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        sockets = [socket.socket() for _ in range(count)]
        try:
            for port, sock in zip(range(first, first + count), sockets, strict=True):
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


def start_cluster(run_dir: Path, nodes: int = 1) -> Cluster:
    """Start (or skip with the reason why SLURM cannot be had here: not root and no sbatch, or no packages)."""
    if os.geteuid() != 0:
        have = "sbatch is installed" if shutil.which("sbatch") else "sbatch is not installed"
        pytest.skip(f"the SLURM tests start a private slurmctld/slurmd, which needs root ({have}, not root)")
    ctld = _free_ports(1 + nodes)
    env = {
        **os.environ,
        "SLURMCTLD_PORT": str(ctld),
        "SLURMD_PORT": str(ctld + 1),
        "SLURM_NODES": str(nodes),
    }
    result = subprocess.run([str(START), str(run_dir)], env=env, capture_output=True, text=True, timeout=900)
    if result.returncode == 3:
        pytest.skip(f"sbatch cannot be had on this machine: {result.stderr.strip()}")
    if result.returncode != 0:
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(run_dir.glob("*.log")))
        pytest.fail(f"start-cluster.sh failed (exit {result.returncode}): {result.stderr.strip()}{logs}")
    names = ("localhost",) if nodes == 1 else tuple(f"node{i}" for i in range(1, nodes + 1))
    return Cluster(run_dir, run_dir / "slurm.conf", names)


def stop_cluster(cluster: Cluster) -> None:
    subprocess.run(
        [str(STOP), str(cluster.run_dir)], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(cluster.conf))
        try:
            yield cluster
        finally:
            stop_cluster(cluster)


@pytest.fixture(scope="session")
def two_node_cluster(tmp_path_factory):
    """Two compute nodes, node1 and node2 (two slurmd on this host). SLURM_CONF is not set: a module that uses it
    sets it for its own tests (the session's one-node cluster stays the default for the others)."""
    cluster = start_cluster(tmp_path_factory.mktemp("slurm2"), nodes=2)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
