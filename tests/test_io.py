"""Atomic writes: a killed writer leaves no file or folder that looks complete."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fuse.io import atomic_dir, atomic_write, read_json, write_json_atomic

WRITER = """
import sys, time
from fuse.io import atomic_write, atomic_dir
target, kind = sys.argv[1], sys.argv[2]
if kind == "file":
    with atomic_write(target) as handle:
        handle.write(b"x" * 1000)
        handle.flush()
        print("writing", flush=True)
        time.sleep(60)
else:
    with atomic_dir(target) as tmp:
        (tmp / "a.bin").write_bytes(b"y" * 1000)
        print("writing", flush=True)
        time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_killed_writer_leaves_nothing_complete(tmp_path, kind):
    target = tmp_path / ("out.bin" if kind == "file" else "model")
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target), kind], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "writing"
    time.sleep(0.1)
    process.kill()
    process.wait()
    assert not target.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(name.startswith(".") and ".tmp" in name for name in leftovers)


def test_exception_inside_block_removes_temporaries(tmp_path):
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "f.txt", "w") as handle:
        handle.write("partial")
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("partial")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_atomic_dir_replaces_existing(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("2")
    assert (target / "v").read_text() == "2"
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_json_round_trip(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert read_json(tmp_path / "m.json") == {"a": [1, 2], "b": 1}
