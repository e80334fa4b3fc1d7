"""The SLURM executor: one sbatch script per stage instance, submitted in topological order with afterok
dependencies, job arrays for missing shards and requeue on SIGUSR1; and the `fuse submit/status/cancel` commands.

Inside each job the stage runs through `fuse run-stage`, the local executor's code path. The scheduler is asked
only through its commands (sbatch, scontrol, scancel; sacct where accounting exists); job ids live in the
instances' manifests (`job_ids`), so a second `fuse submit` knows what is queued or running.

    site        where recipes run: the site config and each instance's layered resources
    render      the job script of one instance (the sandboxed sbatch template)
    scheduler   the `Slurm` command wrapper and job status
    submission  `fuse submit`: held jobs with afterok dependencies and shard arrays, released together
    status      `fuse status` / `fuse cancel`, and waiting for jobs
    cli         the commands' argument parsers and handlers
"""

from fuse.slurm.cli import add_parser, cmd_cancel, cmd_status, cmd_submit
from fuse.slurm.render import JobSettings, job_settings, log_pattern, render_job, sbatch_arg, stage_command
from fuse.slurm.scheduler import ACTIVE_STATES, JobStatus, Slurm, SlurmError, latest_job, summarize
from fuse.slurm.site import SiteConfig, check_resource_keys, load_site, resources_for, site_path
from fuse.slurm.status import InstanceStatus, cancel, collect_status, status_lines, wait
from fuse.slurm.submission import Submission, array_ranges, dry_run_lines, sbatch_options, submit

__all__ = [
    "ACTIVE_STATES",
    "InstanceStatus",
    "JobSettings",
    "JobStatus",
    "SiteConfig",
    "Slurm",
    "SlurmError",
    "Submission",
    "add_parser",
    "array_ranges",
    "cancel",
    "check_resource_keys",
    "cmd_cancel",
    "cmd_status",
    "cmd_submit",
    "collect_status",
    "dry_run_lines",
    "job_settings",
    "latest_job",
    "load_site",
    "log_pattern",
    "render_job",
    "resources_for",
    "sbatch_arg",
    "sbatch_options",
    "site_path",
    "stage_command",
    "status_lines",
    "submit",
    "summarize",
    "wait",
]
