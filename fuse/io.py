"""Atomic writes and content digests: the only place fuse writes files that others may take as complete.

A killed process must never leave a file (or folder) that looks finished, so everything goes to a temporary
name in the same directory, is fsynced, and is renamed into place. What is published gets the permissions the
user's umask gives (mkstemp's 0600 would hide a fused model from the rest of the cluster); files that may hold
secrets (env_setup lines) are written `private` (0600).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


TMP_SUFFIX = (
    ".tmp"  # temporary siblings are ".<name>.<random>.tmp": debris of a killed writer, never an output
)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask() can only set it, which would
    race with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def published_mode(directory: bool = False, private: bool = False) -> int:
    """The mode a plainly created file (0666) or folder (0777) would get, or owner-only when `private`."""
    if private:
        return 0o700 if directory else 0o600
    return (0o777 if directory else 0o666) & ~current_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", private: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; on success fsync it and rename it to `path`.

    The file gets the umask's permissions, or 0600 when `private` (set before any byte is written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, published_mode(private=private))
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, private: bool = False) -> None:
    with atomic_write(path, "w", private=private) as handle:
        handle.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _fsync_tree(folder: Path) -> None:
    """fsync every file, and give files and folders the umask's permissions: libraries write some files owner-only
    (safetensors weights come out 0600), which would make a model folder half-unreadable to the group that
    shares the run store or the cache."""
    file_mode, dir_mode = published_mode(), published_mode(directory=True)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, dir_mode)
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                executable = (
                    os.fstat(handle.fileno()).st_mode & dir_mode & 0o111
                )  # kept where the umask allows
                os.fchmod(handle.fileno(), file_mode | executable)
                os.fsync(handle.fileno())


def publish_dir(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the finished folder `staging` (a sibling of `final`) to `final`, replacing any folder there.

    Why one place: every byte is fsynced before the rename, and an old `final` is first moved aside, so a reader
    sees the old folder, then the new one, never a mix; a kill mid-swap leaves only "*.tmp" debris beside it."""
    staging, final = Path(staging), Path(final)
    _fsync_tree(staging)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}{TMP_SUFFIX}")
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; rename it to `path` only when the block succeeds.

    An existing `path` is replaced. Use for model folders, checkpoints, Arrow datasets. The folder gets the
    umask's permissions (mkdtemp makes it 0700); files inside are created by their writers, under the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    try:
        os.chmod(tmp, published_mode(directory=True))
        yield tmp
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


FULL_DIGEST_MAX_BYTES = 32 << 20
SAMPLE_BLOCK = 64 << 10
SAMPLE_BLOCKS = 64


def content_digest(path: str | os.PathLike) -> str:
    """What vouches for an output file: "sha256:<hex>" of the whole file up to FULL_DIGEST_MAX_BYTES, beyond that
    "sampled:<hex>" of (size, the safetensors header, the first MiB, 64 evenly spaced 64 KiB blocks, the last
    block).

    Why sampled: `fuse plan` re-checks every output of every done instance, and a fused 70B model is 140 GB —
    hashing it all on each plan would take minutes, sampling reads ~6 MB per file. What it catches there:
    truncation or growth (size), any change in a safetensors header (tensor names, shapes, offsets) or in a file's
    first MiB, and damage that covers one of the sampled blocks; a few flipped bytes elsewhere in a large file
    go unseen. Everything up to 32 MiB (manifests, indexes, tables, log-prob shards of the tests, the tiny
    models) is hashed in full, so any change there is caught. The log-prob store checksums its shards itself.
    """
    path = Path(path)
    size = path.stat().st_size
    if size <= FULL_DIGEST_MAX_BYTES:
        return "sha256:" + sha256_file(path)
    digest = hashlib.sha256(f"size={size};".encode())
    with open(path, "rb") as handle:
        head = handle.read(8)
        if path.suffix == ".safetensors" and len(head) == 8:
            header_len = min(int.from_bytes(head, "little"), size - 8)
            digest.update(head + handle.read(header_len))
        handle.seek(0)
        digest.update(handle.read(1 << 20))
        step = max(1, (size - SAMPLE_BLOCK) // SAMPLE_BLOCKS)
        for offset in [*range(0, size - SAMPLE_BLOCK, step)][:SAMPLE_BLOCKS] + [size - SAMPLE_BLOCK]:
            handle.seek(offset)
            digest.update(handle.read(SAMPLE_BLOCK))
    return "sampled:" + digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Digest of a JSON-able object in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
