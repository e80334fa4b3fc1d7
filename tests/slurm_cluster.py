"""A private single-node SLURM for the tests, started once per session by slurm/local/start-cluster.sh (which
installs the Debian packages if sbatch is missing) and stopped by stop-cluster.sh, which stops only what it started.

Use: `from slurm_cluster import slurm_cluster  # noqa: F401` in a test module, then ask for the `slurm_cluster`
fixture. It sets SLURM_CONF for the session, so sbatch/squeue/scontrol in the tests and in fuse talk to it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
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


def _free_ports(count: int) -> list[int]:
    """Ports nobody listens on, so a cluster already running on this host (6817/6818) is left alone."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start_cluster(run_dir: Path) -> Cluster:
    """Start (or skip with the reason why SLURM cannot be had here: not root and no sbatch, or no packages)."""
    if os.geteuid() != 0:
        have = "sbatch is installed" if shutil.which("sbatch") else "sbatch is not installed"
        pytest.skip(f"the SLURM tests start a private slurmctld/slurmd, which needs root ({have}, not root)")
    ctld, slurmd = _free_ports(2)
    env = {**os.environ, "SLURMCTLD_PORT": str(ctld), "SLURMD_PORT": str(slurmd)}
    result = subprocess.run([str(START), str(run_dir)], env=env, capture_output=True, text=True, timeout=900)
    if result.returncode == 3:
        pytest.skip(f"sbatch cannot be had on this machine: {result.stderr.strip()}")
    if result.returncode != 0:
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(run_dir.glob("*.log")))
        pytest.fail(f"start-cluster.sh failed (exit {result.returncode}): {result.stderr.strip()}{logs}")
    return Cluster(run_dir, run_dir / "slurm.conf")


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
