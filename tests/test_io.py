"""Atomic writes: a killed writer leaves no file or folder that looks complete."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fuse.io import atomic_dir, atomic_write, publish_dir, read_json, write_json_atomic

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


def test_publish_dir_moves_a_staged_folder_into_place_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "model"
    for version in ("1", "2"):
        staging = tmp_path / ".model.partial"
        (staging / "sub").mkdir(parents=True)
        (staging / "sub" / "v").write_text(version)
        publish_dir(staging, target)
        assert (target / "sub" / "v").read_text() == version
        assert sorted(os.listdir(tmp_path)) == ["model"]


def test_json_round_trip(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert read_json(tmp_path / "m.json") == {"a": [1, 2], "b": 1}


def test_published_files_and_folders_follow_the_umask(tmp_path):
    """mkstemp/mkdtemp make 0600/0700; a fused model published that way is unreadable to the rest of the cluster."""
    import stat

    from fuse.io import write_bytes_atomic, write_text_atomic

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    old = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "w.safetensors", b"x")
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
        assert mode(tmp_path / "w.safetensors") == 0o644 and mode(tmp_path / "model") == 0o755
        assert mode(tmp_path / "model" / "config.json") == 0o644
        write_text_atomic(tmp_path / "secret.yaml", "token", private=True)
        assert mode(tmp_path / "secret.yaml") == 0o600
        os.umask(0o077)
        write_bytes_atomic(tmp_path / "strict.bin", b"x")
        assert mode(tmp_path / "strict.bin") == 0o600
    finally:
        os.umask(old)


def test_content_digest_full_for_small_files_sampled_for_large(tmp_path, monkeypatch):
    from fuse import io

    small = tmp_path / "small.bin"
    small.write_bytes(bytes(range(256)) * 64)
    digest = io.content_digest(small)
    assert digest.startswith("sha256:")
    data = bytearray(small.read_bytes())
    data[5000] ^= 1  # one bit anywhere in a small file
    small.write_bytes(bytes(data))
    assert io.content_digest(small) != digest

    monkeypatch.setattr(io, "FULL_DIGEST_MAX_BYTES", 1 << 16)  # make a 1 MiB safetensors "large"
    import numpy as np
    from safetensors.numpy import save_file

    big = tmp_path / "model.safetensors"
    save_file({"a": np.zeros(1 << 18, dtype=np.float32)}, str(big))
    digest = io.content_digest(big)
    assert digest.startswith("sampled:")
    header_len = int.from_bytes(big.read_bytes()[:8], "little")
    for offset in (20, 8 + header_len + 10, big.stat().st_size - 3):  # header, first MiB, last block
        data = bytearray(big.read_bytes())
        data[offset] ^= 0xFF
        big.write_bytes(bytes(data))
        assert io.content_digest(big) != digest, offset
        data[offset] ^= 0xFF
        big.write_bytes(bytes(data))
    big.write_bytes(big.read_bytes()[:-4])  # truncation
    assert io.content_digest(big) != digest


def test_digest_cache_sees_an_in_place_edit_that_keeps_the_mtime(tmp_path, monkeypatch):
    from fuse.fingerprint import _memo, file_digest

    monkeypatch.setenv("FUSE_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 128)
    before = file_digest(weights)
    stat_before = weights.stat()
    time.sleep(0.01)
    with open(weights, "r+b") as handle:  # same size, same file, mtime put back as it was
        handle.write(b"b")
    os.utime(weights, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    _memo.clear()
    assert file_digest(weights) != before
