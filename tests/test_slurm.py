"""The SLURM executor without a cluster: resources layering, the rendered job script (run by bash, with the
SIGUSR1 forward-and-requeue contract), multi-node launch, dry-run lines, and submission decisions against a fake
scheduler (held then released, kept when live, all-or-nothing). The real cluster: tests/test_slurm_cluster.py."""

from __future__ import annotations

import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fuse import launch, slurm
from fuse.cli import main
from fuse.dag import build_dag
from fuse.plan import PlanError, fingerprints
from fuse.recipe import RecipeError, load_recipe
from fuse.store import RunStore

from recipes import toy_recipe, write_recipe

TESTS = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("toy_stage_modules")


class FakeSlurm(slurm.Slurm):
    """An in-memory scheduler: jobs[id] = state; `fail_at` makes the n-th sbatch fail."""

    def __init__(self, fail_at: int | None = None):
        self.jobs: dict[str, str] = {}
        self.calls: list[tuple] = []
        self.fail_at = fail_at

    def available(self) -> bool:
        return True

    def submit(self, options, script):
        if self.fail_at is not None and len(self.jobs) + 1 == self.fail_at:
            raise slurm.SlurmError("sbatch: error: Batch job submission failed")
        job_id = str(100 + len(self.jobs))
        self.jobs[job_id] = "PENDING"
        self.calls.append(("sbatch", job_id, *options, Path(script).name))
        return job_id

    def records(self, job_id):
        return (
            [{"JobId": job_id, "JobState": self.jobs[job_id], "RunTime": "00:00:07"}]
            if job_id in self.jobs
            else []
        )

    def release(self, job_ids):
        self.calls.append(("release", *job_ids))

    def cancel(self, job_ids):
        if not job_ids:
            return
        self.calls.append(("scancel", *job_ids))
        self.jobs.update({j: "CANCELLED" for j in job_ids})


def _toy(tmp_path: Path, **executor) -> tuple[Path, dict]:
    recipe = toy_recipe(tmp_path)
    if executor:
        recipe["executor"] = executor
    return write_recipe(tmp_path, recipe), recipe


# --------------------------------------------------------------------------------------------- rendering


