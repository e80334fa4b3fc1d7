"""Fault injection against the run store and the SLURM path, as an adversarial user would try them: corrupted and
truncated outputs, interrupted --from, leftover locks, two runs at once, hostile recipe strings and templates.

Each test names the item of issue 20 it covers. Stages are the toy stages, plus three that write real formats
(a log-prob shard's topk_ids.npy, a safetensors model, a score parquet) so corruption hits the files it hit.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fuse import launch
from fuse.cli import main
from fuse.dag import build_dag
from fuse.executor import run
from fuse.plan import PlanError, fingerprints, make_plan, stage_module
from fuse.recipe import RecipeError, parse_recipe
from fuse.store import RunStore

from recipes import toy_recipe, write_recipe
from toy_stages import OVERRIDES, ToyStage, read_calls

TESTS = Path(__file__).parent


class FormatStage(ToyStage):
    """A toy stage that also writes one real-format output; its content follows FAULT_SALT."""

    def run(self, ctx) -> None:
        super().run(ctx)
        salt = float(os.environ.get("FAULT_SALT", "0"))
        values = np.arange(4096, dtype=np.float32) + salt
        if self.stage == "extract":
            folder = ctx.out / f"shard-{ctx.shard or 0:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / "topk_ids.npy", values.astype(np.uint32))
        elif self.stage == "merge":
            from safetensors.numpy import save_file

            (ctx.out / "model").mkdir(exist_ok=True)
            save_file({"w": values, "b": values[:64]}, str(ctx.out / "model" / "model.safetensors"))
        elif self.stage == "score":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"id": np.arange(4096), "logp": values.astype(np.float64)})
            pq.write_table(table, ctx.out / "scores.parquet", compression="NONE")


extract, merge, score = FormatStage("extract"), FormatStage("merge"), FormatStage("score")
STAGE_MODULES = OVERRIDES + ",extract=test_faults:extract,merge=test_faults:merge,score=test_faults:score"


pytestmark = pytest.mark.usefixtures("toy_stage_modules")


def _quiet(_line: str) -> None:
    pass


def _run(recipe: dict, **kwargs):
    return run(parse_recipe(recipe), echo=_quiet, **kwargs)


def _plan(recipe: dict, **kwargs) -> dict:
    parsed = parse_recipe(recipe)
    steps = make_plan(parsed, build_dag(parsed), RunStore(parsed.workdir), **kwargs)
    return {s.instance.name: s for s in steps}


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "FUSE_STAGE_MODULES": STAGE_MODULES,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        **extra,
    }


# --------------------------------------------------------------------------------------------- items 1 and 3
# A damaged output of a done instance is detected by `plan` and recomputed by `run`, never re-marked done.


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip_64_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated topk_ids.npy": ("extract.a", "shard-00001/topk_ids.npy", _truncate),
    "truncated model.safetensors": ("merge", "model/model.safetensors", _truncate),
    "64 bytes flipped in model.safetensors": ("merge", "model/model.safetensors", _flip_64_bytes),
    "64 bytes flipped in a score parquet": ("score.a", "scores.parquet", _flip_64_bytes),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_output_is_detected_and_recomputed(tmp_path, case):
    instance, rel, corrupt = CORRUPTIONS[case]
    recipe = toy_recipe(tmp_path)
    _run(recipe)
    path = Path(recipe["workdir"]) / instance / "out" / rel
    original = path.read_bytes()
    calls = len(read_calls(recipe["workdir"]))
    corrupt(path)

    step = _plan(recipe)[instance]
    assert step.action == "run" and step.state.kind == "stale", step.state
    assert "outputs missing or changed" in step.state.reason and rel in step.state.reason

    _run(recipe)
    redone = read_calls(recipe["workdir"])[calls:]
    assert any(c.split("#")[0] == instance for c in redone), redone  # recomputed, not re-marked
    assert path.read_bytes() == original
    assert all(s.action == "skip" for s in _plan(recipe).values())


def test_damaged_shard_of_an_interrupted_instance_is_redone(tmp_path):
    """A finished shard whose files changed before the instance finished is redone, not trusted by its marker."""
    recipe = toy_recipe(tmp_path)
    _run(recipe, only=["prepare", "extract.pivot"])
    parsed = parse_recipe(recipe)
    store = RunStore(parsed.workdir)
    manifest = store.manifest("extract.pivot")
    store.update_manifest("extract.pivot", status="running", outputs=None)  # as if killed before finishing
    del manifest
    shard_file = store.out("extract.pivot") / "shard-00000" / "topk_ids.npy"
    original = shard_file.read_bytes()
    _flip_64_bytes(shard_file)
    calls = len(read_calls(parsed.workdir))
    _run(recipe, only=["extract.pivot"])
    assert read_calls(parsed.workdir)[calls:] == ["extract.pivot#0"]  # shard 1 kept, shard 0 redone
    assert shard_file.read_bytes() == original


def test_leftover_temporaries_are_cleaned(tmp_path):
    recipe = toy_recipe(tmp_path)
    _run(recipe, only=["prepare"])
    out = Path(recipe["workdir"]) / "prepare" / "out"
    (out / ".model.abc123.tmp").mkdir()
    (out / ".model.abc123.tmp" / "half.safetensors").write_bytes(b"x" * 10)
    (out / ".result.json.k2j3.tmp").write_text("{")
    RunStore(recipe["workdir"]).update_manifest("prepare", status="running")  # killed mid-write
    _run(recipe, only=["prepare"])
    assert sorted(p.name for p in out.iterdir()) == ["result.json"]


# --------------------------------------------------------------------------------------------- item 4
# A child records the digests of what its parents wrote: a wiped or re-made parent makes it stale.


def test_interrupted_from_leaves_no_descendant_done(tmp_path, monkeypatch):
    recipe = toy_recipe(tmp_path)
    _run(recipe)
    monkeypatch.setenv("TOY_FAIL", "merge")  # `--from merge` dies in merge, after merge was reset
    with pytest.raises(Exception, match="merge"):
        _run(recipe, from_stage="merge")
    monkeypatch.delenv("TOY_FAIL")
    steps = _plan(recipe)
    assert steps["evaluate"].state.kind != "done" and steps["publish"].state.kind != "done"
    assert "merge" in steps["evaluate"].state.reason
    calls = len(read_calls(recipe["workdir"]))
    monkeypatch.setenv("FAULT_SALT", "1")  # this time merge comes out different: everything below is redone
    _run(recipe)
    assert read_calls(recipe["workdir"])[calls:] == ["merge", "evaluate", "publish"]
    assert all(s.action == "skip" for s in _plan(recipe).values())


def test_interrupted_from_keeps_descendants_when_the_parent_comes_out_the_same(tmp_path, monkeypatch):
    recipe = toy_recipe(tmp_path)
    _run(recipe)
    monkeypatch.setenv("TOY_FAIL", "merge")
    with pytest.raises(Exception, match="merge"):
        _run(recipe, from_stage="merge")
    monkeypatch.delenv("TOY_FAIL")
    calls = len(read_calls(recipe["workdir"]))
    _run(recipe)
    assert read_calls(recipe["workdir"])[calls:] == ["merge"]  # same bytes: evaluate and publish still hold
    assert all(s.action == "skip" for s in _plan(recipe).values())


def test_remade_parent_with_other_content_makes_children_stale(tmp_path, monkeypatch):
    recipe = toy_recipe(tmp_path)
    _run(recipe)
    monkeypatch.setenv("FAULT_SALT", "1")  # the parent comes out different (e.g. a nondeterministic kernel)
    _run(recipe, only=["merge"], force=True)
    steps = _plan(recipe)
    assert steps["evaluate"].state.kind == "stale"
    assert "inputs rewritten since it ran: merge" in steps["evaluate"].state.reason
    assert steps["publish"].action == "run"


def test_remade_parent_with_same_content_keeps_children(tmp_path):
    recipe = toy_recipe(tmp_path)
    _run(recipe)
    calls = len(read_calls(recipe["workdir"]))
    _run(recipe, only=["merge"], force=True)  # deterministic: the same bytes again
    assert all(s.action == "skip" for s in _plan(recipe).values())
    # a corrupted parent is redone; its children are kept once it comes out the same
    _flip_64_bytes(Path(recipe["workdir"]) / "merge" / "out" / "model" / "model.safetensors")
    assert _plan(recipe)["evaluate"].action == "run"
    _run(recipe)
    assert read_calls(recipe["workdir"])[calls:] == ["merge", "merge"]


# --------------------------------------------------------------------------------------------- items 2 and 5
# Locks carry their owner; a dead owner's lock is broken; a live one stops a second writer with its name.

HOLD = """
import sys, time
from fuse.store import RunStore
from fuse.store import FileLock
store, name = RunStore(sys.argv[1]), sys.argv[2]
if name == "RUN":
    lock = store.run_lock()
