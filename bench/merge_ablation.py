"""Merge ablation: every merge method (its main parameter at two values) on the targets of one finished run.

Each merge is evaluated with the project's own evaluation (fuse.evaluation: greedy exact-match accuracy per skill,
CE per byte of held-out text) next to the pivot and the targets, and its diagnostics (the share of each target's
delta energy that survives) are reported with it, so a user picks a method from measurements.
Writes bench/results/merge_ablation.{json,md}.

Usage: .venv/bin/python bench/merge_ablation.py RUN_DIR [--targets fpo] [--max-items-per-skill N]
       (RUN_DIR holds recipe.resolved.yaml, the pivot is the recipe's, items/held-out text its evaluate settings')
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from fuse import evaluation
from fuse.logs import setup_logging
from fuse.merging import MergeConfig, run_merge
from fuse.merging.engine import report_markdown
from fuse.recipe import ModelSpec, Recipe, parse_recipe

RESULTS = Path(__file__).parent / "results"

# (method, shared parameters, per-model parameters): the main parameter of each method at two values, one of
# them the default. task_arithmetic/dare/breadcrumbs sum the deltas (mergekit's normalize: false default).
GRID: list[tuple[str, dict[str, Any], dict[str, float]]] = [
    ("linear", {}, {}),
    ("task_arithmetic", {"lambda": 1.0}, {}),
    ("task_arithmetic", {"lambda": 0.5}, {}),
    ("ties", {}, {"density": 1.0}),
    ("ties", {}, {"density": 0.3}),
    ("dare_linear", {}, {"density": 0.9}),
    ("dare_linear", {}, {"density": 0.5}),
    ("dare_ties", {}, {"density": 0.9}),
    ("dare_ties", {}, {"density": 0.5}),
    ("breadcrumbs", {}, {"density": 0.9}),
    ("breadcrumbs", {}, {"density": 0.5}),
    ("sce", {"select_topk": 0.1}, {}),
    ("sce", {"select_topk": 0.5}, {}),
    ("sce", {"select_topk": 1.0}, {}),
    ("sce_mergekit", {"select_topk": 1.0}, {}),
    ("sce_mergekit", {"select_topk": 0.5}, {}),
    ("sce_mergekit", {"select_topk": 0.1}, {}),
    ("varm", {}, {}),
]


def load_run(run_dir: Path) -> Recipe:
    data = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text(encoding="utf-8"))
    return parse_recipe(data, str(run_dir / "recipe.resolved.yaml"), base_dir=run_dir)


def find_targets(run_dir: Path, stage: str) -> dict[str, Path]:
    """`<stage>.<source>/out/model` folders of the run (the SFT-only baseline is not a target)."""
    folders = sorted(run_dir.glob(f"{stage}.*/out/model"))
    targets = {p.parents[1].name: p for p in folders if not p.parents[1].name.endswith("sft_baseline")}
    if not targets:
        raise SystemExit(f"{run_dir}: no {stage}.*/out/model folders (is the run finished?)")
    return targets


def label(method: str, shared: dict[str, Any], per_model: dict[str, float]) -> str:
    values = {**shared, **per_model}
    return method + (" " + ", ".join(f"{k} {v:g}" for k, v in values.items()) if values else "")


def merge_one(
    pivot: ModelSpec, targets: dict[str, Path], entry: tuple, out: Path
) -> tuple[Path, dict[str, Any]]:
    method, shared, per_model = entry
    config = MergeConfig(
        base_model=pivot.path,
        models=[{"path": str(p), "name": n, "parameters": per_model} for n, p in targets.items()],
        method=method,
        parameters=shared,
        dtype="float32",
    )
    report = run_merge(config, out)
    return out, report


def evaluate(spec: ModelSpec, items: list, texts: list[str], max_new_tokens: int) -> dict[str, Any]:
    result = evaluation.evaluate_model(spec, items, texts, max_new_tokens)
    result.pop("samples", None)
    return result


def markdown(results: dict[str, Any]) -> str:
    skills, targets = results["skills"], results["targets"]
    lines = [
        "# Merge ablation",
        "",
        f"Run: `{results['run_dir']}` · targets: {', '.join(targets)} · pivot `{results['pivot']}` · "
        f"{results['n_items']} items, {results['n_texts']} held-out texts · {results['seconds']:.0f} s on "
        f"{results['machine']} · fuse at {results['git_sha']}",
        "",
        "Accuracy: greedy exact match per skill (fuse.evaluation); CE/byte: nats per UTF-8 byte of held-out text; "
        "kept: share of each target's delta energy surviving in the merged delta, ⟨Δ_merged, Δ_i⟩/‖Δ_i‖² "
        "(fuse.merging.diagnostics).",
        "",
        "| model | "
        + " | ".join(skills)
        + " | mean | CE/byte | "
        + " | ".join(f"kept {t}" for t in targets)
        + " |",
        "|---" * (len(skills) + 3 + len(targets)) + "|",
    ]
    for row in results["rows"]:
        accuracy = [f"{row['skills'][s]:.2f}" for s in skills]
        kept = [f"{row['kept'][t]:.2f}" if row.get("kept") else "" for t in targets]
        lines.append(
            f"| {row['name']} | "
            + " | ".join(accuracy)
            + f" | {row['mean_accuracy']:.2f} | {row['ce_per_byte']:.3f} | "
            + " | ".join(kept)
            + " |"
        )
    goal = results["targets_mean_accuracy"]
    best = max((r for r in results["rows"] if r.get("kept")), key=lambda r: r["mean_accuracy"])
    reaching = [r["name"] for r in results["rows"] if r.get("kept") and r["mean_accuracy"] >= goal]
    lines += [
        "",
        f"Mean of the targets' mean accuracies (the goal a merge should keep): **{goal:.3f}**. "
        f"Best merge: {best['name']} ({best['mean_accuracy']:.3f}). "
        f"Merges reaching the goal: {', '.join(reaching) if reaching else 'none'}.",
        "",
        f"## Diagnostics of the targets (merge: {results['diagnostics_of']})",
        "",
        results["diagnostics_md"].split("## Diagnostics", 1)[1].strip(),
    ]
    return "\n".join(lines) + "\n"


def git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--targets", default="fpo", help="stage whose models are merged (fpo or distill)")
    parser.add_argument("--max-items-per-skill", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "merge_ablation")
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING, logging.BASIC_FORMAT)

    run_dir = args.run_dir.resolve()
    recipe = load_run(run_dir)
    settings = recipe.stages.evaluate
    if not settings.items or not settings.heldout_text:
        raise SystemExit("the run's stages.evaluate needs items and heldout_text")
    items = evaluation.load_items(settings.items, args.max_items_per_skill)
    texts = evaluation.load_texts(settings.heldout_text)
    targets = find_targets(run_dir, args.targets)
    pivot = recipe.pivot
    started = time.monotonic()
    rows: list[dict[str, Any]] = []

    def add(name: str, spec: ModelSpec, kept: dict[str, float] | None = None) -> None:
        print(f"evaluating {name}", flush=True)
        rows.append({"name": name, **evaluate(spec, items, texts, settings.max_new_tokens), "kept": kept})

    add("pivot", pivot)
    for name, folder in targets.items():
        add(name, pivot.model_copy(update={"name": name.replace(".", "-"), "path": str(folder)}))
    diagnostics: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="merge-ablation-") as scratch:
        for index, entry in enumerate(GRID):
            name = label(*entry)
            folder, report = merge_one(pivot, targets, entry, Path(scratch) / f"m{index}")
            shares = report["diagnostics"]["families"]["all"]["energy_share"]
            diagnostics[name] = report["diagnostics"]
            if entry[0] == "sce" and entry[1]["select_topk"] == 0.1:
                diagnostics_md, diagnostics_of = report_markdown(report), name
            add(f"merge: {name}", pivot.model_copy(update={"name": f"m{index}", "path": str(folder)}), shares)
    target_rows = [r for r in rows if r["name"] in targets]
    results = {
        "run_dir": str(run_dir),
        "pivot": pivot.path,
        "targets": list(targets),
        "skills": sorted({i.skill for i in items}),
        "n_items": len(items),
        "n_texts": len(texts),
        "targets_mean_accuracy": sum(r["mean_accuracy"] for r in target_rows) / len(target_rows),
        "rows": rows,
        "diagnostics": diagnostics,
        "diagnostics_of": diagnostics_of,
        "diagnostics_md": diagnostics_md,
        "seconds": time.monotonic() - started,
        "machine": f"{platform.machine()}, {platform.system()}, torch CPU",
        "git_sha": git_sha(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))


if __name__ == "__main__":
    main()