def test_resources_are_layered_site_then_recipe(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(
        yaml.safe_dump(
            {
                "env_setup": ["module load cuda/12.4"],
                "resources": {
                    "default": {"partition": "cpu", "time": "01:00:00", "mem": "8G"},
                    "distill": {"partition": "gpu", "gpus_per_node": 8, "extra": ["--exclusive"]},
                },
            }
        )
    )
    path, _ = _toy(
        tmp_path,
        kind="slurm",
        resources={
            "default": {"account": "proj"},
            "distill": {"time": "24:00:00"},
            "distill.b": {"nodes": 2},
        },
        slurm={
            "site_config": "site.yaml",
            "env_setup": ["source /venv/bin/activate"],
            "signal_grace_seconds": 300,
        },
    )
    recipe = load_recipe(path)
    config = slurm.load_site(slurm.site_path(recipe, path))
    dag = build_dag(recipe)
    b = slurm.resources_for(recipe, dag["distill.b"], config)
    assert (b.partition, b.gpus_per_node, b.time, b.mem, b.account, b.nodes) == (
        "gpu",
        8,
        "24:00:00",
        "8G",
        "proj",
        2,
    )
    assert b.extra == ["--exclusive"]
    prepare = slurm.resources_for(recipe, dag["prepare"], config)
    assert (prepare.partition, prepare.gpus_per_node, prepare.nodes) == ("cpu", 0, 1)

    settings = slurm.job_settings(recipe, config, tmp_path / "snapshot.yaml")
    script = slurm.render_job(recipe, dag["distill.b"], b, settings)
    for line in (
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --exclusive",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --time=24:00:00",
        "#SBATCH --nodes=2",
        "export MASTER_ADDR=",
    ):
        assert line in script
    assert script.index("module load cuda/12.4") < script.index("source /venv/bin/activate")
    assert f"{sys.executable} -m fuse run-stage {tmp_path / 'snapshot.yaml'} distill.b &" in script
    assert "MASTER_ADDR" not in slurm.render_job(
        recipe, dag["extract.b"], b, settings
    )  # not a training stage


def test_a_trainings_node_count_is_part_of_its_result_and_checked_at_launch(tmp_path):
    """nodes x num_processes ranks make the global batch: two nodes fingerprint differently from one (one node as
    before: fingerprints made before multi-node runs stay valid), a site config cannot change it, and a job planned
    for two nodes refuses to start on one."""
    from fuse import training

    one_path, _ = _toy(tmp_path / "one", kind="slurm")
    two_path, _ = _toy(tmp_path / "two", kind="slurm", resources={"distill.b": {"nodes": 2}})
    local_path, _ = _toy(tmp_path / "local", kind="local", resources={"distill.b": {"nodes": 2}})
    fps = {}
    for name, path in (("one", one_path), ("two", two_path), ("local", local_path)):
        recipe = load_recipe(path)
        fps[name] = {k: v[1] for k, v in fingerprints(recipe, build_dag(recipe)).items()}
    assert fps["two"]["distill.b"]["nodes"] == 2
    for instance, parts in fps["one"].items():
        assert "nodes" not in parts and "nodes" not in fps["local"][instance]  # one node, or run locally
        assert ("nodes" in fps["two"][instance]) == (instance == "distill.b")

    site = tmp_path / "site.yaml"
    site.write_text("resources:\n  distill: {nodes: 4, partition: gpu}\n")
    recipe = load_recipe(two_path)
    with pytest.raises(RecipeError, match=r"site\.yaml: resources give distill\.a 4 node\(s\), the recipe 1"):
        slurm.check_resource_keys(recipe, build_dag(recipe), slurm.load_site(site), "site.yaml")

    job = training.TrainingJob("m:f", "m:C", {}, "c", "m", "l", run_name="distill.b", nodes=2)
    with pytest.raises(training.TrainingError, match=r"distill\.b: planned for 2 node\(s\).*outside SLURM"):
        training.check_nodes(job, {})
    training.check_nodes(job, {"SLURM_NNODES": "2"})
    with pytest.raises(training.TrainingError, match="in an allocation of 3 nodes"):
        training.check_nodes(job, {"FUSE_NUM_MACHINES": "3"})
    one_node = training.TrainingJob("m:f", "m:C", {}, "c", "m", "l")
    training.check_nodes(one_node, {"SLURM_NNODES": "2"})  # runs on one node of the allocation


def test_bad_resource_keys_are_named(tmp_path):
    path, recipe = _toy(tmp_path, resources={"distil": {"nodes": 2}})
    with pytest.raises(RecipeError, match=r"executor\.resources\.distil: not 'default', a stage"):
        slurm.submit(load_recipe(path), path, FakeSlurm(), dry_run=True)
    site = tmp_path / "site.yaml"
    site.write_text("resources:\n  extract: {gpus: 1}\n")
    with pytest.raises(
        RecipeError,
        match=r"(?s)site\.yaml: the SLURM site config is not valid.*resources\.extract\.gpus: unknown key",
    ):
        slurm.load_site(site)


def test_rendered_scripts_are_valid_bash_with_arrays_for_shards(tmp_path, capsys):
    path, _ = _toy(tmp_path)
    assert main(["submit", str(path), "--dry-run"]) == 0
    scripts = {p.stem: p.read_text() for p in (tmp_path / "run" / "submissions").glob("*/*.sbatch")}
    assert len(scripts) == 17
    for name, text in scripts.items():
        subprocess.run(["bash", "-n", "-c", text], check=True)
        assert f"#SBATCH --job-name=toy.{name}" in text
        sharded = name.startswith("extract.")
        assert (' --shard "$SLURM_ARRAY_TASK_ID"' in text) == sharded
        assert ("slurm-%A_%a.out" in text) == sharded
    assert not RunStore(tmp_path / "run").manifest("prepare")  # a dry run claims nothing


def slurm_filename(pattern: str, job_id: str) -> str:
    """The file sbatch writes for an --output pattern: "%%" is a "%", "%j" the job id, any other "%<letter>" (with
    an optional width) is replaced too."""
    return re.sub(r"%\d*([%A-Za-z])", lambda m: {"%": "%", "j": job_id}.get(m[1], f"<{m[1]}>"), pattern)


def test_percent_signs_in_the_workdir_reach_sbatch_as_literals(tmp_path, capsys):
    """Before: a workdir "run 100%x%j" went into --output unescaped, and SLURM wrote the log elsewhere."""
    recipe = toy_recipe(tmp_path)
    recipe["workdir"] = str(tmp_path / "run 100%x%j")
    assert main(["submit", str(write_recipe(tmp_path, recipe)), "--dry-run"]) == 0
    store = RunStore(recipe["workdir"])
    script = next(Path(recipe["workdir"], "submissions").glob("*/prepare.sbatch")).read_text()
    output = next(line for line in script.splitlines() if line.startswith("#SBATCH --output="))
    (argument,) = shlex.split(output.removeprefix("#SBATCH "))
    expected = store.logs("prepare") / "slurm-77.out"
    assert slurm_filename(argument.removeprefix("--output="), "77") == str(expected)


def test_dry_run_lines_are_a_runnable_submission(tmp_path, capsys):
    """The printed lines, run by bash with a fake sbatch, submit in order with the right dependencies."""
    path, _ = _toy(tmp_path)
    assert main(["submit", str(path), "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert lines[0].startswith("prepare=$(sbatch --parsable --kill-on-invalid-dep=yes ")
    assert lines[1].startswith(
        'extract_pivot=$(sbatch --parsable --array=0-1 "--dependency=afterok:$prepare" '
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(
        '#!/bin/bash\nn=$(( $(wc -l < "$LOG" 2>/dev/null || echo 0) + 1 ))\necho "$n $*" >> "$LOG"\necho $n\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "sbatch.log"
    log.touch()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log)}
    subprocess.run(["bash", "-euc", "\n".join(lines)], env=env, check=True)
    submitted = [line.split() for line in log.read_text().splitlines()]
    assert len(submitted) == 17
    by_script = {Path(s[-1]).stem: s for s in submitted}
    assert "--dependency=afterok:1" in by_script["extract.a"]
    assert "--dependency=afterok:4:2" in by_script["align.b"]  # extract.b, then extract.pivot


def test_snapshot_recipe_keeps_every_fingerprint(tmp_path):
    path, _ = _toy(tmp_path)
    recipe = load_recipe(path)
    submissions = slurm.submit(recipe, path, FakeSlurm(), dry_run=True)
    snapshot = load_recipe(submissions[0].script.parent / "recipe.yaml")
    dag = build_dag(recipe)
    assert {k: v[0] for k, v in fingerprints(recipe, dag).items()} == {
        k: v[0] for k, v in fingerprints(snapshot, build_dag(snapshot)).items()
    }


def test_multinode_command_runs_one_launcher_per_node(tmp_path):
    single = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--use_deepspeed",
        "--num_processes",
        "4",
        "--num_machines",
        "1",
        "--main_process_port",
        "1234",
        "-m",
        "fuse.training",
        str(tmp_path / "a b.json"),
    ]
    assert launch.multinode_command(single, 1) == single
    command = launch.multinode_command(single, 3)
    assert command[:4] == ["srun", "--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    # What each node's shell makes of it (echo instead of exec'ing python):
    inner = command[-1].replace(f"exec {sys.executable}", "echo", 1)
    env = {**os.environ, "SLURM_NODEID": "2", "MASTER_ADDR": "node01", "MASTER_PORT": "29555"}
    out = subprocess.run(
        ["bash", "-c", inner], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    for option in (
        "--num_machines 3",
        "--num_processes 12",
        "--machine_rank 2",
        "--main_process_ip node01",
        "--main_process_port 29555",
        "--rdzv_backend static",
        "--use_deepspeed",
        "--deepspeed_multinode_launcher standard",
    ):
        assert option in out
    assert "1234" not in out and out.endswith(f"-m fuse.training {tmp_path / 'a b.json'}")


# --------------------------------------------------------------------------------------------- the job script


def _job_script(tmp_path: Path, stage_code: str) -> tuple[Path, Path, dict]:
    """The real template around a fake `python` running `stage_code`, with a fake scontrol that logs its args."""
    path, _ = _toy(tmp_path)
    recipe = load_recipe(path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$*" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "python").write_text(f"#!/bin/bash\nexec {sys.executable} -c {shlex.quote(stage_code)}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    settings = slurm.JobSettings(tmp_path / "r.yaml", str(bin_dir / "python"), (), 60)
    dag = build_dag(recipe)
    script = tmp_path / "job.sbatch"
    script.write_text(
        slurm.render_job(
            recipe,
            dag["distill.a"],
            slurm.resources_for(recipe, dag["distill.a"], slurm.SiteConfig()),
            settings,
        )
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77"}
    return script, tmp_path / "scontrol.log", env


def test_job_script_forwards_usr1_and_requeues(tmp_path):
    ready = tmp_path / "ready"
    code = (
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    script, scontrol_log, env = _job_script(tmp_path, code)
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline and job.poll() is None
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # to the batch shell only, as --signal=B:USR1 does
    output, _ = job.communicate(timeout=30)
    assert job.returncode == 75
    assert scontrol_log.read_text().split() == ["requeue", "77"]
    assert "SIGUSR1: asking distill.a to checkpoint and stop" in output and "exit 75" in output


def test_job_script_passes_the_stage_exit_code_without_requeue(tmp_path):
    script, scontrol_log, env = _job_script(tmp_path, "import sys; sys.exit(3)")
    assert subprocess.run(["bash", str(script)], env=env, capture_output=True).returncode == 3
    assert not scontrol_log.exists()


# --------------------------------------------------------------------------------------------- submission logic


def test_submit_holds_all_records_ids_and_keeps_live_jobs(tmp_path):
    path, _ = _toy(tmp_path)
    recipe = load_recipe(path)
    fake = FakeSlurm()
    first = slurm.submit(recipe, path, fake)
    assert [s.action for s in first] == ["submit"] * 17
    assert fake.calls[-1] == ("release", *[s.job_id for s in first])  # held until all were in
    assert all("--hold" in call for call in fake.calls[:-1])
    store = RunStore(recipe.workdir)
    manifest = store.manifest("extract.a")
    assert manifest["status"] == "submitted" and manifest["job_ids"] == [first[2].job_id]
    assert ("--array=0-1" in first[2].sbatch) and first[2].dependencies == [first[0].job_id]

    fake.jobs[first[0].job_id] = "RUNNING"
    assert {s.action for s in slurm.submit(recipe, path, fake)} == {"keep"}  # nothing twice
    with pytest.raises(PlanError, match="extract.pivot must restart .* still PENDING"):
        slurm.submit(recipe, path, fake, from_stage="extract")

    # prepare's job ended without finishing it: it is resubmitted, and so are its pending children (their old
    # jobs wait on the old prepare job), but a running child is not killed behind the user's back.
    fake.jobs[first[0].job_id] = "COMPLETED"
    fake.jobs[first[2].job_id] = "RUNNING"
    with pytest.raises(
        PlanError, match=r"extract.a must restart \(its inputs prepare are resubmitted\) .* RUNNING"
    ):
        slurm.submit(recipe, path, fake)
    assert fake.jobs[first[1].job_id] == "PENDING"  # nothing was cancelled before the error
    fake.jobs[first[2].job_id] = "PENDING"
    again = {s.instance: s for s in slurm.submit(recipe, path, fake)}
    assert again["prepare"].action == "submit" and again["extract.a"].action == "submit"
    assert again["extract.a"].dependencies == [again["prepare"].job_id]
    assert again["align.a"].action == "submit" and again["merge"].action == "submit"
    assert fake.jobs[first[2].job_id] == "CANCELLED"
    assert RunStore(recipe.workdir).manifest("extract.a")["job_ids"] == [
        first[2].job_id,
        again["extract.a"].job_id,
    ]


def test_failed_submission_cancels_what_it_submitted(tmp_path):
    path, _ = _toy(tmp_path)
    fake = FakeSlurm(fail_at=4)
    with pytest.raises(slurm.SlurmError):
        slurm.submit(load_recipe(path), path, fake)
    assert fake.calls[-1] == ("scancel", "100", "101", "102")
    assert not any(call[0] == "release" for call in fake.calls)


def test_status_and_cancel_touch_only_recorded_live_jobs(tmp_path):
    path, _ = _toy(tmp_path)
    recipe = load_recipe(path)
    fake = FakeSlurm()
    jobs = {s.instance: s.job_id for s in slurm.submit(recipe, path, fake)}
    fake.jobs[jobs["prepare"]] = "COMPLETED"
    fake.jobs["999"] = "RUNNING"  # someone else's
    rows = {r.instance: r for r in slurm.collect_status(recipe, fake)}
    assert rows["prepare"].job.state == "COMPLETED" and rows["merge"].state == "submitted"
    assert rows["merge"].job.active and rows["merge"].elapsed == "00:00:07"
    cancelled = slurm.cancel(recipe, fake)
    assert {job for _, job in cancelled} == set(jobs.values()) - {jobs["prepare"]}
    assert fake.jobs["999"] == "RUNNING"
    assert slurm.cancel(recipe, fake) == []


def test_summaries_of_array_jobs():
    records = [
        {"JobState": "COMPLETED", "RunTime": "00:01:05", "ExitCode": "0:0"},
        {"JobState": "RUNNING", "RunTime": "1-00:00:01", "Restarts": "1"},
    ]
    status = slurm.summarize("5", records)
    assert status.state == "COMPLETED 1, RUNNING 1" and status.active and status.elapsed == "1-00:00:01"
    assert status.restarts == 1
    assert slurm.summarize("6", []).state == "UNKNOWN" and not slurm.summarize("6", []).active
    assert slurm.array_ranges([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert slurm.sbatch_options([0, 2], ["4", "5"]) == [
        "--array=0,2",
        "--dependency=afterok:4:5",
        "--kill-on-invalid-dep=yes",
    ]


def test_preemption_flag_inside_checkpointing_and_immediate_stop_outside():
    """The python half of the signal contract: inside `checkpointing()` SIGUSR1 only sets the flag (the trainer
    saves, then stops); outside it stops the stage at once. Either way with PREEMPTED_EXIT_CODE, not done."""
    from fuse import preemption

    preemption.reset()
    with preemption.checkpointing():
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert preemption.requested()
        with pytest.raises(preemption.Preempted) as stopped:
            preemption.raise_if_requested()
    assert stopped.value.code == preemption.PREEMPTED_EXIT_CODE
    preemption.reset()
    with pytest.raises(preemption.Preempted):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(1)
    preemption.reset()
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)


@pytest.mark.parametrize(
    "site", sorted((TESTS.parent / "slurm" / "sites").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_site_configs_are_valid(site, tmp_path):
    config = slurm.load_site(site)
    path, _ = _toy(tmp_path)
    recipe = load_recipe(path)
    dag = build_dag(recipe)
    slurm.check_resource_keys(recipe, dag, config)
    settings = slurm.job_settings(recipe, config, tmp_path / "r.yaml")
    for instance in dag:
        text = slurm.render_job(recipe, instance, slurm.resources_for(recipe, instance, config), settings)
        subprocess.run(["bash", "-n", "-c", text], check=True)


def test_a_shard_array_is_throttled_as_the_recipe_asks(tmp_path):
    """64 shards at tensor parallelism 8 would ask for 512 GPUs at once: `max_concurrent` (or the %N of an
    `--array` line in `extra`, which fuse used to override) bounds the array's running tasks."""
    resources = {
        "extract.pivot": {"max_concurrent": 1},
        "extract.a": {"extra": ["--array=0-63%8", "--exclusive"]},
    }
    path, _ = _toy(tmp_path, kind="slurm", resources=resources)
    submissions = {s.instance: s for s in slurm.submit(load_recipe(path), path, FakeSlurm(), dry_run=True)}
    assert "--array=0-1%1" in submissions["extract.pivot"].sbatch
    assert "--array=0-1%8" in submissions["extract.a"].sbatch
    assert "--array=0-1" in submissions["extract.b"].sbatch  # not throttled unless asked
    script = submissions["extract.a"].script.read_text()
    assert (
        "#SBATCH --exclusive" in script and "--array" not in script
    )  # the array is fuse's, on the sbatch line


def test_env_setup_lines_the_recipe_repeats_from_the_site_run_once(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"env_setup": ["module load cuda/12.4", "source /venv/bin/activate"]}))
    path, _ = _toy(
        tmp_path,
        kind="slurm",
        resources={"default": {"mem": "8G", "time": "01:00:00"}},
        slurm={"site_config": "site.yaml", "env_setup": ["source /venv/bin/activate", "export X=1"]},
    )
    recipe = load_recipe(path)
    config = slurm.load_site(slurm.site_path(recipe, path))
    settings = slurm.job_settings(recipe, config, tmp_path / "snapshot.yaml")
    dag = build_dag(recipe)
    script = slurm.render_job(
        recipe, dag["prepare"], slurm.resources_for(recipe, dag["prepare"], config), settings
    )
    lines = script.splitlines()
    assert lines.count("source /venv/bin/activate") == 1
    assert (
        lines.index("module load cuda/12.4")
        < lines.index("source /venv/bin/activate")
        < lines.index("export X=1")
    )


def test_at_most_max_concurrent_jobs_of_a_submission_run_at_once(tmp_path):
    """Each job also waits (afterany) for the job submitted `max_concurrent_jobs` before it: running jobs are
    always within a window of that many consecutive submissions."""
    path, _ = _toy(
        tmp_path,
        kind="slurm",
        resources={"default": {"mem": "8G", "time": "01:00:00"}},
        slurm={"max_concurrent_jobs": 2},
    )
    submissions = [
        s for s in slurm.submit(load_recipe(path), path, FakeSlurm(), dry_run=True) if s.action == "submit"
    ]
    ids = [s.job_id for s in submissions]
    for k, s in enumerate(submissions):
        dependency = next((o for o in s.sbatch if o.startswith("--dependency=")), "")
        if k >= 2:
            assert f"afterany:{ids[k - 2]}" in dependency, (s.instance, dependency)
        else:
            assert "afterany" not in dependency
    assert any(
        o.startswith("--dependency=afterok:") and ",afterany:" in o for s in submissions for o in s.sbatch
    )