elif "#" in name:
    lock = FileLock(store.shard_lock(*name.split("#")[0:1], int(name.split("#")[1])), name)
else:
    lock = store.lock(name)
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _hold(workdir: str, name: str) -> subprocess.Popen:
    """Another process holding an instance's lock (or the run lock, name RUN) until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, workdir, name], env=_env(), stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_lock_left_by_a_kill_is_broken_and_the_run_ends_done(tmp_path):
    recipe = toy_recipe(tmp_path)
    path = write_recipe(tmp_path, recipe)
    _run(recipe, only=["prepare", "extract.pivot", "extract.a"])
    holder = _hold(recipe["workdir"], "align.a")
    holder.send_signal(signal.SIGKILL)  # killed while it held align.a (e.g. in finalize)
    holder.wait()
    holder = _hold(recipe["workdir"], "RUN")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (Path(recipe["workdir"]) / "align.a" / "instance.lock").exists()
    done = subprocess.run(
        [sys.executable, "-m", "fuse", "run", str(path)], env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    store = RunStore(recipe["workdir"])
    assert store.manifest("align.a")["status"] == "done" and store.manifest("publish")["status"] == "done"
    assert not list(Path(recipe["workdir"]).rglob("*.lock"))


def test_old_style_finalize_lock_of_a_dead_run_does_not_strand_the_instance(tmp_path):
    """What a kill in finalize used to leave: a lock file with a bare pid. Once old enough it is taken as
    abandoned (its owner cannot be checked), and the run finishes the instance instead of skipping it."""
    recipe = toy_recipe(tmp_path)
    _run(recipe, only=["prepare", "extract.pivot", "extract.a"])
    store = RunStore(recipe["workdir"])
    parsed = parse_recipe(recipe)
    fingerprint, parts = fingerprints(parsed, build_dag(parsed))["align.a"]
    store.begin(
        "align.a", "align", fingerprint, parts, 1
    )  # killed in finalize: its shard done, never finished
    store.mark_shard("align.a", 0)
    lock = store.dir("align.a") / "finalize.lock"
    lock.write_text("999999\n")
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    _run(recipe)
    assert store.manifest("align.a")["status"] == "done"
    assert store.manifest("publish")["status"] == "done"


def test_run_stage_fails_while_another_live_process_holds_the_instance(tmp_path, capsys):
    recipe = toy_recipe(tmp_path)
    path = write_recipe(tmp_path, recipe)
    _run(recipe, only=["prepare", "extract.pivot", "extract.a"])
    holder = _hold(recipe["workdir"], "align.a")
    try:
        assert main(["run-stage", str(path), "align.a"]) == 1  # non-zero: afterok dependents must not start
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert main(["run", str(path)]) == 1
        assert f"held by pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert RunStore(recipe["workdir"]).manifest("align.a") is None  # nothing was started on it


def test_an_array_task_cannot_take_a_shard_another_live_task_works_on(tmp_path):
    from fuse.executor import InstanceBusy, run_stage

    recipe = toy_recipe(tmp_path)
    _run(recipe, only=["prepare"])
    run_stage(parse_recipe(recipe), "extract.a", shard=0)
    holder = _hold(recipe["workdir"], "extract.a#1")
    try:
        with pytest.raises(InstanceBusy, match=f"held by pid {holder.pid}"):
            run_stage(parse_recipe(recipe), "extract.a", shard=1)
    finally:
        holder.kill()
        holder.wait()
    run_stage(parse_recipe(recipe), "extract.a", shard=1)  # its owner is gone: taken, done, finalized
    assert RunStore(recipe["workdir"]).manifest("extract.a")["status"] == "done"
    assert read_calls(recipe["workdir"]).count("extract.a#1") == 1


def test_second_run_is_refused_with_the_holder_named(tmp_path):
    recipe = toy_recipe(tmp_path)
    path = write_recipe(tmp_path, recipe)
    first = subprocess.Popen(
        [sys.executable, "-m", "fuse", "run", str(path)],
        env=_env(TOY_SLEEP="distill.a=60"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while "distill.a" not in read_calls(recipe["workdir"]):
            assert time.monotonic() < deadline and first.poll() is None, (
                "the first run never reached distill.a"
            )
            time.sleep(0.1)
        shards_before = sorted(p.name for p in (Path(recipe["workdir"]) / "extract.a" / "shards").iterdir())
        with pytest.raises(PlanError, match=f"held by pid {first.pid}"):
            _run(recipe, only=["extract.a"], force=True)  # would wipe what the first run's distill.a reads
        # a job's run-stage (no run lock) forcing distill.a's input is refused too: distill.a is being worked on
        with pytest.raises(PlanError, match="distill.a is being worked on"):
            from fuse.executor import run_stage

            run_stage(parse_recipe(recipe), "extract.a", force=True)
        assert sorted(p.name for p in (Path(recipe["workdir"]) / "extract.a" / "shards").iterdir()) == (
            shards_before
        )
    finally:
        first.kill()
        first.wait()


# --------------------------------------------------------------------------------------------- items 6 and 7
# Recipe strings cannot inject into the job script; a custom template cannot run code.


def _submit_dry_run(tmp_path: Path, recipe: dict) -> tuple[int, list[Path]]:
    path = write_recipe(tmp_path, recipe)
    code = main(["submit", str(path), "--dry-run"])
    return code, sorted(Path(recipe["workdir"]).glob("submissions/*/*.sbatch"))


def _run_script(script: Path, sandbox: Path) -> subprocess.CompletedProcess:
    """What SLURM would do with the script, minus SLURM: bash runs it (the stage command is a recorder)."""
    return subprocess.run(
        ["bash", str(script)],
        cwd=sandbox,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )


HOSTILE = {
    "newline in resources.partition": ("partition", "debug\ntouch PWNED"),
    "newline in resources.extra": ("extra", ["--exclusive", "--comment=x\ntouch PWNED"]),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_recipe_strings_cannot_run_commands_in_the_job_script(tmp_path, case, capsys):
    key, value = HOSTILE[case]
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    recipe = toy_recipe(tmp_path)
    recipe["executor"] = {
        "kind": "slurm",
        "resources": {"default": {key: value}},
        "slurm": {"python": "true"},
    }
    code, scripts = _submit_dry_run(tmp_path, recipe)
    for script in scripts:
        _run_script(script, sandbox)
    assert not (sandbox / "PWNED").exists()
    assert code == 2 and not scripts
    assert f"executor.resources.default.{key}" in capsys.readouterr().err


def test_instance_names_with_a_trailing_newline_are_refused(tmp_path):
    recipe = toy_recipe(tmp_path)
    recipe["sources"][0]["name"] = "a\n"
    with pytest.raises(RecipeError, match=r"sources\.0\.name"):
        parse_recipe(recipe)


def test_shell_characters_in_paths_reach_the_stage_intact(tmp_path):
    """A legal but hostile workdir and interpreter path: quoted, so bash passes them through as one word."""
    odd = tmp_path / "run $(touch PWNED) `touch PWNED2`; touch PWNED3 'q\" #x"
    recorder = tmp_path / "py thon;x"
    recorder.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    recorder.chmod(0o755)
    recipe = toy_recipe(tmp_path)
    recipe["workdir"] = str(odd)
    recipe["executor"] = {
        "kind": "slurm",
        "slurm": {"python": str(recorder)},
        "resources": {"default": {"account": "my acct"}},
    }
    code, scripts = _submit_dry_run(tmp_path, recipe)
    assert code == 0 and scripts
    script = next(s for s in scripts if s.name == "prepare.sbatch")
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    args_file = tmp_path / "args.txt"
    result = subprocess.run(
        ["bash", str(script)],
        cwd=sandbox,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "ARGS_FILE": str(args_file)},
    )
    assert result.returncode == 0, result.stderr
    assert not any((sandbox / n).exists() or (tmp_path / n).exists() for n in ("PWNED", "PWNED2", "PWNED3"))
    args = args_file.read_text().splitlines()
    assert args[:3] == ["-m", "fuse", "run-stage"] and args[-1] == "prepare"
    assert args[3].startswith(str(odd)) and Path(args[3]).is_file()
    directives = sbatch_directives(script.read_text())
    assert ["--account=my acct"] in directives  # one argument, as sbatch reads it
    assert [f"--output={odd}/prepare/logs/slurm-%j.out"] in directives
    assert ["--requeue"] in directives and ["--open-mode=append"] in directives


def test_multinode_launch_and_dry_run_lines_do_not_expand_paths(tmp_path):
    """Only fuse's own placeholders ($SLURM_NODEID, $<instance> job ids) expand; a path with "$(...)" in it stays a
    path in `bash -c` on every node and in the printed sbatch lines."""
    from fuse import slurm

    recorder = tmp_path / "recorder"
    recorder.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    recorder.chmod(0o755)
    job = str(tmp_path / "run $(touch PWNED)" / "job.json")
    command = [
        str(recorder),
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "-m",
        "fuse.training",
        job,
    ]
    srun_command = launch.multinode_command(command, 2)
    assert srun_command[:5] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash"]
    env = {"PATH": "/usr/bin:/bin", "ARGS_FILE": str(tmp_path / "args"), "SLURM_NODEID": "1"}
    env |= {"MASTER_ADDR": "node7", "MASTER_PORT": "29500"}
    subprocess.run(["bash", "-c", srun_command[-1]], cwd=tmp_path, env=env, check=True, timeout=30)
    args = (tmp_path / "args").read_text().splitlines()
    assert args[-1] == job and not (tmp_path / "PWNED").exists()
    assert (
        args[args.index("--machine_rank") + 1] == "1" and args[args.index("--main_process_ip") + 1] == "node7"
    )

    submission = slurm.Submission(
        "merge", "submit", "", "$merge", None, ["$prepare"], Path(job), ["--x=$prepare"]
    )
    line = slurm.dry_run_lines([submission])[0]
    assert f"'{job}'" in line and '"--x=$prepare"' in line


def sbatch_directives(script: str) -> list[list[str]]:
    """The #SBATCH arguments as sbatch reads them (src/sbatch/opt.c): lines up to the first command; whitespace
    splits, ' and " quote, a backslash escapes, an unquoted # starts a comment."""
    found = []
    for line in script.splitlines()[1:]:
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.lstrip().startswith("#"):
                break
            continue
        args, current, quote, escape, started = [], "", "", False, False
        for char in line[len("#SBATCH") :] + " ":
            if escape:
                current, escape = current + char, False
            elif char == "\\":
                escape = started = True
            elif quote:
                quote, current = ("", current) if char == quote else (quote, current + char)
            elif char in "'\"":
                quote, started = char, True
            elif char == "#":
                break
            elif char.isspace():
                if started:
                    args.append(current)
                current, started = "", False
            else:
                current, started = current + char, True
        if started:
            args.append(current)
        found.append(args)
    return found


