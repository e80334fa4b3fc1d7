"""Where the stages run (`executor:`): local or SLURM, with per-stage resources. Strings here end up in job
scripts, so each is checked for control characters (fuse/slurm renders them)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import Field, field_validator

from fuse.recipe.base import Frozen, no_control_characters


class Resources(Frozen):
    nodes: int = Field(1, ge=1)
    tasks_per_node: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    mem: str | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    extra: list[str] = Field(default_factory=list, description="Extra '#SBATCH' lines, e.g. '--exclusive'.")
    max_concurrent: int | None = Field(
        None,
        ge=1,
        description="Array tasks of a sharded instance that run at once (sbatch --array=0-63%8): 64 shards at "
        "tensor parallelism 8 otherwise ask for 512 GPUs together. An `--array=...%N` in `extra` means the same.",
    )

    def array_limit(self) -> int | None:
        """max_concurrent, else the %N of an `--array` line in `extra` (fuse writes the array itself)."""
        if self.max_concurrent:
            return self.max_concurrent
        for line in self.extra:
            if line.replace(" ", "").startswith("--array=") and "%" in line:
                limit = line.rsplit("%", 1)[1].strip()
                if limit.isdigit():
                    return int(limit)
        return None

    @field_validator("mem", "time", "partition", "account", "qos", "constraint", "extra")
    @classmethod
    def _plain(cls, value: Any) -> Any:
        return no_control_characters(value)


def layered_resources(tables: Iterable[Mapping[str, Resources]], stage: str, instance: str) -> Resources:
    """Resources from tables in order (later wins), each layered default < stage < instance. Only the keys a layer
    sets override (an `extra` list replaces the one below it)."""
    merged: dict[str, Any] = {}
    for table in tables:
        for key in ("default", stage, instance):
            if key in table:
                merged.update(table[key].model_dump(exclude_unset=True))
    return Resources.model_validate(merged)


class SlurmSettings(Frozen):
    site_config: str | None = Field(None, description="YAML with defaults for resources and env_setup.")
    env_setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run before each job, as written (the one field that is shell by design); the job "
        "scripts and recipe snapshots that carry them are written owner-only (0600).",
    )
    signal_grace_seconds: int = Field(120, ge=0)
    max_concurrent_jobs: int | None = Field(
        None,
        ge=1,
        description="At most this many of a submission's jobs run at once (each also waits for the end of the job "
        "submitted that many before it; a shard array counts as one job, bounded by resources.max_concurrent).",
    )
    python: str | None = Field(None, description="Interpreter inside jobs; default: the one running fuse.")
    template: str | None = Field(
        None,
        description="A Jinja template for the job scripts (relative to the recipe); default: fuse's own.",
    )

    @field_validator("python")
    @classmethod
    def _plain_python(cls, value: str | None) -> str | None:
        return no_control_characters(value)


class ExecutorSpec(Frozen):
    kind: Literal["local", "slurm"] = "local"
    resources: dict[str, Resources] = Field(
        default_factory=dict,
        description="Keyed by stage (e.g. 'distill') or instance (e.g. 'distill.llama').",
    )
    slurm: SlurmSettings = SlurmSettings()

    def nodes_for(self, stage: str, instance: str) -> int:
        """The nodes a training instance's ranks span: `resources.<..>.nodes` under SLURM, one node locally. The
        recipe alone says it (a site config cannot): with `num_processes` per node it makes the global batch, so it is
        part of what the instance computes."""
        if self.kind != "slurm":
            return 1
        return layered_resources([self.resources], stage, instance).nodes
