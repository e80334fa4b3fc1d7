"""The run store: the state of a run is files under <workdir>, nothing else.

Each stage instance has a folder with manifest.json (fingerprint, status, timings, outputs, job ids, environment),
shards/NNNNN.done markers written after the shard's outputs, out/ for outputs and logs/ for logs.

What vouches for a done instance is its content: the manifest records every output's digest (io.content_digest)
and the digest of each parent's outputs as it read them (`inputs`), so a corrupted, truncated or re-made parent
makes it stale, and a stale instance is reset before it reruns. Who works on an instance is recorded in lock
files that carry pid, host and start time and are broken once their owner is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from fuse.io import (
    TMP_SUFFIX,
    content_digest,
    published_mode,
    read_json,
    sha256_json,
    write_json_atomic,
    write_text_atomic,
)

MANIFEST = "manifest.json"
INSTANCE_LOCK = "instance.lock"
RUN_LOCK = "run.lock"
MODEL_FOLDER = "model"  # where a stage that makes a model writes it, under its out/


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

    def shard_lock(self, name: str, shard: int) -> Path:
        return self.dir(name) / "shards" / f"{shard:05d}.lock"

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

    def mark_shard(
        self, name: str, shard: int, info: dict[str, Any] | None = None, before: dict[str, Any] | None = None
    ) -> None:
        """Written after the shard's outputs. With `before` (out_snapshot taken when the shard started) it records
        the digests of the files the shard wrote, so a resume can tell a finished shard from a damaged one."""
        record: dict[str, Any] = {"shard": shard, "finished_at": time.time(), **(info or {})}
        if before is not None:
            out, now = self.out(name), self.out_snapshot(name)
            record["outputs"] = {rel: content_digest(out / rel) for rel in now if now[rel] != before.get(rel)}
        write_json_atomic(self.shard_marker(name, shard), record)

    def out_snapshot(self, name: str) -> dict[str, list[int]]:
        """(size, mtime, inode, ctime) of every finished file under out/: what changed while a shard ran."""
        out = self.out(name)
        snapshot = {}
        for path in _output_files(out):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                snapshot[str(path.relative_to(out))] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        return snapshot

    def drop_damaged_shards(self, name: str, num_shards: int) -> list[int]:
        """Remove the markers of finished shards whose recorded outputs are missing or changed: they are redone."""
        dropped = []
        for shard in self.shards_done(name, num_shards):
            marker = self.shard_marker(name, shard)
            try:
                recorded = read_json(marker).get("outputs") or {}
            except (OSError, ValueError, AttributeError):
                recorded = None  # an unreadable marker vouches for nothing
            if recorded is None or _changed_files(self.out(name), recorded):
                marker.unlink(missing_ok=True)
                dropped.append(shard)
        return dropped

    # ------------------------------------------------------------------ state
    def state(
        self,
        name: str,
        fingerprint: str,
        parts: dict[str, Any],
        num_shards: int = 1,
        parents: Iterable[str] = (),
    ) -> State:
        manifest = self.manifest(name)
        if manifest is None:
            return State("pending")
        if manifest.get("fingerprint") != fingerprint:
            return State("stale", describe_change(manifest.get("parts") or {}, parts))
        status = manifest.get("status")
        if status == "done":
            changed = output_problems(self.out(name), manifest.get("outputs") or {})
            if changed:
                return State("stale", f"outputs missing or changed: {', '.join(changed[:3])}")
            moved = self.changed_inputs(manifest, parents)
            if moved:
                return State("stale", f"inputs rewritten since it ran: {', '.join(moved)}")
            return State("done")
        if status == "failed":
            return State("failed", str(manifest.get("error", ""))[:200])
        done = len(self.shards_done(name, num_shards))
        detail = f"{done}/{num_shards} shards done" if num_shards > 1 else "interrupted or in progress"
        return State("partial", detail)

    def inputs_of(self, parents: Iterable[str]) -> dict[str, str | None]:
        """The digest of each parent's outputs as recorded when it finished (None: the parent is not done)."""
        result = {}
        for parent in parents:
            manifest = self.manifest(parent) or {}
            result[parent] = manifest.get("outputs_digest") if manifest.get("status") == "done" else None
        return result

    def changed_inputs(self, manifest: dict[str, Any], parents: Iterable[str]) -> list[str]:
        """Parents whose outputs differ from what this instance read (manifests from before `inputs`: none)."""
        recorded = manifest.get("inputs")
        if recorded is None:
            return []
        parents = list(parents)
        current = self.inputs_of(parents)
        return [p for p in parents if recorded.get(p) != current[p]]

    def reset_reason(
        self, name: str, fingerprint: str, parents: Iterable[str], num_shards: int | None = None
    ) -> str | None:
        """Why what is on disk cannot be continued (None: keep finished shards and checkpoints). The shard count
        is not in the fingerprint (a finished store is the same whatever its layout), but an unfinished one's
        shards cover other rows under another count: it starts over."""
        manifest = self.manifest(name)
        if manifest is None:
            return "never started"
        if manifest.get("fingerprint") != fingerprint:
            return "fingerprint changed"
        recorded = manifest.get("num_shards")
        if num_shards is not None and manifest.get("status") != "done" and recorded not in (None, num_shards):
            return f"shard count changed ({recorded} -> {num_shards}) before it finished"
        moved = self.changed_inputs(manifest, parents)
        if moved:
            return f"inputs rewritten: {', '.join(moved)}"
        if manifest.get("outputs") is not None:
            changed = output_problems(self.out(name), manifest["outputs"])
            if changed:
                return f"outputs missing or changed: {', '.join(changed[:3])}"
        return None

    def reset(self, name: str, keep_checkpoints: bool = False) -> None:
        """Remove outputs, shard markers and (unless kept) checkpoints: a stale instance starts clean.
        Refused while another live process holds one of its locks; locks of dead owners go too."""
        directory = self.dir(name)
        live = self.live_locks(name)
        if live:
            raise LockHeld(f"{name} cannot be reset: {live[0]}")
        for sub in ("out", "shards", *(() if keep_checkpoints else ("checkpoints",))):
            shutil.rmtree(directory / sub, ignore_errors=True)
        self.clean_debris(name)

    def clean_debris(self, name: str) -> None:
        """Temporary files and folders of killed atomic writes, and locks of dead owners. Only while no other live
        process works on the instance (its temporaries are in use)."""
        directory = self.dir(name)
        if not directory.is_dir() or self.live_locks(name):
            return
        for path in sorted(directory.rglob(f".*{TMP_SUFFIX}"), reverse=True):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for lock in [*directory.glob("*.lock"), *directory.glob("shards/*.lock")]:
            if not _mine(lock_owner(lock)):
                lock.unlink(missing_ok=True)  # dead: live_locks found none

    def live_locks(self, name: str) -> list[str]:
        """Locks on this instance held by other live processes, described for an error message."""
        directory = self.dir(name)
        found = []
        for lock in [*directory.glob("*.lock"), *directory.glob("shards/*.lock")]:
            owner = lock_owner(lock)
            if not _mine(owner) and owner_alive(lock, owner):
                found.append(describe_lock(lock, owner))
        return found

    def lock(self, name: str, wait: float = 0.0) -> FileLock:
        """The instance lock: who resets, begins, runs all shards of or finalizes this instance."""
        self.dir(name).mkdir(parents=True, exist_ok=True)
        return FileLock(self.dir(name) / INSTANCE_LOCK, f"stage instance {name}", wait)

    def run_lock(self) -> FileLock:
        """One `fuse run` (or `fuse submit`) at a time per run store."""
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(self.root / RUN_LOCK, f"the run store {self.root}")

    def begin(
        self,
        name: str,
        stage: str,
        fingerprint: str,
        parts: dict[str, Any],
        num_shards: int,
        inputs: dict[str, str | None] | None = None,
    ) -> None:
        """Record that the instance is running and what its parents had written when it started; attempts and
        job ids carry over while the fingerprint holds."""
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
                **({} if inputs is None else {"inputs": inputs}),
                "started_at": (same and previous.get("started_at")) or time.time(),
                "attempts": (int(previous.get("attempts", 0)) if same else 0) + 1,
                "job_ids": previous.get("job_ids", []) if same else [],
                "environment": environment(),
            },
        )
        (self.dir(name) / "out").mkdir(parents=True, exist_ok=True)
        self.logs(name).mkdir(parents=True, exist_ok=True)

    def finish(self, name: str, elapsed: float) -> None:
        outputs = list_outputs(self.out(name))
        self.update_manifest(
            name,
            status="done",
            finished_at=time.time(),
            elapsed_s=round(elapsed, 3),
            outputs=outputs,
            outputs_digest=outputs_digest(outputs),
            error=None,
        )

    def fail(self, name: str, error: str) -> None:
        self.update_manifest(name, status="failed", finished_at=time.time(), error=error)

    def write_resolved_recipe(self, text: str) -> None:
        # private: the recipe may carry env_setup lines (tokens, site secrets)
        write_text_atomic(self.root / "recipe.resolved.yaml", text, private=True)


