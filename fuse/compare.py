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
RESAMPLES = 10_000  # enough for Holm over ~100 tests: the smallest bootstrap p is 1/(resamples + 1)
SFT_BASELINE = "sft_baseline"
SIGNIFICANCE_NOTE = (
    "\nBold: best in its column and better than every other model on the same items (paired bootstrap 95% CI, "
    "Holm-corrected over the table's tests); no bold where no model is significantly best.\n"
)


def run_workdir(run: str | Path) -> tuple[str, Path]:
    """(run name, run directory) of a recipe file or a run directory (one holding recipe.resolved.yaml)."""
    path = Path(run)
    if path.is_dir():
        resolved = path / "recipe.resolved.yaml"
        if not resolved.is_file():
            raise RecipeError(f"{path}: not a run directory (no recipe.resolved.yaml)")
        return load_recipe(resolved).name, path
    recipe = load_recipe(path)
    return recipe.name, Path(recipe.workdir)


def run_metrics(run: str | Path) -> tuple[str, dict[str, Any]]:
    """(run name, evaluate's metrics) of a recipe file or a run directory."""
    name, workdir = run_workdir(run)
    metrics = workdir / METRICS
    if not metrics.is_file():
        raise RecipeError(f"{run}: its run has no evaluation yet ({metrics} missing; run the evaluate stage)")
    return name, json.loads(metrics.read_text(encoding="utf-8"))


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


def run_scores(run: str | Path) -> Any:
    """The run's per-item scores (evaluate's scores.parquet) as a DataFrame, or None for a run evaluated before
    they were kept."""
    from fuse.item_scores import FILE, read_scores

    scores = run_workdir(run)[1] / METRICS.parent / FILE
    return read_scores(scores) if scores.is_file() else None


def best_models(
    frame: Any, models: Sequence[str], resamples: int = RESAMPLES, level: float = 0.95
) -> dict[str, str | None]:
    """Per column label: the model that is best and significantly better than every other model (paired bootstrap
    on the same items, Holm-corrected over every test of the table), else None."""
    from fuse.item_scores import column_value, columns_of, item_values
    from fuse.stats import holm, paired_bootstrap

    leaders: dict[str, str] = {}
    p_values: dict[tuple[str, str], float] = {}
    for column in columns_of(frame):
        scored = {m: v for m in models if (v := column_value(frame, m, column)) is not None}
        if len(scored) < 2 or len(set(scored.values())) < 2:
            continue
        pick = min if column.lower_is_better else max
        leader = pick(scored, key=scored.__getitem__)
        leaders[column.label] = leader
        values, size = item_values(frame, leader, column)
        for other in scored.keys() - {leader}:
            difference = paired_bootstrap(
                values, item_values(frame, other, column)[0], size, resamples=resamples, level=level
            )
            p_values[(column.label, other)] = difference.p_value
    adjusted = holm(p_values)  # keyed by (column, model): any hashable key works
    alpha = 1 - level
    return {
        label: leader if all(adjusted[key] < alpha for key in p_values if key[0] == label) else None
        for label, leader in leaders.items()
    }


def differences(
    frames: Any, models: Sequence[str], baseline: str, resamples: int = RESAMPLES, level: float = 0.95
) -> dict[tuple[str, str], tuple[Any, float]]:
    """{(model, column label): (its paired difference to the baseline, Holm-adjusted p over the table)}. One run's
    table: a paired bootstrap over its items; a list of tables (seeds): the mean of the per-seed differences with
    a seeds-then-items bootstrap."""
    from fuse.item_scores import columns_of, item_values
    from fuse.stats import clustered_bootstrap, holm, paired_bootstrap

    pooled = isinstance(frames, list | tuple)
    frames = list(frames) if pooled else [frames]
    found: dict[tuple[str, str], Any] = {}
    for column in columns_of(frames[0]):
        for model in (m for m in models if m != baseline):
            units = []
            for frame in frames:
                base, size = item_values(frame, baseline, column)
                values = item_values(frame, model, column)[0]
                if len(base) >= (1 if pooled else 2) and len(values) == len(base):
                    units.append((values, base, size))
            if pooled and len(units) >= 2:
                found[(model, column.label)] = clustered_bootstrap(units, resamples=resamples, level=level)
            elif not pooled and units:
                found[(model, column.label)] = paired_bootstrap(*units[0], resamples=resamples, level=level)
    adjusted = holm({key: d.p_value for key, d in found.items()})
    return {key: (d, adjusted[key]) for key, d in found.items()}


