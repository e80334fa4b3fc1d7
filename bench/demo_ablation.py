"""Ablation of the tiny demo: λ (0.9 / 0.5), fusion (min_ce / avg_ce), merge method, with the demo's metrics and
the goals of issue 15 checked on each.

Runs after `make demo` (or any finished run of examples/tiny-demo.yaml): each variant starts from a copy of the
demo's run store, so the run store skips every instance the variant does not change (extract, align, score…) and
reruns only what the changed setting feeds. Writes bench/results/demo_ablation.json + demo_ablation.md.
Usage: .venv/bin/python bench/demo_ablation.py [--demo-run runs/tiny-demo] [--zoo .zoo] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
DEMO = REPO / "examples" / "tiny-demo.yaml"
GENERAL_TOLERANCE = 0.05  # no trained model more than 5% worse than the pivot on general text
GAP_TOLERANCE = 0.10  # fused within 10% of the best source's gap to the limit, per domain

# name -> dotted recipe keys changed from the demo (the demo itself is the first row)
VARIANTS: dict[str, dict[str, Any]] = {
    "demo (λ 0.5, min_ce, sce)": {},
    "λ 0.9": {"stages.distill.lambda": 0.9},
    "fusion avg_ce": {"stages.distill.fusion": "avg_ce"},
    "merge linear": {"stages.merge.method": "linear", "stages.merge.parameters": {}},
    "merge task_arithmetic": {"stages.merge.method": "task_arithmetic", "stages.merge.parameters": {}},
    "merge ties": {"stages.merge.method": "ties", "stages.merge.parameters": {}},
    # a diagnostic, not a setting to adopt: does the teacher's signal pay off with three times the steps?
    "diagnostic: 9 epochs": {"stages.distill.epochs": 9},
}


def recipe_for(workdir: Path, zoo: Path, changes: dict[str, Any], path: Path) -> Path:
    """The demo recipe with its zoo paths made absolute, its own workdir and the variant's changes."""
    text = DEMO.read_text(encoding="utf-8").replace("../.zoo/", f"{zoo.resolve()}/")
    recipe = yaml.safe_load(text)
    recipe["workdir"] = str(workdir)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = recipe
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run_variant(name: str, changes: dict[str, Any], demo_run: Path, zoo: Path, work: Path) -> dict[str, Any]:
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    workdir = work / slug
    if changes:
        if workdir.exists():
            shutil.rmtree(workdir)
        shutil.copytree(demo_run, workdir, symlinks=True)
    else:
        workdir = demo_run
    recipe = recipe_for(workdir, zoo, changes, work / f"{slug}.yaml")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "fuse.cli", "run", str(recipe)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{name}: fuse run failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    reran = next((line for line in result.stdout.splitlines() if "stage instances" in line), "")
    metrics = json.loads((workdir / "evaluate" / "out" / "metrics.json").read_text())
    merge_report = workdir / "merge" / "out" / "merge_report.md"
    return {
        "changes": changes,
        "seconds": round(time.monotonic() - started, 1),
        "reran": reran.strip(),
        "metrics": metrics,
        "merge_report": merge_report.read_text() if merge_report.is_file() else None,
    }


def goals(metrics: dict[str, Any], owners: dict[str, str]) -> dict[str, Any]:
    """Issue 15's goals, each with its numbers and whether it is reached. `owners`: domain -> zoo model."""
    models = metrics["models"]
    limit = metrics["limit"]["domain_ce"]
    sources = [m for m in owners.values() if m != "pivot"]
    targets = [f"fpo.{s}" if f"fpo.{s}" in models else f"distill.{s}" for s in sources]
    sft, fused, pivot = models["distill.sft_baseline"], models["merge"], models["pivot"]
    result: dict[str, Any] = {}
    own = {}
    for domain, owner in owners.items():
        if owner == "pivot":
            continue
        for target in (f"distill.{owner}", f"fpo.{owner}"):
            if target in models:
                ce = models[target]["domain_ce"][domain]
                own[target] = {"domain": domain, "target": ce, "sft_only": sft["domain_ce"][domain]}
                own[target]["reached"] = ce < sft["domain_ce"][domain]
    result["targets_beat_sft_on_own_domain"] = {
        "per_target": own,
        "reached": all(v["reached"] for v in own.values()),
    }
    result["fused_beats_sft_mean_ce"] = {
        "fused": fused["mean_domain_ce"],
        "sft_only": sft["mean_domain_ce"],
        "reached": fused["mean_domain_ce"] < sft["mean_domain_ce"],
    }
    result["fused_beats_sft_mean_accuracy"] = {
        "fused": fused["mean_accuracy"],
        "sft_only": sft["mean_accuracy"],
        "reached": fused["mean_accuracy"] > sft["mean_accuracy"],
    }
    gaps = {}
    for domain in metrics["domains"]:
        best = min(models[m]["domain_ce"][domain] for m in ["pivot", *sources])
        gap_fused, gap_best = fused["domain_ce"][domain] - limit[domain], best - limit[domain]
        gaps[domain] = {
            "fused_gap": gap_fused,
            "best_source_gap": gap_best,
            "ratio": gap_fused / gap_best,
            "reached": gap_fused <= (1 + GAP_TOLERANCE) * gap_best,
        }
    result["fused_gap_within_10pct_of_best_source"] = {
        "per_domain": gaps,
        "reached": all(g["reached"] for g in gaps.values()),
    }
    mean_targets_ce = sum(models[t]["mean_domain_ce"] for t in targets) / len(targets)
    mean_targets_acc = sum(models[t]["mean_accuracy"] for t in targets) / len(targets)
    result["fused_at_least_mean_of_targets"] = {
        "fused_mean_ce": fused["mean_domain_ce"],
        "targets_mean_ce": mean_targets_ce,
        "fused_mean_accuracy": fused["mean_accuracy"],
        "targets_mean_accuracy": mean_targets_acc,
        "reached": fused["mean_domain_ce"] <= mean_targets_ce and fused["mean_accuracy"] >= mean_targets_acc,
    }
    trained = [m for m in models if m.startswith(("distill.", "fpo.")) or m == "merge"]
    worst = max(trained, key=lambda m: models[m]["ce_per_byte"])
    result["general_text_within_5pct_of_pivot"] = {
        "pivot": pivot["ce_per_byte"],
        "worst": worst,
        "worst_ce": models[worst]["ce_per_byte"],
        "reached": models[worst]["ce_per_byte"] <= (1 + GENERAL_TOLERANCE) * pivot["ce_per_byte"],
    }
    return result


