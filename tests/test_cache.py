"""The shared artifact cache: recipes that differ downstream share every upstream instance, concurrent writers
leave one complete entry, a damaged entry is recomputed, gc keeps what named runs use."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from fuse.cache import ArtifactCache
from fuse.cli import main
from fuse.executor import run
from fuse.recipe import load_recipe, parse_recipe
from fuse.store import RunStore

from recipes import toy_recipe, write_recipe
from toy_stages import read_calls

UPSTREAM = ("prepare", "extract.", "score.", "align.", "distill.", "fpo.")


pytestmark = pytest.mark.usefixtures("toy_stage_modules")


def two_recipes(tmp_path) -> tuple[dict, dict]:
    """The same recipe twice, differing only in the merge method (and workdir), sharing one cache."""
    first = toy_recipe(tmp_path, name="sce")
    first["cache"] = str(tmp_path / "cache")
    first["workdir"] = str(tmp_path / "runs" / "sce")
    first["stages"] = {**first["stages"], "merge": {"method": "sce"}}
    second = {**first, "name": "ties", "workdir": str(tmp_path / "runs" / "ties")}
    second["stages"] = {**first["stages"], "merge": {"method": "ties"}}
    return first, second


def quiet(_line: str) -> None:
    pass


def test_a_second_recipe_recomputes_only_what_differs(tmp_path):
    first, second = two_recipes(tmp_path)
    run(parse_recipe(first), echo=quiet)
    assert any(c.startswith("extract.") for c in read_calls(first["workdir"]))
    run(parse_recipe(second), echo=quiet)
    calls = read_calls(second["workdir"])
    assert calls == ["merge", "evaluate", "publish"], calls  # nothing upstream of the merge ran again
    store = RunStore(second["workdir"])
    upstream = [p.name for p in store.root.iterdir() if p.name.startswith(UPSTREAM)]
    assert len(upstream) >= 10
    for name in upstream:  # checked by the run store: each is done, its outputs linked from the cache
        manifest = store.manifest(name)
        assert manifest["status"] == "done" and manifest["cached_from"].startswith(first["cache"]), name
    # and the second run is a complete run store: a rerun plans nothing, its outputs verify
    run(parse_recipe(second), echo=quiet)
    assert read_calls(second["workdir"]) == calls


def test_a_damaged_entry_is_detected_and_recomputed(tmp_path):
    first, second = two_recipes(tmp_path)
    run(parse_recipe(first), echo=quiet)
    cache = ArtifactCache(first["cache"])
    entry = next(p for p in cache.entries() if p.parent.name == "extract")
    damaged = next((entry / "out").rglob("*.json"))
    text = damaged.read_text()
    damaged.write_text(text.replace('"', "'", 1))  # same size, other content
    run(parse_recipe(second), echo=quiet)
    redone = [c for c in read_calls(second["workdir"]) if c.startswith("extract.")]
    assert redone, "the damaged extract entry must be recomputed, not linked"
    record = json.loads((entry / "entry.json").read_text())  # stored again, intact
    assert cache.lookup("extract", entry.name, record["inputs"]) is not None


def publish_from(args) -> bool:
    workdir, cache_root, name, barrier = args
    barrier.wait()
    return ArtifactCache(cache_root).publish(RunStore(workdir), name, "extract")


def test_concurrent_writers_leave_one_complete_entry(tmp_path):
    first, second = two_recipes(tmp_path)
    for recipe in (first, second):  # two runs with the instance done, no cache yet
        recipe = {**recipe, "cache": None}
        run(parse_recipe(recipe), only=["prepare", "extract.pivot"], echo=quiet)
    cache_root = tmp_path / "shared"
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        barrier = manager.Barrier(2)
        with context.Pool(2) as pool:
            won = pool.map(
                publish_from,
                [(r["workdir"], str(cache_root), "extract.pivot", barrier) for r in (first, second)],
            )
    assert sorted(won) == [False, True]
    entries = ArtifactCache(cache_root).entries()
    assert len(entries) == 1 and not [p for p in (cache_root / "extract").iterdir() if p.name.startswith(".")]
    record = json.loads((entries[0] / "entry.json").read_text())
    assert ArtifactCache(cache_root).lookup("extract", entries[0].name, record["inputs"]) is not None


def test_report_and_gc_keep_what_named_recipes_use(tmp_path, capsys):
    first, second = two_recipes(tmp_path)
    run(parse_recipe(first), echo=quiet)
    run(parse_recipe(second), echo=quiet)
    cache = tmp_path / "cache"
    assert main(["cache", "report", str(cache)]) == 0
    assert "| extract |" in capsys.readouterr().out
    kept = write_recipe(tmp_path, second, "ties.yaml")
    before = len(ArtifactCache(cache).entries())
    assert main(["cache", "gc", str(cache), "--keep", str(kept)]) == 0
    after = ArtifactCache(cache).entries()
    assert [p.parent.name for p in after].count("merge") == 1 and len(
        after
    ) == before - 3  # sce's merge/eval/publish
    again = parse_recipe({**second, "workdir": str(tmp_path / "runs" / "again")})
    run(again, echo=quiet)
    assert read_calls(again.workdir) == []  # everything the kept recipe uses is still there
    assert main(["cache", "gc", str(cache)]) != 0  # no --keep: refuses rather than emptying the cache
    assert load_recipe(kept).cache == str(cache)


def test_plan_counts_what_the_run_will_link_from_the_cache(tmp_path, capsys):
    """`fuse plan` shows the instances the run will link as "cached" with their entry, and its counts are the
    run's: what it says to run is exactly what runs."""
    first, second = two_recipes(tmp_path)
    run(parse_recipe(first), echo=quiet)
    path = write_recipe(tmp_path, second, "ties.yaml")
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and " run " in line]
    cached = [line.split()[0] for line in out.splitlines() if " cached " in line]
    assert sorted(listed) == ["evaluate", "merge", "publish"], out
    assert len(cached) >= 10 and all(
        f"from {first['cache']}" in line for line in out.splitlines() if " cached " in line
    )
    assert f"3 to run, {len(cached)} to link from the cache, 0 to skip" in out
    run(parse_recipe(second), echo=quiet)
    assert sorted(read_calls(second["workdir"])) == sorted(listed)
