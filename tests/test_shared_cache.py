"""A shared cache that trusts no one: an entry cannot reach outside itself or outside the run that restores it,
another user's (or an others-writable) entry is not used unless its group is trusted, a change to an entry after
it was checked does not reach the run, gc stays inside the cache, and published folders follow the umask."""

from __future__ import annotations

import json
import os
import stat

import pytest

from fuse.cache import ArtifactCache, UntrustedEntry, entry_path
from fuse.executor import run
from fuse.io import atomic_dir, published_mode, read_json, write_json_atomic
from fuse.recipe import parse_recipe
from fuse.store import RunStore

from recipes import toy_recipe
from toy_stages import read_calls

pytestmark = pytest.mark.usefixtures("toy_stage_modules")


def quiet(_line: str) -> None:
    pass


def cached_run(tmp_path):
    """A toy recipe run once with a cache (every instance stored), and a second workdir sharing that cache."""
    first = toy_recipe(
        tmp_path, cache=str(tmp_path / "shared" / "cache"), workdir=str(tmp_path / "runs" / "first")
    )
    run(parse_recipe(first), only=["prepare"], echo=quiet)
    second = {**first, "workdir": str(tmp_path / "runs" / "second")}
    cache = ArtifactCache(first["cache"])
    entry = next(p for p in cache.entries() if p.parent.name == "prepare")
    return first, second, cache, entry


def plant_output(entry, rel: str, text: str) -> None:
    """What a user who can write to the cache does: add an output name to an entry's record, with the digest of
    the file it names, so the record checks out."""
    from fuse.io import content_digest

    target = os.path.normpath(os.path.join(entry / "out", rel))
    with open(target, "w", encoding="utf-8") as handle:
        handle.write(text)
    record = read_json(entry / "entry.json")
    record["outputs"][rel] = {"size": os.path.getsize(target), "digest": content_digest(target)}
    write_json_atomic(entry / "entry.json", record)


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_an_entry_cannot_write_outside_the_run(tmp_path, kind):
    _, second, _, entry = cached_run(tmp_path)
    victim = tmp_path / "home" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("mine\n")
    # the planted output names the victim: relative (../ out of the run) or absolute
    run_out = tmp_path / "runs" / "second" / "prepare" / "out"
    if kind == "dotdot":  # the same ../ from the entry's out/ (one level deeper) lands on the attacker's file
        rel = os.path.relpath(victim, run_out)
        source = os.path.normpath(os.path.join(entry / "out", rel))
        assert source != str(victim)
        os.makedirs(os.path.dirname(source), exist_ok=True)
        plant_output(entry, rel, "planted\n")
    else:
        plant_output(entry, str(victim), "mine\n")  # its digest checks out: the name is what must be refused
    run(parse_recipe(second), only=["prepare"], echo=quiet)
    assert victim.read_text() == "mine\n"
    assert read_calls(second["workdir"]) == ["prepare"]  # recomputed, not restored
    assert not RunStore(second["workdir"]).manifest("prepare").get("cached_from")


def test_output_names_are_confined(tmp_path):
    for bad in ("../x", "/etc/passwd", "a/../../x", "./a", "a//b", "", "a/", "a\\..\\x"):
        with pytest.raises(UntrustedEntry):
            entry_path(tmp_path, bad)
    assert entry_path(tmp_path, "model/config.json") == tmp_path / "model" / "config.json"


def test_another_users_entry_is_used_only_when_its_group_is_trusted(tmp_path):
    _, second, cache, entry = cached_run(tmp_path)
    record = read_json(entry / "entry.json")
    stranger = ArtifactCache(cache.root, user=os.getuid() + 1)  # we are someone else to this entry
    with pytest.raises(UntrustedEntry, match="belongs to uid"):
        stranger.lookup("prepare", entry.name, record["inputs"])
    group = os.stat(entry).st_gid
    colleague = ArtifactCache(cache.root, groups=frozenset({group}), user=os.getuid() + 1)
    assert colleague.lookup("prepare", entry.name, record["inputs"]) is not None


def test_an_entry_writable_by_others_or_linked_is_not_used(tmp_path):
    _, _, cache, entry = cached_run(tmp_path)
    record = read_json(entry / "entry.json")
    some_output = entry / "out" / next(iter(record["outputs"]))
    os.chmod(some_output, os.stat(some_output).st_mode | stat.S_IWOTH)
    with pytest.raises(UntrustedEntry, match="written by others"):
        cache.lookup("prepare", entry.name, record["inputs"])
    os.chmod(some_output, published_mode())
    real = entry.with_name("elsewhere")
    entry.rename(real)
    entry.symlink_to(real)
    with pytest.raises(UntrustedEntry, match="symbolic link"):
        cache.lookup("prepare", entry.name, record["inputs"])