def _output_files(out: Path) -> list[Path]:
    """Finished files under out/: temporaries of a writer (".name.xxx.tmp", and anything inside such a folder) are
    not outputs."""
    if not out.is_dir():
        return []
    return [
        p
        for p in sorted(out.rglob("*"))
        if p.is_file() and not any(part.endswith(TMP_SUFFIX) for part in p.relative_to(out).parts)
    ]


def outputs_digest(outputs: dict[str, dict[str, Any]]) -> str:
    """The digest that names an instance's outputs (list_outputs') in its manifest and its children's inputs."""
    return sha256_json(outputs)[:20]


def list_outputs(out: Path) -> dict[str, dict[str, Any]]:
    """Every file under out/ with its size and content digest: what a later run checks before trusting the
    instance as done, and what its children record as what they read."""
    return {
        str(p.relative_to(out)): {"size": p.stat().st_size, "digest": content_digest(p)}
        for p in _output_files(out)
    }


def output_problems(out: Path, outputs: dict[str, Any]) -> list[str]:
    """Recorded outputs that are missing, truncated/grown or whose content changed (manifests from before
    digests recorded a bare size: only the size is checked there)."""
    problems = []
    for rel, record in outputs.items():
        path = out / rel
        size, digest = (
            (record, None) if isinstance(record, int) else (record.get("size"), record.get("digest"))
        )
        try:
            if path.stat().st_size != size or (digest is not None and content_digest(path) != digest):
                problems.append(rel)
        except OSError:  # missing, or unreadable (another user's file without read permission)
            problems.append(rel)
    return problems


