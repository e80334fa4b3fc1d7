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

What a shared cache may be: a folder others can write to. What it may not do: reach outside an entry or change a
run after the fact. So an entry is trusted only when its folder, record and files are owned by this user or by the
configured group (`cache_group:` / $FUSE_CACHE_GROUP) and are writable by no one else, and nothing on the way is
a symbolic link; its output names are plain relative paths inside it (no absolute path, no `..`), and restoring
never writes over an existing file. Files this user owns and no one else can write are hard-linked; anything else
is copied, and the run's own copies are verified after they are made, so a change to the entry after the check
reaches nothing. An untrusted entry is left alone (not quarantined: it is not ours) and the instance recomputed.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from fuse.io import TMP_SUFFIX, published_mode, read_json, write_json_atomic
from fuse.store import RunStore, list_outputs, output_problems, outputs_digest

log = logging.getLogger(__name__)

ENV = "FUSE_ARTIFACT_CACHE"
GROUP_ENV = "FUSE_CACHE_GROUP"
ENTRY = "entry.json"


def cache_root(recipe: Any) -> Path | None:
    """The recipe's `cache:` folder, else $FUSE_ARTIFACT_CACHE, else none (no cache)."""
    root = getattr(recipe, "cache", None) or os.environ.get(ENV)
    return Path(root).expanduser() if root else None


def trusted_groups(recipe: Any = None) -> frozenset[int]:
    """The group ids whose members' entries this user trusts: the recipe's `cache_group:`, else
    $FUSE_CACHE_GROUP (a name or a number); none by default (only one's own entries)."""
    name = getattr(recipe, "cache_group", None) or os.environ.get(GROUP_ENV)
    if not name:
        return frozenset()
    if str(name).isdigit():
        return frozenset({int(name)})
    try:
        return frozenset({grp.getgrnam(str(name)).gr_gid})
    except KeyError:  # the recipe's is checked when it loads; a bad $FUSE_CACHE_GROUP trusts no one more
        log.warning("cache group %r does not exist on this host: only your own cache entries are used", name)
        return frozenset()


class UntrustedEntry(Exception):
    """A cache entry that must not be used: the message says why."""


def entry_path(root: Path, rel: str) -> Path:
    """`root`/`rel` for an output name recorded in an entry, refused unless it is a plain relative path that stays
    inside `root` (no absolute path, no "..", ".", empty or backslash part)."""
    if not isinstance(rel, str):
        raise UntrustedEntry(f"output name {rel!r} is not a string")
    pure = PurePosixPath(rel)
    if (
        not rel
        or pure.is_absolute()
        or "\\" in rel
        or "\x00" in rel
        or any(part in ("..", ".") for part in rel.split("/"))
        or str(pure) != rel
    ):
        raise UntrustedEntry(f"output name {rel[:200]!r} does not stay inside the entry")
    return root.joinpath(*pure.parts)


def check_trusted(path: Path, user: int, groups: frozenset[int]) -> os.stat_result:
    """lstat of `path`, refused when it is a symbolic link, is owned by neither `user` nor a trusted group, or can
    be written by someone outside those."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UntrustedEntry(f"{path} is a symbolic link")
    group_trusted = st.st_gid in groups
    if st.st_uid != user and not group_trusted:
        raise UntrustedEntry(
            f"{path} belongs to uid {st.st_uid}, not to you or a trusted group (cache_group)"
        )
    if st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and not group_trusted):
        raise UntrustedEntry(f"{path} can be written by others (mode {stat.filemode(st.st_mode)})")
    return st


def _checked_file(root: Path, rel: str, user: int, groups: frozenset[int]) -> Path:
    """The entry file `rel` under `root`, every folder on the way and the file itself trusted, the file regular."""
    path = entry_path(root, rel)
    folder = root
    for part in PurePosixPath(rel).parts[:-1]:
        folder = folder / part
        check_trusted(folder, user, groups)
    if not stat.S_ISREG(check_trusted(path, user, groups).st_mode):
        raise UntrustedEntry(f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise UntrustedEntry(f"{path} cannot be read by you (its owner's umask or mode)")
    return path


def _copy_new(source: Path, target: Path) -> None:
    """Copy a file to a new `target` (never over an existing one), reading `source` without following a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    with (
        open(os.open(source, os.O_RDONLY | os.O_NOFOLLOW), "rb") as src,
        open(os.open(target, flags, published_mode()), "wb") as dst,
    ):
        shutil.copyfileobj(src, dst, 1 << 22)


