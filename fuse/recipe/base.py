"""What every part of the recipe schema stands on: frozen models (so a settings object can be fingerprinted and
never drifts after validation), the name and control-character checks, and the error every recipe problem raises.

Kept apart from the schema proper so each schema module imports it without importing the others.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticUndefined

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\Z")  # \Z: "$" would let a trailing newline through
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def no_control_characters(value: Any) -> Any:
    """Strings that reach a job script (resources, workdir, interpreter): a newline there would end an #SBATCH
    line or start a shell command, so control characters are refused outright."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str) and CONTROL_RE.search(item):
            raise ValueError(f"{item!r} contains a control character (newline, tab, ...); not allowed here")
    return value


MAX_QUOTED = 300  # characters of a value an error message quotes


def shorten(text: str, limit: int = MAX_QUOTED) -> str:
    """`text` if it is at most `limit` characters; else its start and end around an ellipsis that says how long it
    was, so that a 100 MB value in a recipe makes a readable error, not a 100 MB one."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}…[{len(text):,} characters]…{text[-half:]}"


def quote(value: str, limit: int = MAX_QUOTED) -> str:
    """repr(value), or for a value over `limit` characters the repr of its two ends and its length."""
    if len(value) <= limit:
        return repr(value)
    half = limit // 2
    return f"{value[:half]!r}…[{len(value):,} characters]…{value[-half:]!r}"


class RecipeError(ValueError):
    """A recipe problem, with the YAML key it concerns."""


OPERATIONAL = "operational"


def operational(default: Any = PydanticUndefined, *, description: str | None = None, **kwargs: Any) -> Any:
    """A Field that says how a stage runs, not what it computes (logging, checkpoint cadence, trackers, kernels,
    batch budgets, shard counts, parallelism): left out of the fingerprint, so changing it never makes a finished
    instance stale. Every other setting is a result setting. The JSON schema carries the class ("class": "operational")."""
    extra = {"class": OPERATIONAL}
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


ADDED = "added"


def added(default: Any, *, description: str | None = None, **kwargs: Any) -> Any:
    """A result setting introduced after recipes were already fingerprinted: hashed only when it differs from its
    default, so adding it leaves every finished instance that does not set it valid (its default must be what the
    stage computed before the field existed)."""
    extra = {"class": ADDED}
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def is_added(field: Any) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and extra.get("class") == ADDED


def is_operational(field: Any) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and extra.get("class") == OPERATIONAL


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def operational_fields(self) -> set[str]:
        """This object's operational settings (a subclass may make one count as a result where another setting
        gives it a bearing on the result)."""
        return {name for name, field in type(self).model_fields.items() if is_operational(field)}

    def result_settings(self) -> dict[str, Any]:
        """The settings that decide what is computed, as JSON: the model dump without operational fields (at any
        depth, including per-model overrides). What a fingerprint hashes."""
        dumped = self.model_dump(mode="json")
        skip = self.operational_fields()
        result: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            if name in skip:
                continue
            value = getattr(self, name)
            if is_added(field) and value == field.get_default(call_default_factory=True):
                continue
            if isinstance(value, Frozen):
                result[name] = value.result_settings()
            elif isinstance(value, dict) and value and all(isinstance(v, Frozen) for v in value.values()):
                result[name] = {key: item.result_settings() for key, item in value.items()}
            else:
                result[name] = dumped[name]
        return result


class StageSettings(Frozen):
    """The base of every stage's settings (`enabled: false` skips the stage); here rather than in settings.py
    because the inference and training settings derive from it and settings.py imports them for Stages."""

    enabled: bool = True
