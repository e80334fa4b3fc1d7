"""Per-item scores (evaluate's scores.parquet) and what is computed from them: the significantly best model of
each column, paired differences with CIs, and runs pooled over seeds (`fuse compare`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fuse.cli import main
from fuse.compare import best_models, differences
from fuse.item_scores import FILE, column_value, columns_of, read_scores, scores_table, write_scores

from recipes import toy_recipe, write_recipe

DOMAINS = ["d1"] * 40 + ["d2"] * 40
SKILLS = ["capital"] * 30


def per_item(seed: int, gain: float = 0.0, noise: float = 0.05) -> dict:
    """A model's scores: response NLLs of two domains (`gain` lower on d1 only) and a skill's exact matches."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(99).uniform(20, 40, len(DOMAINS))  # the items' difficulty, shared by models
    nll = base * (1 + rng.normal(0, noise, len(DOMAINS)))
    nll[:40] *= 1 - gain
    return {
        "domain": {"nll": nll.tolist(), "bytes": [50] * len(DOMAINS)},
        "skill": rng.integers(0, 2, len(SKILLS)).tolist(),
    }


def finished_run(tmp_path, name: str, models: dict[str, dict]) -> None:
    """A run directory as evaluate leaves it: recipe.resolved.yaml, metrics.json and scores.parquet."""
    out = tmp_path / name / "evaluate" / "out"
    out.mkdir(parents=True)
    table = scores_table({m: {"items": s} for m, s in models.items()}, SKILLS, DOMAINS, "items")
    write_scores(out / FILE, table)
    frame = read_scores(out / FILE)
    metrics = {"skills": ["capital"], "domains": ["d1", "d2"], "models": {}}
    for model in models:
        values = {c.label: column_value(frame, model, c) for c in columns_of(frame)}
        metrics["models"][model] = {
            "skills": {"capital": values["capital"]},
            "mean_accuracy": values["capital"],
            "domain_ce": {"d1": values["CE d1"], "d2": values["CE d2"]},
            "mean_domain_ce": (values["CE d1"] + values["CE d2"]) / 2,
        }
    (out / "metrics.json").write_text(json.dumps(metrics))
    recipe = toy_recipe(tmp_path, name=name, workdir=str(tmp_path / name))
    write_recipe(tmp_path, recipe, f"{name}.yaml")
    (tmp_path / name / "recipe.resolved.yaml").write_text((tmp_path / f"{name}.yaml").read_text())


def models_of(seed: int) -> dict[str, dict]:
    return {
        "pivot": per_item(seed, noise=0.08),
        "distill.sft_baseline": per_item(seed + 1),
        "distill.a": per_item(seed + 2, gain=0.05),
    }


def test_the_table_reproduces_every_aggregate_from_the_items(tmp_path):
    finished_run(tmp_path, "run", models_of(0))
    frame = read_scores(tmp_path / "run" / "evaluate" / "out" / FILE)
    assert set(frame.columns) == {"model", "kind", "group", "item", "metric", "value", "bytes"}
    scores = models_of(0)["distill.a"]
    nll, size = np.array(scores["domain"]["nll"]), np.array(scores["domain"]["bytes"])
    d1 = next(c for c in columns_of(frame) if c.label == "CE d1")
    assert column_value(frame, "distill.a", d1) == pytest.approx(nll[:40].sum() / size[:40].sum())
    skill = next(c for c in columns_of(frame) if c.label == "capital")
    assert column_value(frame, "pivot", skill) == pytest.approx(np.mean(models_of(0)["pivot"]["skill"]))


def test_only_a_significant_lead_is_bold_and_differences_carry_their_ci(tmp_path):
    finished_run(tmp_path, "run", models_of(0))
    frame = read_scores(tmp_path / "run" / "evaluate" / "out" / FILE)
    names = list(models_of(0))
    best = best_models(frame, names, resamples=4000)
    # distill.a is 5% lower on every d1 item: significant; on d2 and the coin-flip skill nobody is
    assert best == {"CE d1": "distill.a", "CE d2": None, "capital": None}
    found = differences(frame, names, "distill.sft_baseline", resamples=4000)
    d1, adjusted = found[("distill.a", "CE d1")]
    assert d1.estimate < 0 and d1.high < 0 and adjusted < 0.05
    assert d1.low < d1.estimate < d1.high
    d2, adjusted = found[("distill.a", "CE d2")]
    assert d2.low < 0 < d2.high and adjusted > 0.05


def test_fuse_compare_bolds_what_is_significant_and_pools_seeds(tmp_path, capsys):
    for seed in (0, 1, 2):
        finished_run(tmp_path, f"seed-{seed}", models_of(10 * seed))
    runs = [str(tmp_path / f"seed-{seed}") for seed in (0, 1, 2)]
    assert main(["compare", runs[0], "--baseline", "distill.sft_baseline"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| seed-0/distill.a |"))
    assert row.count("**") == 2  # bold on d1 only
    paired = next(
        line for line in out.splitlines() if line.startswith("| seed-0/distill.a |") and "[" in line
    )
    assert paired.split("|")[3].strip().endswith("†")  # CE d1 (columns: capital, CE d1, CE d2)
    assert main(["compare", "--seeds", *runs]) == 0
    pooled = capsys.readouterr().out
    assert "Over 3 seeds" in pooled and "Paired differences to **distill.sft_baseline**" in pooled
    row = next(line for line in pooled.splitlines() if line.startswith("| distill.a |") and "[" in line)
    assert row.split("|")[3].strip().endswith("†") and not row.split("|")[4].strip().endswith("†")
    assert main(["compare", "--seeds", runs[0]]) != 0
    assert "at least two runs" in capsys.readouterr().err
