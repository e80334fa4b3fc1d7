"""The local executor: runs stage instances in this process, in topological order, with resume.

`run_instance` is also what `fuse run-stage` calls inside SLURM jobs, so both executors share one code path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator
from types import ModuleType

from fuse import resources
from fuse.cache import cache_hits, publish_if_cached, restore_if_cached
from fuse.context import StageContext
from fuse.dag import Dag, build_dag
from fuse.logs import LOG_FORMAT
from fuse.plan import PlanError, Step, fingerprints, stage_module
from fuse.progress import Progress
from fuse.recipe import Recipe
from fuse.stage_table import STAGE_TABLE
from fuse.start import RunStart, start_run, write_resolved_recipe
from fuse.store import MODEL_FOLDER, FileLock, LockHeld, RunStore

log = logging.getLogger("fuse")


JOB_LOCK_WAIT_S = 90.0


def returns_freed_memory(stage: str) -> bool:
    """Whether a stage runs with freed host memory returned to the OS (fuse.resources.set_allocator): the training
    stages, whose peaks it bounds; the others run at glibc's speed (a stage unknown to the table: returned)."""
    info = STAGE_TABLE.get(stage)
    return info is None or info.trains


class StageFailed(RuntimeError):
    def __init__(self, instance: str, message: str):
        super().__init__(f"stage {instance} failed: {message}")
        self.instance = instance


class InstanceBusy(StageFailed):
    """Another live process works on the instance (its lock names it); nothing was changed."""


class NotDone(StageFailed):
    """An instance that should have ended done did not: `fuse run`/`run-stage` must not report success."""


@contextlib.contextmanager
def instance_log(store: RunStore, name: str) -> Iterator[logging.Logger]:
    """Send everything logged while the instance runs (ours and the libraries') to its logs/stage.log."""
    path = store.logs(name) / "stage.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(min(previous_level or logging.INFO, logging.INFO))
    try:
        yield logging.getLogger(f"fuse.stage.{name}")
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()


