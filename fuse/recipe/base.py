"""What every part of the recipe schema stands on: frozen models (so a settings object can be fingerprinted and
never drifts after validation), the name and control-character checks, and the error every recipe problem raises.

Kept apart from the schema proper so each schema module imports it without importing the others.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\Z")  # \Z: "$" would let a trailing newline through
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def no_control_characters(value: Any) -> Any:
    """Strings that reach a job script (resources, workdir, interpreter): a newline there would end an #SBATCH
    line or start a shell command, so control characters are refused outright."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str) and CONTROL_RE.search(item):
            raise ValueError(f"{item!r} contains a control character (newline, tab, ...); not allowed here")
    return value


class RecipeError(ValueError):
    """A recipe problem, with the YAML key it concerns."""


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class StageSettings(Frozen):
    """The base of every stage's settings (`enabled: false` skips the stage); here rather than in settings.py
    because the inference and training settings derive from it and settings.py imports them for Stages."""

    enabled: bool = True
