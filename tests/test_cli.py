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
    assert "Traceback" not in result.stderr  # the console gets one line; the traceback is in the stage log
    assert (
        "Traceback" in (Path(toy_recipe(tmp_path)["workdir"]) / "align.a" / "logs" / "stage.log").read_text()
    )
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


def test_plan_imports_no_stage_module_and_no_torch(tmp_path):
    """`fuse plan` and a no-op `fuse run` must stay fast: stage versions come from the stage table, so planning
    imports no stage module (which import torch, transformers, TRL at their top)."""
    path = str(write_recipe(tmp_path, toy_recipe(tmp_path)))
    code = (
        "import sys; from fuse.cli import main; main(['plan', sys.argv[1]]);"
        "import fuse.plan as p; from fuse.stage_table import STAGES; [p.stage_version(s) for s in STAGES];"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'vllm') if m in sys.modules];"
        "stages = [m for m in sys.modules if m.startswith('fuse.stages.')];"
        "print('HEAVY', heavy, 'STAGES', stages)"
    )
    result = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY [] STAGES []" in result.stdout


def test_the_stage_table_names_every_stage_module():
    """Each stage in the table has a module with run(ctx), and no module keeps a VERSION of its own (the table's
    is the one fingerprints use)."""
    import importlib

    from fuse.stage_table import STAGE_TABLE

    for info in STAGE_TABLE.values():
        module = importlib.import_module(info.module)
        assert callable(module.run), info.name
        assert not hasattr(module, "VERSION"), info.name


@pytest.mark.parametrize(
    "recipe_file", sorted((TESTS.parent / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_recipes_validate(recipe_file):
    result = fuse("validate", str(recipe_file), "--no-load", toy=False)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------- first contact


@pytest.mark.parametrize(
    "recipe_file",
    [p for p in sorted((TESTS.parent / "examples").glob("*.yaml")) if not p.name.startswith("tiny-demo")],
    ids=lambda p: p.name,
)
def test_shipped_recipes_submit_dry_run(recipe_file, tmp_path):
    """As shipped (site config included), only the run store moved: every instance gets a rendered job script."""
    result = fuse("submit", str(recipe_file), "--dry-run", "--set", f"workdir={tmp_path / 'run'}", toy=False)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    jobs = int(result.stdout.split(": ", 1)[1].split(" jobs", 1)[0])
    scripts = list((tmp_path / "run" / "submissions").glob("*/*.sbatch"))
    assert jobs > 10 and len(scripts) == jobs
    assert result.stdout.count("sbatch --parsable") == jobs
    assert all("run-stage" in s.read_text() for s in scripts)


def test_validate_no_load_checks_site_config_and_resource_keys(tmp_path):
    recipe = toy_recipe(tmp_path)
    recipe["executor"] = {
        "slurm": {"site_config": "sites/missing.yaml"},
        "resources": {"distil": {"nodes": 2}},
    }
    result = fuse("validate", str(write_recipe(tmp_path, recipe)), "--no-load")
    assert result.returncode == 2
    assert "executor.slurm.site_config" in result.stderr and "missing.yaml" in result.stderr
    assert "executor.resources.distil: not 'default', a stage" in result.stderr
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "missing.yaml").write_text("resources: {extrct: {gpus_per_node: 1}}\n")
    recipe["executor"]["resources"] = {"distill": {"nodes": 2}}
    result = fuse("validate", str(write_recipe(tmp_path, recipe)), "--no-load")
    assert result.returncode == 2 and "resources.extrct" in result.stderr


def test_set_overrides_validated_like_the_file(tmp_path):
    path = str(write_recipe(tmp_path, toy_recipe(tmp_path)))
    moved = tmp_path / "elsewhere"
    plan = fuse("plan", path, "--set", f"workdir={moved}", "--set", "stages.extract.num_shards=3")
    assert plan.returncode == 0, plan.stderr
    assert f"in {moved}" in plan.stdout and "[3 shards]" in plan.stdout
    bad = fuse("validate", path, "--no-load", "--set", "stages.distill.lerning_rate=1e-5")
    assert bad.returncode == 2 and "stages.distill.lerning_rate: unknown key" in bad.stderr
    bad = fuse("validate", path, "--no-load", "--set", "stages.distill.learning_rate=-1")
    assert bad.returncode == 2 and "stages.distill.learning_rate" in bad.stderr
    bad = fuse("validate", path, "--no-load", "--set", "sources.7.path=x")
    assert bad.returncode == 2 and "not an index of a list of 2 entries" in bad.stderr
    good = fuse("validate", path, "--no-load", "--set", "stages.distill.learning_rate=1e-5")
    assert good.returncode == 0, good.stderr


def test_apply_overrides_types_and_lists():
    from fuse.recipe import apply_overrides

    data = {"sources": [{"name": "a", "path": "x"}], "stages": {}}
    out = apply_overrides(
        data, ["sources.0.path=/m/a", "stages.distill.lambda=0.5", "stages.distill.deepspeed={stage: 3}"]
    )
    assert out["sources"][0]["path"] == "/m/a" and data["sources"][0]["path"] == "x"  # a copy
    assert out["stages"]["distill"] == {"lambda": 0.5, "deepspeed": {"stage": 3}}


def test_an_unknown_command_lists_every_command():
    from fuse.cli import BUILT_IN, PLUGINS

    done = subprocess.run([sys.executable, "-m", "fuse", "foo"], capture_output=True, text=True)
    assert done.returncode == 2
    listed = done.stderr.split("choose from", 1)[1]
    assert all(f"'{command}'" in listed for command in (*BUILT_IN, *PLUGINS)), done.stderr


def test_flag_before_recipe(tmp_path):
    path = str(write_recipe(tmp_path, toy_recipe(tmp_path)))
    result = fuse("plan", "--only", "prepare", "extract.a", path)
    assert result.returncode == 0, result.stderr
    assert "2 to run" in result.stdout
    verbose = fuse("plan", path, "-v")
    assert verbose.returncode == 0, verbose.stderr


def test_closed_pipe_is_quiet(tmp_path):
    path = str(write_recipe(tmp_path, toy_recipe(tmp_path)))
    read, write = os.pipe()
    os.close(read)  # the reader (`head`) is gone before fuse writes
    environment = {**os.environ, "PYTHONPATH": str(TESTS), "FUSE_STAGE_MODULES": OVERRIDES}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "fuse", "plan", path],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
            timeout=120,
        )
    finally:
        os.close(write)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.returncode != 0