def test_custom_template_is_sandboxed(tmp_path, capsys):
    template = tmp_path / "job.j2"
    template.write_text(
        "#!/bin/bash\n{{ cycler.__init__.__globals__.os.system('touch " + str(tmp_path / "PWNED") + "') }}\n"
    )
    recipe = toy_recipe(tmp_path)
    recipe["executor"] = {"kind": "slurm", "slurm": {"template": str(template)}}
    code, scripts = _submit_dry_run(tmp_path, recipe)
    assert not (tmp_path / "PWNED").exists()
    assert code == 2 and not scripts
    assert "executor.slurm.template" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- item 8


def test_files_holding_env_setup_are_private(tmp_path):
    recipe = toy_recipe(tmp_path)
    recipe["executor"] = {"kind": "slurm", "slurm": {"env_setup": ["export HF_TOKEN=hf_secret"]}}
    code, scripts = _submit_dry_run(tmp_path, recipe)
    assert code == 0 and scripts
    workdir = Path(recipe["workdir"])
    holding = [*scripts, scripts[0].parent / "recipe.yaml", workdir / "recipe.resolved.yaml"]
    for path in holding:
        assert "hf_secret" in path.read_text()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(scripts[0].parent.stat().st_mode) == 0o700


def test_resolved_recipe_of_a_local_run_is_private(tmp_path):
    recipe = toy_recipe(tmp_path)
    _run(recipe, only=["prepare"])
    resolved = Path(recipe["workdir"]) / "recipe.resolved.yaml"
    assert yaml.safe_load(resolved.read_text())["name"] == "toy"
    assert stat.S_IMODE(resolved.stat().st_mode) == 0o600
    manifest = json.loads((Path(recipe["workdir"]) / "prepare" / "manifest.json").read_text())
    assert manifest["outputs"]["result.json"]["digest"].startswith("sha256:")