def _changed_files(out: Path, digests: dict[str, str]) -> list[str]:
    changed = []
    for rel, digest in digests.items():
        try:
            if content_digest(out / rel) != digest:
                changed.append(rel)
        except FileNotFoundError:
            changed.append(rel)
    return changed


# --------------------------------------------------------------------------------------------- locks

LOCK_HEARTBEAT_S = 30.0
LOCK_TTL_S = 600.0  # a lock from another host not refreshed for this long is taken as abandoned


class LockHeld(RuntimeError):
    """Someone alive holds the lock; the message names them."""


def _process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot), so a reused pid is not taken for the owner."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def lock_owner(path: Path) -> dict[str, Any] | None:
    try:
        owner = read_json(path)
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def pid_namespace() -> str | None:
    """This process's PID namespace ("pid:[4026531836]"): a pid means something only inside the namespace that
    gave it (a container or `unshare --pid` on the same host numbers its processes from 1)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _same_namespace(owner: dict[str, Any]) -> bool:
    """The owner's pid can be looked up here: same host name and same PID namespace (locks written before the
    namespace was recorded: assumed the same, as they were treated until then)."""
    if owner.get("host") != socket.gethostname():
        return False
    return owner.get("pidns") is None or owner.get("pidns") == pid_namespace()


def _mine(owner: dict[str, Any] | None) -> bool:
    return bool(owner) and _same_namespace(owner) and owner.get("pid") == os.getpid()


def slurm_run() -> dict[str, Any]:
    """Which run of which SLURM job this process belongs to (empty outside SLURM): a lock's owner records it."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    return {
        "slurm_job": job,
        "slurm_cluster": os.environ.get("SLURM_CLUSTER_NAME"),
        "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
    }