def test_errors_are_one_line(tmp_path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"base_model: {folder}\nmodels: [{{path: {folder}}}]\nmethod: linear\noutput: {tmp_path}/o\n"
    )
    result = fuse("merge", str(config), toy=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "no .safetensors" in result.stdout + result.stderr
    missing = fuse("plan", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0


def test_logs_shows_stage_log_skips_binary_and_stays_in_the_run(tmp_path):
    recipe = toy_recipe(tmp_path)
    path = str(write_recipe(tmp_path, recipe))
    assert fuse("run", path, "--only", "prepare").returncode == 0
    logs = Path(recipe["workdir"]) / "prepare" / "logs"
    (logs / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)))
    (logs / "summary.json").write_text('{"global_step": 3}')  # newer than stage.log
    shown = fuse("logs", path, "prepare")
    assert shown.returncode == 0 and "stage.log" in shown.stdout and "summary.json" not in shown.stdout
    every = fuse("logs", path, "prepare", "--all")
    assert "summary.json" in every.stdout and "loss.png" not in every.stdout and "PNG" not in every.stdout
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "logs").mkdir()
    (tmp_path / "secret" / "logs" / "stage.log").write_text("SECRET")
    escape = fuse("logs", path, "../secret")
    assert escape.returncode == 1 and "SECRET" not in escape.stdout
    assert "no stage instance '../secret'" in escape.stderr


def test_per_model_overrides_apply_to_that_model_only(tmp_path):
    """A 72B source gets its own tensor_parallel_size / dtype / engine settings; the other models' instances keep
    their fingerprints (their extraction is not redone) and an unknown model name is an error naming the key."""
    from fuse.dag import build_dag
    from fuse.plan import fingerprints
    from fuse.recipe import RecipeError, parse_recipe

    data = toy_recipe(tmp_path)
    plain = parse_recipe(data)
    data["stages"]["extract"]["models"] = {
        "b": {"tensor_parallel_size": 8, "dtype": "bfloat16", "vllm": {"max_num_batched_tokens": 512}}
    }  # dtype changes what b's extraction computes; the parallelism and batch budget only how
    data["stages"]["score"] = {"models": {"target-a": {"dtype": "bfloat16"}}}
    tuned = parse_recipe(data)
    assert tuned.stages.extract.for_model("b").tensor_parallel_size == 8
    assert tuned.stages.extract.for_model("a").tensor_parallel_size == 1
    before, after = fingerprints(plain, build_dag(plain)), fingerprints(tuned, build_dag(tuned))
    changed = sorted(name for name in before if before[name][0] != after[name][0])
    assert "extract.b" in changed and "extract.a" not in changed and "extract.pivot" not in changed
    assert "score.a" not in changed
    data["stages"]["extract"]["models"] = {"c": {"dtype": "float16"}}
    with pytest.raises(RecipeError, match=r"stages\.extract\.models\.c: not a model of this recipe"):
        parse_recipe(data)


def test_validate_checks_gpus_against_tensor_parallel_size(tmp_path):
    recipe = toy_recipe(tmp_path)
    recipe["stages"]["extract"] = {
        "backend": "vllm",
        "tensor_parallel_size": 2,
        "models": {"b": {"tensor_parallel_size": 8}},
    }
    recipe["executor"] = {
        "kind": "slurm",
        "resources": {"default": {"mem": "8G", "time": "01:00:00"}, "extract": {"gpus_per_node": 2}},
    }
    result = fuse("validate", str(write_recipe(tmp_path, recipe)), "--no-load")
    assert result.returncode == 2
    assert (
        "executor.resources.extract.b: 2 GPUs per node" in result.stderr
        and "tensor_parallel_size 8" in result.stderr
    )
    assert "extract.a:" not in result.stderr and "extract.pivot:" not in result.stderr
    recipe["executor"]["resources"]["extract.b"] = {"gpus_per_node": 8}
    assert fuse("validate", str(write_recipe(tmp_path, recipe)), "--no-load").returncode == 0


def test_import_errors_are_one_line_with_exit_codes(tmp_path):
    """`fuse import` without a cache to import into is a usage error (2); a folder that is not an export, one line
    naming it (1), no traceback."""
    missing = fuse("import", str(tmp_path / "nowhere"), toy=False, FUSE_ARTIFACT_CACHE="")
    assert missing.returncode == 2 and "--cache DIR" in missing.stderr
    gone = fuse("import", str(tmp_path / "nowhere"), "--cache", str(tmp_path / "cache"), toy=False)
    assert gone.returncode == 1 and f"{tmp_path / 'nowhere'}: no such dataset folder" in gone.stderr
    assert "Traceback" not in gone.stderr and "ExportError" not in gone.stderr
