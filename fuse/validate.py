"""Checks of a recipe against the world before any work: files exist, models resolve, names are registered.

Each problem is reported with the YAML key it comes from; all problems are reported at once.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from fuse.dag import build_dag
from fuse.models import ModelLoadError, check_vocab, load_tokenizer, resolve_model_dir
from fuse.recipe import ModelSpec, Recipe, RecipeError


def _model_key(recipe: Recipe, spec: ModelSpec) -> str:
    if spec.name == "pivot":
        return "pivot"
    return f"sources[{recipe.source_names.index(spec.name)}]"


def check_files(recipe: Recipe) -> list[str]:
    """Cheap checks: local paths named in the recipe exist and hold what they should."""
    problems = []
    for spec in [recipe.model("pivot"), *recipe.sources]:
        key = _model_key(recipe, spec)
        path = Path(spec.path)
        looks_local = path.is_absolute() or path.exists()
        if looks_local and not path.is_dir():
            problems.append(f"{key}.path: model folder {path} does not exist")
        elif looks_local and not (path / "config.json").is_file():
            problems.append(f"{key}.path: {path} has no config.json (not a Hugging Face model folder)")
        elif looks_local and not any(path.glob("*.safetensors")) and not spec.allow_pickle:
            problems.append(
                f"{key}.path: {path} has no .safetensors weights (pickles need allow_pickle: true)"
            )
        if spec.chat_template and "{" not in spec.chat_template and not Path(spec.chat_template).is_file():
            problems.append(f"{key}.chat_template: file {spec.chat_template} does not exist")
    for key, dataset in (("data.sft", recipe.data.sft), ("data.preference", recipe.data.preference)):
        if dataset is not None and Path(dataset.path).is_absolute() and not Path(dataset.path).exists():
            problems.append(f"{key}.path: {dataset.path} does not exist")
    evaluate = recipe.stages.evaluate
    for key in ("items", "heldout_text"):
        value = getattr(evaluate, key)
        if evaluate.enabled and value and not Path(value).exists():
            problems.append(f"stages.evaluate.{key}: {value} does not exist")
    return problems


def check_registries(recipe: Recipe) -> list[str]:
    """Names that select an algorithm must be registered (imports the registries, so it costs a torch import)."""
    problems = []
    checks = [
        ("stages.distill.fusion", recipe.stages.distill, "fusion", "fuse.losses", "FUSIONS"),
        ("stages.merge.method", recipe.stages.merge, "method", "fuse.merging.methods", "METHODS"),
    ]
    for key, settings, field, module_name, registry_name in checks:
        if not settings.enabled:
            continue
        try:
            registry = getattr(importlib.import_module(module_name), registry_name)
        except (ImportError, AttributeError):
            continue  # that stage is not installed in this build; running it will say so
        value = getattr(settings, field)
        if value not in registry:
            problems.append(f"{key}: unknown {field} {value!r} (known: {', '.join(sorted(registry))})")
    problems += _merge_parameter_problems(recipe)
    return problems


def _merge_parameter_problems(recipe: Recipe) -> list[str]:
    merge = recipe.stages.merge
    if not merge.enabled:
        return []
    try:
        from fuse.merging.methods import METHODS, MergeConfigError, resolve_params
    except ImportError:
        return []
    if merge.method not in METHODS:
        return []  # reported above
    per_model = [dict(merge.model_parameters.get(name, {})) for name in recipe.source_names]
    try:
        resolve_params(METHODS[merge.method], dict(merge.parameters), per_model, merge.seed)
    except MergeConfigError as error:
        return [f"stages.merge.{error}"]
    return []


def check_executor(recipe: Recipe) -> list[str]:
    """The SLURM site config exists and parses, and every `resources` key (recipe's and site's) names a stage or an
    instance: a misspelt key would silently not apply. Needs neither weights nor data (part of --no-load)."""
    from fuse.slurm import check_resource_keys, load_site

    problems = []
    site_config = recipe.executor.slurm.site_config
    try:
        site = load_site(site_config)
    except RecipeError as error:
        problems.append(f"executor.slurm.site_config: {error}")
        site = load_site(None)
    try:
        check_resource_keys(recipe, build_dag(recipe), site, site_config or "site config")
    except RecipeError as error:
        problems.append(str(error))
    return problems


def check_models(recipe: Recipe) -> list[str]:
    """Load each tokenizer and config (no weights): resolvable, has a chat template, vocab sizes consistent."""
    from transformers import AutoConfig

    problems = []
    needs_template = recipe.stages.extract.enabled or recipe.stages.score.enabled
    for spec in [recipe.model("pivot"), *recipe.sources]:
        key = _model_key(recipe, spec)
        try:
            directory = resolve_model_dir(spec)
            tokenizer = load_tokenizer(spec, require_chat_template=needs_template)
            config = AutoConfig.from_pretrained(directory, trust_remote_code=spec.trust_remote_code)
            check_vocab(spec, config, tokenizer)
        except (ModelLoadError, OSError, ValueError) as error:
            problems.append(f"{key}: {error}")
    return problems


def require_files(recipe: Recipe) -> None:
    """The cheap checks `fuse run` and `fuse submit` make before any work; one error listing every problem."""
    problems = check_files(recipe)
    if problems:
        raise RecipeError(
            "the recipe does not fit the files it names:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def check_push(recipe: Recipe) -> list[str]:
    """A push that cannot happen (offline, no token) is reported now, not after the whole run."""
    publish = recipe.stages.publish
    if not (publish.enabled and publish.push):
        return []
    from fuse.stages.publish import check_push_possible

    try:
        check_push_possible()
    except RuntimeError as error:
        return [str(error)]
    return []


def validate(recipe: Recipe, files: bool = True, load: bool = True) -> None:
    """Raise one RecipeError listing every problem found.

    files=False, load=False (`--no-load`) checks what needs neither weights nor data: schema, DAG shape,
    registered names — enough to validate a real-scale recipe on a laptop.
    """
    build_dag(recipe)  # cross-stage checks raise RecipeError themselves
    problems = check_executor(recipe) + check_registries(recipe)
    if files:
        problems = check_files(recipe) + problems
    if load and not problems:
        problems += check_models(recipe) + check_push(recipe)
    if problems:
        raise RecipeError(
            "the recipe does not fit the files it names:\n" + "\n".join(f"  - {p}" for p in problems)
        )
