"""Preference optimization measured like a paper: InfiFPO on every target of the tiny demo, beside its DPO control,
over zoo seeds × training seeds, each arm paired with its input target on the same held-out preference pairs.
Writes bench/results/fpo_seeds[-NAME].json and .md.

The held-out pairs (the zoo's data/preference_heldout.jsonl) are every training pair's question asked in the
phrasing no training row uses, with the same right and wrong answer; evaluate scores each model's preference as
l(y_w)/b(y_w) > l(y_l)/b(y_l) (log-prob per UTF-8 byte, the model's own chat template). A fact table's keys do not
generalize to other keys, so pairs over unseen keys (prepare's held-out split, 14 pairs) cannot show what
preference training teaches; a new phrasing of a trained question can.

Metrics, stated before any number was measured, per unit (world × training seed), each a mean over the three
targets (fpo.<s> against distill.<s>, its input):
- preference: held-out preference accuracy of the arm − that of its input target (fpo and the dpo control);
- fpo − dpo: InfiFPO's accuracy − the DPO control's (InfiFPO's claim: a fused reference beats a self reference);
- CE: (domain CE of the arm on its source's domain) / (that of its input target) − 1 (the goal: within 1%).
Also: per skill, the same differences; how often the fused reference was taken from the skill's owner (the source
that knows it), for the own-margin rule fpo uses and, recomputed from the score tables, for the clipped-margin rule
it replaced; and seconds per optimizer step of fpo against distill (the same batch of 16 sequences).

Usage: .venv/bin/python bench/fpo_seeds.py [--zoo-seeds 0,1,2] [--train-seeds 1,2,3] [--set KEY=VALUE …] [--name N]
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

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from demo_seeds import DEMO, build_zoo, fmt, write_results, zoo_root  # noqa: E402

from fuse.item_scores import FILE, Column, column_value, read_scores  # noqa: E402
from fuse.stats import seed_summary  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def recipe_for(seed: int, work: Path) -> Path:
    """The demo recipe (fpo and its dpo control on) over the world of `seed`, sharing demo_seeds' cache."""
    text = DEMO.read_text(encoding="utf-8").replace("../.zoo/", f"{zoo_root(seed)}/")
    recipe = yaml.safe_load(text)
    recipe |= {
        "name": f"fpo-zoo{seed}",
        "workdir": str(work / f"zoo-{seed}"),
        "cache": str(work.parent / "cache"),
    }
    recipe["stages"]["fpo"].setdefault("controls", ["dpo"])
    path = work / f"zoo-{seed}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def ensure_zoo(seed: int) -> None:
    """Build the world's zoo where there is none; a zoo built by earlier code only gets the held-out preference
    file (its models and other files do not depend on it: the zoo's build is deterministic, a rebuild gives the
    same bytes, only slower)."""
    from fuse.zoo import MARKER, PREFERENCE_HELDOUT, write_heldout_preference

    root = zoo_root(seed)
    if not (root / MARKER).is_file():
        build_zoo(seed)
    elif not (root / PREFERENCE_HELDOUT).is_file():
        write_heldout_preference(root)


def run_world(seed: int, train_seeds: list[int], work: Path, changes: list[str]) -> float:
    started = time.monotonic()
    command = [sys.executable, "-m", "fuse.cli", "run", str(recipe_for(seed, work))]
    command += ["--seeds", ",".join(map(str, train_seeds))]
    for change in changes:
        command += ["--set", change.replace("{zoo}", str(zoo_root(seed)))]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"zoo seed {seed}: fuse run failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return time.monotonic() - started


# --------------------------------------------------------------------------------------------- measuring


def preference(frame: Any, model: str, skill: str | None = None) -> float:
    """The share of held-out pairs (of one skill, or all) the model prefers the right answer of."""
    rows = frame[(frame["model"] == model) & (frame["kind"] == "preference") & (frame["metric"] == "correct")]
    if skill is not None:
        rows = rows[rows["group"] == skill]
    if rows.empty:
        raise KeyError(f"no held-out preference scores of {model}")
    return float(rows["value"].mean())


def domain_ce(frame: Any, model: str, domain: str) -> float:
    value = column_value(frame, model, Column("domain", domain, "nll"))
    if value is None:
        raise KeyError(f"no held-out scores of {model} on {domain}")
    return value


