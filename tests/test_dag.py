"""DAG expansion for several recipe shapes."""

from __future__ import annotations

from fuse.dag import build_dag
from fuse.recipe import parse_recipe

from recipes import toy_recipe


def _dag(tmp_path, sources=("a", "b"), **stages):
    recipe = toy_recipe(tmp_path, sources)
    recipe["stages"].update(stages)
    return build_dag(parse_recipe(recipe))


def test_default_shape_fpo_per_target(tmp_path):
    dag = _dag(tmp_path)
    names = [i.name for i in dag.order()]
    assert names[0] == "prepare"
    for source in ("a", "b"):
        assert dag[f"align.{source}"].parents == (f"extract.{source}", "extract.pivot")
        assert set(dag[f"fpo.{source}"].parents) == {
            "prepare",
            f"distill.{source}",
            f"score.target-{source}",
            "score.a",
            "score.b",
        }
        assert dag[f"score.target-{source}"].parents == ("prepare", f"distill.{source}")
    assert set(dag["merge"].parents) == {"fpo.a", "fpo.b"}
    assert dag["publish"].parents == ("merge", "evaluate", "align.a", "align.b")  # + teacher-signal reports
    assert dag["extract.pivot"].num_shards == 2
    # parents always come before children
    seen = set()
    for instance in dag.order():
        assert set(instance.parents) <= seen
        seen.add(instance.name)


def test_fpo_off_merges_distilled_targets(tmp_path):
    dag = _dag(tmp_path, fpo={"enabled": False}, score={"enabled": False})
    assert not dag.of_stage("fpo") and not dag.of_stage("score")
    assert set(dag["merge"].parents) == {"distill.a", "distill.b"}


def test_fpo_after_merge(tmp_path):
    dag = _dag(tmp_path, fpo={"placement": "after_merge"})
    assert set(dag["merge"].parents) == {"distill.a", "distill.b"}
    assert set(dag["fpo.merged"].parents) == {"prepare", "merge", "score.merged", "score.a", "score.b"}
    assert dag["publish"].parents == ("fpo.merged", "evaluate", "align.a", "align.b")


def test_sft_baseline_and_three_sources(tmp_path):
    dag = _dag(tmp_path, ("a", "b", "c"), distill={"sft_baseline": True})
    baseline = dag["distill.sft_baseline"]
    assert baseline.parents == ("prepare",) and baseline.option("sft_only") is True
    assert "distill.sft_baseline" in dag["evaluate"].parents
    assert len(dag.of_stage("extract")) == 4


def test_pivot_among_fused_sources(tmp_path):
    dag = _dag(tmp_path, fpo={"include_pivot": True})
    assert "score.pivot" in dag["fpo.a"].parents


def test_descendants(tmp_path):
    dag = _dag(tmp_path)
    below = dag.descendants(["align.a"])
    assert {"align.a", "distill.a", "score.target-a", "fpo.a", "merge", "evaluate", "publish"} == below
