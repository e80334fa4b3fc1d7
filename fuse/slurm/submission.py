"""`fuse submit`: one held sbatch job per unfinished instance, in topological order with afterok dependencies and
job arrays for missing shards, released once all are in; job ids are recorded in the instances' manifests."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from fuse.dag import Instance, build_dag
from fuse.io import write_text_atomic
from fuse.launch import shell_word
from fuse.plan import PlanError, Step
from fuse.recipe import Recipe
from fuse.slurm.render import JobSettings, job_settings, render_job
from fuse.slurm.scheduler import Slurm, SlurmError, latest_job
from fuse.slurm.site import SiteConfig, check_resource_keys, resources_for
from fuse.start import RunStart, start_run, write_resolved_recipe
from fuse.store import LockHeld, RunStore


@dataclass
class Submission:
    """What `fuse submit` did with one instance."""

    instance: str
    action: str  # submit | keep (its job is queued or running) | skip (done, or not selected)
    why: str
    job_id: str | None = None
    shards: list[int] | None = None  # the array's tasks (missing shards) of a sharded instance
    dependencies: list[str] = field(default_factory=list)
    script: Path | None = None
    sbatch: list[str] = field(default_factory=list)  # the options given on the sbatch line


def array_ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (sbatch --array syntax)."""
    parts: list[str] = []
    for n in sorted(numbers):
        if parts and n == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{n}"
        else:
            parts.append(str(n))
    return ",".join(parts)


def sbatch_options(
    shards: list[int] | None, dependencies: list[str], limit: int | None = None, after_any: list[str] = ()
) -> list[str]:
    """The sbatch line's options: the missing shards as an array (at most `limit` tasks at once), the
    dependencies (afterok on the parents; afterany on `after_any`, the window of max_concurrent_jobs)."""
    throttle = f"%{limit}" if limit else ""
    options = [f"--array={array_ranges(shards)}{throttle}"] if shards is not None else []
    conditions = [f"afterok:{':'.join(dependencies)}"] if dependencies else []
    conditions += [f"afterany:{':'.join(after_any)}"] if after_any else []
    if conditions:
        options.append("--dependency=" + ",".join(conditions))  # a comma: all must hold
    return [*options, "--kill-on-invalid-dep=yes"]  # a failed parent cancels its dependents, not strands them


def _restart_clean(store: RunStore, step: Step, from_stage: str | None) -> bool:
    """As locally: a changed fingerprint or a forced instance starts from nothing; otherwise finished shards and
    training checkpoints are kept and the job continues from them."""
    fingerprint = (store.manifest(step.instance.name) or {}).get("fingerprint")
    return fingerprint != step.fingerprint or step.why == "forced" or step.instance.stage == from_stage


def _claim(store: RunStore, step: Step, clean: bool) -> None:
    """Before sbatch: reset what must restart, record the fingerprint and `submitted`. The job's `fuse
    run-stage` then sees the instance as unfinished (never stale) and keeps what this left."""
    name = step.instance.name
    previous = store.manifest(name) or {}
    if clean:
        try:
            store.reset(name)
        except LockHeld as error:  # a process outside this submission still works on it
            raise PlanError(str(error)) from None
    store.write_manifest(
        name,
        {
            **({} if clean else previous),
            "instance": name,
            "stage": step.instance.stage,
            "fingerprint": step.fingerprint,
            "parts": step.parts,
            "status": "submitted",
            "num_shards": step.instance.num_shards,
            "job_ids": previous.get("job_ids", []),
            "submitted_at": time.time(),
        },
    )
    store.logs(name).mkdir(parents=True, exist_ok=True)  # SLURM opens the log there before anything runs


def _missing_shards(store: RunStore, instance: Instance, clean: bool) -> list[int] | None:
    if instance.num_shards == 1:
        return None
    done = set() if clean else set(store.shards_done(instance.name, instance.num_shards))
    return [i for i in range(instance.num_shards) if i not in done]