def _link_tree(
    source: Path,
    target: Path,
    files: Iterable[str],
    user: int | None = None,
    groups: frozenset[int] = frozenset(),
) -> None:
    """Place each output `rel` of `source` at `target`/`rel`: a hard link when the file is `user`'s (made read-only
    to everyone else, so no one but its owner can change it under the run), else a copy (also across
    filesystems). Names are confined to both folders; an existing target file is an error, never overwritten.
    With `user` None (our own run store) the folders on the way are not checked."""
    owner = os.getuid() if user is None else user
    for rel in files:
        src = entry_path(source, rel) if user is None else _checked_file(source, rel, user, groups)
        dst = entry_path(target, rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        st = os.lstat(src)
        if stat.S_ISLNK(st.st_mode):
            raise UntrustedEntry(f"{src} is a symbolic link")
        if st.st_uid == owner:
            try:
                os.link(src, dst, follow_symlinks=False)
                if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):  # one inode: the run's file and the entry's
                    os.chmod(dst, stat.S_IMODE(st.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))
                continue
            except FileExistsError:
                raise UntrustedEntry(f"{rel}: two outputs name one file") from None
            except OSError:
                pass  # another filesystem, or links not allowed: copy
        try:
            _copy_new(src, dst)
        except FileExistsError:
            raise UntrustedEntry(f"{rel}: two outputs name one file") from None


class ArtifactCache:
    def __init__(
        self, root: str | os.PathLike, groups: frozenset[int] = frozenset(), user: int | None = None
    ):
        self.root = Path(root)
        self.groups = groups
        self.user = os.getuid() if user is None else user

    def entry(self, stage: str, fingerprint: str) -> Path:
        return self.root / stage / fingerprint

    def check_entry(self, folder: Path) -> None:
        """Raise UntrustedEntry unless the entry folder, its record and its out/ may be trusted (the stage folder
        may be anyone's, but not a link)."""
        if folder.parent.is_symlink():
            raise UntrustedEntry(f"{folder.parent} is a symbolic link")
        for path in (folder, folder / ENTRY, folder / "out"):
            check_trusted(path, self.user, self.groups)

    def lookup(self, stage: str, fingerprint: str, inputs: dict[str, str | None]) -> dict[str, Any] | None:
        """The entry's record when it is complete, trusted, intact and was made from the same parent outputs.
        Raises UntrustedEntry for an entry that must not be used (someone else's, writable by others, a link)."""
        folder = self.entry(stage, fingerprint)
        if not os.path.lexists(folder / ENTRY):
            return None
        self.check_entry(folder)
        try:
            record = read_json(folder / ENTRY)
        except (FileNotFoundError, ValueError):
            return None
        outputs = record.get("outputs") or {}
        for rel in outputs:
            _checked_file(folder / "out", rel, self.user, self.groups)
        damaged = output_problems(folder / "out", outputs)
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
        outputs = manifest.get("outputs") or list_outputs(store.out(name))
        record = {
            "instance": name,
            "outputs": outputs,
            "outputs_digest": manifest.get("outputs_digest"),
            "inputs": manifest.get("inputs") or {},
            "parts": manifest.get("parts"),
            "made_in": str(store.root),
        }
        return self.add(
            stage, manifest["fingerprint"], lambda out: _link_tree(store.out(name), out, outputs), record
        )

    def add(self, stage: str, fingerprint: str, fill: Callable[[Path], None], record: dict[str, Any]) -> bool:
        """A new entry whose out/ `fill(out)` writes (a run's outputs linked, or `fuse import` rebuilding a store),
        recorded with `record` (instance, inputs, parts; the outputs and their digest when not given are those
        `fill` wrote). Assembled aside and renamed into place; False when the fingerprint has an entry already."""
        final = self.entry(stage, fingerprint)
        if (final / ENTRY).is_file():
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.parent.is_symlink():
            raise UntrustedEntry(f"{final.parent} is a symbolic link: not storing {fingerprint} through it")
        staging = final.with_name(f".{fingerprint}.{os.getpid()}.{time.monotonic_ns()}{TMP_SUFFIX}")
        try:
            fill(staging / "out")
            outputs = record.get("outputs") or list_outputs(staging / "out")
            write_json_atomic(  # the entry is complete once it is renamed into place
                staging / ENTRY,
                {
                    "fingerprint": fingerprint,
                    "stage": stage,
                    **record,
                    "outputs": outputs,
                    "outputs_digest": record.get("outputs_digest") or outputs_digest(outputs),
                    "created_at": time.time(),
                },
            )
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
        _link_tree(folder / "out", store.out(name), record["outputs"], self.user, self.groups)
        # what vouches for the run is its own files, checked after they were made: a change to the entry since
        # lookup's check (by whoever else may write there) is caught here, and cannot happen to them afterwards
        changed = output_problems(store.out(name), record["outputs"])
        if changed:
            store.reset(name)
            raise UntrustedEntry(
                f"{folder}: outputs changed while they were restored: {', '.join(changed[:3])}"
            )
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
    def _folders(self) -> list[Path]:
        """Every real folder two levels down (<stage>/<fingerprint>, and writers' debris), never through a
        symbolic link: what gc may delete stays inside the cache."""
        found = []
        for stage in _real_dirs(self.root):
            found += _real_dirs(stage)
        return found

    def entries(self) -> list[Path]:
        return sorted(p for p in self._folders() if not p.name.startswith(".") and (p / ENTRY).is_file())

    def size_report(self) -> dict[str, dict[str, int]]:
        """Per stage: entries and bytes (a file hard-linked into runs counts here once, in full)."""
        report: dict[str, dict[str, int]] = {}
        for folder in self.entries():
            row = report.setdefault(folder.parent.name, {"entries": 0, "bytes": 0})
            row["entries"] += 1
            row["bytes"] += sum(
                os.lstat(os.path.join(top, f)).st_size
                for top, _dirs, files in os.walk(folder / "out")  # does not follow links
                for f in files
            )
        return report

    def gc(self, keep: set[str], dry_run: bool = False) -> list[Path]:
        """Remove every entry whose fingerprint is not in `keep` (and leftovers of killed writers)."""
        removed = []
        debris = [p for p in self._folders() if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)]
        for folder in [*self.entries(), *debris]:
            if folder.name in keep:
                continue
            removed.append(folder)
            if not dry_run:
                shutil.rmtree(folder, ignore_errors=True)
        return removed


