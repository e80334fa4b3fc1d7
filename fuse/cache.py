"""A content-addressed artifact cache shared by recipes: a finished stage instance's outputs stored under its
fingerprint, linked into any run whose instance has the same fingerprint instead of being recomputed (extracting a
72B source is the expensive part: never do it twice, whichever recipe asks).

    <cache>/<stage>/<fingerprint>/entry.json   fingerprint, outputs with digests, the inputs it was made from
    <cache>/<stage>/<fingerprint>/out/...      the outputs (hard links where the filesystem allows, else copies)

An entry appears whole or not at all: it is assembled in a temporary folder beside it and renamed into place, and a
second writer's rename onto an existing entry fails and is discarded, so concurrent runs (on NFS/Lustre too) leave
one complete entry. An entry is used only after its outputs check out against the digests it recorded, and only
when this run's parents wrote the same outputs as the ones it was made from; a damaged entry is moved aside and
the instance recomputed (and stored again).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fuse.io import TMP_SUFFIX, read_json, write_json_atomic
from fuse.store import RunStore, list_outputs, output_problems

log = logging.getLogger(__name__)

ENV = "FUSE_ARTIFACT_CACHE"
ENTRY = "entry.json"


def cache_root(recipe: Any) -> Path | None:
    """The recipe's `cache:` folder, else $FUSE_ARTIFACT_CACHE, else none (no cache)."""
    root = getattr(recipe, "cache", None) or os.environ.get(ENV)
    return Path(root).expanduser() if root else None


def _link_tree(source: Path, target: Path, files: Iterable[str]) -> None:
    """Hard-link (copy across filesystems) each relative file from `source` into `target`."""
    for rel in files:
        dst = target / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source / rel, dst)
        except OSError:
            shutil.copy2(source / rel, dst)


class ArtifactCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def entry(self, stage: str, fingerprint: str) -> Path:
        return self.root / stage / fingerprint

    def lookup(self, stage: str, fingerprint: str, inputs: dict[str, str | None]) -> dict[str, Any] | None:
        """The entry's record when it is complete, intact and was made from the same parent outputs."""
        folder = self.entry(stage, fingerprint)
        try:
            record = read_json(folder / ENTRY)
        except (FileNotFoundError, ValueError):
            return None
        damaged = output_problems(folder / "out", record.get("outputs") or {})
        if damaged or record.get("fingerprint") != fingerprint:
            self.quarantine(folder, f"outputs missing or changed: {', '.join(damaged[:3])}")
            return None
        if (record.get("inputs") or {}) != inputs:
            log.info(
                "%s/%s: in the cache, but made from other parent outputs; recomputing", stage, fingerprint
            )
            return None
        return record

    def quarantine(self, folder: Path, why: str) -> None:
        """Move a damaged entry out of the way (then delete it): the next run recomputes and stores it anew."""
        log.warning(
            "cache entry %s is damaged (%s); it is discarded and the instance recomputed", folder, why
        )
        aside = folder.with_name(f".{folder.name}.bad.{os.getpid()}{TMP_SUFFIX}")
        with contextlib.suppress(OSError):
            folder.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)

    def publish(self, store: RunStore, name: str, stage: str) -> bool:
        """Store a done instance's outputs under its fingerprint; False when an entry is already there (made by
        another run: same fingerprint, so the same content as far as anything downstream may tell)."""
        manifest = store.manifest(name) or {}
        if manifest.get("status") != "done":
            return False
        fingerprint = manifest["fingerprint"]
        final = self.entry(stage, fingerprint)
        if (final / ENTRY).is_file():
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.with_name(f".{fingerprint}.{os.getpid()}.{time.monotonic_ns()}{TMP_SUFFIX}")
        try:
            outputs = manifest.get("outputs") or list_outputs(store.out(name))
            _link_tree(store.out(name), staging / "out", outputs)
            record = {
                "fingerprint": fingerprint,
                "stage": stage,
                "instance": name,
                "outputs": outputs,
                "outputs_digest": manifest.get("outputs_digest"),
                "inputs": manifest.get("inputs") or {},
                "parts": manifest.get("parts"),
                "created_at": time.time(),
                "made_in": str(store.root),
            }
            write_json_atomic(staging / ENTRY, record)  # the entry is complete once it is renamed into place
            try:
                staging.rename(final)
            except OSError:  # another run published this fingerprint first: keep theirs
                return False
            return True
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def restore(self, record: dict[str, Any], store: RunStore, name: str, num_shards: int) -> None:
        """Link an entry's outputs into the run's (reset) instance and mark it done, saying where it came from."""
        folder = self.entry(record["stage"], record["fingerprint"])
        store.reset(name)
        _link_tree(folder / "out", store.out(name), record["outputs"])
        for shard in range(num_shards):  # array tasks that arrive later find every shard done
            write_json_atomic(store.shard_marker(name, shard), {"shard": shard, "cached_from": str(folder)})
        store.update_manifest(
            name,
            instance=name,
            stage=record["stage"],
            fingerprint=record["fingerprint"],
            parts=record.get("parts"),
            status="done",
            num_shards=num_shards,
            inputs=record.get("inputs") or {},
            outputs=record["outputs"],
            outputs_digest=record.get("outputs_digest"),
            cached_from=str(folder),
            finished_at=time.time(),
            error=None,
        )

    # ------------------------------------------------------------------ reports and gc
    def entries(self) -> list[Path]:
        return sorted(
            p
            for p in self.root.glob("*/*")
            if p.is_dir() and not p.name.startswith(".") and (p / ENTRY).is_file()
        )

    def size_report(self) -> dict[str, dict[str, int]]:
        """Per stage: entries and bytes (a file hard-linked into runs counts here once, in full)."""
        report: dict[str, dict[str, int]] = {}
        for folder in self.entries():
            row = report.setdefault(folder.parent.name, {"entries": 0, "bytes": 0})
            row["entries"] += 1
            row["bytes"] += sum(p.stat().st_size for p in (folder / "out").rglob("*") if p.is_file())
        return report

    def gc(self, keep: set[str], dry_run: bool = False) -> list[Path]:
        """Remove every entry whose fingerprint is not in `keep` (and leftovers of killed writers)."""
        removed = []
        for folder in [*self.entries(), *self.root.glob(f"*/.*{TMP_SUFFIX}")]:
            if folder.name in keep:
                continue
            removed.append(folder)
            if not dry_run:
                shutil.rmtree(folder, ignore_errors=True)
        return removed


