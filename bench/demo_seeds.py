"""The tiny demo measured like a paper: zoo seeds × training seeds, every arm and control, paired differences to
SFT-only with their uncertainty. Writes bench/results/demo_seeds[-NAME].json and .md.

Each zoo seed is a world (its own chains, skills and models: `fuse zoo build --seed`); each world runs the demo
recipe with `fuse run --seeds` (one run store per training seed, the seed-independent instances shared through the
cache). fpo is off here: the arms are what is measured (the preference stage has its own issue).

The primary metric, stated before any number was measured: the mean over the three source domains (weather:
llama, market: gpt2, garden: gemma) of CE(target of that domain's source) − CE(SFT-only), nats per byte of the
held-out responses; negative is better. A control (or the fused model) is one model for all three domains.
Usage: .venv/bin/python bench/demo_seeds.py [--zoo-seeds 0,1,2] [--train-seeds 1,2,3] [--set KEY=VALUE …] [--name N]
(a variant: e.g. --name new-phrasing --set 'stages.evaluate.domains={zoo}/data/domains_new_phrasing.jsonl'; its run
stores link every instance the change does not feed from the shared cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from fuse.item_scores import FILE, Column, column_value, read_scores
from fuse.stats import seed_summary

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
DEMO = REPO / "examples" / "tiny-demo.yaml"
SFT = "distill.sft_baseline"
CONTROLS = ("distill.self_distill", "distill.label_smoothing", "distill.oracle", "merge", "distill.joint")


def zoo_root(seed: int) -> Path:
    """The demo's own zoo for seed 0 (what `make demo` builds), a sibling folder for the other worlds."""
    return REPO / (".zoo" if seed == 0 else f".zoo-seed{seed}")


