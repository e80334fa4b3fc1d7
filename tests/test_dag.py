"""DAG expansion for several recipe shapes."""

from __future__ import annotations

import pytest

from fuse.context import StageContext
from fuse.dag import Dag, Edge, Instance, build_dag
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


def test_control_arms_are_evaluated_but_never_merged(tmp_path):
    oracle = tmp_path / "oracle" / "index.json"
    oracle.parent.mkdir()
    oracle.write_text("{}")
    controls = ["self_distill", "label_smoothing", "oracle"]
    dag = _dag(tmp_path, distill={"controls": controls, "oracle_teacher": str(oracle)})
    for control in controls:
        arm = dag[f"distill.{control}"]
        assert arm.option("control") == control and arm.models == ("pivot",)
        assert ("controls", arm.name, arm.name) in _roles(dag["evaluate"])
        assert arm.name not in dag["merge"].parents
    assert dag["distill.label_smoothing"].parents == ("prepare",)  # no teacher at all
    assert (
        dag["distill.self_distill"].parents == dag["distill.oracle"].parents == ("prepare", "extract.pivot")
    )


def test_controls_and_the_baseline_do_not_make_the_targets_stale(tmp_path):
    """Which arms exist is the DAG's shape, not a target's setting: adding a control reruns no target."""
    from fuse.plan import fingerprints
    from fuse.recipe import DistillSettings, RecipeError

    def prints(**distill):
        recipe = parse_recipe(toy_recipe(tmp_path, stages={"distill": distill}))
        return {name: fp for name, (fp, _) in fingerprints(recipe, build_dag(recipe)).items()}

    base = prints()
    more = prints(controls=["self_distill", "label_smoothing"], sft_baseline=True)
    assert more["distill.a"] == base["distill.a"] and more["merge"] == base["merge"]
    assert more["distill.label_smoothing"] != more["distill.sft_baseline"]
    smoothing = DistillSettings(controls=["label_smoothing"]).for_control("label_smoothing")
    assert smoothing.lambda_ == 1.0 and smoothing.label_smoothing == 0.1
    assert DistillSettings(lambda_=0.5).for_control("self_distill").lambda_ == 0.5
    with pytest.raises(RecipeError, match="controls has oracle but oracle_teacher"):
        parse_recipe(toy_recipe(tmp_path, stages={"distill": {"controls": ["oracle"]}}))
    with pytest.raises(RecipeError, match="reserved"):
        parse_recipe(toy_recipe(tmp_path, sources=("oracle", "b")))


def test_the_dpo_control_sits_beside_every_fpo_instance_and_is_never_merged(tmp_path):
    from fuse.dag import instance_settings
    from fuse.plan import fingerprints

    recipe = parse_recipe(toy_recipe(tmp_path, stages={"fpo": {"controls": ["dpo"], "clip": "sides"}}))
    dag = build_dag(recipe)
    for source in ("a", "b"):
        control, arm = dag[f"fpo.dpo-{source}"], dag[f"fpo.{source}"]
        assert control.option("control") == "dpo" and control.parents == arm.parents
        assert ("controls", control.name, control.name) in _roles(dag["evaluate"])
        assert control.name not in dag["merge"].parents and arm.name in dag["merge"].parents
        settings = instance_settings(recipe, control)
        assert settings.fusion == "none" and settings.clip == "margin" and settings.controls == []
        assert instance_settings(recipe, arm).fusion == "max_margin"
    after = build_dag(
        parse_recipe(toy_recipe(tmp_path, stages={"fpo": {"placement": "after_merge", "controls": ["dpo"]}}))
    )
    assert after["fpo.dpo-merged"].option("control") == "dpo" and after["publish"].parents[0] == "fpo.merged"

    def prints(**fpo):
        loaded = parse_recipe(toy_recipe(tmp_path, stages={"fpo": fpo}))
        return {name: fp for name, (fp, _) in fingerprints(loaded, build_dag(loaded)).items()}

    assert prints(controls=["dpo"])["fpo.a"] == prints()["fpo.a"]  # adding the control reruns no InfiFPO arm


def test_fpo_clip_reads_the_old_boolean_form(tmp_path):
    from fuse.recipe import RecipeError

    for given, read in ((True, "sides"), (False, "none"), ("margin", "margin")):
        assert parse_recipe(toy_recipe(tmp_path, stages={"fpo": {"clip": given}})).stages.fpo.clip == read
    with pytest.raises(RecipeError, match="clip"):
        parse_recipe(toy_recipe(tmp_path, stages={"fpo": {"clip": "both"}}))


