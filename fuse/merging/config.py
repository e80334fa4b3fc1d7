"""The standalone merge configuration (`fuse merge CONFIG`): base, models, method, parameters, output.

The merge stage builds the same object from the recipe, so both paths run one engine with one validation; a
mergekit YAML is read as written (fuse.merging.mergekit_format) into the same object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fuse.merging.checkpoint import parse_size
from fuse.merging.mergekit_format import from_mergekit, is_mergekit, rename_models
from fuse.merging.methods import MergeConfigError, get_method, resolve_params
from fuse.recipe.base import RecipeError
from fuse.recipe.safe_yaml import load_yaml


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MergeModel(_Frozen):
    path: str = Field(description="Local checkpoint folder (safetensors, optionally sharded with an index).")
    name: str = Field("", description="Label in the report; default: the folder name.")
    parameters: dict[str, float] = Field(
        default_factory=dict, description="Per-model parameters (weight, density, …)."
    )

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


class MergeConfig(_Frozen):
    base_model: str = Field(description="The checkpoint the deltas are taken against (the pivot).")
    models: list[MergeModel] = Field(min_length=1)
    method: str = "sce"
    parameters: dict[str, Any] = Field(default_factory=dict, description="Shared method parameters.")
    output: str = Field("", description="Output folder (the CLI requires it; the stage sets it).")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    max_shard_size: str = "2GB"
    seed: int = Field(0, description="Seed of the random masks (dare_*, della*), per tensor and model.")
    read_threads: int = Field(4, ge=1, description="Parallel tensor reads (one per model at most).")
    chat_template: str | None = Field(
        None,
        description="The output's chat template: Jinja text, or auto (the most common one among base and models); "
        "default: the base's, copied with its tokenizer.",
    )
    name: str = Field("", description="A name for the merge (mergekit's name:), shown in the report.")

    @field_validator("chat_template")
    @classmethod
    def _template_ok(cls, value: str | None) -> str | None:
        if value is not None and value != "auto" and "{" not in value:
            raise ValueError(f"Jinja text (with {{% … %}}/{{{{ … }}}}) or auto, got {value[:40]!r}")
        return value

    @field_validator("max_shard_size")
    @classmethod
    def _size_ok(cls, value: str) -> str:
        parse_size(value)
        return value

    @model_validator(mode="after")
    def _method_ok(self) -> MergeConfig:
        method = get_method(self.method)
        resolve_params(method, self.parameters, [m.parameters for m in self.models], self.seed)
        labels = [m.label for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"models: labels must be unique, got {labels} (set name: for each)")
        return self


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge YAML, in fuse's format or mergekit's (detected: `merge_method`, `- model:`);
    relative paths are taken from the YAML file's folder."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}  # aliases bounded, as in recipes
    except RecipeError as error:
        raise MergeConfigError(str(error)) from None
    except yaml.composer.ComposerError:
        raise MergeConfigError(
            f"{path}: several YAML documents (mergekit-multi's format); fuse merge reads one merge per file"
        ) from None
    except yaml.YAMLError as error:
        raise MergeConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise MergeConfigError(f"{path}: expected a mapping at the top level")

    def rebase(value: str) -> str:
        return value if not value or Path(value).is_absolute() else str((path.parent / value).resolve())

    keys: dict[int, str] = {}
    if is_mergekit(raw):
        try:
            raw, keys = from_mergekit(raw, path.parent)
        except MergeConfigError as error:
            raise MergeConfigError(f"{path}: {error}") from None
    raw = dict(raw)
    for key in ("base_model", "output"):
        if isinstance(raw.get(key), str):
            raw[key] = rebase(raw[key])
    if isinstance(raw.get("models"), list):
        raw["models"] = [
            {**m, "path": rebase(m["path"])} if isinstance(m, dict) and isinstance(m.get("path"), str) else m
            for m in raw["models"]
        ]
    try:
        return MergeConfig.model_validate(raw)
    except ValidationError as error:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in error.errors()]
        message = f"{path}: invalid merge config:\n" + "\n".join(f"  - {line}" for line in lines)
        raise MergeConfigError(rename_models(message, keys) if keys else message) from None
