"""The knowledge-across-vocabularies ablation: one row per align objective, each measured by bench/demo_seeds.py
over the same worlds and training seeds. Writes bench/results/knowledge_ablation.json and .md.

Per objective: the primary metric of the targets and of the merged model (mean over the three source domains of
arm − SFT-only, nats/byte, with its t-interval over the units), its paired difference to the FuseChat projection on
the same units, the gap closed, the share of word-start response rows that receive a teacher signal (projected or
chunk), and the cost: a target's training step time and the align stage's time, relative to the FuseChat projection.

Usage: .venv/bin/python bench/knowledge_ablation.py [NAME=VARIANT ...] (VARIANT: a demo_seeds result name; `demo`
is the unnamed run). The first is the reference row.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fuse.stats import seed_summary

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
WORK = REPO / "runs" / "demo-seeds"
SOURCES = ("llama", "gpt2", "gemma")
DEFAULT = {
    "FuseChat projection (one_to_one)": "demo",
    "sound + chunk likelihood": "chunk",
    "sound + chunk + completion": "chunk-complete",
    "sound + chunk, pivot fallback": "chunk-pivot",
    "sound + chunk + candidate scoring": "scored",
}


def result_of(variant: str) -> dict[str, Any]:
    stem = "demo_seeds" + ("" if variant == "demo" else f"-{variant}")
    return json.loads((RESULTS / f"{stem}.json").read_text())


def runs_of(variant: str, result: dict[str, Any]) -> list[Path]:
    return [WORK / variant / f"zoo-{u['zoo_seed']}" / f"seed-{u['train_seed']}" for u in result["units"]]


def word_start_share(run: Path, source: str) -> float:
    """Share of word-start response rows with a source signal, from the align report; an align report older
    than that count is recounted from the run's extract stores under its settings."""
    report = json.loads((run / f"align.{source}" / "out" / "report.json").read_text())
    shares = report.get("word_start_signal_shares") or recount(run, source)
    return sum(shares.get(k, 0.0) for k in ("projected", "chunk", "scored"))


@functools.cache
def recount(run: Path, source: str) -> dict[str, float]:
    """The word-start shares of a run's align, recounted from its extract stores with the stage's own code (used
    for the runs from before the align report counted word starts, which scored no candidates)."""
    from fuse.alignment.project import completion_matrix, project
    from fuse.data.logprobs import LogprobReader
    from fuse.models import load_tokenizer
    from fuse.recipe import load_recipe
    from fuse.stages.align import Tally, align_sample, project_options, read_corpus, steps_of

    recipe = load_recipe(run / "recipe.resolved.yaml")
    settings = recipe.stages.align
    written = yaml.safe_load((run / "recipe.resolved.yaml").read_text())["stages"]["align"]
    chunk = written.get("chunk", False)  # a run from before the chunk objective existed had none
    options = project_options(settings.model_copy(update={"chunk": chunk}))
    pivot_store = LogprobReader(run / "extract.pivot" / "out")
    source_store = LogprobReader(run / f"extract.{source}" / "out")
    tokenizers = (load_tokenizer(recipe.model(name)) for name in ("pivot", source))
    corpus, needed = read_corpus(settings, pivot_store, source_store, *tokenizers)
    completion = completion_matrix(corpus.counts) if options.complete else None
    tally = Tally(corpus.vocabs[0])
    for pivot in pivot_store:
        found = source_store.get(pivot.id) if pivot.id in source_store else None
        content = align_sample(pivot, found, corpus.vocabs, settings.method, corpus.end_of_turn)
        steps = steps_of(pivot, pivot_store.top_k), steps_of(found, source_store.top_k)
        projection = project(
            content.alignment, *steps, corpus.vocab_map.target, pivot_store.vocab_size, options, completion
        )
        tally.add(pivot, found, projection, content.regions)
    return tally.report(corpus.vocab_map, needed)["word_start_signal_shares"]


def step_seconds(run: Path, source: str) -> float:
    training = json.loads((run / f"distill.{source}" / "logs" / "summary.json").read_text())
    return training["train_runtime"] / training["global_step"]


def align_seconds(run: Path, source: str) -> float | None:
    """The align stage's time in the run that computed it (None in the runs that took it from the cache)."""
    return json.loads((run / f"align.{source}" / "manifest.json").read_text()).get("elapsed_s")