def evaluations_named(workdir: Path) -> set[str]:
    """The per-model evaluation entries (evaluate.model/<key>) that a run store's evaluations were made from or
    stored: metrics.json's models.*.evaluation_key, of the run and of its per-seed run stores."""
    keys: set[str] = set()
    for path in [workdir / "evaluate" / "out" / "metrics.json", *workdir.glob("*/evaluate/out/metrics.json")]:
        try:
            models = read_json(path).get("models") or {}
        except (OSError, ValueError, AttributeError):
            continue
        keys |= {
            m["evaluation_key"] for m in models.values() if isinstance(m, dict) and m.get("evaluation_key")
        }
    return keys


def _real_dirs(folder: Path) -> list[Path]:
    """The sub-folders of `folder` that are folders themselves, not links to one."""
    try:
        with os.scandir(folder) as it:
            return [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


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
    cache = ArtifactCache(root, trusted_groups(recipe))
    try:
        record = cache.lookup(instance.stage, step.fingerprint, store.inputs_of(instance.parents))
        if record is None:
            return False
        cache.restore(record, store, name, instance.num_shards)
    except (UntrustedEntry, OSError) as error:  # OSError: e.g. an entry this user may not read
        log.warning("%s: not using the cache entry (%s); recomputing", name, error)
        return False
    log.info("%s: outputs linked from the cache (%s)", name, cache.entry(instance.stage, step.fingerprint))
    return True


def cache_hits(recipe: Any, store: RunStore, steps: list[Any]) -> dict[str, Path]:
    """The planned instances a run would link from the recipe's cache (name -> entry), as `run` decides it: an
    entry under the instance's fingerprint made from the outputs its parents will have — the done parents' as
    recorded, a cached parent's as its entry recorded them. Forced instances are recomputed. Not yet verified
    (digests and ownership are checked when the entry is used)."""
    root = cache_root(recipe)
    if root is None:
        return {}
    cache = ArtifactCache(root)
    will_have: dict[str, str | None] = {}  # instance -> the outputs digest it will have (None: unknown yet)
    hits: dict[str, Path] = {}
    for step in steps:
        name = step.instance.name
        if step.action != "run":
            manifest = store.manifest(name) or {}
            will_have[name] = manifest.get("outputs_digest") if manifest.get("status") == "done" else None
            continue
        will_have[name] = None
        if step.forced:
            continue
        folder = cache.entry(step.instance.stage, step.fingerprint)
        try:
            record = read_json(folder / ENTRY)
        except (OSError, ValueError):
            continue
        needed = record.get("inputs") or {}
        if all(
            will_have.get(p) is not None and will_have.get(p) == needed.get(p) for p in step.instance.parents
        ):
            hits[name] = folder
            will_have[name] = record.get("outputs_digest")
    return hits


def publish_if_cached(recipe: Any, store: RunStore, step: Any) -> None:
    """After an instance ends done: store it for other runs (a cache that cannot be written only warns)."""
    root = cache_root(recipe)
    if root is None or (store.manifest(step.instance.name) or {}).get("cached_from"):
        return
    try:
        ArtifactCache(root).publish(store, step.instance.name, step.instance.stage)
    except (OSError, UntrustedEntry) as error:
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
        keep |= evaluations_named(Path(recipe.workdir))
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
