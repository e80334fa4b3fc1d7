"""`stages.merge.base: sft_baseline`: the targets' deltas are taken against the SFT-only model, which trained on the
same data and budget as every target, so what the targets share is not counted once per target."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fuse.dag import build_dag
from fuse.plan import fingerprints
from fuse.recipe import RecipeError, parse_recipe
from fuse.stages import merge as stage

from merge_models import load_all, make_family, merge_context, save_tokenizer


def recipe_dict(tmp_path: Path, family: list[Path], merge: dict, sft_baseline: bool = True) -> dict:
    (tmp_path / "sft.jsonl").write_text("{}\n")
    return {
        "name": "m",
        "workdir": str(tmp_path / "run"),
        "pivot": {"path": str(family[0])},
        "sources": [{"name": "a", "path": str(family[1])}, {"name": "b", "path": str(family[2])}],
        "data": {"sft": {"path": str(tmp_path / "sft.jsonl")}},
        "stages": {"fpo": {"enabled": False}, "distill": {"sft_baseline": sft_baseline}, "merge": merge},
    }


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    """pivot, target a, target b, the SFT-only model (a fourth checkpoint of the same shapes)."""
    paths = make_family(tmp_path_factory.mktemp("family"), n=3)
    save_tokenizer(paths[0])
    return paths


def test_task_arithmetic_over_the_sft_model_adds_each_targets_own_delta(family, tmp_path):
    pivot, a, b, sft = family
    recipe = parse_recipe(
        recipe_dict(
            tmp_path, family, {"method": "task_arithmetic", "base": "sft_baseline", "dtype": "float32"}
        )
    )
    assert set(build_dag(recipe)["merge"].parents) == {"distill.a", "distill.b", "distill.sft_baseline"}
    ctx = merge_context(recipe, {"distill.a": a, "distill.b": b, "distill.sft_baseline": sft}, tmp_path)
    stage.run(ctx)

    merged, base, ta, tb = (load_all(p) for p in (ctx.out / "model", sft, a, b))
    for name, value in merged.items():  # λ 1, weights 1: SFT + (a − SFT) + (b − SFT)
        torch.testing.assert_close(value, base[name] + (ta[name] - base[name]) + (tb[name] - base[name]))
    assert (ctx.out / "model" / "tokenizer_config.json").is_file()  # the pivot's files all the same
    assert (ctx.out / "model" / "generation_config.json").is_file()


def test_the_default_base_leaves_fingerprints_and_a_missing_baseline_is_named(family, tmp_path):
    default = parse_recipe(recipe_dict(tmp_path, family, {}))
    explicit = parse_recipe(recipe_dict(tmp_path, family, {"base": "pivot"}))
    on_sft = parse_recipe(recipe_dict(tmp_path, family, {"base": "sft_baseline"}))

    def prints(recipe):  # noqa: ANN001, ANN202
        return {name: fp for name, (fp, _) in fingerprints(recipe, build_dag(recipe)).items()}

    assert prints(default) == prints(explicit)  # an added setting at its default is not hashed
    assert prints(on_sft)["merge"] != prints(default)["merge"]
    assert prints(on_sft)["distill.a"] == prints(default)["distill.a"]
    with pytest.raises(RecipeError, match=r"stages.merge.base: sft_baseline needs .*sft_baseline: true"):
        parse_recipe(recipe_dict(tmp_path, family, {"base": "sft_baseline"}, sft_baseline=False))


def test_the_merged_model_keeps_the_special_tokens_its_targets_were_trained_with(family, tmp_path):
    """A Trainer aligns a target's eos with the pivot's tokenizer (gemma-3: <end_of_turn>, not the base config's
    <eos>): the merged model stops where its targets do; targets that disagree leave the pivot's value."""
    import json
    import shutil

    pivot, a, b, _ = family
    trained = []
    for name, folder in (("a", a), ("b", b)):
        copy = tmp_path / "trained" / name
        shutil.copytree(folder, copy)
        for file, eos in (("config.json", 5), ("generation_config.json", [5, 2])):
            config = json.loads((copy / file).read_text())
            config["eos_token_id"] = eos
            (copy / file).write_text(json.dumps(config))
        trained.append(copy)
    recipe = parse_recipe(recipe_dict(tmp_path, family, {"method": "linear", "dtype": "float32"}, False))
    ctx = merge_context(recipe, {"distill.a": trained[0], "distill.b": trained[1]}, tmp_path / "agree")
    stage.run(ctx)
    merged = ctx.out / "model"
    assert json.loads((merged / "config.json").read_text())["eos_token_id"] == 5
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == [5, 2]
    base_eos = json.loads((pivot / "config.json").read_text())["eos_token_id"]
    assert base_eos != 5

    config = json.loads((trained[1] / "config.json").read_text())
    config["eos_token_id"] = 6
    (trained[1] / "config.json").write_text(json.dumps(config))
    ctx = merge_context(recipe, {"distill.a": trained[0], "distill.b": trained[1]}, tmp_path / "disagree")
    stage.run(ctx)
    assert json.loads((ctx.out / "model" / "config.json").read_text())["eos_token_id"] == base_eos
    assert json.loads((ctx.out / "model" / "generation_config.json").read_text())["eos_token_id"] == [5, 2]