# --------------------------------------------------------------------------------------------- item 9


def test_resume_refuses_a_checkpoint_others_could_have_written(tmp_path):
    from fuse.training import TrainingError, check_checkpoint_trust

    checkpoint = tmp_path / "checkpoints" / "checkpoint-4"
    (checkpoint / "global_step4").mkdir(parents=True)
    pickle = checkpoint / "global_step4" / "mp_rank_00_model_states.pt"
    pickle.write_bytes(b"not really a pickle")
    for path in (tmp_path / "checkpoints", checkpoint, checkpoint / "global_step4", pickle):
        path.chmod(0o755 if path.is_dir() else 0o644)
    check_checkpoint_trust(checkpoint)  # ours, written under umask 022: fine

    pickle.chmod(0o664)
    with pytest.raises(TrainingError, match="mp_rank_00_model_states.pt is writable by its group"):
        check_checkpoint_trust(checkpoint)
    pickle.chmod(0o644)
    (tmp_path / "checkpoints").chmod(0o777)  # anyone could swap in a checkpoint folder of their own
    with pytest.raises(TrainingError, match="writable by group and others"):
        check_checkpoint_trust(checkpoint)
    (tmp_path / "checkpoints").chmod(0o755)
    if os.getuid() == 0:  # only root can hand a file to someone else
        os.chown(pickle, 4321, -1)
        with pytest.raises(TrainingError, match="owned by uid 4321"):
            check_checkpoint_trust(checkpoint)


