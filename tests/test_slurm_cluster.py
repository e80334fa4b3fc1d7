"""`fuse submit/status/cancel` against a real single-node SLURM: the whole DAG, failure, scancel and cancel
mid-run, resubmission, a requeued training job resuming from its checkpoint, arrays of missing shards.

Stages are the toy ones (tests/toy_stages.py, tests/slurm_toy.py), so each job takes about a second; one test
runs the shipped demo with the real stages.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fuse import slurm
from fuse.cli import main
from fuse.dag import build_dag
from fuse.executor import run_stage
from fuse.plan import stage_module
from fuse.recipe import load_recipe
from fuse.store import RunStore

from demo_recipe import check_metrics, demo_recipe, table_rows
from recipes import toy_recipe, write_recipe
from slurm_cluster import slurm_cluster, wait_for  # noqa: F401  (the session's cluster)
from toy_stages import OVERRIDES, read_calls

TESTS = Path(__file__).parent
pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

SMALL = {  # prepare -> extract.{pivot,a} -> align.a -> distill.a -> merge -> evaluate -> publish
    "extract": {"num_shards": 1},
    "fpo": {"enabled": False},
}


@pytest.fixture(autouse=True)
def toy(monkeypatch):
    """Toy stages in the jobs too: sbatch hands the submitting environment to each job."""
    monkeypatch.setenv("FUSE_STAGE_MODULES", OVERRIDES + ",distill=slurm_toy")
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("TOY_STEP_SECONDS", "0.1")
    for name in ("TOY_SLEEP", "TOY_FAIL", "TOY_STEPS"):
        monkeypatch.delenv(name, raising=False)
    stage_module.cache_clear()
    yield
    stage_module.cache_clear()


def _recipe(tmp_path: Path, sources=("a", "b"), stages=None) -> Path:
    recipe = toy_recipe(tmp_path, sources=sources)
    if stages is not None:
        recipe["stages"] = stages
    return write_recipe(tmp_path, recipe)


def _submit(path: Path, **kwargs) -> dict[str, slurm.Submission]:
    submissions = slurm.submit(load_recipe(path), path, **kwargs)
    return {s.instance: s for s in submissions}


def _wait(submissions: dict[str, slurm.Submission], timeout: float = 180) -> dict[str, slurm.JobStatus]:
    ids = {name: s.job_id for name, s in submissions.items() if s.job_id}
    final = slurm.wait(list(ids.values()), timeout=timeout, poll=0.5)
    return {name: final[job_id] for name, job_id in ids.items()}


def _call_name(call: str) -> str:
    """calls.log lines: "extract.a#1" (shard 1), "distill.a@0" (slurm_toy, resumed from step 0)."""
    return call.split("#")[0].split("@")[0]


def _states(path: Path) -> dict[str, str]:
    return {row.instance: row.state for row in slurm.collect_status(load_recipe(path))}


def test_whole_dag_end_to_end_then_nothing_to_submit(tmp_path, capsys):
    path = _recipe(tmp_path)
    assert main(["submit", str(path), "--wait", "--timeout", "240"]) == 0
    submitted = capsys.readouterr().out
    assert "17 jobs submitted, 0 kept" in submitted and "array 0-1" in submitted

    workdir = tmp_path / "run"
    calls = read_calls(workdir)
    assert len(calls) == len(set(calls)) == 20  # 17 instances, 3 of them with 2 shards: each exactly once
    recipe = load_recipe(path)
    dag = build_dag(recipe)
    for instance in dag:  # afterok held every job until its parents were done
        first = min(i for i, c in enumerate(calls) if _call_name(c) == instance.name)
        for parent in instance.parents:
            assert max(i for i, c in enumerate(calls) if _call_name(c) == parent) < first, (
                parent,
                instance.name,
            )
    rows = slurm.collect_status(recipe)
    assert {r.state for r in rows} == {"done"} and {r.job.state for r in rows} == {"COMPLETED"}
    extract_job = RunStore(workdir).manifest("extract.pivot")["job_ids"][-1]
    assert sorted(p.name for p in (workdir / "extract.pivot" / "logs").glob("slurm-*")) == [
        f"slurm-{extract_job}_0.out",
        f"slurm-{extract_job}_1.out",
    ]

    assert main(["status", str(path)]) == 0
    status = capsys.readouterr().out
    assert status.count("COMPLETED") == 17 and "publish" in status
    assert main(["submit", str(path)]) == 0
    assert "0 jobs submitted, 0 kept" in capsys.readouterr().out
    assert read_calls(workdir) == calls


def test_failed_stage_cancels_dependents_then_resubmit_reruns_only_them(tmp_path, monkeypatch):
    path = _recipe(tmp_path)
    monkeypatch.setenv("TOY_FAIL", "align.a")
    final = _wait(_submit(path))
    downstream = {"distill.a", "score.target-a", "fpo.a", "merge", "evaluate", "publish"}
    assert final["align.a"].state == "FAILED"
    assert {final[n].state for n in downstream} == {"CANCELLED"}  # --kill-on-invalid-dep: not pending forever
    assert {final[n].state for n in final if n not in downstream | {"align.a"}} == {"COMPLETED"}
    states = _states(path)
    assert states["align.a"] == "failed" and states["fpo.b"] == "done" and states["merge"] == "submitted"

    monkeypatch.delenv("TOY_FAIL")
    before = read_calls(tmp_path / "run")
    again = _submit(path)
    assert {n for n, s in again.items() if s.action == "submit"} == downstream | {"align.a"}
    assert {s.state for s in _wait(again).values()} == {"COMPLETED"}
    assert set(_states(path).values()) == {"done"}
    rerun = read_calls(tmp_path / "run")[len(before) :]
    assert sorted(map(_call_name, rerun)) == sorted(downstream | {"align.a"})


def test_scancel_mid_stage_then_submit_finishes_without_redoing_work(tmp_path, monkeypatch):
    path = _recipe(tmp_path, sources=("a",), stages=SMALL)
    workdir = tmp_path / "run"
    monkeypatch.setenv("TOY_STEPS", "400")  # distill.a would run 40 s
    first = _submit(path)
    wait_for(lambda: (workdir / "steps.log").exists(), 90, "distill.a to start")

    second = _submit(path)  # while it runs: nothing is submitted twice
    assert {s.action for s in second.values()} == {"skip", "keep"}
    assert {n: s.job_id for n, s in second.items() if s.action == "keep"} == {
        n: first[n].job_id for n in ("distill.a", "merge", "evaluate", "publish")
    }

    subprocess.run(["scancel", first["distill.a"].job_id], check=True)
    final = _wait(first)
    assert final["distill.a"].state == "CANCELLED" and final["publish"].state == "CANCELLED"
    steps_before = len((workdir / "steps.log").read_text().splitlines())

    monkeypatch.setenv("TOY_STEPS", str(steps_before + 3))
    calls_before = read_calls(workdir)
    third = _submit(path)
    assert {n for n, s in third.items() if s.action == "submit"} == {
        "distill.a",
        "merge",
        "evaluate",
        "publish",
    }
    assert {s.state for s in _wait(third).values()} == {"COMPLETED"}
    rerun = read_calls(workdir)[len(calls_before) :]
    resumed = int(rerun[0].removeprefix("distill.a@"))
    assert resumed >= steps_before >= 1  # from its checkpoint, not from step 0
    assert rerun[1:] == ["merge", "evaluate", "publish"]  # prepare, extract, align not redone
    steps = [int(line.split()[0]) for line in (workdir / "steps.log").read_text().splitlines()]
    assert steps[steps_before:] == list(range(resumed + 1, steps_before + 4))


def test_fuse_cancel_cancels_only_this_runs_jobs(tmp_path, monkeypatch, capsys):
    path = _recipe(tmp_path, sources=("a",), stages=SMALL)
    other = subprocess.run(
        ["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 120"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        monkeypatch.setenv("TOY_SLEEP", "prepare=60")
        jobs = _submit(path)
        wait_for(lambda: read_calls(tmp_path / "run") == ["prepare"], 90, "prepare to start")
        assert main(["cancel", str(path)]) == 0
        assert f"{len(jobs)} jobs cancelled" in capsys.readouterr().out
        assert {s.state for s in _wait(jobs, timeout=60).values()} == {"CANCELLED"}
        assert slurm.Slurm().status(other).active  # not this run's: untouched
    finally:
        subprocess.run(["scancel", other], check=False)


def test_requeued_training_job_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """SIGUSR1 to the job script (what --signal=B:USR1@grace sends before the time limit): the script forwards it,
    the stage saves and exits, the script requeues the job, and the rerun resumes from the checkpoint."""
    stages = {
        **SMALL,
        "merge": {"enabled": False},
        "evaluate": {"enabled": False},
        "publish": {"enabled": False},
    }
    path = _recipe(tmp_path, sources=("a",), stages=stages)
    workdir = tmp_path / "run"
    monkeypatch.setenv("TOY_STEPS", "20")
    monkeypatch.setenv("TOY_STEP_SECONDS", "0.3")
    jobs = _submit(path)
    steps_log = workdir / "steps.log"
    wait_for(
        lambda: steps_log.exists() and len(steps_log.read_text().splitlines()) >= 3, 90, "3 training steps"
    )
    job_id = jobs["distill.a"].job_id
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    final = _wait(jobs)
    assert final["distill.a"].state == "COMPLETED" and final["distill.a"].restarts == 1

    steps = [line.split() for line in steps_log.read_text().splitlines()]
    assert [int(s[0]) for s in steps] == list(range(1, 21))  # every step once: none lost, none redone
    stopped_at = max(int(s[0]) for s in steps if s[1] == "restart=0")
    assert 3 <= stopped_at < 20 and all(s[1] == "restart=1" for s in steps[stopped_at:])
    assert [c for c in read_calls(workdir) if c.startswith("distill")] == [
        "distill.a@0",
        f"distill.a@{stopped_at}",
    ]
    log = (workdir / "distill.a" / "logs" / f"slurm-{job_id}.out").read_text()
    assert "SIGUSR1" in log and f"requeueing job {job_id}" in log and "restart 1" in log  # one appended log
    manifest = RunStore(workdir).manifest("distill.a")
    assert manifest["status"] == "done" and manifest["attempts"] == 2 and manifest["job_ids"] == [job_id]


def test_array_runs_only_the_missing_shards(tmp_path):
    stages = {
        "extract": {"num_shards": 3},
        **{s: {"enabled": False} for s in ("align", "distill", "fpo", "merge", "evaluate", "publish")},
    }
    path = _recipe(tmp_path, sources=("a",), stages=stages)
    recipe = load_recipe(path)
    run_stage(recipe, "prepare")  # done locally, before: not submitted
    run_stage(recipe, "extract.pivot", shard=1)
    jobs = _submit(path)
    assert jobs["prepare"].action == "skip"
    assert jobs["extract.pivot"].shards == [0, 2] and "--array=0,2" in jobs["extract.pivot"].sbatch
    assert jobs["extract.a"].shards == [0, 1, 2] and jobs["extract.a"].dependencies == []
    assert {s.state for s in _wait(jobs).values()} == {"COMPLETED"}
    calls = read_calls(tmp_path / "run")
    assert sorted(calls) == sorted(
        [
            "prepare",
            "extract.pivot#1",
            "extract.pivot#0",
            "extract.pivot#2",
            "extract.a#0",
            "extract.a#1",
            "extract.a#2",
        ]
    )
    logs = sorted(p.name for p in (tmp_path / "run" / "extract.pivot" / "logs").glob("slurm-*"))
    assert logs == [
        f"slurm-{jobs['extract.pivot'].job_id}_0.out",
        f"slurm-{jobs['extract.pivot'].job_id}_2.out",
    ]
    assert set(_states(path).values()) == {"done"}


@pytest.mark.slow
def test_tiny_demo_dag_via_slurm(zoo, tmp_path, monkeypatch, capsys):
    """The shipped demo, real stages, one SLURM job per instance (arrays for extract's shards) on the local cluster.
    The job chain, not the table, is what this test is about, so the demo shrinks to what exercises every stage
    and every kind of dependency (arrays, fan-out per source, fan-in at merge): two of its three sources, no
    control arms, one epoch per training arm, evaluation on 8 items per skill and align without candidate scoring
    (with the whole demo: 30 jobs, 7.5 minutes on 2 cores; three aligns scoring candidates side by side, 8 minutes
    each). The whole demo runs locally in test_demo.py, candidate scoring in test_candidates.py."""
    # the autouse `toy` fixture's swap is off: real stages, here and in the jobs (they inherit this environment)
    monkeypatch.delenv("FUSE_STAGE_MODULES")
    stage_module.cache_clear()
    workdir = tmp_path / "run"
    sources = ("llama", "gpt2")
    path = demo_recipe(
        zoo.root,
        workdir,
        tmp_path / "tiny-demo.yaml",
        sources=sources,
        stages__evaluate__max_items_per_skill=8,
        stages__distill__epochs=1,
        stages__distill__controls=[],
        stages__fpo__controls=[],
        stages__fpo__epochs=1,
        stages__align__score_candidates=False,
    )
    site = TESTS.parent / "slurm" / "sites" / "local.yaml"
    code = main(["submit", str(path), "--site", str(site), "--wait", "--timeout", "1500"])
    submitted = capsys.readouterr().out
    jobs = 18  # prepare, 3 extract arrays, 2 align, 3 distill, 4 score, 2 fpo, merge, evaluate, publish
    assert f"{jobs} jobs submitted, 0 kept" in submitted, submitted
    assert main(["status", str(path)]) == 0
    status = capsys.readouterr().out
    with capsys.disabled():  # the job list (ids, states, elapsed) for the closing note of issue 9
        print(f"\n{status}")
    Path("/tmp/slurm_demo_status.txt").write_text(status, encoding="utf-8")
    assert code == 0, f"{submitted}\n{status}"

    rows = slurm.collect_status(load_recipe(path))
    assert len(rows) == jobs and {r.state for r in rows} == {"done"}, status
    assert {r.job.state for r in rows} == {"COMPLETED"} and status.count("COMPLETED") == jobs, status
    assert len({r.job.job_id for r in rows}) == jobs and all(r.elapsed for r in rows)
    metrics = json.loads((workdir / "evaluate" / "out" / "metrics.json").read_text())
    check_metrics(metrics, table_rows(sources, controls=False))
    assert (workdir / "publish" / "out" / "model" / "model.safetensors").is_file()
    assert main(["submit", str(path), "--site", str(site)]) == 0
    assert "0 jobs submitted, 0 kept" in capsys.readouterr().out