def test_a_change_to_the_entry_after_the_check_does_not_reach_the_run(tmp_path):
    _, second, cache, entry = cached_run(tmp_path)
    record = read_json(entry / "entry.json")
    store = RunStore(second["workdir"])
    colleague = ArtifactCache(cache.root, groups=frozenset({os.stat(entry).st_gid}), user=os.getuid() + 1)
    checked = colleague.lookup("prepare", entry.name, record["inputs"])
    rel = next(rel for rel in record["outputs"] if rel.endswith(".json"))
    original = (entry / "out" / rel).read_bytes()
    # rewritten in place (same size) between the check and the restore: the restore's own check refuses it
    (entry / "out" / rel).write_bytes(original.replace(b'"', b"'", 1))
    with pytest.raises(UntrustedEntry, match="changed while they were restored"):
        colleague.restore(checked, store, "prepare", 1)
    assert not (store.out("prepare") / rel).exists()  # reset: nothing half-restored is left
    # restored intact, then rewritten: the run has its own copy (another user's file is never hard-linked)
    (entry / "out" / rel).write_bytes(original)
    colleague.restore(checked, store, "prepare", 1)
    assert os.stat(store.out("prepare") / rel).st_ino != os.stat(entry / "out" / rel).st_ino
    (entry / "out" / rel).write_bytes(original.replace(b'"', b"'", 1))
    assert (store.out("prepare") / rel).read_bytes() == original
    # our own entry (no one else can write it) is hard-linked: nothing is copied
    restored = RunStore(tmp_path / "runs" / "third")
    (entry / "out" / rel).write_bytes(original)
    cache.restore(cache.lookup("prepare", entry.name, record["inputs"]), restored, "prepare", 1)
    assert os.stat(restored.out("prepare") / rel).st_ino == os.stat(entry / "out" / rel).st_ino


def test_gc_does_not_follow_links_out_of_the_cache(tmp_path):
    _, _, cache, _ = cached_run(tmp_path)
    outside = tmp_path / "precious" / "0123abcd"
    outside.mkdir(parents=True)
    (outside / "entry.json").write_text(json.dumps({"fingerprint": "0123abcd"}))
    (outside / "data.bin").write_bytes(b"keep me")
    (cache.root / "evil").symlink_to(tmp_path / "precious")
    removed = cache.gc(keep=set())
    assert outside.is_dir() and (outside / "data.bin").read_bytes() == b"keep me"
    assert all(tmp_path / "precious" not in p.parents for p in removed)
    assert cache.root / "evil" not in [p.parent for p in removed]


def test_published_folders_follow_the_umask(tmp_path):
    # safetensors writes weights owner-only: a folder published through fuse gets the umask's modes throughout
    with atomic_dir(tmp_path / "model") as folder:
        weights = folder / "model.safetensors"
        weights.write_bytes(b"\0" * 16)
        os.chmod(weights, 0o600)
        (folder / "sub").mkdir(mode=0o700)
        (folder / "sub" / "x").write_text("x")
        os.chmod(folder / "sub" / "x", 0o600)
    assert stat.S_IMODE(os.stat(tmp_path / "model" / "model.safetensors").st_mode) == published_mode()
    assert stat.S_IMODE(os.stat(tmp_path / "model" / "sub").st_mode) == published_mode(directory=True)
    assert stat.S_IMODE(os.stat(tmp_path / "model" / "sub" / "x").st_mode) == published_mode()


def test_an_unreadable_entry_is_recomputed_not_fatal(tmp_path, monkeypatch):
    _, second, cache, entry = cached_run(tmp_path)
    record = read_json(entry / "entry.json")
    rel = next(iter(record["outputs"]))
    real_access = os.access
    monkeypatch.setattr(
        "fuse.cache.os.access", lambda p, mode: False if str(p).endswith(rel) else real_access(p, mode)
    )  # root reads everything; this is what another user's 0600 file looks like to us
    run(parse_recipe(second), only=["prepare"], echo=quiet)
    assert read_calls(second["workdir"]) == ["prepare"]
    assert RunStore(second["workdir"]).manifest("prepare")["status"] == "done"


def test_under_a_group_umask_own_files_are_linked_and_no_longer_group_writable(tmp_path):
    _, second, cache, entry = cached_run(tmp_path)
    record = read_json(entry / "entry.json")
    rel = next(iter(record["outputs"]))
    os.chmod(entry / "out" / rel, 0o664)  # umask 002: a colleague could write it
    colleague = ArtifactCache(cache.root, groups=frozenset({os.stat(entry).st_gid}))
    colleague.restore(
        colleague.lookup("prepare", entry.name, record["inputs"]), RunStore(second["workdir"]), "prepare", 1
    )
    restored = RunStore(second["workdir"]).out("prepare") / rel
    assert os.stat(restored).st_ino == os.stat(entry / "out" / rel).st_ino  # no copy
    assert stat.S_IMODE(os.stat(restored).st_mode) == 0o644
