"""Fingerprints of every stage instance and the plan of a run: what is done, what is stale and why, what would run.

Fingerprints are derived from the recipe alone (settings, model identities, data digests, parents'
fingerprints, stage code version), so the whole plan is known before anything runs. What the parents actually
wrote is checked through the run store (a done instance records its parents' output digests).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from fuse.dag import Dag, Instance, instance_settings
from fuse.fingerprint import file_digest, fingerprint, path_digest
from fuse.models import identity
from fuse.recipe import DatasetSpec, Recipe
from fuse.stage_table import STAGE_TABLE
from fuse.store import RunStore, State


class StageNotImplemented(RuntimeError):
    pass


def _overrides() -> dict[str, str]:
    """FUSE_STAGE_MODULES="extract=my.pkg.extract,merge=my.pkg:merge": swap in another implementation of a stage
    (an object with run(ctx) and VERSION). Used by the tests' toy stages; open to users with custom stages."""
    pairs = [p for p in os.environ.get("FUSE_STAGE_MODULES", "").split(",") if p.strip()]
    return dict(p.split("=", 1) for p in pairs)


def _override(stage: str) -> Any:
    module_name, _, attr = _overrides()[stage].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


@cache
def stage_module(stage: str) -> ModuleType:
    """The code that runs `stage`: imported only when an instance of it runs, never to plan."""
    if stage in _overrides():
        return _override(stage)
    if stage not in STAGE_TABLE:
        raise StageNotImplemented(f"stage {stage!r} is not in the stage table (fuse.stage_table)")
    return importlib.import_module(STAGE_TABLE[stage].module)


def stage_version(stage: str) -> str:
    """The code version that goes into the fingerprint, from the stage table (an override's own VERSION)."""
    if stage in _overrides():
        return str(getattr(_override(stage), "VERSION", 0))
    info = STAGE_TABLE.get(stage)
    return str(info.version) if info else "missing"


def by_content(value: Any) -> Any:
    """`value` with every string that names a local file replaced by that file's digest, so a fingerprint says
    what was read, not where it lay: a run and its inputs can move, and a cache can serve any recipe (hub ids,
    names and other strings stay as they are)."""
    if isinstance(value, dict):
        return {key: by_content(item) for key, item in value.items()}
    if isinstance(value, list):
        return [by_content(item) for item in value]
    if isinstance(value, str) and value.startswith(("/", "~", ".")) and Path(value).expanduser().is_file():
        return {"file_digest": path_digest(Path(value).expanduser())}
    return value


def _dataset_part(spec: DatasetSpec | None) -> Any:
    if spec is None:
        return None
    part: dict[str, Any] = spec.model_dump(mode="json")
    try:
        part["digest"] = path_digest(spec.path)
        del part["path"]  # the digest names a local file; where it lies does not matter
    except FileNotFoundError:
        part["digest"] = None  # a hub dataset: its id and revision name it
    return part


def _store_digests(index: str) -> dict[str, str]:
    """A log-prob store named by its shards' headers, which carry every data file's sha256: its content."""
    root = Path(index).expanduser().parent
    return {p.parent.name: file_digest(p) for p in sorted(root.glob("shard-*/header.json"))}


def _extra_parts(recipe: Recipe, instance: Instance) -> dict[str, Any]:
    if instance.option("control") == "oracle":
        return {"oracle_store": _store_digests(recipe.stages.distill.oracle_teacher or "")}
    if instance.stage == "prepare":
        return {
            "data": {
                "sft": _dataset_part(recipe.data.sft),
                "preference": _dataset_part(recipe.data.preference),
                "heldout_fraction": recipe.data.heldout_fraction,
                "seed": recipe.data.seed,
            }
        }
    return {}


