"""Where a recipe runs on SLURM: the site config (slurm/sites/*.yaml) and each instance's resources, layered from
the site's defaults and the recipe's `executor.resources`."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from fuse.dag import Dag, Instance, stage_of
from fuse.recipe import Frozen, Recipe, RecipeError, Resources, format_error
from fuse.recipe.executor_settings import layered_resources
from fuse.recipe.safe_yaml import load_yaml
from fuse.stage_table import STAGE_TABLE, STAGES


class SiteConfig(Frozen):
    """Where recipes run (slurm/sites/*.yaml): defaults that a recipe's `executor` section overrides."""

    env_setup: list[str] = Field(default_factory=list, description="Shell lines run first in every job.")
    python: str | None = Field(
        None, description="Interpreter inside jobs (e.g. the venv's python on the nodes)."
    )
    signal_grace_seconds: int | None = Field(None, ge=0)
    resources: dict[str, Resources] = Field(
        default_factory=dict, description="Keyed by 'default', a stage (e.g. 'distill') or an instance."
    )


def site_path(recipe: Recipe, recipe_path: str | Path, override: str | None = None) -> Path | None:
    """The site config: `--site` wins over executor.slurm.site_config, which is relative to the recipe's folder."""
    value = override or recipe.executor.slurm.site_config
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() or override else Path(recipe_path).resolve().parent / path


def load_site(path: str | Path | None) -> SiteConfig:
    if path is None:
        return SiteConfig()
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such SLURM site config (executor.slurm.site_config or --site)")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}  # aliases bounded, as in recipes
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    try:
        return SiteConfig.model_validate(data)
    except ValidationError as error:
        message = format_error(error, str(path)).replace(
            "the recipe is not", "the SLURM site config is not", 1
        )
        raise RecipeError(message) from None


def check_resource_keys(recipe: Recipe, dag: Dag, site: SiteConfig, site_name: str = "site config") -> None:
    """A misspelt key would silently not apply: the recipe's must name this DAG's instances, the site's stages. A
    site config cannot move a training to another number of nodes (ExecutorSpec.nodes_for)."""
    for key in recipe.executor.resources:
        if key != "default" and key not in STAGES and key not in dag.instances:
            raise RecipeError(
                f"executor.resources.{key}: not 'default', a stage ({', '.join(STAGES)}) or an instance of this "
                f"recipe ({', '.join(dag.instances)})"
            )
    for key in site.resources:
        if key != "default" and stage_of(key) not in STAGES:
            raise RecipeError(f"{site_name}: resources.{key}: not 'default', a stage or a stage instance")
    for instance in dag.instances.values():
        if not STAGE_TABLE[instance.stage].trains:
            continue
        planned = recipe.executor.nodes_for(instance.stage, instance.name)
        nodes = resources_for(recipe, instance, site).nodes
        if nodes != planned:
            raise RecipeError(
                f"{site_name}: resources give {instance.name} {nodes} node(s), the recipe {planned}: a training's "
                f"node count makes its global batch (num_processes per node x nodes ranks), so it is part of the "
                f"result and only the recipe's executor.resources may set it"
            )


def resources_for(recipe: Recipe, instance: Instance, site: SiteConfig) -> Resources:
    """Layered, later wins: site default < site stage < site instance < recipe default < stage < instance.
    Only the keys a layer sets override (an `extra` list replaces the one below it)."""
    return layered_resources((site.resources, recipe.executor.resources), instance.stage, instance.name)
