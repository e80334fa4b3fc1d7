"""What a stage sees: its instance, its settings, its directory, and its parents' output folders, by role.

A stage never parses instance names: it asks for the parent in a role (`ctx.input("policy")`), for every parent of
a role by label (`ctx.inputs_of("targets")`), or for the model a parent made (`ctx.made_model("policy")`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuse.dag import Instance, instance_settings
from fuse.recipe import ModelSpec, Recipe
from fuse.store import MODEL_FOLDER


@dataclass
class StageContext:
    recipe: Recipe
    instance: Instance
    dir: Path  # <workdir>/<instance name>/
    inputs: dict[str, Path]  # parent instance name -> that parent's out/ folder
    shard: int | None = None  # the shard to do (sharded stages), None = not sharded / all
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("fuse.stage"))
    on_progress: Any = None  # callable(done, total, unit, **metrics) set by the executor
    _started: float = field(default_factory=time.monotonic)

    @property
    def out(self) -> Path:
        """Where the stage writes its outputs (created by the executor)."""
        return self.dir / "out"

    @property
    def settings(self) -> Any:
        """The stage's settings as this instance uses them (see fuse.dag.instance_settings)."""
        return instance_settings(self.recipe, self.instance)

    @property
    def model_out(self) -> Path:
        """Where a stage that makes a model writes it, and where its children find it."""
        return self.out / MODEL_FOLDER

    @property
    def num_shards(self) -> int:
        return self.instance.num_shards

    def _out(self, parent: str) -> Path:
        try:
            return self.inputs[parent]
        except KeyError:
            raise KeyError(f"{self.instance.name}: parent {parent} has no output folder given") from None

    def parent(self, role: str) -> str:
        """The one parent instance in `role`."""
        found = self.instance.in_role(role)
        if len(found) != 1:
            named = [e.parent for e in found]
            roles = sorted({e.role for e in self.instance.edges})
            raise KeyError(
                f"{self.instance.name}: expected one {role!r} input, got {named} (its roles: {roles})"
            )
        return found[0].parent

    def has_input(self, role: str) -> bool:
        return bool(self.instance.in_role(role))

    def input(self, role: str) -> Path:
        """The out/ folder of the parent in `role`; a stage reads other stages' files only through these."""
        return self._out(self.parent(role))

    def inputs_of(self, role: str) -> dict[str, Path]:
        """label -> out/ folder of every parent in `role`, in DAG order (unlabelled edges go by parent name)."""
        return {e.label or e.parent: self._out(e.parent) for e in self.instance.in_role(role)}

    def made_model(self, role: str) -> Path:
        """The model folder the parent in `role` made."""
        return self.input(role) / MODEL_FOLDER

    def made_models(self, role: str) -> dict[str, Path]:
        """label -> the model folder of every parent in `role`."""
        return {label: out / MODEL_FOLDER for label, out in self.inputs_of(role).items()}

    def made_model_spec(self, folder: Path, name: str) -> ModelSpec:
        """A model a stage of this run made from the pivot (target, fused model, baseline): its folder, loaded with
        the pivot's options (chat template override, remote code), since it carries the pivot's tokenizer."""
        update = {"name": name, "path": str(folder), "revision": None}
        return self.model_spec("pivot").model_copy(update=update)

    def model_spec(self, name: str) -> ModelSpec:
        return self.recipe.model(name)

    def progress(self, done: int, total: int | None = None, unit: str = "step", **metrics: Any) -> None:
        """Report how far the stage is (`metrics`, e.g. loss=, are shown beside the count)."""
        if self.on_progress is not None:
            self.on_progress(done, total, unit, **metrics)

    def shard_range(self, n_items: int) -> range:
        """The item indices of this context's shard: contiguous, balanced, fixed by (n_items, num_shards)."""
        if self.shard is None or self.num_shards == 1:
            return range(n_items)
        per, extra = divmod(n_items, self.num_shards)
        start = self.shard * per + min(self.shard, extra)
        return range(start, start + per + (1 if self.shard < extra else 0))