def instance_parts(recipe: Recipe, instance: Instance, parent_fps: dict[str, str]) -> dict[str, Any]:
    settings = instance_settings(recipe, instance)
    return {
        "instance": instance.name,
        "code": stage_version(instance.stage),
        "settings": by_content({k: v for k, v in settings.result_settings().items() if k != "enabled"}),
        "options": {k: v for k, v in instance.options},
        "models": {
            m: {
                # a local folder is named by its files' digests (identity), a hub model by id and revision
                "spec": by_content(recipe.model(m).model_dump(mode="json", exclude={"name", "path"})),
                "identity": identity(recipe.model(m)),
            }
            for m in instance.models
        },
        "parents": {p: parent_fps[p] for p in instance.parents},
        "seed": recipe.seed,
        **_extra_parts(recipe, instance),
        **_nodes_part(recipe, instance),
    }


def _nodes_part(recipe: Recipe, instance: Instance) -> dict[str, int]:
    """A training on several nodes has num_processes x nodes ranks, another global batch: another result. One node
    adds nothing, so fingerprints made before multi-node runs stay valid."""
    if not STAGE_TABLE[instance.stage].trains:
        return {}
    nodes = recipe.executor.nodes_for(instance.stage, instance.name)
    return {"nodes": nodes} if nodes > 1 else {}


def fingerprints(recipe: Recipe, dag: Dag) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (fingerprint, the parts it was computed from)."""
    result: dict[str, tuple[str, dict[str, Any]]] = {}
    for instance in dag.order():
        parts = instance_parts(recipe, instance, {p: result[p][0] for p in instance.parents})
        result[instance.name] = (fingerprint(parts), parts)
    return result


@dataclass(frozen=True)
class Step:
    instance: Instance
    fingerprint: str
    parts: dict[str, Any]
    state: State
    action: str  # run | skip | blocked (an ancestor fails to be done and is not in this run)
    why: str = ""
    forced: bool = False  # --force / --from: recomputed, never taken from the cache


class PlanError(RuntimeError):
    pass


def make_plan(
    recipe: Recipe,
    dag: Dag,
    store: RunStore,
    from_stage: str | None = None,
    only: list[str] | None = None,
    force: bool = False,
) -> list[Step]:
    """Decide for every instance whether this run does it, and why."""
    prints = fingerprints(recipe, dag)
    if from_stage is not None and not dag.of_stage(from_stage):
        stages = sorted({i.stage for i in dag})
        raise PlanError(f"--from {from_stage}: no such stage in this DAG (stages: {', '.join(stages)})")
    for name in only or []:
        dag[name]  # raises a clear KeyError
    selected = set(only) if only else set(dag.instances)
    forced: set[str] = set()
    if from_stage is not None:
        forced = dag.descendants(i.name for i in dag.of_stage(from_stage)) & selected
    if force:
        forced |= selected

    steps: list[Step] = []
    will_be_done: set[str] = set()
    redone: set[str] = set()
    for instance in dag.order():
        fp, parts = prints[instance.name]
        state = store.state(instance.name, fp, parts, instance.num_shards, instance.parents)
        renewed = [p for p in instance.parents if p in redone]
        if instance.name not in selected:
            action, why = "skip", "not selected"
            if state.kind == "done":
                will_be_done.add(instance.name)
        elif state.kind == "done" and instance.name not in forced and not renewed:
            action, why = "skip", "done"
            will_be_done.add(instance.name)
        elif state.kind == "done" and instance.name not in forced:
            # a parent is redone: the executor keeps this one if the parent writes the same outputs again
            action, why = "run", f"if {', '.join(renewed)} come(s) out different"
            state = State("done", f"kept if {', '.join(renewed)} come(s) out the same")
            will_be_done.add(instance.name)
        else:
            waiting = [p for p in instance.parents if p not in will_be_done]
            if waiting:
                action, why = "blocked", f"needs {', '.join(waiting)} (not done, not in this run)"
            else:
                action = "run"
                why = "forced" if instance.name in forced and state.kind == "done" else str(state)
                will_be_done.add(instance.name)
        if action == "run":
            redone.add(instance.name)
        steps.append(Step(instance, fp, parts, state, action, why, instance.name in forced))
    return steps
