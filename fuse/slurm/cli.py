"""The `fuse submit`, `fuse status` and `fuse cancel` commands (fuse.cli adds them through `add_parser`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fuse.recipe import RecipeError, load_recipe
from fuse.slurm.scheduler import Slurm, SlurmError
from fuse.slurm.site import load_site, site_path
from fuse.slurm.status import cancel, collect_status, status_lines, wait
from fuse.slurm.submission import array_ranges, dry_run_lines, submit


def cmd_submit(args: argparse.Namespace) -> int:
    from fuse.validate import check_files, require_files

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.seeds:
        raise RecipeError(
            f"seeds {recipe.seeds}: fuse submit does not fan a recipe out over seeds yet (its seeds would race for the "
            "shared instances): submit the seeds one after another with --set seeds=[] --set stages.distill.seed=N "
            "--set workdir=<workdir>/seed-N, or use fuse run --seeds"
        )
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
        array = f" array {array_ranges(s.shards)}" if s.shards is not None and s.action == "submit" else ""
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
