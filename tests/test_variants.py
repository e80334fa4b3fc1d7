"""Variants of a recipe: `extends:` (an ablation is a small file) and `fuse compare` (their tables side by side)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from fuse.cli import main
from fuse.recipe import RecipeError, load_recipe

from recipes import toy_recipe, write_recipe

METRICS = {
    "skills": ["antonym", "capital"],
    "n_items": {"antonym": 4, "capital": 4},
    "n_texts": 2,
    "models": {
        "pivot": {"skills": {"antonym": 0.0, "capital": 1.0}, "mean_accuracy": 0.5, "ce_per_byte": 0.4},
        "merge": {"skills": {"antonym": 0.5, "capital": 1.0}, "mean_accuracy": 0.75, "ce_per_byte": 0.5},
    },
}


def base_and_variant(tmp_path, variant: dict) -> tuple:
    stages = {"extract": {"num_shards": 2}, "merge": {"method": "sce"}}
    base = write_recipe(tmp_path, toy_recipe(tmp_path, stages=stages), "base.yaml")
    (tmp_path / "ablations").mkdir()
    child = tmp_path / "ablations" / "ties.yaml"
    child.write_text(yaml.safe_dump({"extends": "../base.yaml", **variant}), encoding="utf-8")
    return base, child


def test_a_variant_is_its_base_with_a_few_keys_changed(tmp_path):
    base_path, child_path = base_and_variant(
        tmp_path,
        {
            "name": "ties",
            "stages": {"merge": {"method": "ties", "parameters": {"density": 0.5}}, "distill": {"epochs": 2}},
        },
    )
    base, child = load_recipe(base_path), load_recipe(child_path)
    assert child.name == "ties" and child.workdir == str(tmp_path / "ties")  # its own run directory
    assert child.pivot.path == base.pivot.path and child.data.sft.path == base.data.sft.path  # base's folder
    assert child.stages.extract.num_shards == base.stages.extract.num_shards == 2  # kept from the base
    # the merge mapping names another method: taken whole, no sce parameter leaks into ties
    assert child.stages.merge.method == "ties" and child.stages.merge.parameters == {"density": 0.5}
    assert child.stages.distill.epochs == 2 and base.stages.distill.epochs != 2


def test_variant_errors_name_the_problem(tmp_path):
    _, same_name = base_and_variant(tmp_path, {"stages": {"merge": {"method": "ties"}}})
    with pytest.raises(RecipeError, match="give the variant its own `name`"):
        load_recipe(same_name)
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop2.yaml\nname: a\n")
    (tmp_path / "loop2.yaml").write_text("extends: loop.yaml\nname: b\n")
    with pytest.raises(RecipeError, match="a cycle of recipes"):
        load_recipe(loop)
    child = tmp_path / "bad.yaml"
    child.write_text("extends: base.yaml\nname: bad\nstages: {merge: {metod: ties}}\n")
    with pytest.raises(RecipeError, match=r"stages.merge.metod: unknown key"):
        load_recipe(child)


def finished_run(workdir, recipe_path, metrics) -> None:
    (workdir / "evaluate" / "out").mkdir(parents=True)
    (workdir / "evaluate" / "out" / "metrics.json").write_text(json.dumps(metrics))
    (workdir / "recipe.resolved.yaml").write_text(recipe_path.read_text())


def test_compare_puts_runs_side_by_side(tmp_path, capsys):
    base_path, child_path = base_and_variant(tmp_path, {"name": "ties"})
    other = json.loads(json.dumps(METRICS))
    other["models"]["merge"] |= {"skills": {"antonym": 1.0, "capital": 1.0}, "mean_accuracy": 1.0}
    finished_run(tmp_path / "run", base_path, METRICS)
    finished_run(tmp_path / "ties", child_path, other)
    assert main(["compare", str(base_path), str(child_path), "--models", "merge"]) == 0
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:] if line.startswith("| ")}
    assert "no per-item scores in some run" in table  # runs evaluated before scores.parquet: no tests
    assert set(rows) == {"toy/merge", "ties/merge"}
    assert re.search(r"\*\*1\.00\*\*", rows["ties/merge"]) and "**" not in rows["toy/merge"].split("|")[1]
    # a run directory works as well as its recipe; a run without an evaluation is named
    assert main(["compare", str(tmp_path / "run"), str(child_path)]) == 0
    assert "toy/pivot" in capsys.readouterr().out
    (tmp_path / "ties" / "evaluate" / "out" / "metrics.json").unlink()
    assert main(["compare", str(base_path), str(child_path)]) != 0
    assert "no evaluation yet" in capsys.readouterr().err
