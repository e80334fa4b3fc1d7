"""The DAG engine on toy stages: fingerprints, skip/rerun, --from/--only, failures, kill -9 and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuse.dag import build_dag
from fuse.executor import StageFailed, run
from fuse.plan import PlanError, fingerprints, make_plan
from fuse.recipe import load_recipe, parse_recipe
from fuse.store import RunStore

import toy_stages
from recipes import toy_recipe, write_recipe
from toy_stages import OVERRIDES, read_calls

TESTS = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("toy_stage_modules")


def _quiet(_line: str) -> None:
    pass


def _run(recipe_dict, **kwargs):
    return run(parse_recipe(recipe_dict), echo=_quiet, **kwargs)


def test_full_run_then_noop(tmp_path):
    recipe = toy_recipe(tmp_path)
    _run(recipe)
    calls = read_calls(recipe["workdir"])
    assert "extract.pivot#0" in calls and "extract.pivot#1" in calls
    assert calls[-1] == "publish"
    assert len(calls) == len(set(calls))
    _run(recipe)
    assert read_calls(recipe["workdir"]) == calls  # nothing rerun


def test_fingerprint_changes_exactly_with_inputs(tmp_path):
    base = parse_recipe(toy_recipe(tmp_path))
    prints = {k: v[0] for k, v in fingerprints(base, build_dag(base)).items()}
    assert prints == {k: v[0] for k, v in fingerprints(base, build_dag(base)).items()}  # deterministic

    changed = toy_recipe(tmp_path)
    changed["stages"]["distill"] = {"learning_rate": 3e-5}
    changed = parse_recipe(changed)
    new = {k: v[0] for k, v in fingerprints(changed, build_dag(changed)).items()}
    differ = {k for k in prints if prints[k] != new[k]}
    assert differ == {
        "distill.a",
        "distill.b",
        "score.target-a",
        "score.target-b",
        "fpo.a",
        "fpo.b",
        "merge",
        "evaluate",
        "publish",
    }


def test_model_weights_change_fingerprint(tmp_path):
    recipe = parse_recipe(toy_recipe(tmp_path))
    before = {k: v[0] for k, v in fingerprints(recipe, build_dag(recipe)).items()}
    time.sleep(0.01)
    (tmp_path / "models" / "b" / "model.safetensors").write_bytes(b"\x09" * 64)
    after = {k: v[0] for k, v in fingerprints(recipe, build_dag(recipe)).items()}
    differ = {k for k in before if before[k] != after[k]}
    assert (
        "extract.b" in differ
        and "score.b" in differ
        and "extract.a" not in differ
        and "prepare" not in differ
    )


def test_setting_change_reruns_only_downstream(tmp_path):
    recipe = toy_recipe(tmp_path)
    _run(recipe)
    first = len(read_calls(recipe["workdir"]))
    recipe["stages"]["merge"] = {"method": "ties"}
    steps = make_plan(parse_recipe(recipe), build_dag(parse_recipe(recipe)), RunStore(recipe["workdir"]))
    stale = {s.instance.name: s.state.reason for s in steps if s.action == "run"}
    assert set(stale) == {"merge", "evaluate", "publish"}
    assert "settings changed: method" in stale["merge"]
    assert "input changed: merge" in stale["evaluate"]

    from fuse.store import describe_change

    # the recipe's key, not the Python field behind it
    assert (
        describe_change({"settings": {"lambda_": 0.5}}, {"settings": {"lambda_": 0.9}})
        == "settings changed: lambda"
    )
    _run(recipe)
    assert read_calls(recipe["workdir"])[first:] == ["merge", "evaluate", "publish"]


def test_dataset_change_reruns_everything(tmp_path):
    recipe = toy_recipe(tmp_path)
    _run(recipe)
    with open(recipe["data"]["sft"]["path"], "a") as handle:
        handle.write(
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        )
    parsed = parse_recipe(recipe)
    steps = make_plan(parsed, build_dag(parsed), RunStore(recipe["workdir"]))
    assert all(s.action == "run" for s in steps)


def test_deleted_output_is_detected(tmp_path):
    recipe = toy_recipe(tmp_path)
    _run(recipe)
    os.unlink(Path(recipe["workdir"]) / "align.a" / "out" / "result.json")
    parsed = parse_recipe(recipe)
    steps = {s.instance.name: s for s in make_plan(parsed, build_dag(parsed), RunStore(recipe["workdir"]))}
    assert steps["align.a"].state.kind == "stale" and "outputs missing" in steps["align.a"].state.reason
    assert steps["align.b"].action == "skip"


def test_from_and_only(tmp_path):
    recipe = toy_recipe(tmp_path)
    _run(recipe)
    n = len(read_calls(recipe["workdir"]))
    _run(recipe, from_stage="merge")
    assert read_calls(recipe["workdir"])[n:] == ["merge", "evaluate", "publish"]
    n += 3
    _run(recipe, only=["align.b"])
    assert read_calls(recipe["workdir"])[n:] == []  # done: --only does not force
    _run(recipe, only=["align.b"], force=True)
    assert read_calls(recipe["workdir"])[n:] == ["align.b"]
    with pytest.raises(PlanError, match="no such stage"):
        _run(recipe, from_stage="nonsense")
    with pytest.raises(KeyError, match="no stage instance"):
        _run(recipe, only=["align.zzz"])


def test_only_with_parents_not_done_is_refused(tmp_path):
    recipe = toy_recipe(tmp_path)
    with pytest.raises(PlanError, match="needs extract.a"):
        _run(recipe, only=["align.a"])
    assert read_calls(recipe["workdir"]) == []


def test_failure_names_instance_and_resume_skips_done(tmp_path, monkeypatch):
    recipe = toy_recipe(tmp_path)
    monkeypatch.setenv("TOY_FAIL", "distill.b")
    with pytest.raises(StageFailed, match="distill.b"):
        _run(recipe)
    manifest = RunStore(recipe["workdir"]).manifest("distill.b")
    assert manifest["status"] == "failed" and "toy failure" in manifest["error"]
    before = read_calls(recipe["workdir"])
    monkeypatch.delenv("TOY_FAIL")
    _run(recipe)
    after = read_calls(recipe["workdir"])[len(before) :]
    assert after[0] == "distill.b" and "extract.a#0" not in after and "distill.a" not in after


def test_finished_shards_are_not_redone(tmp_path):
    recipe = toy_recipe(tmp_path)
    parsed = parse_recipe(recipe)
    store = RunStore(recipe["workdir"])
    _run(recipe, only=["prepare"])
    # pretend shard 0 of extract.a finished in an earlier, interrupted run
    dag = build_dag(parsed)
    fp, parts = fingerprints(parsed, dag)["extract.a"]
    store.begin("extract.a", "extract", fp, parts, 2)
    toy_stages.extract.run(_ctx(parsed, dag, store, "extract.a", 0))
    store.mark_shard("extract.a", 0)
    _run(recipe, only=["extract.a"])
    assert read_calls(recipe["workdir"]).count("extract.a#0") == 1
    assert "extract.a#1" in read_calls(recipe["workdir"])
    assert store.manifest("extract.a")["status"] == "done"


def _ctx(recipe, dag, store, name, shard):
    from fuse.context import StageContext

    instance = dag[name]
    return StageContext(recipe, instance, store.dir(name), {p: store.out(p) for p in instance.parents}, shard)


@pytest.mark.slow
def test_kill_9_mid_stage_then_rerun_finishes_the_rest(tmp_path):
    recipe = toy_recipe(tmp_path)
    path = write_recipe(tmp_path, recipe)
    env = {
        **os.environ,
        "FUSE_STAGE_MODULES": OVERRIDES,
        "TOY_SLEEP": "distill.a=60",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "fuse", "run", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while "distill.a" not in read_calls(recipe["workdir"]):
        assert time.monotonic() < deadline and process.poll() is None, "the run never reached distill.a"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = read_calls(recipe["workdir"])
    state = RunStore(recipe["workdir"]).manifest("distill.a")["status"]
    assert state == "running"  # killed: neither done nor failed
    env["TOY_SLEEP"] = ""
    done = subprocess.run(
        [sys.executable, "-m", "fuse", "run", str(path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    after = read_calls(recipe["workdir"])[len(before) :]
    assert after[0] == "distill.a"
    assert not set(after) & {c for c in before if c != "distill.a"}  # nothing finished is redone
    assert after[-1] == "publish"
    assert load_recipe(path).workdir == recipe["workdir"]


def test_after_forcing_only_merge_the_old_table_and_model_are_not_this_runs_result(tmp_path):
    """`run --force --only merge` re-makes the merge (other content here): evaluate and publish read the old one,
    so they are stale and the end of the run names neither their table nor their model."""
    from fuse.executor import _done_now

    recipe = parse_recipe(toy_recipe(tmp_path))
    steps = run(recipe, echo=lambda _: None)
    store = RunStore(recipe.workdir)
    assert all(_done_now(store, s) for s in steps)
    # as if a forced merge had come out different
    (store.out("merge") / "result.json").write_text('{"remade": true}\n')
    store.finish("merge", 0.1)  # recorded as done with these outputs: a new outputs digest
    now = {s.instance.name: _done_now(store, s) for s in steps}
    assert now["merge"] and not now["evaluate"] and not now["publish"]