def unit_numbers(frame: Any, domains: dict[str, str], skills: list[str]) -> dict[str, Any]:
    """One unit's metrics (module docstring); `domains`: domain -> owner, the sources' domains only."""
    targets = {owner: domain for domain, owner in domains.items()}
    arms = {"fpo": "fpo.{}", "dpo": "fpo.dpo-{}"}
    numbers: dict[str, Any] = {}
    for arm, name in arms.items():
        pref = {s: preference(frame, name.format(s)) - preference(frame, f"distill.{s}") for s in targets}
        ce = {
            s: domain_ce(frame, name.format(s), d) / domain_ce(frame, f"distill.{s}", d) - 1
            for s, d in targets.items()
        }
        per_skill = {
            k: float(
                np.mean(
                    [
                        preference(frame, name.format(s), k) - preference(frame, f"distill.{s}", k)
                        for s in targets
                    ]
                )
            )
            for k in skills
        }
        numbers[arm] = {"preference": float(np.mean(list(pref.values()))), "per_target": pref, "ce": ce}
        numbers[arm]["ce_mean"] = float(np.mean(list(ce.values())))
        numbers[arm]["per_skill"] = per_skill
    numbers["fpo_vs_dpo"] = {
        "preference": numbers["fpo"]["preference"] - numbers["dpo"]["preference"],
        "per_skill": {k: numbers["fpo"]["per_skill"][k] - numbers["dpo"]["per_skill"][k] for k in skills},
    }
    numbers["targets"] = {s: preference(frame, f"distill.{s}") for s in targets}
    return numbers


