"""The `fuse` command line, run as a user runs it: validate, plan, run, run-stage, logs, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes import toy_recipe, write_recipe
from toy_stages import OVERRIDES, read_calls

TESTS = Path(__file__).parent


def fuse(*args: str, toy: bool = True, **env: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        **env,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    if toy:
        environment["FUSE_STAGE_MODULES"] = OVERRIDES
    return subprocess.run(
        [sys.executable, "-m", "fuse", *args], env=environment, capture_output=True, text=True, timeout=300
    )


def test_validate_plan_run_noop(tmp_path):
    recipe = toy_recipe(tmp_path)
    path = str(write_recipe(tmp_path, recipe))
    result = fuse("validate", path, "--no-load")
    assert result.returncode == 0, result.stderr
    broken = toy_recipe(tmp_path / "broken")
    broken["sources"][0]["path"] = str(tmp_path / "gone")
    refused = fuse("run", str(write_recipe(tmp_path, broken, "broken.yaml")))
    assert refused.returncode == 2 and "sources[0].path" in refused.stderr  # checked before any work
    assert not (tmp_path / "broken" / "run").exists()
    assert "valid" in result.stdout and "2 sources" in result.stdout

    plan = fuse("plan", path)
    assert plan.returncode == 0, plan.stderr
    assert "extract.pivot" in plan.stdout and "pending" in plan.stdout and "[2 shards]" in plan.stdout

    first = fuse("run", path)
    assert first.returncode == 0, first.stderr
    assert "publish" in first.stderr  # the progress display names instances
    again = fuse("run", path)
    assert again.returncode == 0 and "nothing to do" in again.stdout

    plan = fuse("plan", path)
    assert "0 to run" in plan.stdout
    assert (Path(recipe["workdir"]) / "recipe.resolved.yaml").is_file()
    assert (Path(recipe["workdir"]) / "merge" / "logs" / "stage.log").is_file()


def test_failure_exit_code_names_instance(tmp_path):
    path = str(write_recipe(tmp_path, toy_recipe(tmp_path)))
    result = fuse("run", path, TOY_FAIL="align.a")
    assert result.returncode == 1
    assert "stage align.a failed" in result.stderr and "toy failure" in result.stderr
    assert "align.a/logs/stage.log" in result.stderr
    logs = fuse("logs", path, "align.a")
    assert "toy failure in align.a" in logs.stdout


def test_bad_recipe_exit_code_2(tmp_path):
    recipe = toy_recipe(tmp_path)
    recipe["stages"]["merge"] = {"methd": "ties"}
    result = fuse("validate", str(write_recipe(tmp_path, recipe)), "--no-load")
    assert result.returncode == 2
    assert "stages.merge.methd: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_stage_one_shard_and_parents_check(tmp_path):
    recipe = toy_recipe(tmp_path)
    path = str(write_recipe(tmp_path, recipe))
    refused = fuse("run-stage", path, "extract.a", "--shard", "0")
    assert refused.returncode == 1 and "inputs prepare are not done" in refused.stderr
    assert fuse("run-stage", path, "prepare").returncode == 0
    assert fuse("run-stage", path, "extract.a", "--shard", "1").returncode == 0
    assert read_calls(recipe["workdir"]) == ["prepare", "extract.a#1"]
    plan = fuse("plan", path)
    assert "1/2 shards done" in plan.stdout
    assert fuse("run-stage", path, "extract.a", "--shard", "0").returncode == 0
    assert "extract.a" in fuse("plan", path).stdout
    assert '"status": "done"' in (Path(recipe["workdir"]) / "extract.a" / "manifest.json").read_text()
    out_of_range = fuse("run-stage", path, "extract.a", "--shard", "5")
    assert out_of_range.returncode == 1 and "out of range" in out_of_range.stderr


def test_plan_does_not_import_torch(tmp_path):
    """`fuse plan` and a no-op `fuse run` must stay fast: no stage module may import torch at top level."""
    path = str(write_recipe(tmp_path, toy_recipe(tmp_path)))
    code = (
        "import sys; from fuse.cli import main; main(['plan', sys.argv[1]]);"
        "import fuse.plan as p; [p.stage_version(s) for s in "
        "('prepare','extract','score','align','distill','fpo','merge','evaluate','publish')];"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'vllm') if m in sys.modules];"
        "print('HEAVY', heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


@pytest.mark.parametrize(
    "recipe_file", sorted((TESTS.parent / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_recipes_validate(recipe_file):
    result = fuse("validate", str(recipe_file), "--no-load", toy=False)
    assert result.returncode == 0, result.stderr
