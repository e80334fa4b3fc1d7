"""What a stage sees: its instance, its settings, its directory, and the output folders of its parents."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuse.dag import Instance
from fuse.recipe import ModelSpec, Recipe


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
        return getattr(self.recipe.stages, self.instance.stage)

    @property
    def num_shards(self) -> int:
        return self.instance.num_shards

    def input(self, name: str) -> Path:
        """The out/ folder of parent `name`; a stage reads other stages' files only through this."""
        try:
            return self.inputs[name]
        except KeyError:
            raise KeyError(
                f"{self.instance.name} has no input {name!r}; its inputs are {sorted(self.inputs)}"
            ) from None

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