# --------------------------------------------------------------------------------------------- executor hooks


def restore_if_cached(recipe: Any, store: RunStore, step: Any) -> bool:
    """Before running an instance: True when it is done (already, or now from the cache)."""
    root = cache_root(recipe)
    if root is None:
        return False
    instance = step.instance
    name = instance.name
    now = store.state(name, step.fingerprint, step.parts, instance.num_shards, instance.parents)
    if now.kind == "done":
        return True
    cache = ArtifactCache(root)
    record = cache.lookup(instance.stage, step.fingerprint, store.inputs_of(instance.parents))
    if record is None:
        return False
    cache.restore(record, store, name, instance.num_shards)
    log.info("%s: outputs linked from the cache (%s)", name, cache.entry(instance.stage, step.fingerprint))
    return True


def cached_count(recipe: Any, steps: list[Any]) -> int:
    """How many of `steps` have an entry in the recipe's cache (not yet verified: that happens at use)."""
    root = cache_root(recipe)
    if root is None:
        return 0
    cache = ArtifactCache(root)
    return sum((cache.entry(s.instance.stage, s.fingerprint) / ENTRY).is_file() for s in steps)


def publish_if_cached(recipe: Any, store: RunStore, step: Any) -> None:
    """After an instance ends done: store it for other runs (a cache that cannot be written only warns)."""
    root = cache_root(recipe)
    if root is None or (store.manifest(step.instance.name) or {}).get("cached_from"):
        return
    try:
        ArtifactCache(root).publish(store, step.instance.name, step.instance.stage)
    except OSError as error:
        log.warning("%s: could not store it in the cache %s: %s", step.instance.name, root, error)


# --------------------------------------------------------------------------------------------- CLI


def cmd_cache(args: argparse.Namespace) -> int:
    from fuse.dag import build_dag
    from fuse.plan import fingerprints
    from fuse.recipe import RecipeError, load_recipe

    cache = ArtifactCache(args.cache)
    if not cache.root.is_dir():
        raise RecipeError(f"{cache.root}: no such cache folder")
    if args.action == "report":
        report = cache.size_report()
        print("| stage | entries | GB |\n|---|---|---|")
        for stage, row in sorted(report.items()):
            print(f"| {stage} | {row['entries']} | {row['bytes'] / 1e9:.3f} |")
        total = sum(r["bytes"] for r in report.values())
        print(
            f"total: {sum(r['entries'] for r in report.values())} entries, {total / 1e9:.3f} GB in {cache.root}"
        )
        return 0
    if not args.keep:
        raise RecipeError("fuse cache gc: name the recipes whose entries to keep (--keep RECIPE, repeatable)")
    keep: set[str] = set()
    for path in args.keep:
        recipe = load_recipe(path)
        keep |= {fp for fp, _ in fingerprints(recipe, build_dag(recipe)).values()}
    removed = cache.gc(keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(removed)} entries; kept those of {len(args.keep)} recipe(s)")
    for folder in removed:
        print(f"  {folder.relative_to(cache.root)}")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("cache", help="the shared artifact cache: size report, garbage collection")
    p.add_argument("action", choices=("report", "gc"))
    p.add_argument("cache", help="the cache folder (a recipe's `cache:`)")
    p.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="RECIPE",
        help="gc: keep what this recipe uses (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="gc: list what would go, remove nothing")
    p.set_defaults(handler=cmd_cache)
