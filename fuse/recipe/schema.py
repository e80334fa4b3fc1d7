"""The recipe as a whole: names, models, data, stages and executor, and the checks that span them (source
names unique and not reserved, per-model overrides naming models of this recipe, fpo against score)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from fuse.recipe.base import NAME_RE, Frozen, no_control_characters
from fuse.recipe.executor_settings import ExecutorSpec
from fuse.recipe.settings import Stages
from fuse.recipe.specs import DataSpec, ModelSpec

RESERVED_NAMES = ("pivot", "merged", "joint", "sft_baseline", "self_distill", "label_smoothing", "oracle")


class Recipe(Frozen):
    name: str
    workdir: str
    cache: str | None = Field(
        None,
        description="A content-addressed artifact cache shared by recipes (a folder, e.g. on the cluster's shared "
        "filesystem; default: $FUSE_ARTIFACT_CACHE): instances with the same fingerprint are linked from it, "
        "never recomputed.",
    )
    cache_group: str | None = Field(
        None,
        description="A group (name or id) whose members' cache entries you trust as your own (default: "
        "$FUSE_CACHE_GROUP; none: only your own entries are used). An entry is used only when it is yours or this "
        "group's and no one else can write it.",
    )
    pivot: ModelSpec
    sources: list[ModelSpec] = Field(min_length=1)
    data: DataSpec
    stages: Stages = Stages()
    executor: ExecutorSpec = ExecutorSpec()
    seed: int = 0
    seeds: list[int] = Field(
        default_factory=list,
        description="Train every arm once per seed (stages.distill/fpo.seed): one run store per seed under "
        "<workdir>/seed-<N>, sharing every seed-independent instance through the cache, and <workdir>/seeds.md "
        "pooling the evaluations (mean ± SD, paired differences with CIs). `fuse run --seeds 1,2,3` sets it.",
    )

    @field_validator("cache_group")
    @classmethod
    def _known_group(cls, value: str | None) -> str | None:
        import grp

        if value and not value.isdigit():
            try:
                grp.getgrnam(value)
            except KeyError:
                raise ValueError(f"no group named {value!r} on this host") from None
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds repeat: {value}")
        return value

    @field_validator("workdir")
    @classmethod
    def _plain_workdir(cls, value: str) -> str:
        return no_control_characters(value)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(f"{value!r} must be letters, digits, '_' or '-'")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> Recipe:
        names = [s.name for s in self.sources]
        for i, name in enumerate(names):
            if not name:
                raise ValueError(f"sources[{i}].name is required")
            # the DAG's own instance keys (distill.sft_baseline, distill.<control>, score.target-<source>)
            if name in RESERVED_NAMES or name.startswith("target-"):
                raise ValueError(f"sources[{i}].name {name!r} is reserved")
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"duplicate source names: {', '.join(dups)}")
        for stage, extra in (("extract", ()), ("score", (*(f"target-{n}" for n in names), "merged"))):
            for name in getattr(self.stages, stage).models:
                if name not in ("pivot", *names, *extra):
                    raise ValueError(
                        f"stages.{stage}.models.{name}: not a model of this recipe ({', '.join(['pivot', *names])})"
                    )
        fpo = self.stages.fpo
        unknown = sorted(set(fpo.weights) - set(names) - ({"pivot"} if fpo.include_pivot else set()))
        if fpo.enabled and unknown:
            raise ValueError(f"stages.fpo.weights names unknown sources: {', '.join(unknown)}")
        if fpo.enabled and self.stages.score.max_length < fpo.max_length:
            raise ValueError(
                f"stages.score.max_length ({self.stages.score.max_length}) must be at least stages.fpo.max_length "
                f"({fpo.max_length}): the reference must score every token the policy sees"
            )
        distill = self.stages.distill
        merge = self.stages.merge
        if merge.enabled and merge.base == "sft_baseline" and not (distill.enabled and distill.sft_baseline):
            raise ValueError(
                "stages.merge.base: sft_baseline needs the SFT-only model: set stages.distill.sft_baseline: true"
            )
        if distill.enabled and distill.validation and self.data.heldout_fraction <= 0:
            raise ValueError(
                "stages.distill.validation scores the prepared held-out split: set data.heldout_fraction > 0"
            )
        return self

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def model(self, name: str) -> ModelSpec:
        if name == "pivot":
            return self.pivot.model_copy(update={"name": "pivot"})
        for spec in self.sources:
            if spec.name == name:
                return spec
        raise KeyError(f"no model named {name!r} in the recipe")
