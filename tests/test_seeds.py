"""Seeds as an axis: `fuse run --seeds` trains every arm once per seed, each seed in its own run store, and
shares every seed-independent instance through the cache."""

from __future__ import annotations

import pytest

from fuse.cli import main
from fuse.recipe import RecipeError, load_recipe
from fuse.seeds import parse_seeds, seed_recipes, seed_workdir

from recipes import toy_recipe, write_recipe
from toy_stages import read_calls

pytestmark = pytest.mark.usefixtures("toy_stage_modules")
SEED_FREE = ("prepare", "extract.", "align.", "score.pivot", "score.a", "score.b")


def test_seeds_parse_and_bad_lists_are_named():
    assert parse_seeds("1,2,3") == [1, 2, 3] and parse_seeds("4-6, 9") == [4, 5, 6, 9]
    for bad in ("1,1", "a", ""):
        with pytest.raises(RecipeError, match="--seeds"):
            parse_seeds(bad)


def test_each_seed_gets_its_own_store_and_the_training_seed(tmp_path):
    path = write_recipe(tmp_path, toy_recipe(tmp_path, seeds=[1, 2]), "toy.yaml")
    base = load_recipe(path)
    recipes = dict(seed_recipes(path, [], base))
    assert list(recipes) == [1, 2]
    for seed, recipe in recipes.items():
        assert recipe.workdir == str(seed_workdir(base.workdir, seed)) and recipe.seeds == []
        assert recipe.stages.distill.seed == recipe.stages.fpo.seed == seed
        assert recipe.cache == str(tmp_path / "run" / "cache")  # none in the recipe: one beside the seeds
    recipe = toy_recipe(tmp_path, stages={"distill": {"validation": True}})
    with pytest.raises(RecipeError, match="set data.heldout_fraction > 0"):
        load_recipe(
            write_recipe(tmp_path, recipe | {"data": recipe["data"] | {"heldout_fraction": 0}}, "v.yaml")
        )
    with pytest.raises(RecipeError, match="seeds repeat"):
        load_recipe(write_recipe(tmp_path, toy_recipe(tmp_path, seeds=[1, 1]), "bad.yaml"))


def test_a_second_seed_reruns_only_what_the_seed_feeds(tmp_path, capsys):
    recipe = toy_recipe(tmp_path)
    recipe["stages"] = {**recipe["stages"], "evaluate": {"enabled": False}, "publish": {"enabled": False}}
    path = write_recipe(tmp_path, recipe, "toy.yaml")
    assert main(["run", str(path), "--seeds", "1,2"]) == 0
    first, second = (read_calls(seed_workdir(tmp_path / "run", s)) for s in (1, 2))
    assert any(c.startswith("extract.") for c in first)
    assert not any(c.startswith(SEED_FREE) for c in second), second  # linked from the cache
    trained = {c for c in second if c.startswith(("distill.", "fpo."))}
    assert trained == {"distill.a", "distill.b", "fpo.a", "fpo.b"} and "merge" in second
    assert "finished 2 seeds" in capsys.readouterr().out


def test_submit_refuses_seeds_it_cannot_fan_out(tmp_path, capsys):
    path = write_recipe(tmp_path, toy_recipe(tmp_path, seeds=[1, 2]), "toy.yaml")
    assert main(["submit", str(path), "--dry-run"]) != 0
    assert "fuse submit does not fan a recipe out over seeds" in capsys.readouterr().err
