"""`fuse compare RUN…`: the evaluation tables of several runs (variants of one recipe: another merge method, λ,
fusion…) side by side in one table, each model named `<run>/<model>`, the best value of each column in bold.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fuse.recipe import RecipeError, load_recipe

METRICS = Path("evaluate") / "out" / "metrics.json"


def run_metrics(run: str | Path) -> tuple[str, dict[str, Any]]:
    """(run name, evaluate's metrics) of a recipe file or a run directory (one holding recipe.resolved.yaml)."""
    path = Path(run)
    if path.is_dir():
        resolved = path / "recipe.resolved.yaml"
        if not resolved.is_file():
            raise RecipeError(f"{path}: not a run directory (no recipe.resolved.yaml)")
        recipe = load_recipe(resolved)
        workdir = path
    else:
        recipe = load_recipe(path)
        workdir = Path(recipe.workdir)
    metrics = workdir / METRICS
    if not metrics.is_file():
        raise RecipeError(f"{run}: its run has no evaluation yet ({metrics} missing; run the evaluate stage)")
    return recipe.name, json.loads(metrics.read_text(encoding="utf-8"))


def _union(values: Sequence[Any]) -> Any:
    """Lists: their items in first-seen order; mappings: merged; anything else: the first value."""
    if all(isinstance(v, list) for v in values):
        return list(dict.fromkeys(item for v in values for item in v))
    if all(isinstance(v, Mapping) for v in values):
        return {key: value for v in values for key, value in v.items()}
    return values[0]


def side_by_side(
    runs: Mapping[str, Mapping[str, Any]], models: Sequence[str] | None = None
) -> dict[str, Any]:
    """One metrics mapping (evaluate's schema) holding every run's models as `<run>/<model>`, optionally only the
    named models; the other top-level entries (skills, domains, limits…) are united across runs."""
    keys = list(dict.fromkeys(key for metrics in runs.values() for key in metrics if key != "models"))
    joined: dict[str, Any] = {key: _union([m[key] for m in runs.values() if key in m]) for key in keys}
    joined["models"] = {
        f"{run}/{name}": result
        for run, metrics in runs.items()
        for name, result in metrics["models"].items()
        if not models or name in models
    }
    return joined


def compare(paths: Sequence[str | Path], models: Sequence[str] | None = None) -> str:
    from fuse.evaluation import markdown_table

    runs: dict[str, dict[str, Any]] = {}
    for path in paths:
        name, metrics = run_metrics(path)
        if name in runs:
            name = f"{name}@{path}"
        runs[name] = metrics
    joined = side_by_side(runs, models)
    if not joined["models"]:
        raise RecipeError(f"no model named {', '.join(models or [])} in the runs' evaluations")
    return markdown_table(joined)


def cmd_compare(args: argparse.Namespace) -> int:
    models = [m for item in args.models for m in item.split(",") if m] if args.models else None
    print(compare(args.runs, models), end="")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("compare", help="the evaluation tables of several runs side by side")
    p.add_argument("runs", nargs="+", help="recipe files (or run directories) whose evaluate stage is done")
    p.add_argument(
        "--models",
        action="append",
        help="only these models of each run, e.g. --models merge,distill.sft_baseline (repeatable)",
    )
    p.set_defaults(handler=cmd_compare)
