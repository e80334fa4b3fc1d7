"""Recipe validation: each kind of bad input gets one clear error naming the YAML key."""

from __future__ import annotations

import copy

import pytest

from fuse.recipe import RecipeError, load_recipe, parse_recipe
from fuse.validate import validate

from recipes import toy_recipe, write_recipe


def _error(tmp_path, mutate) -> str:
    recipe = toy_recipe(tmp_path)
    mutate(recipe)
    with pytest.raises(RecipeError) as info:
        validate(load_recipe(write_recipe(tmp_path, recipe)), files=True, load=False)
    return str(info.value)


def test_valid_recipe_resolves_paths_relative_to_the_file(tmp_path):
    recipe = toy_recipe(tmp_path)
    recipe["workdir"] = "runs/toy"
    parsed = load_recipe(write_recipe(tmp_path, recipe))
    assert parsed.workdir == str(tmp_path / "runs" / "toy")
    assert parsed.pivot.name == "pivot"
    assert parsed.source_names == ["a", "b"]
    assert parsed.stages.distill.lambda_ == 0.9


def test_unknown_key_is_named(tmp_path):
    message = _error(tmp_path, lambda r: r["stages"].update(distill={"learning_rat": 1e-4}))
    assert "stages.distill.learning_rat: unknown key" in message


def test_wrong_type_is_named(tmp_path):
    message = _error(tmp_path, lambda r: r["stages"].update(extract={"top_k": "ten"}))
    assert "stages.extract.top_k" in message


def test_missing_required_key(tmp_path):
    message = _error(tmp_path, lambda r: r.pop("pivot"))
    assert "pivot: required key is missing" in message


def test_duplicate_source_names(tmp_path):
    message = _error(tmp_path, lambda r: r["sources"].append(copy.deepcopy(r["sources"][0])))
    assert "duplicate source names: a" in message


def test_reserved_and_malformed_names(tmp_path):
    assert "reserved" in _error(tmp_path, lambda r: r["sources"][0].update(name="pivot"))
    assert "sources.0.name" in _error(tmp_path, lambda r: r["sources"][0].update(name="a b"))


def test_missing_model_folder(tmp_path):
    message = _error(tmp_path, lambda r: r["sources"][1].update(path=str(tmp_path / "nowhere")))
    assert "sources[1].path" in message and "does not exist" in message


def test_model_folder_without_safetensors(tmp_path):
    def drop_weights(recipe):
        for f in (tmp_path / "models" / "a").glob("*.safetensors"):
            f.unlink()

    assert "sources[0].path" in _error(tmp_path, drop_weights)


def test_missing_dataset_file(tmp_path):
    message = _error(tmp_path, lambda r: r["data"]["sft"].update(path=str(tmp_path / "missing.jsonl")))
    assert "data.sft.path" in message


def test_stage_dependencies_are_checked(tmp_path):
    message = _error(tmp_path, lambda r: r["stages"].update(align={"enabled": False}))
    assert "stages.distill is on but stages.align" in message


def test_fpo_needs_preference_data(tmp_path):
    message = _error(tmp_path, lambda r: r["data"].pop("preference"))
    assert "data.preference" in message


def test_push_needs_repo_id(tmp_path):
    message = _error(tmp_path, lambda r: r["stages"].update(publish={"push": True}))
    assert "push: true needs repo_id" in message


def test_not_a_mapping():
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        parse_recipe(["a"])


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_fpo_cross_checks(tmp_path):
    assert "unknown sources: zed" in _error(
        tmp_path, lambda r: r["stages"].update(fpo={"weights": {"zed": 1.0}})
    )
    message = _error(
        tmp_path, lambda r: r["stages"].update(fpo={"max_length": 512}, score={"max_length": 256})
    )
    assert "stages.score.max_length (256) must be at least stages.fpo.max_length (512)" in message
