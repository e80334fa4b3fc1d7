"""How close `fuse plan --estimate` comes to what runs measured: per stage instance, the estimate (from the shipped
calibration alone, no refinement from the runs it is compared with) beside the manifest's elapsed seconds and peak
memory, for the demo and both directions of the real pair.

    python bench/estimate_check.py [RECIPE:RUNSTORE ...]

Default: the demo (examples/tiny-demo.yaml, runs/tiny-demo) and the real pair (examples/real-pair-*.yaml,
runs/real-pair-*), each where its run store exists. Writes bench/results/estimate_check.{json,md}.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuse.dag import build_dag  # noqa: E402
from fuse.estimate import clock, estimate_plan  # noqa: E402
from fuse.recipe import load_recipe  # noqa: E402
from fuse.resources import host_peak_gb  # noqa: E402
from fuse.store import RunStore  # noqa: E402

DEFAULT = [
    ("examples/tiny-demo.yaml", "runs/tiny-demo"),
    ("examples/real-pair-smollm2.yaml", "runs/real-pair-smollm2"),
    ("examples/real-pair-smollm2.yaml", "runs/real-pair-smollm2-first-piece"),
    ("examples/real-pair-gemma3.yaml", "runs/real-pair-gemma3"),
]


def measured(store: RunStore, name: str) -> tuple[float | None, float | None]:
    manifest = store.manifest(name) or {}
    if manifest.get("status") != "done" or manifest.get("cached_from"):
        return None, None  # linked from the cache: its time was spent elsewhere
    peaks = manifest.get("peak_memory") or {}
    peak = host_peak_gb(peaks) or None
    return manifest.get("elapsed_s"), peak


def compare(recipe_path: str, workdir: str) -> dict:
    resolved = (
        ROOT / workdir / "recipe.resolved.yaml"
    )  # what that run ran (a bench variant differs from the example)
    recipe = load_recipe(resolved if resolved.is_file() else ROOT / recipe_path)
    recipe = recipe.model_copy(update={"workdir": str(ROOT / workdir)})
    store = RunStore(recipe.workdir)
    estimates, data, sizes = estimate_plan(recipe, build_dag(recipe), store, use_runs=False)
    rows = []
    for e in estimates:
        seconds, peak = measured(store, e.instance)
        if seconds is None:
            continue
        rows.append(
            {
                "instance": e.instance,
                "estimated_s": round(e.seconds, 1),
                "measured_s": seconds,
                "time_ratio": round(seconds / e.seconds, 2),
                "estimated_gb": round(e.peak_gb, 2),
                "measured_gb": round(peak, 2) if peak else None,
                "memory_ratio": round(peak / e.peak_gb, 2) if peak else None,
            }
        )
    return {"recipe": recipe_path, "run_store": workdir, "rows": rows, "summary": summary(rows)}


def factor(ratios: list[float]) -> float:
    """The largest factor either way: max(r, 1/r)."""
    return max(max(r, 1 / r) for r in ratios)


def summary(rows: list[dict]) -> dict:
    times = [r["time_ratio"] for r in rows]
    mems = [r["memory_ratio"] for r in rows if r["memory_ratio"]]
    estimated, spent = sum(r["estimated_s"] for r in rows), sum(r["measured_s"] for r in rows)
    return {
        "instances": len(rows),
        "total_estimated_s": round(estimated, 1),
        "total_measured_s": round(spent, 1),
        "total_time_ratio": round(spent / estimated, 2),
        "time_geomean_ratio": round(math.exp(statistics.fmean(math.log(t) for t in times)), 2),
        "time_max_factor": round(factor(times), 2),
        "memory_geomean_ratio": round(math.exp(statistics.fmean(math.log(m) for m in mems)), 2),
        "memory_max_factor": round(factor(mems), 2),
    }


def markdown(results: list[dict]) -> str:
    lines = [
        "# plan --estimate against measured runs",
        "",
        "Estimates from the shipped CPU calibration (no refinement from these runs); measured: the manifests'",
        "elapsed seconds and peak RSS, on this machine kind (2 shared CPU cores). Ratio = measured / estimated.",
    ]
    for result in results:
        s = result["summary"]
        lines += [
            "",
            f"## {result['recipe']} ({result['run_store']})",
            "",
            f"{s['instances']} instances; all together {s['total_estimated_s']:.0f} s estimated, "
            f"{s['total_measured_s']:.0f} s measured (ratio {s['total_time_ratio']}); per instance, time: "
            f"geometric-mean ratio {s['time_geomean_ratio']}, worst factor "
            f"{s['time_max_factor']}; memory: geometric-mean ratio {s['memory_geomean_ratio']}, worst factor "
            f"{s['memory_max_factor']}",
            "",
            "| instance | estimated | measured | ratio | est. peak GB | measured GB | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            lines.append(
                f"| {r['instance']} | {clock(r['estimated_s'])} ({r['estimated_s']} s) | {r['measured_s']:.1f} s | "
                f"{r['time_ratio']} | {r['estimated_gb']} | {r['measured_gb']} | {r['memory_ratio']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    pairs = [tuple(a.split(":", 1)) for a in argv] or DEFAULT
    results = [compare(r, w) for r, w in pairs if (ROOT / w).is_dir()]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimate_check.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "estimate_check.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
