"""The `fuse` command line: validate, plan, run, run-stage, logs — and the subcommands other modules add."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from fuse.logs import setup_logging, tail_lines
from fuse.recipe import RecipeError, load_recipe

# Subcommands that live in other modules: each module has add_parser(subparsers), adding its commands with a
# `handler` default. A module is imported only when one of its commands is used (or for --help), so that
# `fuse plan` never pays for torch.
PLUGINS = {
    "submit": "fuse.slurm.cli",
    "status": "fuse.slurm.cli",
    "cancel": "fuse.slurm.cli",
    "merge": "fuse.merging.cli",
    "compare": "fuse.compare",
    "cache": "fuse.cache",
    "export": "fuse.export",
    "import": "fuse.export",
    "zoo": "fuse.zoo",
}


def _recipe_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="the recipe YAML file")
    add_set_option(parser)


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """`--set KEY=VALUE` (repeatable): override a recipe key for this command, validated like the file."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set stages.distill.learning_rate=1e-5 (repeatable; YAML values)",
    )


def recipe_of(args: argparse.Namespace):
    """The command's recipe, with its --set overrides."""
    return load_recipe(args.recipe, getattr(args, "overrides", None))


def cmd_validate(args: argparse.Namespace) -> int:
    from fuse.dag import build_dag
    from fuse.validate import validate

    recipe = recipe_of(args)
    validate(recipe, files=not args.no_load, load=not args.no_load)
    dag = build_dag(recipe)
    print(f"{args.recipe}: valid — {len(recipe.sources)} sources, {len(dag)} stage instances")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from fuse import resources
    from fuse.cache import cache_hits
    from fuse.dag import build_dag
    from fuse.plan import make_plan
    from fuse.store import RunStore

    recipe = recipe_of(args)
    dag, store = build_dag(recipe), RunStore(recipe.workdir)
    steps = make_plan(recipe, dag, store, args.from_stage, args.only, args.force)
    hits = cache_hits(recipe, store, steps)
    width = max(len(s.instance.name) for s in steps)
    print(f"run {recipe.name} in {recipe.workdir}")
    for step in steps:
        parents = ", ".join(step.instance.parents) or "-"
        shards = f" [{step.instance.num_shards} shards]" if step.instance.num_shards > 1 else ""
        peak = resources.describe((store.manifest(step.instance.name) or {}).get("peak_memory"))
        peak = f"  (last run: {peak})" if peak else ""
        action = "cached" if step.instance.name in hits else step.action
        source = f"  (from {hits[step.instance.name]})" if step.instance.name in hits else ""
        print(
            f"  {step.instance.name:<{width}}  {action:<7} {str(step.state):<40} <- {parents}{shards}{peak}"
            f"{source}"
        )
    todo = sum(s.action == "run" for s in steps) - len(hits)
    print(
        f"{todo} to run, "
        + (f"{len(hits)} to link from the cache, " if hits else "")
        + f"{sum(s.action == 'skip' for s in steps)} to skip"
        + (
            f", {sum(s.action == 'blocked' for s in steps)} blocked"
            if any(s.action == "blocked" for s in steps)
            else ""
        )
    )
    if args.estimate:
        print()
        for line in plan_estimate(args, recipe, dag, store):
            print(line)
    return 0


