"""The shipped demo (examples/tiny-demo.yaml) end to end on the zoo, as `make demo` runs it: all 30 instances,
the published model, the result table; then a no-op rerun, and a changed setting rerunning only what it feeds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuse.dag import build_dag
from fuse.executor import results, run
from fuse.plan import stage_module
from fuse.recipe import load_recipe
from fuse.store import RunStore

from demo_recipe import DOMAINS, TABLE_ROWS, check_metrics, demo_recipe
from recipes import toy_recipe, write_recipe
from toy_stages import OVERRIDES

TESTS = Path(__file__).parent
# `fuse run` in a fresh interpreter, reporting which heavy libraries the command itself imported
RUN = (
    "import sys; from fuse.cli import main; code = main(['run', sys.argv[1]]);"
    "print('HEAVY', [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]); sys.exit(code)"
)


def fuse_run(recipe: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FUSE_STAGE_MODULES"}  # the real stages
    result = subprocess.run(
        [sys.executable, "-c", RUN, str(recipe)], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"fuse run failed:\n{result.stdout}\n{result.stderr[-5000:]}"
    return result


def finished_at(recipe: Path) -> dict[str, float]:
    loaded = load_recipe(recipe)
    store = RunStore(loaded.workdir)
    manifests = {i.name: store.manifest(i.name) or {} for i in build_dag(loaded)}
    assert {n: m.get("status") for n, m in manifests.items()} == dict.fromkeys(manifests, "done")
    return {name: m["finished_at"] for name, m in manifests.items()}


def check_item_scores(metrics: dict, out: Path) -> None:
    """scores.parquet holds every model's every item, and reproduces every aggregate of metrics.json."""
    from fuse.item_scores import FILE, Column, column_value, read_scores

    frame = read_scores(out / FILE)
    assert set(frame["model"]) == set(metrics["models"])
    for name, row in metrics["models"].items():
        for domain, ce in row["domain_ce"].items():
            assert column_value(frame, name, Column("domain", domain, "nll")) == pytest.approx(ce, rel=1e-12)
        for skill, accuracy in row["skills"].items():
            assert column_value(frame, name, Column("skill", skill, "correct")) == pytest.approx(accuracy)
        assert column_value(frame, name, Column("text", "text", "nll")) == pytest.approx(row["ce_per_byte"])
        for skill, accuracy in row["preference"].items():  # held-out preference pairs, per skill
            assert column_value(frame, name, Column("preference", skill, "correct")) == pytest.approx(
                accuracy
            )
        assert set(row["preference"]) == set(row["skills"])
    assert "Paired differences to **distill.sft_baseline**" in (out / "metrics.md").read_text()


def check_published(model: Path, merged: Path) -> None:
    """The published folder reloads, holds the merged weights, and generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    published = AutoModelForCausalLM.from_pretrained(model)
    reference = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    for name, tensor in published.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which city is the capital of Nevotra?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = published.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]


def check_estimate(recipe_path, workdir) -> None:
    """`fuse plan --estimate` against this run: from the shipped calibration alone (fitted on another run, the
    real pair), the whole run's time within 3x of what it took here (1.31x on the machine it was fitted on), and
    each instance's peak memory within 3.5x (3.1x there)."""
    from fuse.dag import build_dag
    from fuse.estimate import estimate_plan
    from fuse.recipe import load_recipe
    from fuse.resources import host_peak_gb

    recipe = load_recipe(recipe_path)
    store = RunStore(workdir)
    estimates, _, _ = estimate_plan(recipe, build_dag(recipe), store, use_runs=False)
    measured = {e.instance: store.manifest(e.instance) for e in estimates}
    timed = [e for e in estimates if measured[e.instance].get("elapsed_s")]  # not linked from a cache
    total = sum(measured[e.instance]["elapsed_s"] for e in timed)
    assert len(timed) >= 25 and 1 / 3 < total / sum(e.seconds for e in timed) < 3, (total, timed)
    for e in estimates:
        peaks = measured[e.instance]["peak_memory"]
        peak = host_peak_gb(peaks)
        assert 1 / 3.5 < peak / e.peak_gb < 3.5, (e.instance, peak, e.peak_gb)


