"""Fingerprints name inputs by content, not by place: a run moved with its models and data is still done, and a
copy of a model or data file elsewhere is the same input."""

from __future__ import annotations

import shutil

import pytest

from fuse.dag import build_dag
from fuse.executor import run
from fuse.plan import fingerprints, make_plan
from fuse.recipe import parse_recipe
from fuse.store import RunStore

from recipes import toy_recipe
from toy_stages import read_calls

pytestmark = pytest.mark.usefixtures("toy_stage_modules")


def test_a_moved_run_with_its_models_and_data_plans_as_done(tmp_path):
    old = tmp_path / "site-a"
    old.mkdir()
    recipe = parse_recipe(toy_recipe(old))
    run(recipe, echo=lambda _: None)
    calls = read_calls(recipe.workdir)
    new = tmp_path / "elsewhere" / "site-b"
    new.parent.mkdir()
    shutil.move(str(old), str(new))
    moved = parse_recipe(toy_recipe(new))  # every path in it now points under the new place
    assert moved.workdir != recipe.workdir
    steps = make_plan(moved, build_dag(moved), RunStore(moved.workdir))
    assert {(step.state.kind, step.action) for step in steps} == {("done", "skip")}, [
        (s.instance.name, str(s.state)) for s in steps if s.state.kind != "done"
    ]
    run(moved, echo=lambda _: None)
    assert read_calls(moved.workdir) == calls  # nothing recomputed


def test_the_same_inputs_in_another_place_have_the_same_fingerprints(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    first, second = parse_recipe(toy_recipe(a)), parse_recipe(toy_recipe(b))
    prints_a, prints_b = fingerprints(first, build_dag(first)), fingerprints(second, build_dag(second))
    assert {k: v[0] for k, v in prints_a.items()} == {k: v[0] for k, v in prints_b.items()}
    (b / "data" / "sft.jsonl").write_text('{"messages": []}\n')  # other content: not the same input any more
    changed = fingerprints(second, build_dag(second))
    assert changed["prepare"][0] != prints_a["prepare"][0]