def build_zoo(seed: int) -> float:
    started = time.monotonic()
    command = [sys.executable, "-m", "fuse.zoo", "build", str(zoo_root(seed)), "--seed", str(seed)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return time.monotonic() - started


def recipe_for(seed: int, work: Path) -> Path:
    """The demo recipe over the world of `seed`, its own workdir and a cache shared by every training seed and every
    variant (a variant retrains only what its change feeds), fpo off."""
    text = DEMO.read_text(encoding="utf-8").replace("../.zoo/", f"{zoo_root(seed)}/")
    recipe = yaml.safe_load(text)
    recipe |= {
        "name": f"demo-zoo{seed}",
        "workdir": str(work / f"zoo-{seed}"),
        "cache": str(work.parent / "cache"),
    }
    recipe["stages"]["fpo"] = {"enabled": False}
    path = work / f"zoo-{seed}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run_world(seed: int, train_seeds: list[int], work: Path, changes: list[str]) -> float:
    started = time.monotonic()
    recipe = recipe_for(seed, work)
    command = [
        sys.executable,
        "-m",
        "fuse.cli",
        "run",
        str(recipe),
        "--seeds",
        ",".join(map(str, train_seeds)),
    ]
    for change in changes:  # "{zoo}" in a value: this world's zoo folder
        command += ["--set", change.replace("{zoo}", str(zoo_root(seed)))]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"zoo seed {seed}: fuse run failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return time.monotonic() - started


# --------------------------------------------------------------------------------------------- measuring


def domain_ce(frame: Any, model: str, domain: str) -> float:
    value = column_value(frame, model, Column("domain", domain, "nll"))
    if value is None:
        raise KeyError(f"no held-out scores of {model} on {domain}")
    return value


def unit_numbers(frame: Any, owners: dict[str, str]) -> dict[str, Any]:
    """One (world, training seed): per arm, its difference to SFT-only on each source domain and their mean (the
    primary metric), and the share of the SFT-only → source gap it closes (ratio of the means)."""
    domains = [d for d, owner in owners.items() if owner != "pivot"]
    sft = {d: domain_ce(frame, SFT, d) for d in domains}
    source = {d: domain_ce(frame, owners[d], d) for d in domains}
    arms = {"targets": {d: f"distill.{owners[d]}" for d in domains}}
    arms |= {name: dict.fromkeys(domains, name) for name in CONTROLS if name in set(frame["model"])}
    numbers: dict[str, Any] = {}
    for arm, model_of in arms.items():
        diff = {d: domain_ce(frame, model_of[d], d) - sft[d] for d in domains}
        primary = sum(diff.values()) / len(diff)
        gap = sum(source[d] - sft[d] for d in domains) / len(domains)
        numbers[arm] = {"per_domain": diff, "primary": primary, "gap_closed": primary / gap}
    pivot_domain = next(d for d, owner in owners.items() if owner == "pivot")
    numbers["pivot_domain"] = {
        arm: domain_ce(frame, f"distill.{owners[d]}", pivot_domain) - domain_ce(frame, SFT, pivot_domain)
        for d, arm in ((d, f"distill.{owners[d]}") for d in domains)
    }
    return numbers


def summarize(units: list[dict[str, Any]]) -> dict[str, Any]:
    """Across the units: mean, SD, SE and 95% t-interval of each arm's primary metric and per-domain differences."""
    arms = [a for a in units[0] if a != "pivot_domain"]
    out: dict[str, Any] = {}
    for arm in arms:
        primary = seed_summary([u[arm]["primary"] for u in units])
        gap = seed_summary([u[arm]["gap_closed"] for u in units])
        domains = {
            d: seed_summary([u[arm]["per_domain"][d] for u in units]).__dict__
            | {"wins": sum(u[arm]["per_domain"][d] < 0 for u in units)}
            for d in units[0][arm]["per_domain"]
        }
        out[arm] = {
            "primary": primary.__dict__,
            "gap_closed": gap.__dict__,
            "per_domain": domains,
            "wins": sum(u[arm]["primary"] < 0 for u in units),
        }
        if arm != "targets":  # paired with the targets on the same units: what one model keeps of their gains
            paired = [u[arm]["primary"] - u["targets"]["primary"] for u in units]
            out[arm]["minus_targets"] = seed_summary(paired).__dict__ | {"wins": sum(d < 0 for d in paired)}
    out["pivot_domain"] = {
        m: seed_summary([u["pivot_domain"][m] for u in units]).__dict__ for m in units[0]["pivot_domain"]
    }
    return out


def fmt(s: dict[str, float], digits: int = 3) -> str:
    return f"{s['mean']:+.{digits}f} ± {s['sd']:.{digits}f} [{s['low']:+.{digits}f}, {s['high']:+.{digits}f}]"


def markdown(result: dict[str, Any]) -> str:
    summary, n = result["summary"], len(result["units"])
    lines = [
        f"# The tiny demo over {len(result['zoo_seeds'])} worlds × {len(result['train_seeds'])} training seeds",
        "",
        f"{n} units (zoo seed × training seed); each number is mean ± SD over the units [95% t-interval, "
        f"{n - 1} df]; 'wins' counts the units where the arm is below SFT-only. Primary metric: mean over the "
        "three source domains of CE(arm) − CE(SFT-only), nats/byte (negative: better than SFT-only; for "
        "'targets' each domain's own source's target). Gap closed: the primary metric over the mean "
        "(source − SFT-only) on those domains (1 = as good as the sources).",
        "",
        "| arm | primary metric | SE | wins | gap closed |",
        "|---|---|---|---|---|",
    ]
    for arm in (a for a in summary if a != "pivot_domain"):
        s = summary[arm]
        lines.append(
            f"| {arm} | {fmt(s['primary'])} | {s['primary']['se']:.4f} | {s['wins']}/{n} | "
            f"{s['gap_closed']['mean']:+.1%} ± {s['gap_closed']['sd']:.1%} |"
        )
    lines += [
        "",
        "Each arm paired with the targets on the same units (arm − targets, primary metric; a one-model arm near 0 "
        "keeps the targets' gains in one model):",
        "",
    ]
    lines += [
        f"- {arm}: {fmt(s['minus_targets'])} ({s['minus_targets']['wins']}/{n} below the targets)"
        for arm, s in summary.items()
        if "minus_targets" in s
    ]
    domains = list(summary["targets"]["per_domain"])
    lines += ["", "Per source domain (arm − SFT-only):", "", "| arm | " + " | ".join(domains) + " |"]
    lines.append("|---" * (len(domains) + 1) + "|")
    for arm in (a for a in summary if a != "pivot_domain"):
        cells = [
            f"{fmt(summary[arm]['per_domain'][d])} ({summary[arm]['per_domain'][d]['wins']}/{n})"
            for d in domains
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Each target on the pivot's own domain (target − SFT-only):", ""]
    lines += [f"- {m}: {fmt(s)}" for m, s in summary["pivot_domain"].items()]
    timing = result["seconds"]
    lines += [
        "",
        f"Time: {timing['total']:.0f} s in all on {result['cpus']} CPU cores — zoo builds "
        + ", ".join(f"seed {z}: {s:.0f} s" for z, s in timing["zoo_builds"].items())
        + "; runs "
        + ", ".join(f"world {z}: {s:.0f} s" for z, s in timing["runs"].items())
        + ".",
        f"Settings changed from examples/tiny-demo.yaml: {result['changes'] or 'none'} (and fpo off).",
        f"Machine: {result['machine']}.",
    ]
    return "\n".join(lines) + "\n"


def measure(work: Path, zoo_seeds: list[int], train_seeds: list[int]) -> list[dict[str, Any]]:
    from fuse.zoo import Zoo

    units = []
    for z in zoo_seeds:
        owners = Zoo.from_dir(zoo_root(z)).domains
        for t in train_seeds:
            frame = read_scores(work / f"zoo-{z}" / f"seed-{t}" / "evaluate" / "out" / FILE)
            units.append({"zoo_seed": z, "train_seed": t, **unit_numbers(frame, owners)})
    return units


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo-seeds", default="0,1,2")
    parser.add_argument("--train-seeds", default="1,2,3")
    parser.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default="", help="a variant's name: results in demo_seeds-NAME.*")
    parser.add_argument("--work", default=str(REPO / "runs" / "demo-seeds"))
    parser.add_argument(
        "--measure-only",
        action="store_true",
        help="build and run nothing: measure the finished run stores again (times from the last results file)",
    )
    args = parser.parse_args()
    zoo_seeds = [int(s) for s in args.zoo_seeds.split(",")]
    train_seeds = [int(s) for s in args.train_seeds.split(",")]
    work = Path(args.work).resolve() / (args.name or "demo")
    work.mkdir(parents=True, exist_ok=True)

    stem = "demo_seeds" + (f"-{args.name}" if args.name else "")
    started = time.monotonic()
    seconds: dict[str, Any] = {"zoo_builds": {}, "runs": {}}
    if args.measure_only:
        seconds = json.loads((RESULTS / f"{stem}.json").read_text())["seconds"]
    for z in zoo_seeds if not args.measure_only else []:
        seconds["zoo_builds"][z] = build_zoo(z)
        print(f"zoo seed {z}: built in {seconds['zoo_builds'][z]:.0f} s", flush=True)
        seconds["runs"][z] = run_world(z, train_seeds, work, args.changes)
        print(f"zoo seed {z}: {len(train_seeds)} training seeds in {seconds['runs'][z]:.0f} s", flush=True)
    if not args.measure_only:
        seconds["total"] = time.monotonic() - started
    units = measure(work, zoo_seeds, train_seeds)
    numbers = [{k: v for k, v in u.items() if k not in ("zoo_seed", "train_seed")} for u in units]
    result = {
        "zoo_seeds": zoo_seeds,
        "train_seeds": train_seeds,
        "changes": args.changes,
        "units": units,
        "summary": summarize(numbers),
        "seconds": seconds,
        "cpus": os.cpu_count(),
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}",
    }
    write_results(stem, result, markdown(result))


def write_results(stem: str, result: dict[str, Any], text: str) -> None:
    """bench/results/<stem>.json and .md, and the table on stdout."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