@pytest.mark.slow
def test_tiny_demo_end_to_end_then_noop_then_one_setting(zoo, tmp_path):
    workdir = tmp_path / "run"
    cache = str(tmp_path / "cache")  # as the shipped demo has one: a rerun reuses what did not change
    recipe = demo_recipe(zoo.root, workdir, tmp_path / "tiny-demo.yaml", cache=cache)
    first = fuse_run(recipe)
    assert "30 of 30 stage instances to run" in first.stdout
    finished = finished_at(recipe)
    assert len(finished) == 30

    model = workdir / "publish" / "out" / "model"
    table = workdir / "evaluate" / "out" / "metrics.md"
    check_published(model, workdir / "merge" / "out" / "model")
    metrics = json.loads((workdir / "evaluate" / "out" / "metrics.json").read_text())
    check_metrics(metrics)
    check_item_scores(metrics, workdir / "evaluate" / "out")
    ending = first.stdout[first.stdout.index("finished in") :]
    assert f"published model: {model.resolve()}" in ending and f"results ({table.resolve()})" in ending
    printed = [line.split("|")[1].strip() for line in ending.splitlines() if line.startswith("| ")]
    assert printed[0] == "model" and set(printed[1:]) >= set(TABLE_ROWS) and printed[-1] == "limit", printed
    header = next(line for line in ending.splitlines() if line.startswith("| model |"))
    assert all(f"| CE {domain} |" in header for domain in DOMAINS) and "| CE mean |" in header, header

    check_estimate(recipe, workdir)

    again = fuse_run(recipe)
    assert "nothing to do: all 30 stage instances are done" in again.stdout
    assert "HEAVY []" in again.stdout  # the no-op path stays light
    assert f"published model: {model.resolve()}" in again.stdout  # and still says where the result is
    assert finished_at(recipe) == finished

    changed = demo_recipe(
        zoo.root,
        workdir,
        tmp_path / "tiny-demo.yaml",
        cache=cache,
        stages__merge__parameters__select_topk=0.7,
    )
    third = fuse_run(changed)
    assert "3 of 30 stage instances to run" in third.stdout
    now = finished_at(changed)
    assert {name for name in now if now[name] != finished[name]} == {"merge", "evaluate", "publish"}
    # evaluate scores the new merge alone: every other model's results come back from the cache
    rows = json.loads((workdir / "evaluate" / "out" / "metrics.json").read_text())["models"]
    assert {name for name, row in rows.items() if not row.get("cached")} == {"merge"}
    assert all(rows[n]["ce_per_byte"] == metrics["models"][n]["ce_per_byte"] for n in rows if n != "merge")
    assert f"published model: {model.resolve()}" in third.stdout


def test_results_name_the_model_and_table_only_when_done_now(tmp_path, monkeypatch):
    """`fuse run` ends with where the model is and the table, read from the run store (toy stages here)."""
    monkeypatch.setenv("FUSE_STAGE_MODULES", OVERRIDES)
    stage_module.cache_clear()
    try:
        path = write_recipe(tmp_path, toy_recipe(tmp_path))
        store = RunStore(tmp_path / "run")
        steps = run(load_recipe(path), echo=lambda _: None)
        assert results(steps, store) == []  # toy stages write no model and no table
        (store.out("publish") / "model").mkdir()
        (store.out("evaluate") / "metrics.md").write_text(
            "# Evaluation\n\n| model | x |\n|---|---|\n| a | 1 |\n"
        )
        lines = results(steps, store)
        assert lines[0] == f"published model: {(store.out('publish') / 'model').resolve()}"
        assert lines[-3:] == ["| model | x |", "|---|---|", "| a | 1 |"]

        changed = toy_recipe(tmp_path, stages={"extract": {"num_shards": 2}, "merge": {"method": "ties"}})
        stale = run(load_recipe(write_recipe(tmp_path, changed)), only=["prepare"], echo=lambda _: None)
        assert results(stale, store) == []  # publish and evaluate are stale: their old outputs are not shown
    finally:
        stage_module.cache_clear()