def row(variant: str, reference: dict[str, Any] | None) -> dict[str, Any]:
    result = result_of(variant)
    runs = runs_of(variant, result)
    units = {(u["zoo_seed"], u["train_seed"]): u for u in result["units"]}
    written = yaml.safe_load((runs[0] / "recipe.resolved.yaml").read_text())["stages"]["align"]
    out: dict[str, Any] = {"variant": variant, "align": written, "units": len(units)}
    for arm in ("targets", "merge"):
        out[arm] = seed_summary([u[arm]["primary"] for u in units.values()]).__dict__
        out[f"{arm}_gap_closed"] = seed_summary([u[arm]["gap_closed"] for u in units.values()]).__dict__
        if reference is not None:
            ref = {(u["zoo_seed"], u["train_seed"]): u for u in reference["units"]}
            paired = [units[k][arm]["primary"] - ref[k][arm]["primary"] for k in units if k in ref]
            out[f"{arm}_vs_reference"] = seed_summary(paired).__dict__
    out["per_domain"] = {
        d: seed_summary([u["targets"]["per_domain"][d] for u in units.values()]).__dict__
        for d in next(iter(units.values()))["targets"]["per_domain"]
    }
    out["word_start_signal"] = {s: float(np.mean([word_start_share(r, s) for r in runs])) for s in SOURCES}
    out["step_s"] = float(np.mean([step_seconds(r, s) for r in runs for s in SOURCES]))
    timed = [align_seconds(r, s) for r in runs for s in SOURCES]
    out["align_s"] = float(np.mean([t for t in timed if t is not None]))
    return out


def fmt(s: dict[str, float]) -> str:
    return f"{s['mean']:+.3f} [{s['low']:+.3f}, {s['high']:+.3f}]"


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    names = list(rows)
    base = rows[names[0]]
    lines = [
        "# Knowledge across vocabularies: the align objectives on the demo bench",
        "",
        f"Each row: bench/demo_seeds.py over the same {base['units']} units (3 worlds × 3 training seeds), mean "
        "[95% t-interval over the units]. Primary metric: mean over the three source domains of arm − SFT-only, "
        f"nats/byte (negative is better). Δ: the paired difference to the first row on the same units. Word "
        "starts with a signal: share of word-start response rows that receive the source (projected, chunk or scored), "
        "llama / gpt2 / gemma. Cost: a target's training step and the align stage, relative to the first row.",
        "",
        "| objective | targets | Δ targets | gap closed | merge | Δ merge | word starts with a signal | step | align |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        delta = {
            arm: fmt(r[f"{arm}_vs_reference"]) if f"{arm}_vs_reference" in r else "—"
            for arm in ("targets", "merge")
        }
        starts = " / ".join(f"{v:.2f}" for v in r["word_start_signal"].values())
        lines.append(
            f"| {name} | {fmt(r['targets'])} | {delta['targets']} | {r['targets_gap_closed']['mean']:+.1%} | "
            f"{fmt(r['merge'])} | {delta['merge']} | {starts} | {r['step_s'] / base['step_s']:.2f}× | "
            f"{r['align_s'] / base['align_s']:.2f}× |"
        )
    lines += [
        "",
        "Per source domain (target − SFT-only):",
        "",
        "| objective | " + " | ".join(base["per_domain"]) + " |",
    ]
    lines.append("|---" * (len(base["per_domain"]) + 1) + "|")
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(s) for s in r["per_domain"].values()) + " |")
    lines += [
        "",
        "The align settings of each row, as its runs resolved them (the rest: examples/tiny-demo.yaml):",
        "",
    ]
    lines += [f"- {name}: `{json.dumps(r['align'])}`" for name, r in rows.items()]
    lines += [
        "",
        "The distillation step is the same computation for every row (sparse targets of the same width); its "
        "measured ratio moves with whatever else ran on the 2 cores at the time. What differs is align's cost.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    pairs = dict(arg.split("=", 1) for arg in sys.argv[1:]) or DEFAULT
    rows: dict[str, dict[str, Any]] = {}
    reference = None
    for name, variant in pairs.items():
        rows[name] = row(variant, reference)
        reference = reference or result_of(variant)
    (RESULTS / "knowledge_ablation.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / "knowledge_ablation.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
