"""The start that `fuse run` (fuse.executor) and `fuse submit` (fuse.slurm) share: the run lock, the plan and its
refusals, and the resolved recipe that every run leaves in its store."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import yaml

from fuse.dag import Dag
from fuse.plan import PlanError, Step, make_plan
from fuse.recipe import Recipe
from fuse.store import LockHeld, RunStore


@dataclass(frozen=True)
class RunStart:
    """A run's plan, made under the run lock that the `start_run` block holds; nothing in it is blocked."""

    recipe: Recipe
    dag: Dag
    store: RunStore
    steps: list[Step]

    @property
    def todo(self) -> list[Step]:
        """The steps to run, in topological order."""
        return [s for s in self.steps if s.action == "run"]


@contextlib.contextmanager
def start_run(
    recipe: Recipe, dag: Dag, from_stage: str | None, only: list[str] | None, force: bool
) -> Iterator[RunStart]:
    """Take the run lock (one run or submission at a time on a run store) and plan under it, held until the block
    ends. Raises PlanError when another run holds the lock or an instance is blocked (naming each, and why)."""
    store = RunStore(recipe.workdir)
    try:
        lock = store.run_lock().acquire()
    except LockHeld as error:
        raise PlanError(str(error)) from None
    try:
        steps = make_plan(recipe, dag, store, from_stage, only, force)
        blocked = [s for s in steps if s.action == "blocked"]
        if blocked:
            raise PlanError("; ".join(f"{s.instance.name}: {s.why}" for s in blocked))
        yield RunStart(recipe, dag, store, steps)
    finally:
        lock.release()


def write_resolved_recipe(store: RunStore, recipe: Recipe) -> str:
    """Record the recipe as this run resolved it (defaults and --set overrides applied); returns the YAML text."""
    text = yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True), sort_keys=False)
    store.write_resolved_recipe(text)
    return text
