"""The run store: the state of a run is files under <workdir>, nothing else.

Each stage instance has a folder with manifest.json (fingerprint, status, timings, outputs, job ids, environment),
shards/NNNNN.done markers written after the shard's outputs, out/ for outputs and logs/ for logs.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from fuse.io import read_json, write_json_atomic, write_text_atomic

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class State:
    kind: str  # done | stale | failed | partial | running | pending
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.kind} ({self.reason})" if self.reason else self.kind


class RunStore:
    def __init__(self, workdir: str | os.PathLike):
        self.root = Path(workdir)

    # ------------------------------------------------------------------ paths
    def dir(self, name: str) -> Path:
        return self.root / name

    def out(self, name: str) -> Path:
        return self.dir(name) / "out"

    def logs(self, name: str) -> Path:
        return self.dir(name) / "logs"

    def shard_marker(self, name: str, shard: int) -> Path:
        return self.dir(name) / "shards" / f"{shard:05d}.done"

    # ------------------------------------------------------------------ manifests
    def manifest(self, name: str) -> dict[str, Any] | None:
        try:
            return read_json(self.dir(name) / MANIFEST)
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return None  # unreadable: treated as absent, so the instance reruns

    def write_manifest(self, name: str, manifest: dict[str, Any]) -> None:
        write_json_atomic(self.dir(name) / MANIFEST, manifest)

    def update_manifest(self, name: str, **fields: Any) -> dict[str, Any]:
        manifest = self.manifest(name) or {"instance": name}
        manifest.update(fields)
        self.write_manifest(name, manifest)
        return manifest

    # ------------------------------------------------------------------ shards
    def shards_done(self, name: str, num_shards: int) -> list[int]:
        return [i for i in range(num_shards) if self.shard_marker(name, i).exists()]

    def mark_shard(self, name: str, shard: int, info: dict[str, Any] | None = None) -> None:
        write_json_atomic(
            self.shard_marker(name, shard), {"shard": shard, "finished_at": time.time(), **(info or {})}
        )

    # ------------------------------------------------------------------ state
    def state(self, name: str, fingerprint: str, parts: dict[str, Any], num_shards: int = 1) -> State:
        manifest = self.manifest(name)
        if manifest is None:
            return State("pending")
        if manifest.get("fingerprint") != fingerprint:
            return State("stale", describe_change(manifest.get("parts") or {}, parts))
        status = manifest.get("status")
        if status == "done":
            missing = missing_outputs(self.out(name), manifest.get("outputs") or {})
            if missing:
                return State("stale", f"outputs missing or changed: {', '.join(missing[:3])}")
            return State("done")
        if status == "failed":
            return State("failed", str(manifest.get("error", ""))[:200])
        done = len(self.shards_done(name, num_shards))
        detail = f"{done}/{num_shards} shards done" if num_shards > 1 else "interrupted or in progress"
        return State("partial", detail)

    def reset(self, name: str, keep_checkpoints: bool = False) -> None:
        """Remove outputs, shard markers and (unless kept) checkpoints: a stale instance starts clean."""
        directory = self.dir(name)
        for sub in ("out", "shards", *(() if keep_checkpoints else ("checkpoints",))):
            shutil.rmtree(directory / sub, ignore_errors=True)
        for lock in directory.glob("*.lock"):
            lock.unlink(missing_ok=True)

    def begin(self, name: str, stage: str, fingerprint: str, parts: dict[str, Any], num_shards: int) -> None:
        """Record that the instance is running; attempts and job ids carry over while the fingerprint holds."""
        previous = self.manifest(name) or {}
        same = previous.get("fingerprint") == fingerprint
        self.write_manifest(
            name,
            {
                "instance": name,
                "stage": stage,
                "fingerprint": fingerprint,
                "parts": parts,
                "status": "running",
                "num_shards": num_shards,
                "started_at": (same and previous.get("started_at")) or time.time(),
                "attempts": (int(previous.get("attempts", 0)) if same else 0) + 1,
                "job_ids": previous.get("job_ids", []) if same else [],
                "environment": environment(),
            },
        )
        (self.dir(name) / "out").mkdir(parents=True, exist_ok=True)
        self.logs(name).mkdir(parents=True, exist_ok=True)

    def finish(self, name: str, elapsed: float) -> None:
        self.update_manifest(
            name,
            status="done",
            finished_at=time.time(),
            elapsed_s=round(elapsed, 3),
            outputs=list_outputs(self.out(name)),
            error=None,
        )

    def fail(self, name: str, error: str) -> None:
        self.update_manifest(name, status="failed", finished_at=time.time(), error=error)

    def write_resolved_recipe(self, text: str) -> None:
        write_text_atomic(self.root / "recipe.resolved.yaml", text)


def list_outputs(out: Path) -> dict[str, int]:
    """Every file under out/ with its size: what a later run checks before trusting the instance as done."""
    if not out.is_dir():
        return {}
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}


def missing_outputs(out: Path, outputs: dict[str, int]) -> list[str]:
    missing = []
    for rel, size in outputs.items():
        path = out / rel
        try:
            if path.stat().st_size != size:
                missing.append(rel)
        except FileNotFoundError:
            missing.append(rel)
    return missing


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which part of a fingerprint changed, in words a user can act on."""
    reasons = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            noun = {
                "parents": "input changed",
                "settings": "settings changed",
                "models": "model changed",
            }.get(key, f"{key} changed")
            reasons.append(f"{noun}: {', '.join(keys)}")
        else:
            reasons.append(f"{key} changed")
    return "; ".join(reasons) or "fingerprint changed"


@cache
def environment() -> dict[str, Any]:
    """Provenance for manifests: versions, host, git sha of the fuse checkout (if it is one)."""
    versions = {}
    for package in (
        "fuse-llm",
        "torch",
        "transformers",
        "accelerate",
        "deepspeed",
        "trl",
        "vllm",
        "datasets",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "versions": versions,
        "git_sha": _git_sha(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def _git_sha() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return None
    try:
        return (
            subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None