def quiet_libraries() -> None:
    """Library progress bars would interleave with the executor's progress line; their logs still reach the
    instance's log file."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported
    try:
        from transformers.utils import logging as transformers_logging  # light: does not import torch
    except ImportError:
        return
    transformers_logging.disable_progress_bar()


def run_instance(
    recipe: Recipe,
    dag: Dag,
    step: Step,
    store: RunStore,
    shard: int | None = None,
    progress: Progress | None = None,
    force: bool = False,
    wait: float | None = None,
) -> bool:
    """Run one instance (all its missing shards, or just `shard`). Returns True when the instance is done, or —
    with `shard` — when that shard is done and the instance is done, waits for other shards or is being
    finalized by another live task.

    Under the instance lock, what cannot be continued (forced, fingerprint or inputs changed, outputs damaged)
    is reset first, so nothing broken is ever re-marked done; what can is kept, less damaged shards and the
    temporaries of killed writers. Raises InstanceBusy when another live process holds the instance."""
    instance = step.instance
    name = instance.name
    module = stage_module(instance.stage)
    # A whole-instance run holds the instance lock to the end; array tasks hold it only to set up (waiting for
    # each other) and to finalize, and each holds its own shard's lock while it works.
    lock = store.lock(name, wait=(0 if shard is None else 120) if wait is None else wait)
    try:
        lock.acquire()
    except LockHeld as error:
        raise InstanceBusy(name, str(error)) from None
    try:
        progress = progress or Progress()
        if not force and restore_if_cached(recipe, store, step):
            progress.start(name)
            progress.end("done: outputs from the artifact cache")
            return True
        _prepare(store, step, force)
        if shard is not None:
            lock.release()
        done = _work(recipe, step, store, module, shard, progress, lock)
        if done:
            publish_if_cached(recipe, store, step)
        return done
    finally:
        lock.release()


def _prepare(store: RunStore, step: Step, force: bool) -> None:
    instance, name = step.instance, step.instance.name
    reason = (
        "forced"
        if force
        else store.reset_reason(name, step.fingerprint, instance.parents, instance.num_shards)
    )
    if reason:
        log.info("%s: starting clean (%s)", name, reason)
        try:
            store.reset(name)
        except LockHeld as error:
            raise InstanceBusy(name, str(error)) from None
    else:
        store.clean_debris(name)
        if (store.manifest(name) or {}).get("outputs") is None:
            dropped = store.drop_damaged_shards(name, instance.num_shards)
            if dropped:
                log.warning("%s: redoing shards whose outputs changed: %s", name, dropped)
    store.begin(
        name,
        instance.stage,
        step.fingerprint,
        step.parts,
        instance.num_shards,
        inputs=store.inputs_of(instance.parents),
    )


def _work(
    recipe: Recipe,
    step: Step,
    store: RunStore,
    module: ModuleType,
    shard: int | None,
    progress: Progress,
    lock: FileLock,
) -> bool:
    instance = step.instance
    name = instance.name
    started = time.monotonic()
    with instance_log(store, name) as logger:
        ctx = StageContext(
            recipe=recipe,
            instance=instance,
            dir=store.dir(name),
            inputs={p: store.out(p) for p in instance.parents},
            log=logger,
            on_progress=progress.update,
        )
        try:
            shards = range(instance.num_shards) if shard is None else [shard]
            for index in shards:
                with contextlib.ExitStack() as held:
                    if shard is not None:
                        held.enter_context(FileLock(store.shard_lock(name, index), f"{name} shard {index}"))
                    if store.shard_marker(name, index).exists():
                        continue
                    progress.start(
                        f"{name}"
                        + (f" shard {index + 1}/{instance.num_shards}" if instance.num_shards > 1 else "")
                    )
                    ctx.shard = index if instance.num_shards > 1 else None
                    quiet_libraries()
                    before = store.out_snapshot(name)
                    with resources.recorded(store.dir(name), index, returns_freed_memory(instance.stage)):
                        module.run(ctx)
                    store.mark_shard(name, index, before=before)
            if len(store.shards_done(name, instance.num_shards)) < instance.num_shards:
                progress.end(f"shard {shard} done; others pending")
                return shard is not None
            if shard is not None:
                try:
                    lock.acquire()  # the array task that gets here first finalizes; the others end with their shard
                except LockHeld:
                    progress.end(f"shard {shard} done; another task finalizes {name}")
                    return True
            if (store.manifest(name) or {}).get("status") == "done":
                return True
            ctx.shard = None
            if hasattr(module, "finalize"):
                module.finalize(ctx)
            store.finish(name, time.monotonic() - started)
            store.update_manifest(name, peak_memory=resources.summary(store.dir(name), instance.num_shards))
        except LockHeld as error:
            progress.end(f"busy: {error}")
            raise InstanceBusy(name, str(error)) from None
        except BaseException as error:
            message = f"{type(error).__name__}: {error}"
            logger.error("stage %s failed:\n%s", name, traceback.format_exc())
            try:
                store.fail(name, message)
            except OSError as unrecorded:  # a full disk can refuse the manifest too: say so, keep the name
                message += f" (and the failure could not be recorded in its manifest: {unrecorded})"
                logger.error("stage %s: %s", name, message)
            progress.end(f"FAILED: {message}")
            if isinstance(error, KeyboardInterrupt | SystemExit):
                raise
            raise StageFailed(name, message) from error
    progress.end("done")
    return True


def run(
    recipe: Recipe,
    from_stage: str | None = None,
    only: list[str] | None = None,
    force: bool = False,
    progress: Progress | None = None,
    echo: Callable[[str], None] = print,
) -> list[Step]:
    """Run the DAG under the run lock; raise StageFailed naming the first instance that fails or does not end
    done, PlanError when another run holds the store or a live process works on what this run would redo."""
    with start_run(recipe, build_dag(recipe), from_stage, only, force) as start:
        return _run_started(start, progress, echo)


def _run_started(start: RunStart, progress: Progress | None, echo: Callable[[str], None]) -> list[Step]:
    recipe, dag, store, steps, todo = start.recipe, start.dag, start.store, start.steps, start.todo
    check_not_busy(store, dag, [s.instance.name for s in todo])
    write_resolved_recipe(store, recipe)
    if not todo:
        echo(f"nothing to do: all {len(steps)} stage instances are done ({store.root})")
        return steps
    cached = len(cache_hits(recipe, store, steps))
    echo(
        f"{len(todo)} of {len(steps)} stage instances to run in {store.root}"
        + (f" ({cached} of them in the artifact cache)" if cached else "")
    )
    progress = progress or Progress()
    for number, step in enumerate(todo, 1):
        forced = step.forced  # --force, or --from: that stage and everything downstream (make_plan decides)
        name = step.instance.name
        if not forced and step.state.kind in ("done", "stale"):
            # planned because a parent is (or was being) redone: kept when the parents wrote the same outputs
            # again as the ones it read
            now = store.state(
                name, step.fingerprint, step.parts, step.instance.num_shards, step.instance.parents
            )
            if now.kind == "done":
                echo(f"[{number}/{len(todo)}] {name}: its inputs came out the same; kept")
                continue
        prefixed = _Prefixed(progress, number, len(todo))
        if not run_instance(recipe, dag, step, store, progress=prefixed, force=forced):
            raise NotDone(name, "did not end done (another process is finalizing it)")
    return steps


def check_not_busy(store: RunStore, dag: Dag, names: list[str]) -> None:
    """Redoing an instance pulls its files from under anything downstream: refuse while a live process (a SLURM
    job, another run-stage) works on it or on a descendant."""
    for name in sorted(dag.descendants(names)):
        live = store.live_locks(name)
        if live:
            raise PlanError(f"{name} is being worked on: {live[0]}; wait for it or cancel it first")


def results(steps: list[Step], store: RunStore) -> list[str]:
    """What a finished run produced, for the end of `fuse run`: where the fused model is and the evaluation
    table. Only instances done at their current fingerprint count; reads small files only (no torch)."""
    done = {s.instance.stage: s.instance.name for s in steps if _done_now(store, s)}
    lines = []
    model_stage = next((stage for stage in ("publish", "merge") if stage in done), None)
    folder = store.out(done[model_stage]) / MODEL_FOLDER if model_stage else None
    if folder and folder.is_dir():
        label = "published model" if model_stage == "publish" else "fused model"
        lines.append(f"{label}: {folder.resolve()}")
    table = store.out(done["evaluate"]) / "metrics.md" if "evaluate" in done else None
    if table and table.is_file():
        lines += ["", f"results ({table.resolve()}):", *first_table(table.read_text(encoding="utf-8"))]
    return lines


def first_table(markdown: str) -> list[str]:
    """The first Markdown table's lines (evaluate's main table; the paired differences follow it in the file)."""
    rows: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return rows


def _done_now(store: RunStore, step: Step) -> bool:
    """Done at its current fingerprint and from the outputs its parents have now (after `--force --only merge`,
    evaluate and publish are stale: their table and model are not this run's result)."""
    manifest = store.manifest(step.instance.name) or {}
    if manifest.get("status") != "done" or manifest.get("fingerprint") != step.fingerprint:
        return False
    return not store.changed_inputs(manifest, step.instance.parents)


class _Prefixed(Progress):
    """A Progress whose lines start with the instance's rank in this run: "[3/9] distill.llama step 40/100"."""

    def __init__(self, inner: Progress, number: int, total: int):
        super().__init__(inner.stream, inner.interval)
        self.tag = f"[{number}/{total}]"

    def start(self, prefix: str) -> None:
        super().start(f"{self.tag} {prefix}")


def run_stage(recipe: Recipe, name: str, shard: int | None = None, force: bool = False) -> bool:
    """Run exactly one instance (or one shard of it): what SLURM jobs call. Parents must be done. Raises NotDone
    when the instance (without `shard`) did not end done, so the job fails and `afterok` dependents do not start."""
    dag = build_dag(recipe)
    store = RunStore(recipe.workdir)
    instance = dag[name]
    if shard is not None and not 0 <= shard < instance.num_shards:
        raise PlanError(f"{name} has {instance.num_shards} shard(s); --shard {shard} is out of range")
    prints = fingerprints(recipe, dag)
    not_done = [
        p
        for p in instance.parents
        if store.state(p, *prints[p], dag[p].num_shards, dag[p].parents).kind != "done"
    ]
    if not_done:
        raise PlanError(f"{name}: its inputs {', '.join(not_done)} are not done")
    fp, parts = prints[name]
    state = store.state(name, fp, parts, instance.num_shards, instance.parents)
    step = Step(instance, fp, parts, state, "run", str(state))
    if state.kind == "done" and not force:
        print(f"{name} is already done (fingerprint {fp})")
        return True
    if force:
        check_not_busy(store, dag, dag.children(name))
    # In a SLURM job that replaces a cancelled or preempted one, the old process may still be exiting (SLURM gives
    # it KillWait, 30 s by default) and hold the instance lock: wait for it rather than fail the new job.
    wait = JOB_LOCK_WAIT_S if os.environ.get("SLURM_JOB_ID") and shard is None else None
    if not run_instance(recipe, dag, step, store, shard=shard, force=force, wait=wait):
        raise NotDone(name, "did not end done")
    return True