def _assignments(text: str | None, option: str, form: str, cast: Any) -> dict[str, Any] | None:
    """ "a=1,b=2" -> {"a": cast("1"), "b": cast("2")}; None when not given."""
    from fuse.recipe import RecipeError

    if not text:
        return None
    try:
        return {k.strip(): cast(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise RecipeError(f"{option} {text}: write it as {form}") from None


def plan_estimate(args: argparse.Namespace, recipe: Any, dag: Any, store: Any) -> list[str]:
    from fuse.estimate import calibrations, estimate_lines, estimate_plan
    from fuse.recipe import RecipeError
    from fuse.slurm.site import load_site, site_path

    if args.gpu not in calibrations():
        raise RecipeError(f"--gpu {args.gpu}: no calibration for it (known: {', '.join(calibrations())})")
    site = load_site(site_path(recipe, args.recipe, args.site))
    rows = _assignments(args.rows, "--rows", "sft=N,preference=M", int)
    params = _assignments(args.params, "--params", "NAME=N,... (e.g. pivot=7.24e9)", float)
    try:
        estimates, data, sizes = estimate_plan(
            recipe,
            dag,
            store,
            gpu=args.gpu,
            site=site,
            rows=rows,
            tokens_per_row=args.tokens_per_row,
            params=params,
        )
    except ValueError as error:
        raise RecipeError(f"--estimate: {error}") from None
    return estimate_lines(estimates, data, sizes)


def cmd_run(args: argparse.Namespace) -> int:
    from fuse.executor import results, run
    from fuse.store import RunStore
    from fuse.validate import require_files

    recipe = recipe_of(args)
    require_files(recipe)
    if getattr(args, "seeds", None):
        from fuse.seeds import parse_seeds

        recipe = recipe.model_copy(update={"seeds": parse_seeds(args.seeds)})
    if recipe.seeds:
        return run_seeds(args, recipe)
    started = time.monotonic()
    steps = run(recipe, from_stage=args.from_stage, only=args.only, force=args.force)
    print(f"finished in {time.monotonic() - started:.1f} s — run store: {recipe.workdir}")
    lines = results(steps, RunStore(recipe.workdir))  # the fused model and the table, when this run has them
    if lines:
        print("\n".join(lines))
    return 0


def run_seeds(args: argparse.Namespace, base: Any) -> int:
    """The recipe once per seed (fuse.seeds), then the evaluations pooled over the seeds."""
    from fuse.executor import run
    from fuse.seeds import REPORT, seed_recipes, seed_report

    started = time.monotonic()
    for seed, recipe in seed_recipes(args.recipe, args.overrides, base):
        print(f"seed {seed}: run store {recipe.workdir}", flush=True)
        run(recipe, from_stage=args.from_stage, only=args.only, force=args.force)
    print(f"finished {len(base.seeds)} seeds in {time.monotonic() - started:.1f} s")
    if base.stages.evaluate.enabled and not args.only:
        print(seed_report(base), end="")
        print(f"(also in {Path(base.workdir) / REPORT})")
    return 0


def cmd_run_stage(args: argparse.Namespace) -> int:
    from fuse import preemption
    from fuse.executor import run_stage

    recipe = recipe_of(args)
    preemption.install()  # SIGUSR1 from SLURM: checkpoint, stop cleanly, let the job script requeue
    run_stage(recipe, args.instance, shard=args.shard, force=args.force)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    """The explicit download `fuse validate` leaves out: each hub model's snapshot with its weights, into the cache
    this shell's HF_HOME names (run it where the jobs' cache is, e.g. `HF_HOME=/shared/hf-cache fuse fetch R`)."""
    from pathlib import Path

    from fuse.models import resolve_model_dir

    recipe = recipe_of(args)
    for spec in [recipe.pivot, *recipe.sources]:
        if Path(spec.path).expanduser().is_dir():
            print(f"{spec.name}: local folder {spec.path}, nothing to fetch")
            continue
        print(f"{spec.name}: {spec.path} -> {resolve_model_dir(spec, weights=True)}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from fuse.dag import build_dag
    from fuse.store import RunStore

    recipe = recipe_of(args)
    # Only an instance of this recipe names a folder to read: `fuse logs RECIPE ../../x` reads nothing.
    build_dag(recipe)[args.instance]
    files = text_logs(RunStore(recipe.workdir).logs(args.instance))
    if not files:
        print(f"error: no logs for {args.instance} under {recipe.workdir}", file=sys.stderr)
        return 1
    for path in files if args.all else files[:1]:
        with open(path, "rb") as handle:
            lines = tail_lines(handle, args.lines)
        print(f"==> {path} <==")
        print("\n".join(lines))
    return 0


def text_logs(folder: Path) -> list[Path]:
    """An instance's readable logs, the stage log first, then the newest first (SLURM output, training JSONL);
    binary files (the loss plot) are left out."""
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.is_file() and not _binary(p)]
    return sorted(files, key=lambda p: (p.name != "stage.log", -p.stat().st_mtime))


def _binary(path: Path) -> bool:
    with open(path, "rb") as handle:
        return b"\0" in handle.read(8192)


BUILT_IN = ("validate", "plan", "run", "run-stage", "logs", "fetch")


def _plugins_for(argv: list[str]) -> list[str]:
    """The plugin modules to import: the one a plugin command lives in; none for a built-in command; every one when
    there is no command, or an unknown one (so that the usage and the error list every command)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in PLUGINS:
        return [PLUGINS[command]]
    if command in BUILT_IN:
        return []
    return list(dict.fromkeys(PLUGINS.values()))


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuse", description="Fuse LLMs of different architectures and vocabularies."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a recipe (schema, files, models) before any work")
    _recipe_arg(p)
    p.add_argument(
        "--no-load",
        "--offline-ok",
        dest="no_load",
        action="store_true",
        help="do not resolve or load models (validate a real-scale recipe without its weights)",
    )
    p.set_defaults(handler=cmd_validate)

    for name, handler, help_text in (
        ("plan", cmd_plan, "print the DAG, each instance's state and what a run would do"),
        ("run", cmd_run, "run the DAG locally (resumes; skips what is done)"),
    ):
        p = sub.add_parser(name, help=help_text)
        _recipe_arg(p)
        p.add_argument(
            "--from", dest="from_stage", metavar="STAGE", help="rerun STAGE and everything downstream"
        )
        p.add_argument(
            "--only", nargs="+", metavar="INSTANCE", help="run only these instances (parents must be done)"
        )
        p.add_argument("--force", action="store_true", help="rerun selected instances even if done")
        if name == "plan":
            p.add_argument(
                "--estimate",
                action="store_true",
                help="price every instance: tokens, teacher store size, time and peak memory, the SLURM --mem/--time "
                "it would need, total GPU-hours (refined from this run store's done instances)",
            )
            p.add_argument(
                "--gpu",
                default="h100",
                help="the GPU kind that instances with GPUs run on, for --estimate (h100, h200, a100, or one "
                "$FUSE_CALIBRATION names)",
            )
            p.add_argument(
                "--site", help="a SLURM site config, for --estimate (default: executor.slurm.site_config)"
            )
            p.add_argument(
                "--rows",
                metavar="sft=N,preference=M",
                help="--estimate: rows of data that cannot be read here (a hub dataset offline, a cluster path)",
            )
            p.add_argument(
                "--params",
                metavar="NAME=N,...",
                help="--estimate: parameter counts of models whose size cannot be read here (e.g. pivot=7.24e9)",
            )
            p.add_argument(
                "--tokens-per-row",
                type=float,
                metavar="N",
                help="--estimate: tokens per SFT row for models whose tokenizer cannot be read here",
            )
        if name == "run":
            p.add_argument(
                "--seeds",
                metavar="LIST",
                help="train every arm once per seed (e.g. 1,2,3): a run store per seed under the workdir, "
                "seed-independent instances shared, the evaluations pooled in <workdir>/seeds.md",
            )
        p.set_defaults(handler=handler)

    p = sub.add_parser(
        "run-stage", help="run exactly one stage instance (or one shard): what SLURM jobs call"
    )
    _recipe_arg(p)
    p.add_argument("instance")
    p.add_argument("--shard", type=int, default=None)
    p.add_argument("--force", action="store_true")
    p.set_defaults(handler=cmd_run_stage)

    p = sub.add_parser(
        "fetch",
        help="download every hub model's weights into the Hugging Face cache (validate reads no weights)",
    )
    _recipe_arg(p)
    p.set_defaults(handler=cmd_fetch)

    p = sub.add_parser("logs", help="print the tail of an instance's log")
    _recipe_arg(p)
    p.add_argument("instance")
    p.add_argument("-n", "--lines", type=int, default=40)
    p.add_argument("--all", action="store_true", help="every log file of the instance, not just the newest")
    p.set_defaults(handler=cmd_logs)

    for module_name in _plugins_for(sys.argv[1:] if argv is None else argv):
        importlib.import_module(module_name).add_parser(sub)
    return parser


class FirstLine(logging.Formatter):
    """The console gets the first line of each record; tracebacks stay in the instance's stage.log (`-v` shows
    them here too)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return f"{record.levelname} {record.name}: {message.splitlines()[0] if message else ''}"


def recipe_first(argv: list[str]) -> list[str]:
    """Options where the user puts them: `fuse run --only prepare recipe.yaml` (`--only` takes one or more values
    and would swallow the recipe: an existing .yaml/.yml file among them is moved in front of the option, where the
    recipe belongs) and `fuse plan RECIPE -v`."""
    # -v is an option of `fuse` itself; after the command it would be refused, so it is moved in front.
    argv = [a for a in argv if a in ("-v", "--verbose")] + [a for a in argv if a not in ("-v", "--verbose")]
    for i, arg in enumerate(argv):
        if arg != "--only":
            continue
        end = next((j for j in range(i + 1, len(argv)) if argv[j].startswith("-")), len(argv))
        for j in range(i + 1, end):
            if argv[j].endswith((".yaml", ".yml")) and Path(argv[j]).is_file():
                argv.insert(i, argv.pop(j))
                return argv
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = recipe_first(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    # The console shows progress lines and warnings; each instance's log file gets everything (see executor).
    if args.verbose:
        setup_logging(logging.DEBUG, "%(levelname)s %(name)s: %(message)s")
    else:
        setup_logging(logging.WARNING, FirstLine())
    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # a closed pipe surfaces here, not in the interpreter's final flush
        return code
    except RecipeError as error:
        print(f"error: {_short_lines(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `fuse plan | head`: the reader left. Point stdout at /dev/null so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as error:
        from fuse.executor import StageFailed

        if args.verbose:
            raise
        print(f"error: {_short_lines(_one_line(error))}", file=sys.stderr)
        if isinstance(error, StageFailed):
            print(
                f"log: {Path(recipe_of(args).workdir) / error.instance / 'logs' / 'stage.log'}",
                file=sys.stderr,
            )
        elif not _expected(error):
            print("(fuse -v ... shows the traceback)", file=sys.stderr)
        return 1


def _short_lines(text: str) -> str:
    """Each line of an error at most a few hundred characters: a huge value in a recipe is quoted by its ends."""
    from fuse.recipe.base import MAX_QUOTED, shorten

    return "\n".join(shorten(line, 3 * MAX_QUOTED) for line in text.split("\n"))


def _one_line(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return text if _expected(error) else f"{type(error).__name__}: {text}"


def _expected(error: BaseException) -> bool:
    """Errors whose message is written for the user (they name the key, file or instance); others get their type."""
    from fuse.executor import StageFailed
    from fuse.plan import PlanError

    names = {
        "SlurmError",
        "ModelLoadError",
        "BackendError",
        "TrainingError",
        "CheckpointError",
        "MergeConfigError",
        "PreflightError",
        "ExportError",
    }
    return isinstance(error, StageFailed | PlanError | KeyError) or type(error).__name__ in names


if __name__ == "__main__":
    sys.exit(main())
