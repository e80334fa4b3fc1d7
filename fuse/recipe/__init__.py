"""The recipe: one YAML file, validated by pydantic before any work starts.

A package split along its seams: base.py (frozen models, name checks, RecipeError), specs.py (models and data),
settings.py with inference_settings.py and training_settings.py (every stage's settings), executor_settings.py
(local/SLURM), schema.py (Recipe) and load.py (YAML, `extends`, `--set`, error lines, paths).

Everything importers used from the single module is re-exported here, so `from fuse.recipe import X` keeps working
and a training job written as "fuse.recipe:DistillSettings" still loads.
"""

from __future__ import annotations

from fuse.recipe.base import CONTROL_RE, NAME_RE, Frozen, RecipeError, StageSettings, no_control_characters
from fuse.recipe.executor_settings import ExecutorSpec, Resources, SlurmSettings
from fuse.recipe.inference_settings import (
    ExtractSettings,
    ForwardSettings,
    ModelOverrides,
    ScoreSettings,
    VllmSettings,
)
from fuse.recipe.load import (
    apply_overrides,
    extend,
    format_error,
    load_recipe,
    parse_recipe,
)
from fuse.recipe.schema import Recipe
from fuse.recipe.settings import (
    AlignSettings,
    EvaluateSettings,
    LmEvalSettings,
    MergeSettings,
    PrepareSettings,
    PublishSettings,
    Stages,
)
from fuse.recipe.specs import DatasetSpec, DataSpec, ModelSpec
from fuse.recipe.training_settings import (
    DEEPSPEED_AUTO_KEYS,
    DeepSpeedSettings,
    DistillSettings,
    FpoSettings,
    Tracker,
    TrainSettings,
)

__all__ = [
    "CONTROL_RE",
    "DEEPSPEED_AUTO_KEYS",
    "NAME_RE",
    "AlignSettings",
    "DataSpec",
    "DatasetSpec",
    "DeepSpeedSettings",
    "DistillSettings",
    "EvaluateSettings",
    "ExecutorSpec",
    "ExtractSettings",
    "FpoSettings",
    "Frozen",
    "LmEvalSettings",
    "MergeSettings",
    "ModelOverrides",
    "ModelSpec",
    "ForwardSettings",
    "PrepareSettings",
    "PublishSettings",
    "Recipe",
    "RecipeError",
    "Resources",
    "ScoreSettings",
    "SlurmSettings",
    "StageSettings",
    "Stages",
    "Tracker",
    "TrainSettings",
    "VllmSettings",
    "format_error",
    "apply_overrides",
    "extend",
    "load_recipe",
    "no_control_characters",
    "parse_recipe",
]
