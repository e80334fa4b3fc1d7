"""`fuse status` and `fuse cancel`, and waiting for jobs: each instance's state in the run store beside its latest
job's state in the scheduler; only the jobs recorded in this run's manifests are ever cancelled."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from fuse.dag import Instance, build_dag
from fuse.plan import fingerprints
from fuse.recipe import Recipe
from fuse.slurm.scheduler import JobStatus, Slurm, SlurmError, latest_job
from fuse.store import RunStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceStatus:
    instance: str
    state: str  # run store: done | stale | failed | partial | pending | submitted | running
    detail: str
    job: JobStatus | None
    elapsed: str
    log: str | None
    peak: str = ""  # peak memory measured by a finished run (fuse.resources)


def _store_state(
    store: RunStore, instance: Instance, fingerprint: str, parts: dict[str, Any]
) -> tuple[str, str]:
    state = store.state(instance.name, fingerprint, parts, instance.num_shards, instance.parents)
    status = (store.manifest(instance.name) or {}).get("status")
    if state.kind == "partial" and status == "running" and not store.live_locks(instance.name):
        return (
            "partial",
            "interrupted: no live process holds it",
        )  # killed, or its manifest could not be updated
    if state.kind == "partial" and status in ("submitted", "running"):
        return status, state.reason
    return state.kind, state.reason


def _newest_log(store: RunStore, name: str) -> str | None:
    logs = [p for p in store.logs(name).glob("*") if p.is_file()]
    return str(max(logs, key=lambda p: p.stat().st_mtime)) if logs else None


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}:{secs:02d}"


def collect_status(recipe: Recipe, slurm: Slurm | None = None) -> list[InstanceStatus]:
    """Each instance's state in the run store and, for its latest job, in the scheduler."""
    from fuse import resources

    slurm = slurm or Slurm()
    scheduler = slurm if slurm.available() else None
    dag, store = build_dag(recipe), RunStore(recipe.workdir)
    prints = fingerprints(recipe, dag)
    rows = []
    for instance in dag.order():
        state, detail = _store_state(store, instance, *prints[instance.name])
        job = latest_job(store, instance.name, scheduler)
        elapsed = (job and job.elapsed) or ""
        manifest_elapsed = (store.manifest(instance.name) or {}).get("elapsed_s")
        if not elapsed and manifest_elapsed is not None:
            elapsed = _clock(manifest_elapsed)
        peak = resources.describe((store.manifest(instance.name) or {}).get("peak_memory"))
        rows.append(
            InstanceStatus(
                instance.name, state, detail, job, elapsed, _newest_log(store, instance.name), peak
            )
        )
    return rows


def status_lines(rows: list[InstanceStatus]) -> list[str]:
    width = max(len(r.instance) for r in rows)
    lines = [
        f"{'instance':<{width}}  {'state':<9} {'job':<8} {'slurm':<22} {'elapsed':<10} {'peak mem':<17} log"
    ]
    for r in rows:
        slurm_state = ""
        if r.job:
            slurm_state = r.job.state + (f" ({r.job.reason})" if r.job.reason and r.job.active else "")
            slurm_state += f" x{r.job.restarts + 1}" if r.job.restarts else ""
        job_id = r.job.job_id if r.job else ""
        lines.append(
            f"{r.instance:<{width}}  {r.state:<9} {job_id:<8} {slurm_state:<22} {r.elapsed:<10} {r.peak:<17} "
            f"{r.log or ''}"
        )
    return lines


def cancel(
    recipe: Recipe, slurm: Slurm | None = None, names: list[str] | None = None
) -> list[tuple[str, str]]:
    """scancel the live jobs recorded in this run's manifests (all instances, or `names`): nothing else."""
    slurm = slurm or Slurm()
    dag, store = build_dag(recipe), RunStore(recipe.workdir)
    for name in names or []:
        dag[name]  # a clear KeyError for a wrong name
    found = []
    for instance in dag.order():
        if names and instance.name not in names:
            continue
        for job_id in (store.manifest(instance.name) or {}).get("job_ids") or []:
            if slurm.status(str(job_id)).active:
                found.append((instance.name, str(job_id)))
    slurm.cancel([job_id for _, job_id in found])
    return found


def wait(
    job_ids: list[str], slurm: Slurm | None = None, timeout: float = 3600, poll: float = 1.0
) -> dict[str, JobStatus]:
    """Until none of `job_ids` can run any more (requeued jobs count as live); returns their final status."""
    slurm = slurm or Slurm()
    deadline = time.monotonic() + timeout
    while True:
        try:
            statuses = {job_id: slurm.status(job_id) for job_id in job_ids}
        except SlurmError as error:  # a passing controller hiccup: keep waiting until the deadline
            log.warning("%s; polling again", error)
            statuses = {}
        if statuses and not any(s.active for s in statuses.values()):
            return statuses
        if time.monotonic() > deadline:
            live = ", ".join(f"{j} {s.state}" for j, s in statuses.items() if s.active)
            raise TimeoutError(f"jobs still live after {timeout:.0f} s: {live}")
        time.sleep(poll)