def differences_markdown(
    found: Mapping[tuple[str, str], tuple[Any, float]], baseline: str, level: float = 0.95, pooled: str = ""
) -> str:
    """Model rows, one column per metric: 'difference [CI]', with † where the Holm-adjusted p < 1 − level."""
    if not found:
        return ""
    labels = list(dict.fromkeys(label for _, label in found))
    models = list(dict.fromkeys(model for model, _ in found))
    lines = [
        f"Paired differences to **{baseline}** (model − {baseline}; {round(level * 100)}% bootstrap CI{pooled}; "
        f"† significant after Holm's correction over the {len(found)} tests of this table):",
        "",
        "| model | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    for model in models:
        cells = []
        for label in labels:
            if (model, label) not in found:
                cells.append("–")
                continue
            difference, adjusted = found[(model, label)]
            mark = " †" if adjusted < 1 - level and difference.significant else ""
            cells.append(difference.format() + mark)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def default_baseline(models: Sequence[str]) -> str | None:
    """What a fusion is judged against: the SFT-only baseline (same data, same budget), else the pivot."""
    for name in models:
        if name.endswith(SFT_BASELINE):
            return name
    return next((name for name in models if name.endswith("pivot")), None)


def compare(
    paths: Sequence[str | Path],
    models: Sequence[str] | None = None,
    baseline: str | None = None,
    resamples: int = RESAMPLES,
) -> str:
    from fuse.evaluation import markdown_table

    runs: dict[str, dict[str, Any]] = {}
    frames: dict[str, Any] = {}
    for path in paths:
        name, metrics = run_metrics(path)
        if name in runs:
            name = f"{name}@{path}"
        runs[name] = metrics
        frames[name] = run_scores(path)
    joined = side_by_side(runs, models)
    if not joined["models"]:
        raise RecipeError(f"no model named {', '.join(models or [])} in the runs' evaluations")
    if any(frame is None for frame in frames.values()):
        note = "(no per-item scores in some run: no significance tests; bold = best value)\n"
        return markdown_table(joined) + note
    frame = joined_scores(frames, list(joined["models"]))
    names = list(joined["models"])
    text = markdown_table(joined, best=best_models(frame, names, resamples))
    text += SIGNIFICANCE_NOTE
    if baseline is not None:
        matches = [n for n in names if n == baseline or n.endswith(f"/{baseline}")]
        if len(matches) != 1:
            raise RecipeError(
                f"--baseline {baseline}: matches {matches or 'no model'} (models: {', '.join(names)})"
            )
        text += "\n" + differences_markdown(differences(frame, names, matches[0], resamples), matches[0])
    return text


def joined_scores(frames: Mapping[str, Any], names: Sequence[str]) -> Any:
    """Every run's per-item rows with models named `<run>/<model>`, only the named ones."""
    import pandas as pd

    parts = []
    for run, frame in frames.items():
        frame = frame.assign(model=run + "/" + frame["model"])
        parts.append(frame[frame["model"].isin(names)])
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------------------------- seeds


def seed_units(paths: Sequence[str | Path]) -> list[tuple[dict[str, Any], Any]]:
    """(metrics, per-item scores) of each run, runs of one experiment under different seeds."""
    units = []
    for path in paths:
        _, metrics = run_metrics(path)
        frame = run_scores(path)
        if frame is None:
            raise RecipeError(f"{path}: its evaluation kept no per-item scores (rerun evaluate)")
        units.append((metrics, frame))
    if len(units) < 2:
        raise RecipeError("pooling over seeds needs at least two runs")
    return units


def pooled_over_seeds(
    frames: Sequence[Any], models: Sequence[str], baseline: str | None, resamples: int = RESAMPLES
) -> str:
    """Each model's value per column as mean ± SD over the seed units, and its difference to the baseline pooled
    over seeds (the mean of per-seed paired differences, with a seed-then-item bootstrap CI)."""
    from fuse.item_scores import column_value, columns_of
    from fuse.stats import seed_summary

    columns = columns_of(frames[0])
    lines = [
        f"Over {len(frames)} seeds (mean ± SD of each seed's value):",
        "",
        "| model | " + " | ".join(c.label for c in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for model in models:
        cells = []
        for column in columns:
            values = [v for frame in frames if (v := column_value(frame, model, column)) is not None]
            cells.append(_mean_sd(seed_summary(values)) if values else "–")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if baseline is None:
        return text
    found = differences(list(frames), models, baseline, resamples)
    return text + "\n" + differences_markdown(found, baseline, pooled=", seeds then items resampled")


def _mean_sd(summary: Any) -> str:
    return f"{summary.mean:.3f}" if summary.n < 2 else f"{summary.mean:.3f} ± {summary.sd:.3f}"


def compare_seeds(paths: Sequence[str | Path], models: Sequence[str] | None, baseline: str | None) -> str:
    units = seed_units(paths)
    names = [n for n in units[0][0]["models"] if not models or n in models]
    if not names:
        raise RecipeError(f"no model named {', '.join(models or [])} in the runs' evaluations")
    baseline = baseline or default_baseline(names)
    if baseline is not None and baseline not in names:
        raise RecipeError(f"--baseline {baseline}: no such model (models: {', '.join(names)})")
    return pooled_over_seeds([frame for _, frame in units], names, baseline)


def cmd_compare(args: argparse.Namespace) -> int:
    models = [m for item in args.models for m in item.split(",") if m] if args.models else None
    if args.seeds:
        print(compare_seeds(args.runs, models, args.baseline), end="")
    else:
        print(compare(args.runs, models, args.baseline), end="")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("compare", help="the evaluation tables of several runs side by side")
    p.add_argument("runs", nargs="+", help="recipe files (or run directories) whose evaluate stage is done")
    p.add_argument(
        "--models",
        action="append",
        help="only these models of each run, e.g. --models merge,distill.sft_baseline (repeatable)",
    )
    p.add_argument(
        "--baseline",
        help="also give every model's paired difference to this one, with its CI (with --seeds: default the "
        "SFT-only baseline, else the pivot)",
    )
    p.add_argument(
        "--seeds",
        action="store_true",
        help="the runs are one experiment under different seeds: mean ± SD per model, differences pooled over seeds",
    )
    p.set_defaults(handler=cmd_compare)
