"""The SLURM executor: one sbatch script per stage instance, submitted in topological order with afterok
dependencies, job arrays for missing shards and requeue on SIGUSR1; and the `fuse submit/status/cancel` commands.

Inside each job the stage runs through `fuse run-stage`, the local executor's code path. The scheduler is asked
only through its commands (sbatch, scontrol, scancel; sacct where accounting exists); job ids live in the
instances' manifests (`job_ids`), so a second `fuse submit` knows what is queued or running.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources as package_files
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from fuse.dag import STAGES, Dag, Instance, build_dag
from fuse.io import write_text_atomic
from fuse.launch import shell_word
from fuse.plan import PlanError, Step, fingerprints, make_plan
from fuse.recipe import Frozen, Recipe, RecipeError, Resources, _format_error, load_recipe
from fuse.store import LockHeld, RunStore

log = logging.getLogger(__name__)

TEMPLATE = "job.sbatch.j2"
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
TRAINING_STAGES = ("distill", "fpo")
# Scheduler states in which a job may still run: such an instance is not submitted again.
ACTIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
     "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "SPECIAL_EXIT"}
)  # fmt: skip


class SlurmError(RuntimeError):
    """A scheduler command failed or is missing."""


# --------------------------------------------------------------------------------------------- site config


class SiteConfig(Frozen):
    """Where recipes run (slurm/sites/*.yaml): defaults that a recipe's `executor` section overrides."""

    env_setup: list[str] = Field(default_factory=list, description="Shell lines run first in every job.")
    python: str | None = Field(
        None, description="Interpreter inside jobs (e.g. the venv's python on the nodes)."
    )
    signal_grace_seconds: int | None = Field(None, ge=0)
    resources: dict[str, Resources] = Field(
        default_factory=dict, description="Keyed by 'default', a stage (e.g. 'distill') or an instance."
    )


def site_path(recipe: Recipe, recipe_path: str | Path, override: str | None = None) -> Path | None:
    """The site config: `--site` wins over executor.slurm.site_config, which is relative to the recipe's folder."""
    value = override or recipe.executor.slurm.site_config
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() or override else Path(recipe_path).resolve().parent / path


def load_site(path: str | Path | None) -> SiteConfig:
    if path is None:
        return SiteConfig()
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such SLURM site config (executor.slurm.site_config or --site)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    try:
        return SiteConfig.model_validate(data)
    except ValidationError as error:
        message = _format_error(error, str(path)).replace(
            "the recipe is not", "the SLURM site config is not", 1
        )
        raise RecipeError(message) from None


def check_resource_keys(recipe: Recipe, dag: Dag, site: SiteConfig, site_name: str = "site config") -> None:
    """A misspelt key would silently not apply: the recipe's must name this DAG's instances, the site's stages."""
    for key in recipe.executor.resources:
        if key != "default" and key not in STAGES and key not in dag.instances:
            raise RecipeError(
                f"executor.resources.{key}: not 'default', a stage ({', '.join(STAGES)}) or an instance of this "
                f"recipe ({', '.join(dag.instances)})"
            )
    for key in site.resources:
        if key != "default" and key.split(".", 1)[0] not in STAGES:
            raise RecipeError(f"{site_name}: resources.{key}: not 'default', a stage or a stage instance")


def resources_for(recipe: Recipe, instance: Instance, site: SiteConfig) -> Resources:
    """Layered, later wins: site default < site stage < site instance < recipe default < stage < instance.
    Only the keys a layer sets override (an `extra` list replaces the one below it)."""
    merged: dict[str, Any] = {}
    for table in (site.resources, recipe.executor.resources):
        for key in ("default", instance.stage, instance.name):
            if key in table:
                merged.update(table[key].model_dump(exclude_unset=True))
    return Resources.model_validate(merged)


# --------------------------------------------------------------------------------------------- job scripts


@dataclass(frozen=True)
class JobSettings:
    """What every job script of one submission shares."""

    recipe_path: Path  # the submission's snapshot of the resolved recipe
    python: str
    env_setup: tuple[str, ...]
    grace: int
    template: str | None = None  # a custom Jinja template file; default: fuse/templates/job.sbatch.j2


def job_settings(
    recipe: Recipe, site: SiteConfig, recipe_path: Path, recipe_dir: Path | None = None
) -> JobSettings:
    slurm = recipe.executor.slurm
    template = slurm.template
    if template and recipe_dir is not None and not Path(template).expanduser().is_absolute():
        template = str(recipe_dir / template)
    grace = slurm.signal_grace_seconds if "signal_grace_seconds" in slurm.model_fields_set else None
    return JobSettings(
        recipe_path=recipe_path,
        python=slurm.python or site.python or sys.executable,
        env_setup=(*site.env_setup, *slurm.env_setup),
        grace=grace if grace is not None else (site.signal_grace_seconds or slurm.signal_grace_seconds),
        template=template,
    )


def log_pattern(store: RunStore, instance: Instance) -> Path:
    """SLURM's output file; a requeued job appends to the same one (--open-mode=append)."""
    name = "slurm-%A_%a.out" if instance.num_shards > 1 else "slurm-%j.out"
    return store.logs(instance.name) / name


def stage_command(settings: JobSettings, instance: Instance) -> str:
    command = shlex.join(
        [settings.python, "-m", "fuse", "run-stage", str(settings.recipe_path), instance.name]
    )
    return command + (' --shard "$SLURM_ARRAY_TASK_ID"' if instance.num_shards > 1 else "")


def sbatch_arg(value: Any) -> str:
    """One argument on an #SBATCH line. sbatch splits those lines itself (not bash): whitespace separates, ' and "
    quote, # starts a comment, backslash escapes even inside quotes — so shlex.quote's form is read back intact
    once backslashes are ruled out, and control characters were refused when the recipe was read."""
    text = str(value)
    if "\\" in text or CONTROL.search(text):
        raise RecipeError(f"{text!r}: a backslash or control character cannot go on an #SBATCH line")
    return shlex.quote(text)


def shell_quote(value: Any) -> str:
    text = str(value)
    if CONTROL.search(text):
        raise RecipeError(f"{text!r}: control characters cannot go into a job script")
    return shlex.quote(text)


def _template(path: str | None) -> Any:
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment

    if path:
        try:
            source = Path(path).expanduser().read_text(encoding="utf-8")
        except OSError as error:
            raise RecipeError(f"executor.slurm.template: cannot read {path}: {error}") from None
    else:
        source = (package_files.files("fuse") / "templates" / TEMPLATE).read_text(encoding="utf-8")
    # Sandboxed: a template is a recipe input, and `fuse submit --dry-run` must not run code from it
    environment = SandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )
    environment.filters.update(q=shell_quote, sbatch_arg=sbatch_arg)
    try:
        return environment.from_string(source)
    except jinja2.TemplateError as error:
        raise RecipeError(f"executor.slurm.template: {path or TEMPLATE}: {error}") from None


def render_job(recipe: Recipe, instance: Instance, resources: Resources, settings: JobSettings) -> str:
    """The sbatch script of one stage instance."""
    import jinja2

    template = _template(settings.template)
    try:
        return template.render(
            run_name=recipe.name,
            workdir=recipe.workdir,
            instance=instance.name,
            job_name=f"{recipe.name}.{instance.name}",
            log=str(log_pattern(RunStore(recipe.workdir), instance)),
            grace=settings.grace,
            r=resources,
            env_setup=settings.env_setup,
            multinode=instance.stage in TRAINING_STAGES and resources.nodes > 1,
            command=stage_command(settings, instance),
        )
    except jinja2.TemplateError as error:  # SecurityError (the sandbox), undefined names, filters' refusals
        raise RecipeError(f"executor.slurm.template: {settings.template or TEMPLATE}: {error}") from None


# --------------------------------------------------------------------------------------------- the scheduler


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


# --------------------------------------------------------------------------------------------- submission


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


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (sbatch --array syntax)."""
    parts: list[str] = []
    for n in sorted(numbers):
        if parts and n == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{n}"
        else:
            parts.append(str(n))
    return ",".join(parts)


def sbatch_options(shards: list[int] | None, dependencies: list[str]) -> list[str]:
    options = [f"--array={_ranges(shards)}"] if shards is not None else []
    if dependencies:
        options.append("--dependency=afterok:" + ":".join(dependencies))
    return [*options, "--kill-on-invalid-dep=yes"]  # a failed parent cancels its dependents, not strands them


def latest_job(store: RunStore, name: str, slurm: Slurm | None) -> JobStatus | None:
    ids = (store.manifest(name) or {}).get("job_ids") or []
    if not ids or slurm is None:
        return None
    return slurm.status(str(ids[-1]))


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
    text = yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True), sort_keys=False)
    store.write_resolved_recipe(text)
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
    dag, store = build_dag(recipe), RunStore(recipe.workdir)
    check_resource_keys(recipe, dag, site)
    try:
        lock = store.run_lock().acquire()  # one submission (or local run) at a time on a run store
    except LockHeld as error:
        raise PlanError(str(error)) from None
    try:
        return _submit_locked(recipe, recipe_path, slurm, site, dag, store, from_stage, only, force, dry_run)
    finally:
        lock.release()


def _submit_locked(
    recipe: Recipe,
    recipe_path: str | Path,
    slurm: Slurm,
    site: SiteConfig,
    dag: Dag,
    store: RunStore,
    from_stage: str | None,
    only: list[str] | None,
    force: bool,
    dry_run: bool,
) -> list[Submission]:
    steps = make_plan(recipe, dag, store, from_stage, only, force)
    blocked = [s for s in steps if s.action == "blocked"]
    if blocked:
        raise PlanError("; ".join(f"{s.instance.name}: {s.why}" for s in blocked))
    scheduler = slurm if slurm.available() else None
    if scheduler is None and not dry_run:
        raise SlurmError(
            "sbatch/scontrol/scancel not found: is SLURM installed and on PATH? (--dry-run works without)"
        )
    folder = _submission_dir(store)
    settings = job_settings(
        recipe, site, _snapshot(recipe, store, folder), Path(recipe_path).resolve().parent
    )
    submissions: list[Submission] = []
    held: list[str] = []
    replaced: list[str] = []
    try:
        for step in steps:
            submissions.append(_submit_one(recipe, step, store, scheduler, site, settings, folder, submissions,
                                           from_stage, dry_run, held, replaced))  # fmt: skip
        if not dry_run:
            slurm.cancel(replaced)
        if held:
            slurm.release(held)
    except BaseException:
        if held:
            slurm.cancel(held)  # all or nothing: no half-submitted DAG
        raise
    return submissions


def _submit_one(
    recipe: Recipe,
    step: Step,
    store: RunStore,
    scheduler: Slurm | None,
    site: SiteConfig,
    settings: JobSettings,
    folder: Path,
    earlier: list[Submission],
    from_stage: str | None,
    dry_run: bool,
    held: list[str],
    replaced: list[str],
) -> Submission:
    instance = step.instance
    if step.action != "run":
        return Submission(instance.name, "skip", step.why)
    clean = _restart_clean(store, step, from_stage)
    renewed = [s.instance for s in earlier if s.action == "submit" and s.instance in instance.parents]
    job = latest_job(store, instance.name, scheduler)
    if job is not None and job.active:
        if not clean and not renewed:
            return Submission(instance.name, "keep", f"job {job.job_id} is {job.state}", job_id=job.job_id)
        if clean or job.state != "PENDING":
            why = step.why if clean else f"its inputs {', '.join(renewed)} are resubmitted"
            raise PlanError(
                f"{instance.name} must restart ({why}) but its job {job.job_id} is still {job.state}: "
                f"cancel it first (fuse cancel RECIPE {instance.name})"
            )
        replaced.append(job.job_id)  # it waits on a parent's old job: replaced by one after the new job
    ids = {s.instance: s.job_id for s in earlier if s.job_id}
    dependencies = [ids[p] for p in instance.parents if p in ids]
    shards = _missing_shards(store, instance, clean)
    script = folder / f"{instance.name}.sbatch"
    write_text_atomic(
        script, render_job(recipe, instance, resources_for(recipe, instance, site), settings), private=True
    )
    options = sbatch_options(shards, dependencies)
    if dry_run:
        job_id = "$" + shell_name(instance.name)
    else:
        _claim(store, step, clean)
        job_id = scheduler.submit(["--hold", *options], script)
        held.append(job_id)
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


# --------------------------------------------------------------------------------------------- status, cancel, wait


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


# --------------------------------------------------------------------------------------------- command line


def cmd_submit(args: argparse.Namespace) -> int:
    from fuse.validate import check_files, require_files

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:  # a preview, often made before the data is staged: say what a real submit would refuse
        for problem in check_files(recipe):
            print(f"warning: {problem} (a real submit refuses this)", file=sys.stderr)
    else:
        require_files(recipe)
    path = site_path(recipe, args.recipe, args.site)
    site = load_site(path)
    try:
        submissions = submit(
            recipe, args.recipe, Slurm(), site, args.from_stage, args.only, args.force, args.dry_run
        )
    except SlurmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    new = [s for s in submissions if s.action == "submit"]
    if args.dry_run:
        print(f"# fuse submit --dry-run: {len(new)} jobs; scripts in {new[0].script.parent if new else '-'}")
        print("\n".join(dry_run_lines(submissions)))
        return 0
    for s in submissions:
        array = f" array {_ranges(s.shards)}" if s.shards is not None and s.action == "submit" else ""
        after = f" after {','.join(s.dependencies)}" if s.dependencies else ""
        print(f"{s.action:<6} {s.instance:<24} {s.job_id or '':<8}{array}{after}  {s.why}")
    print(
        f"{len(new)} jobs submitted, {sum(s.action == 'keep' for s in submissions)} kept — run store: {recipe.workdir}"
    )
    if not args.wait:
        return 0
    wait([s.job_id for s in submissions if s.job_id], timeout=args.timeout)
    rows = collect_status(recipe)
    print("\n".join(status_lines(rows)))
    return 0 if all(r.state == "done" for r in rows) else 1


def cmd_status(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    rows = collect_status(recipe)
    if args.json:
        print(json.dumps([{**r.__dict__, "job": r.job and r.job.__dict__} for r in rows], indent=1))
    else:
        print(f"run {recipe.name} in {recipe.workdir}")
        print("\n".join(status_lines(rows)))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    try:
        found = cancel(recipe, names=args.instances or None)
    except SlurmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, job_id in found:
        print(f"cancelled {name} (job {job_id})")
    print(f"{len(found)} jobs cancelled")
    return 0


def add_parser(subparsers: Any) -> None:
    from fuse.cli import add_set_option

    p = subparsers.add_parser(
        "submit", help="submit the DAG to SLURM: one job per stage instance, afterok chains"
    )
    p.add_argument("recipe", help="the recipe YAML file")
    add_set_option(p)
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun STAGE and everything downstream")
    p.add_argument(
        "--only", nargs="+", metavar="INSTANCE", help="submit only these instances (parents must be done)"
    )
    p.add_argument("--force", action="store_true", help="rerun selected instances even if done")
    p.add_argument("--site", help="site config YAML (default: executor.slurm.site_config)")
    p.add_argument("--dry-run", action="store_true", help="write the job scripts and print the sbatch lines")
    p.add_argument(
        "--wait", action="store_true", help="wait for the jobs; exit 1 unless every instance is done"
    )
    p.add_argument("--timeout", type=float, default=7 * 86400, help="seconds --wait waits at most")
    p.set_defaults(handler=cmd_submit)

    p = subparsers.add_parser("status", help="each instance's state in the run store and in SLURM")
    p.add_argument("recipe", help="the recipe YAML file")
    add_set_option(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)

    p = subparsers.add_parser("cancel", help="cancel this run's queued and running SLURM jobs")
    p.add_argument("recipe", help="the recipe YAML file")
    add_set_option(p)
    p.add_argument("instances", nargs="*", metavar="INSTANCE", help="only these instances' jobs")
    p.set_defaults(handler=cmd_cancel)
