"""Fingerprints: content addresses of stage instances and of the files they read.

File digests are cached by (path, inode, size, mtime, ctime) so a no-op rerun does not re-hash multi-GB weights;
ctime is in the key because an in-place edit can keep (or reset) the mtime, but never the ctime.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from fuse.io import read_json, sha256_file, sha256_json, write_json_atomic


def _cache_path() -> Path:
    root = os.environ.get("FUSE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fuse")
    return Path(root) / "file-digests.json"


_memo: dict[str, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, cached on disk by (resolved path, inode, size, mtime_ns, ctime_ns)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
    if key in _memo:
        return _memo[key]
    cache_file = _cache_path()
    try:
        cache = read_json(cache_file)
    except (FileNotFoundError, json.JSONDecodeError):
        cache = {}
    digest = cache.get(key)
    if digest is None:
        digest = sha256_file(path)
        cache[key] = digest
        with contextlib.suppress(OSError):  # a read-only home only costs a re-hash next time
            write_json_atomic(cache_file, cache)
    _memo[key] = digest
    return digest


def files_digest(paths: list[Path]) -> dict[str, str]:
    return {p.name: file_digest(p) for p in paths}


def path_digest(path: str | os.PathLike) -> dict[str, str] | str:
    """Digest of a local file, or of every file below a directory (relative names)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    return {str(p.relative_to(path)): file_digest(p) for p in sorted(path.rglob("*")) if p.is_file()}


def fingerprint(parts: dict[str, Any]) -> str:
    """The fingerprint of anything described by a JSON-able mapping; short enough to read, long enough to trust."""
    return sha256_json(parts)[:20]