def _submission_dir(store: RunStore) -> Path:
    """Owner-only: its recipe snapshot and job scripts carry the env_setup lines (tokens, site secrets)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
    folder = store.root / "submissions" / stamp
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    return folder


def _snapshot(recipe: Recipe, store: RunStore, folder: Path) -> Path:
    """Jobs read this copy of the resolved recipe, so editing the recipe file cannot change queued jobs."""
    text = write_resolved_recipe(store, recipe)
    path = folder / "recipe.yaml"
    write_text_atomic(path, text, private=True)
    return path


def submit(
    recipe: Recipe,
    recipe_path: str | Path,
    slurm: Slurm | None = None,
    site: SiteConfig | None = None,
    from_stage: str | None = None,
    only: list[str] | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> list[Submission]:
    """Submit every instance that is not done and has no live job, in topological order, held until all are
    in (so a failure half-way cancels them all and no job starts before its id is in its manifest)."""
    slurm = slurm or Slurm()
    site = site or SiteConfig()
    dag = build_dag(recipe)
    check_resource_keys(recipe, dag, site)
    with start_run(recipe, dag, from_stage, only, force) as start:
        return _submit_started(start, recipe_path, slurm, site, from_stage, dry_run)


@dataclass
class _Batch:
    """One `fuse submit` under way: what all its jobs share, and what it has submitted so far."""

    start: RunStart
    scheduler: Slurm | None  # None on a dry run where SLURM is not installed
    site: SiteConfig
    settings: JobSettings
    folder: Path  # the job scripts and the recipe snapshot
    from_stage: str | None
    dry_run: bool
    submissions: list[Submission] = field(default_factory=list)
    held: list[str] = field(default_factory=list)  # submitted with --hold; released together at the end
    replaced: list[str] = field(default_factory=list)  # pending jobs waiting on a parent's old job


def _submit_started(
    start: RunStart,
    recipe_path: str | Path,
    slurm: Slurm,
    site: SiteConfig,
    from_stage: str | None,
    dry_run: bool,
) -> list[Submission]:
    recipe, store = start.recipe, start.store
    scheduler = slurm if slurm.available() else None
    if scheduler is None and not dry_run:
        raise SlurmError(
            "sbatch/scontrol/scancel not found: is SLURM installed and on PATH? (--dry-run works without)"
        )
    folder = _submission_dir(store)
    settings = job_settings(
        recipe, site, _snapshot(recipe, store, folder), Path(recipe_path).resolve().parent
    )
    batch = _Batch(start, scheduler, site, settings, folder, from_stage, dry_run)
    try:
        for step in start.steps:
            batch.submissions.append(_submit_one(batch, step))
        if not dry_run:
            slurm.cancel(batch.replaced)
        if batch.held:
            slurm.release(batch.held)
    except BaseException:
        if batch.held:
            slurm.cancel(batch.held)  # all or nothing: no half-submitted DAG
        raise
    return batch.submissions


def _submit_one(batch: _Batch, step: Step) -> Submission:
    recipe, store, earlier = batch.start.recipe, batch.start.store, batch.submissions
    instance = step.instance
    if step.action != "run":
        return Submission(instance.name, "skip", step.why)
    clean = _restart_clean(store, step, batch.from_stage)
    renewed = [s.instance for s in earlier if s.action == "submit" and s.instance in instance.parents]
    job = latest_job(store, instance.name, batch.scheduler)
    if job is not None and job.active:
        if not clean and not renewed:
            return Submission(instance.name, "keep", f"job {job.job_id} is {job.state}", job_id=job.job_id)
        if clean or job.state != "PENDING":
            why = step.why if clean else f"its inputs {', '.join(renewed)} are resubmitted"
            raise PlanError(
                f"{instance.name} must restart ({why}) but its job {job.job_id} is still {job.state}: "
                f"cancel it first (fuse cancel RECIPE {instance.name})"
            )
        batch.replaced.append(job.job_id)  # it waits on a parent's old job: replaced by one after the new job
    ids = {s.instance: s.job_id for s in earlier if s.job_id}
    dependencies = [ids[p] for p in instance.parents if p in ids]
    shards = _missing_shards(store, instance, clean)
    script = batch.folder / f"{instance.name}.sbatch"
    resources = resources_for(recipe, instance, batch.site)
    write_text_atomic(script, render_job(recipe, instance, resources, batch.settings), private=True)
    # max_concurrent_jobs N: each job also waits for the end of the job submitted N before it, so that at most N of
    # this submission's jobs (an array counting as one) run at a time, whatever the DAG allows
    window = recipe.executor.slurm.max_concurrent_jobs
    submitted = [s.job_id for s in earlier if s.action == "submit" and s.job_id]
    after_any = [submitted[-window]] if window and len(submitted) >= window else []
    options = sbatch_options(shards, dependencies, resources.array_limit(), after_any)
    if batch.dry_run:
        job_id = "$" + shell_name(instance.name)
    else:
        _claim(store, step, clean)
        job_id = batch.scheduler.submit(["--hold", *options], script)
        batch.held.append(job_id)
        previous = (store.manifest(instance.name) or {}).get("job_ids", [])
        store.update_manifest(instance.name, job_ids=[*previous, job_id])
    return Submission(instance.name, "submit", step.why, job_id, shards, dependencies, script, options)


def shell_name(instance: str) -> str:
    return re.sub(r"\W", "_", instance)


def dry_run_lines(submissions: list[Submission]) -> list[str]:
    """A shell script that would do the submission: `name=$(sbatch --parsable ... script)` per job."""
    lines = []
    for s in submissions:
        if s.action == "submit":
            command = " ".join(shell_word(a) for a in ["sbatch", "--parsable", *s.sbatch, str(s.script)])
            lines.append(f"{shell_name(s.instance)}=$({command})")
        else:
            lines.append(f"# {s.action} {s.instance}: {s.why}" + (f" (job {s.job_id})" if s.job_id else ""))
    return lines