def pair_skills(store: Path, zoo: Path) -> dict[str, str]:
    """prepare's pair id -> its zoo skill, matched on (prompt, chosen, rejected) with the zoo's preference file."""
    from datasets import load_from_disk

    skill_of = {}
    for line in (zoo / "data" / "preference.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        skill_of[(row["prompt"][0]["content"], row["chosen"], row["rejected"])] = row["id"].rsplit("-", 1)[0]
    prepared = load_from_disk(str(store / "prepare" / "out" / "preference" / "train"))
    return {r["id"]: skill_of[(r["prompt"][0]["content"], r["chosen"], r["rejected"])] for r in prepared}


def picks(store: Path, zoo: Path, owners: dict[str, str]) -> dict[str, Any]:
    """How often each fpo.<s>'s reference came from the skill's owner (source-owned skills only), for the own-margin
    rule (what fpo trained with) and the clipped-margin rule (recomputed from the same score tables)."""
    from datasets import load_from_disk

    from fuse.data.scores import read_scores as read_score_table
    from fuse.preference import clip_to_pivot, join_scores, normalized_scores

    skill_of = pair_skills(store, zoo)
    out: dict[str, Any] = {}
    for target in ("llama", "gpt2", "gemma"):
        summary = json.loads((store / f"fpo.{target}" / "out" / "summary.json").read_text())
        sources, norm = summary["sources"], summary["normalization"]
        rows = load_from_disk(str(store / f"fpo.{target}" / "data" / "train"))
        ids, picked = list(rows["id"]), np.asarray(rows["picked"])
        pivot = normalized_scores(
            join_scores(read_score_table(store / f"score.target-{target}" / "out", "p"), ids, "p"), norm
        )
        own = [
            normalized_scores(join_scores(read_score_table(store / f"score.{k}" / "out", k), ids, k), norm)
            for k in sources
        ]
        clipped = [clip_to_pivot(s, pivot).scores.margin for s in own]
        old = np.argmax(np.stack(clipped), axis=0)
        owned = [
            (i, sources.index(owners[skill_of[p]]))
            for i, p in enumerate(ids)
            if owners[skill_of[p]] in sources
        ]
        index, owner = (np.array(x) for x in zip(*owned, strict=True))
        out[target] = {
            "pairs": len(index),
            "own_margin": float(np.mean(picked[index] == owner)),
            "clipped_margin": float(np.mean(old[index] == owner)),
        }
    return out


def step_seconds(store: Path) -> dict[str, float]:
    """Seconds per optimizer step (train_runtime / global_step, the Trainer's own numbers) of fpo and distill."""
    out = {}
    for stage in ("fpo", "distill"):
        rates = []
        for target in ("llama", "gpt2", "gemma"):  # the whole training summary, timings included, is in logs/
            path = store / f"{stage}.{target}" / "logs" / "summary.json"
            if not path.is_file():  # restored from the shared cache: it did not train in this run
                continue
            training = json.loads(path.read_text())
            if training.get("resumed_from") is None and training.get("global_step"):
                rates.append(training["train_runtime"] / training["global_step"])
        out[stage] = float(np.mean(rates)) if rates else float("nan")
    return out


def measure(work: Path, zoo_seeds: list[int], train_seeds: list[int]) -> list[dict[str, Any]]:
    from fuse.zoo import Zoo

    units = []
    for z in zoo_seeds:
        zoo = Zoo.from_dir(zoo_root(z))
        domains = {d: o for d, o in zoo.domains.items() if o != "pivot"}
        skills = sorted(zoo.skills)
        for t in train_seeds:
            store = work / f"zoo-{z}" / f"seed-{t}"
            frame = read_scores(store / "evaluate" / "out" / FILE)
            unit = {"zoo_seed": z, "train_seed": t, **unit_numbers(frame, domains, skills)}
            unit["picks"] = picks(store, zoo.root, zoo.skills)
            unit["step_seconds"] = step_seconds(store)
            units.append(unit)
    return units


def summarize(units: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm in ("fpo", "dpo"):
        out[arm] = {
            "preference": seed_summary([u[arm]["preference"] for u in units]).__dict__,
            "wins": sum(u[arm]["preference"] > 0 for u in units),
            "ce": seed_summary([u[arm]["ce_mean"] for u in units]).__dict__,
            "per_skill": {
                k: seed_summary([u[arm]["per_skill"][k] for u in units]).__dict__
                for k in units[0][arm]["per_skill"]
            },
        }
    out["fpo_vs_dpo"] = {
        "preference": seed_summary([u["fpo_vs_dpo"]["preference"] for u in units]).__dict__,
        "wins": sum(u["fpo_vs_dpo"]["preference"] > 0 for u in units),
        "per_skill": {
            k: seed_summary([u["fpo_vs_dpo"]["per_skill"][k] for u in units]).__dict__
            for k in units[0]["fpo_vs_dpo"]["per_skill"]
        },
    }
    out["targets"] = seed_summary([float(np.mean(list(u["targets"].values()))) for u in units]).__dict__
    out["picks"] = {
        rule: float(np.mean([p[rule] for u in units for p in u["picks"].values()]))
        for rule in ("own_margin", "clipped_margin")
    }
    ratios = [u["step_seconds"]["fpo"] / u["step_seconds"]["distill"] for u in units]
    out["step_ratio"] = float(np.nanmean(ratios))
    return out


def markdown(result: dict[str, Any]) -> str:
    s, n = result["summary"], len(result["units"])
    skills = list(s["fpo"]["per_skill"])
    lines = [
        f"# Preference optimization over {len(result['zoo_seeds'])} worlds × {len(result['train_seeds'])} training seeds",
        "",
        f"{n} units (zoo seed × training seed); mean ± SD [95% t-interval, {n - 1} df]. Held-out preference "
        "accuracy: the share of held-out pairs (every training pair's question in the phrasing no training row "
        "uses) whose right answer the model finds likelier per byte. Each arm is paired with its input target "
        "(distill.<s>), averaged over the three targets.",
        "",
        f"Input targets' held-out preference accuracy: {s['targets']['mean']:.3f} ± {s['targets']['sd']:.3f}.",
        "",
        "| arm | held-out preference accuracy − input target | wins | domain CE / input target − 1 |",
        "|---|---|---|---|",
    ]
    for arm, label in (("fpo", "InfiFPO (fpo.<s>)"), ("dpo", "DPO control (fpo.dpo-<s>)")):
        lines.append(
            f"| {label} | {fmt(s[arm]['preference'])} | {s[arm]['wins']}/{n} | {fmt(s[arm]['ce'], 4)} |"
        )
    lines.append(
        f"| InfiFPO − DPO | {fmt(s['fpo_vs_dpo']['preference'])} | {s['fpo_vs_dpo']['wins']}/{n} | |"
    )
    lines += ["", "Per skill (held-out preference accuracy, arm − input target; last row InfiFPO − DPO):", ""]
    lines += ["| arm | " + " | ".join(skills) + " |", "|---" * (len(skills) + 1) + "|"]
    for arm in ("fpo", "dpo", "fpo_vs_dpo"):
        lines.append(f"| {arm} | " + " | ".join(fmt(s[arm]["per_skill"][k]) for k in skills) + " |")
    picks = s["picks"]
    lines += [
        "",
        f"Who the fused reference came from, on pairs of a source-owned skill: the skill's owner "
        f"{picks['own_margin']:.1%} of the time with the own-margin rule (fpo), {picks['clipped_margin']:.1%} with "
        "the clipped-margin rule it replaced (recomputed from the same score tables).",
        f"Seconds per optimizer step, fpo / distill (16 sequences each): {s['step_ratio']:.2f}×.",
        "",
        f"Time: {result['seconds']['total']:.0f} s on {result['cpus']} CPU cores. Settings changed from "
        f"examples/tiny-demo.yaml: {result['changes'] or 'none'}. Machine: {result['machine']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo-seeds", default="0,1,2")
    parser.add_argument("--train-seeds", default="1,2,3")
    parser.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default="", help="a variant's name: results in fpo_seeds-NAME.*")
    parser.add_argument("--work", default=str(REPO / "runs" / "demo-seeds"))
    parser.add_argument("--measure-only", action="store_true", help="read the run stores, run nothing")
    args = parser.parse_args()
    zoo_seeds = [int(s) for s in args.zoo_seeds.split(",")]
    train_seeds = [int(s) for s in args.train_seeds.split(",")]
    work = Path(args.work).resolve() / ("fpo" + (f"-{args.name}" if args.name else ""))
    work.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    if not args.measure_only:
        for z in zoo_seeds:
            ensure_zoo(z)
            print(f"zoo seed {z}: {run_world(z, train_seeds, work, args.changes):.0f} s", flush=True)
    units = measure(work, zoo_seeds, train_seeds)
    result = {
        "zoo_seeds": zoo_seeds,
        "train_seeds": train_seeds,
        "changes": args.changes,
        "units": units,
        "summary": summarize(units),
        "seconds": {"total": time.monotonic() - started},
        "cpus": os.cpu_count(),
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}",
    }
    write_results("fpo_seeds" + (f"-{args.name}" if args.name else ""), result, markdown(result))


if __name__ == "__main__":
    main()
