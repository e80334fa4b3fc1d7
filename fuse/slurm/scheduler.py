"""SLURM through its commands (sbatch, scontrol, scancel; sacct where accounting exists): the `Slurm` wrapper, the
only place a scheduler command is started, and a job's status as the scheduler reports it."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fuse.store import RunStore

# Scheduler states in which a job may still run: such an instance is not submitted again.
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "SPECIAL_EXIT",
    }
)


class SlurmError(RuntimeError):
    """A scheduler command failed or is missing."""


def _seconds(runtime: str) -> int:
    """SLURM durations: [D-]HH:MM:SS, MM:SS or MM:SS.mmm."""
    days, _, clock = runtime.rpartition("-")
    total = 0
    for part in clock.split(":"):
        total = total * 60 + int(float(part or 0))
    return total + int(days or 0) * 86400


@dataclass(frozen=True)
class JobStatus:
    """A job (all tasks of an array) as the scheduler sees it."""

    job_id: str
    state: str  # COMPLETED | RUNNING | "COMPLETED 1, RUNNING 1" (array tasks) | UNKNOWN (forgotten)
    active: bool
    elapsed: str = ""  # the longest run time among its tasks
    reason: str = ""
    restarts: int = 0
    exit_code: str = ""


def summarize(job_id: str, records: list[dict[str, str]]) -> JobStatus:
    if not records:
        return JobStatus(job_id, "UNKNOWN", active=False)
    states = Counter(r.get("JobState", "UNKNOWN").split()[0] for r in records)
    state = (
        next(iter(states)) if len(states) == 1 else ", ".join(f"{s} {n}" for s, n in sorted(states.items()))
    )
    longest = max(records, key=lambda r: _seconds(r.get("RunTime") or "0"))
    reasons = sorted({r.get("Reason", "") for r in records} - {"", "None"})
    exits = sorted({r.get("ExitCode", "") for r in records} - {"", "0:0"})
    return JobStatus(
        job_id,
        state,
        active=any(s in ACTIVE_STATES for s in states),
        elapsed=longest.get("RunTime", ""),
        reason=", ".join(reasons),
        restarts=max(int(r.get("Restarts") or 0) for r in records),
        exit_code=", ".join(exits),
    )


class Slurm:
    """SLURM through its commands. `run` is the only place a command is started (tests substitute it)."""

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        try:
            result = subprocess.run(list(args), capture_output=True, text=True, timeout=120, check=False)
        except FileNotFoundError:
            raise SlurmError(f"{args[0]} not found: is SLURM installed and on PATH?") from None
        if check and result.returncode != 0:
            raise SlurmError(f"{shlex.join(args)} failed (exit {result.returncode}): {result.stderr.strip()}")
        return result

    def available(self) -> bool:
        return all(shutil.which(c) for c in ("sbatch", "scontrol", "scancel"))

    def submit(self, options: list[str], script: Path) -> str:
        """sbatch; returns the job id (of the whole array, for arrays)."""
        output = self.run("sbatch", "--parsable", *options, str(script)).stdout.strip()
        return output.split(";")[0]  # "id;cluster" on multi-cluster sites

    def records(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` (one record per array task); sacct for jobs it has forgotten, where it works."""
        result = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        if result.returncode == 0:
            return [
                dict(re.findall(r"(\S+?)=(\S*)", line)) for line in result.stdout.splitlines() if line.strip()
            ]
        if "invalid job id" not in result.stderr.lower():
            # the controller did not answer (auth, connection): not knowing is not the same as "forgotten"
            raise SlurmError(f"scontrol show job {job_id} failed: {result.stderr.strip()}")
        return self._sacct(job_id)

    def _sacct(self, job_id: str) -> list[dict[str, str]]:
        if not shutil.which("sacct"):
            return []
        result = self.run(
            "sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,Elapsed,ExitCode", check=False
        )
        if result.returncode != 0:
            return []  # "accounting storage is disabled": no slurmdbd
        keys = ("JobId", "JobState", "RunTime", "ExitCode")
        return [dict(zip(keys, line.split("|"), strict=False)) for line in result.stdout.splitlines() if line]

    def status(self, job_id: str) -> JobStatus:
        return summarize(job_id, self.records(job_id))

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            self.run("scancel", *job_ids)

    def release(self, job_ids: list[str]) -> None:
        if job_ids:
            self.run("scontrol", "release", ",".join(job_ids))


def latest_job(store: RunStore, name: str, slurm: Slurm | None) -> JobStatus | None:
    """The status of the last job recorded in the instance's manifest; None without one or without a scheduler."""
    ids = (store.manifest(name) or {}).get("job_ids") or []
    if not ids or slurm is None:
        return None
    return slurm.status(str(ids[-1]))