# --------------------------------------------------------------------------------------------- late or unclear errors


def test_model_identity_includes_remote_code(tmp_path):
    from fuse.models import identity
    from fuse.recipe import ModelSpec

    folder = tmp_path / "remote"
    (folder).mkdir()
    (folder / "config.json").write_text('{"auto_map": {"AutoModel": "modeling_x.XModel"}}')
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    (folder / "modeling_x.py").write_text("class XModel: pass\n")
    spec = ModelSpec(name="x", path=str(folder), trust_remote_code=True)
    before = identity(spec)
    (folder / "modeling_x.py").write_text("class XModel: scale = 2\n")
    assert identity(spec) != before


def _late_error(tmp_path: Path, case: str) -> tuple[dict, str]:
    """A recipe with one problem that used to surface only mid-run, and the words its up-front error must say."""
    recipe = toy_recipe(tmp_path)
    data = tmp_path / "data"
    if case == "remote code not trusted":
        config = Path(recipe["sources"][0]["path"]) / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "auto_map": {"AutoModel": "m.X"}}))
        return recipe, "sources[0].trust_remote_code: "
    if case == "bad eval item":
        items = data / "items.jsonl"
        items.write_text('{"skill": "s", "prompt": "p", "answer": "a"}\n\n{"skill": "s", "prompt": "p"}\n')
        recipe["stages"]["evaluate"] = {"items": str(items)}
        return recipe, f"stages.evaluate.items: {items}:3: not an item"
    if case == "held-out text not UTF-8":
        text = data / "heldout.jsonl"
        text.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
        recipe["stages"]["evaluate"] = {"heldout_text": str(text)}
        return recipe, f"stages.evaluate.heldout_text: {text}:2: not UTF-8 (byte 0xe9"
    if case == "held-out row without text":
        text = data / "heldout.jsonl"
        text.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
        recipe["stages"]["evaluate"] = {"heldout_text": str(text)}
        return recipe, f"stages.evaluate.heldout_text: {text}:2: a held-out row needs 'text' or 'messages'"
    if case == "SFT row not UTF-8":
        sft = Path(recipe["data"]["sft"]["path"])
        sft.write_bytes(sft.read_bytes() + b'{"messages": [{"role": "user", "content": "\xff"}]}\n')
        return recipe, f"data.sft.path: {sft}:21: not UTF-8 (byte 0xff"
    if case == "10 MB message":
        sft = Path(recipe["data"]["sft"]["path"])
        row = {
            "messages": [{"role": "user", "content": "x" * 10_000_000}, {"role": "assistant", "content": "y"}]
        }
        sft.write_text(sft.read_text() + json.dumps(row) + "\n")
        return recipe, f"data.sft.path: {sft}:21: a row of 10.0 MB"
    if case == "missing local-looking path":
        recipe["sources"][0]["path"] = "models/llama/v2"
        return recipe, "sources[0].path: 'models/llama/v2' is not a local path that exists, nor a hub id"
    raise AssertionError(case)