def summary_row(name: str, metrics: dict[str, Any], checked: dict[str, Any]) -> str:
    models, domains = metrics["models"], metrics["domains"]
    fused, sft = models["merge"], models["distill.sft_baseline"]
    cells = [
        name,
        *(f"{fused['domain_ce'][d]:.3f}" for d in domains),
        f"{fused['mean_domain_ce']:.3f}",
        f"{sft['mean_domain_ce']:.3f}",
        f"{fused['mean_accuracy']:.2f}",
        f"{sft['mean_accuracy']:.2f}",
        f"{fused['ce_per_byte']:.3f}",
        " ".join("✓" if checked[g]["reached"] else "✗" for g in checked),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(results: dict[str, Any], owners: dict[str, str]) -> str:
    from fuse.evaluation import markdown_table

    first = next(iter(results.values()))["metrics"]
    domains, limit = first["domains"], first["limit"]["domain_ce"]
    header = ["variant", *(f"fused CE {d}" for d in domains), "fused CE mean", "SFT-only CE mean"]
    header += ["fused acc", "SFT-only acc", "fused general CE", "goals 1–6"]
    lines = [
        "# Tiny-demo ablation (issue 15)",
        "",
        f"Domains and owners: {', '.join(f'{d} ({owners[d]})' for d in domains)}; limit (nats/byte): "
        + ", ".join(f"{d} {limit[d]:.3f}" for d in domains)
        + ".",
        "Goals: 1 each target beats SFT-only on its own domain; 2 fused beats SFT-only on mean domain CE; "
        "3 … on mean skill accuracy; 4 fused within 10% of the best source's gap to the limit on every domain; "
        "5 fused at least the mean of the targets (CE and accuracy); 6 (last) no trained model >5% worse than the "
        "pivot on general text.",
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
    ]
    for name, result in results.items():
        lines.append(summary_row(name, result["metrics"], result["goals"]))
    lines += ["", "Reruns per variant (what the run store did not skip):", ""]
    lines += [f"- {name}: {r['reran']} ({r['seconds']:.0f} s)" for name, r in results.items()]
    for name, result in results.items():
        lines += ["", f"## {name}", "", markdown_table(result["metrics"])]
        lines += ["```", json.dumps(result["goals"], indent=1, default=float), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo-run", default=str(REPO / "runs" / "tiny-demo"))
    parser.add_argument("--zoo", default=str(REPO / ".zoo"))
    parser.add_argument("--work", default=str(REPO / "runs" / "demo-ablation"))
    parser.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    args = parser.parse_args()

    from fuse.zoo import Zoo

    zoo, demo_run, work = Path(args.zoo), Path(args.demo_run).resolve(), Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    owners = Zoo.from_dir(zoo).domains
    wanted = set(args.only.split(",")) if args.only else set(VARIANTS)
    results: dict[str, Any] = {}
    for name, changes in VARIANTS.items():
        if name not in wanted:
            continue
        print(f"variant: {name}", flush=True)
        result = run_variant(name, changes, demo_run, zoo, work)
        result["goals"] = goals(result["metrics"], owners)
        results[name] = result
        print(summary_row(name, result["metrics"], result["goals"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": platform.platform(), "python": platform.python_version()}
    (RESULTS / "demo_ablation.json").write_text(json.dumps(meta | {"variants": results}, indent=1) + "\n")
    (RESULTS / "demo_ablation.md").write_text(markdown(results, owners))
    print((RESULTS / "demo_ablation.md").read_text())


if __name__ == "__main__":
    main()