def test_pivot_among_fused_sources(tmp_path):
    dag = _dag(tmp_path, fpo={"include_pivot": True})
    assert "score.pivot" in dag["fpo.a"].parents


def test_descendants(tmp_path):
    dag = _dag(tmp_path)
    below = dag.descendants(["align.a"])
    assert {"align.a", "distill.a", "score.target-a", "fpo.a", "merge", "evaluate", "publish"} == below


def _roles(instance):
    return {(e.role, e.parent, e.label) for e in instance.edges if e.role != "data"}


def test_made_models_reach_evaluate_grouped_by_kind(tmp_path):
    per_target = _dag(tmp_path, distill={"sft_baseline": True})
    after_merge = _dag(tmp_path, fpo={"placement": "after_merge"})
    kinds = {
        parent: role for role, parent, _ in _roles(per_target["evaluate"]) | _roles(after_merge["evaluate"])
    }
    assert kinds == {
        "distill.a": "targets",
        "distill.b": "targets",
        "fpo.a": "targets",
        "fpo.b": "targets",
        "merge": "fused",
        "fpo.merged": "fused",
        "distill.sft_baseline": "sft_baseline",
    }


def test_stages_get_their_inputs_by_role(tmp_path):
    dag = _dag(tmp_path, fpo={"include_pivot": True})
    assert _roles(dag["fpo.a"]) == {
        ("policy", "distill.a", None),
        ("policy_scores", "score.target-a", "target-a"),
        ("source_scores", "score.a", "a"),
        ("source_scores", "score.b", "b"),
        ("source_scores", "score.pivot", "pivot"),
    }
    assert _roles(dag["merge"]) == {("targets", "fpo.a", "a"), ("targets", "fpo.b", "b")}
    assert _roles(dag["score.target-a"]) == {("model", "distill.a", None)}
    assert _roles(dag["publish"]) == {
        ("model", "merge", None),
        ("evaluation", "evaluate", None),
        ("teacher_signal", "align.a", "a"),
        ("teacher_signal", "align.b", "b"),
    }
    assert _roles(dag["distill.a"]) == {
        ("pivot_logprobs", "extract.pivot", None),
        ("source_logprobs", "extract.a", None),
        ("alignment", "align.a", None),
    }


def test_the_context_resolves_roles_and_names_what_is_missing(tmp_path):
    recipe = parse_recipe(toy_recipe(tmp_path, ("a", "b")))
    dag = build_dag(recipe)
    instance = dag["merge"]
    ctx = StageContext(
        recipe, instance, tmp_path / "merge", {p: tmp_path / p / "out" for p in instance.parents}
    )
    assert ctx.made_models("targets") == {
        "a": tmp_path / "fpo.a" / "out" / "model",
        "b": tmp_path / "fpo.b" / "out" / "model",
    }
    with pytest.raises(KeyError, match="expected one 'targets' input, got \\['fpo.a', 'fpo.b'\\]"):
        ctx.input("targets")
    with pytest.raises(KeyError, match="expected one 'policy' input, got \\[\\]"):
        ctx.made_model("policy")
    assert not ctx.has_input("evaluation")


def test_an_unknown_role_is_refused():
    with pytest.raises(ValueError, match="unknown input roles \\['teachers'\\]"):
        Instance("distill.x", "distill", "x", (Edge("teachers", "extract.x"),))


def test_the_dag_matches_the_stage_table(tmp_path):
    """One instance per run / model / source / target, as the table says; only sharded stages get shards."""
    from fuse.stage_table import STAGE_TABLE

    dag = _dag(tmp_path, ("a", "b", "c"))
    count = {"run": 1, "model": 4, "source": 3, "target": 3}  # model: pivot + 3 sources; per_target fpo
    for stage, info in STAGE_TABLE.items():
        instances = dag.of_stage(stage)
        if stage == "score":  # score also scores each fpo policy at its initial weights
            instances = [i for i in instances if not i.in_role("model")]
        assert len(instances) == count[info.per], stage
    assert {i.stage for i in dag if i.num_shards > 1} <= {
        s for s, info in STAGE_TABLE.items() if info.sharded
    }
    with pytest.raises(ValueError, match="stage align does not shard"):
        Dag().add(Instance("align.x", "align", "x", num_shards=2))