LATE = [
    "remote code not trusted",
    "bad eval item",
    "held-out text not UTF-8",
    "held-out row without text",
    "SFT row not UTF-8",
    "10 MB message",
    "missing local-looking path",
]


@pytest.mark.parametrize("case", LATE)
def test_late_errors_are_reported_before_any_work(tmp_path, case, capsys):
    recipe, expected = _late_error(tmp_path, case)
    path = write_recipe(tmp_path, recipe)
    assert main(["run", str(path)]) == 2
    assert expected in capsys.readouterr().err
    assert not Path(recipe["workdir"]).exists()  # nothing started


# --------------------------------------------------------------------------------------------- kill -9 and resume

KILLED = ["prepare", "extract.a", "score.a", "align.a", "distill.a", "fpo.a", "merge", "evaluate", "publish"]


def _outputs(workdir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.glob("*/out/**/*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("reference")
    os.environ["FUSE_STAGE_MODULES"] = STAGE_MODULES
    stage_module.cache_clear()
    try:
        _run(toy_recipe(tmp))
    finally:
        os.environ.pop("FUSE_STAGE_MODULES")
        stage_module.cache_clear()
    return _outputs(Path(toy_recipe(tmp)["workdir"]))


@pytest.mark.slow
@pytest.mark.parametrize("instance", KILLED)
def test_kill_9_in_any_stage_then_resume_gives_the_same_outputs(tmp_path, instance, uninterrupted):
    """For each of the nine stage kinds: kill -9 mid-stage, rerun: it finishes, redoes only unfinished work, and
    every output is byte-identical to an uninterrupted run's."""
    recipe = toy_recipe(tmp_path)
    path = write_recipe(tmp_path, recipe)
    process = subprocess.Popen(
        [sys.executable, "-m", "fuse", "run", str(path)],
        env=_env(TOY_SLEEP=f"{instance}=60"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not any(c.split("#")[0] == instance for c in read_calls(recipe["workdir"])):
        assert time.monotonic() < deadline and process.poll() is None, f"the run never reached {instance}"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = read_calls(recipe["workdir"])
    _run(recipe)
    after = read_calls(recipe["workdir"])[len(before) :]
    finished_before = {c for c in before if c.split("#")[0] != instance}
    assert not finished_before & set(after)  # nothing finished is redone
    assert after[0].split("#")[0] == instance
    assert _outputs(Path(recipe["workdir"])) == uninterrupted


def test_a_job_replacing_a_cancelled_one_waits_for_it_to_exit(tmp_path, monkeypatch):
    """scancel ends a job, but its process may hold the instance lock for a few more seconds (SLURM's KillWait):
    the resubmitted job waits for it instead of failing, while outside a job a live holder is refused at once."""
    import threading

    from fuse.executor import InstanceBusy, run_stage

    recipe = toy_recipe(tmp_path)
    _run(recipe, only=["prepare", "extract.pivot", "extract.a"])
    holder = _hold(recipe["workdir"], "align.a")
    with pytest.raises(InstanceBusy):
        run_stage(parse_recipe(recipe), "align.a")

    def exit_late() -> None:  # the cancelled job's process exits (and is reaped) two seconds later
        holder.kill()
        holder.wait()

    threading.Timer(2.0, exit_late).start()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    try:
        assert run_stage(parse_recipe(recipe), "align.a")
    finally:
        holder.kill()
        holder.wait()
    assert RunStore(recipe["workdir"]).manifest("align.a")["status"] == "done"