def _earlier_run_of_this_job(owner: dict[str, Any]) -> bool:
    """The owner was an earlier run of the SLURM job this process is a later run of. SLURM starts a requeued job only
    once its previous run has ended, or its node has been declared DOWN (and the run is killed there if the node
    comes back): that owner is gone, on whatever host. Without this, a job requeued off a lost node would find its
    own lock from another host fresh, and wait out LOCK_TTL_S."""
    here = slurm_run()
    if not here or owner.get("slurm_job") != here["slurm_job"]:
        return False
    if owner.get("slurm_cluster") != here["slurm_cluster"]:
        return False
    restart = owner.get("slurm_restart")
    return isinstance(restart, int) and restart < here["slurm_restart"]


def owner_alive(path: Path, owner: dict[str, Any] | None) -> bool:
    """Same host and PID namespace: the pid exists and started when the lock says. Another host or namespace:
    refreshed within LOCK_TTL_S (the owner touches its lock every LOCK_HEARTBEAT_S). Unreadable: alive until it
    ages like a foreign one. A heartbeat more than LOCK_TTL_S in the future is no heartbeat (a clock can be that
    far off only when something set the time by hand): abandoned. An owner that was an earlier run of this
    process's own SLURM job (requeued) is gone."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if owner is not None and _earlier_run_of_this_job(owner):
        return False
    if owner is None or not _same_namespace(owner):
        return -LOCK_TTL_S < age < LOCK_TTL_S
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, someone else's
    start = _process_start(pid)
    return not (owner.get("start") and start and start != owner["start"])


def describe_lock(path: Path, owner: dict[str, Any] | None) -> str:
    if owner is None:
        return f"{path} is being written or unreadable"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    return (
        f"held by pid {owner.get('pid')} on {owner.get('host')}"
        + (f" (PID namespace {owner['pidns']})" if owner.get("pidns") not in (None, pid_namespace()) else "")
        + f" since {since} ({owner.get('command', '?')}); "
        f"if that process is gone, delete {path}"
    )


class FileLock:
    """An exclusive lock file holding {pid, host, since, start, command, SLURM job and run}, created atomically (link of a complete
    temporary file, which works on NFS too). A lock whose owner is gone is broken: dead pid on this host, or no
    heartbeat for LOCK_TTL_S from another host. While held, a thread refreshes its mtime (the heartbeat)."""

    def __init__(self, path: Path, what: str, wait: float = 0.0):
        self.path, self.what, self.wait = Path(path), what, wait
        self._stop: threading.Event | None = None

    def acquire(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.time(),
            "start": _process_start(os.getpid()),
            "pidns": pid_namespace(),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
            **slurm_run(),
        }
        deadline = time.monotonic() + self.wait
        while True:
            if self._try_create(owner):
                break
            held = lock_owner(self.path)
            if not owner_alive(self.path, held):
                self._break(held)
                continue
            if time.monotonic() >= deadline:
                raise LockHeld(f"{self.what} is busy: {describe_lock(self.path, held)}")
            time.sleep(0.2)
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, args=(self._stop,), daemon=True).start()
        return self

    def _try_create(self, owner: dict[str, Any]) -> bool:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=TMP_SUFFIX, dir=self.path.parent)
        os.fchmod(
            fd, published_mode()
        )  # readable by whoever shares the run store: the holder is named to them
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(owner, handle)
            os.link(tmp, self.path)
            return True
        except (FileExistsError, FileNotFoundError):  # taken; or our temporary was swept as debris: try again
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _break(self, seen: dict[str, Any] | None) -> None:
        """Remove a dead owner's lock, unless it changed hands since we looked (another breaker got there)."""
        if lock_owner(self.path) == seen:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(LOCK_HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if self._stop is None:
            return
        self._stop.set()
        self._stop = None
        if _mine(lock_owner(self.path)):
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which part of a fingerprint changed, in words a user can act on."""
    reasons = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            # a field named after a Python keyword (`lambda_`) is the recipe's key without the underscore
            keys = sorted(
                k[:-1] if k.endswith("_") else k
                for k in set(before) | set(after)
                if before.get(k) != after.get(k)
            )
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
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
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
