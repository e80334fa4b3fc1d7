"""What the recipe fuses and trains on: the models (pivot and sources) and the datasets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fuse.recipe.base import NAME_RE, Frozen, quote

MAX_NAME_PART = 255  # bytes of one file name (NAME_MAX), and far more than a hub id's part


def nameable_path(value: str) -> str:
    """A path or hub id each of whose parts could name a file; a longer one would fail deep inside a stage."""
    if any(len(part.encode()) > MAX_NAME_PART for part in value.split("/")):
        raise ValueError(
            f"{quote(value)} names no file nor hub repo: a part of it is over {MAX_NAME_PART} bytes"
        )
    return value


class ModelSpec(Frozen):
    name: str = ""
    path: str = Field(description="Local directory or hub id.")
    revision: str | None = None
    chat_template: str | None = Field(None, description="Inline Jinja template, or a path to a .jinja file.")
    trust_remote_code: bool = False
    allow_pickle: bool = Field(False, description="Allow .bin (pickle) weights; safetensors only by default.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @field_validator("path")
    @classmethod
    def _path_ok(cls, value: str) -> str:
        return nameable_path(value)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        if value and not NAME_RE.match(value):
            raise ValueError(f"{value!r} must be letters, digits, '_' or '-' (it names stage instances)")
        return value


class DatasetSpec(Frozen):
    path: str = Field(description="Local .jsonl/.json/.parquet file or directory, or a hub dataset id.")
    split: str = "train"
    name: str | None = Field(None, description="Hub dataset config name.")
    revision: str | None = None
    format: Literal["messages", "sharegpt", "prompt_response", "preference"] = "messages"
    columns: dict[str, str] = Field(default_factory=dict, description="Our field name -> the file's column.")
    max_rows: int | None = Field(None, ge=1)

    @field_validator("path")
    @classmethod
    def _path_ok(cls, value: str) -> str:
        return nameable_path(value)


class DataSpec(Frozen):
    sft: DatasetSpec
    preference: DatasetSpec | None = None
    heldout_fraction: float = Field(0.05, ge=0.0, lt=0.5)
    seed: int = 0
