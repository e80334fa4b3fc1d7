"""From a YAML file to a validated Recipe: `extends`, `--set` overrides, pydantic errors as YAML-keyed lines,
and relative paths made absolute against the recipe's folder. The schema knows nothing of files; this does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fuse.recipe.base import MAX_QUOTED, RecipeError, quote, shorten
from fuse.recipe.safe_yaml import load_yaml
from fuse.recipe.schema import Recipe
from fuse.recipe.specs import ModelSpec


def format_error(error: ValidationError, source: str) -> str:
    """One line per problem, `key: message`; a long value (or key) is quoted by its start and length only."""
    lines = [f"{shorten(source)}: the recipe is not valid:"]
    for item in error.errors():
        key = ".".join(shorten(str(p), MAX_QUOTED // 3) for p in item["loc"]) or "(top level)"
        message = _shorten_input(item["msg"], item.get("input"))
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        elif item["type"].startswith("value_error"):
            message = message.removeprefix("Value error, ")
        lines.append(f"  - {key}: {shorten(message, 3 * MAX_QUOTED)}")
    return "\n".join(lines)


def _shorten_input(message: str, value: Any) -> str:
    """`message` with a long string value it quotes (as repr or as is) shortened, the rest of it kept whole."""
    if not isinstance(value, str) or len(value) <= MAX_QUOTED:
        return message
    if repr(value) in message:
        return message.replace(repr(value), quote(value))
    return message.replace(value, shorten(value))


def parse_recipe(data: dict[str, Any], source: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe mapping; relative paths are made absolute against `base_dir`."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: the recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as error:
        raise RecipeError(format_error(error, source)) from None
    return _absolutize(recipe, base_dir or Path.cwd())


def load_recipe(
    path: str | Path, overrides: list[str] | tuple[str, ...] | None = None, _chain: tuple[Path, ...] = ()
) -> Recipe:
    """The recipe file, with `--set KEY=VALUE` overrides applied before validation (so they are checked alike).
    A recipe with `extends: OTHER.yaml` is that recipe with this file's keys laid over it (see `extend`)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    if isinstance(data, dict) and "extends" in data:
        data = extend(data, path, _chain)
    source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " (with --set " + " ".join(overrides) + ")"
    return parse_recipe(data, source, path.resolve().parent)


def extend(child: dict[str, Any], path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """`extends: base.yaml` (relative to this file): the base recipe as written (its relative paths made absolute
    against its own folder, no defaults filled in), with this file's mappings merged key by key and its other
    values (lists included) replacing the base's; a mapping that names another `method` replaces the base's whole.
    An ablation is then a small file: `name` plus the keys it
    changes. It gets its own run directory (`workdir`, by default the base's sibling named after it), so a
    variant never overwrites the base's outputs."""
    here = path.resolve()
    if not isinstance(child["extends"], str):
        raise RecipeError(f"{path}: extends: expected the path of another recipe file")
    parent_path = (here.parent / child["extends"]).resolve()
    if parent_path in (*chain, here):
        cycle = " -> ".join(str(p) for p in (*chain, here, parent_path))
        raise RecipeError(f"{path}: extends: a cycle of recipes ({cycle})")
    parent = load_recipe(parent_path, _chain=(*chain, here))
    own = {key: value for key, value in child.items() if key != "extends"}
    if "workdir" not in own:
        if own.get("name", parent.name) == parent.name:
            raise RecipeError(
                f"{path}: extends {parent_path.name}: give the variant its own `name` (or `workdir`), or it would "
                "share the base recipe's run directory"
            )
        own["workdir"] = str(Path(parent.workdir).parent / own["name"])
    base = parent.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return _merged(base, own)


def _merged(base: Any, over: Any) -> Any:
    """`over` laid on `base`; a mapping whose `method` changes is taken whole: its parameters are the new
    method's, not a mix of both."""
    if (
        isinstance(base, dict)
        and isinstance(over, dict)
        and over.get("method", base.get("method")) == base.get("method")
    ):
        return {**base, **{key: _merged(base.get(key), value) for key, value in over.items()}}
    return over


def apply_overrides(data: Any, overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`stages.distill.learning_rate=1e-5`, `sources.0.path=/models/x`: a dotted key (list items by index) and a
    YAML value, set in a copy of the recipe mapping. Unknown keys are left for the schema to report."""
    import copy

    if not isinstance(data, dict):
        raise RecipeError(f"the recipe must be a YAML mapping, got {type(data).__name__}")
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise RecipeError(
                f"--set {quote(item)}: expected KEY=VALUE with a dotted KEY, e.g. stages.distill.epochs=2"
            )
        try:
            value = load_yaml(text, f"--set {key}") if text.strip() else ""
        except yaml.YAMLError as error:
            raise RecipeError(f"--set {key}: the value is not valid YAML: {error}") from None
        node: Any = data
        for depth, part in enumerate(parts):
            where = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"--set {key}: {where}: not an index of a list of {len(node)} entries")
                part = int(part)
            elif not isinstance(node, dict):
                raise RecipeError(f"--set {key}: {'.'.join(parts[:depth])} is not a mapping")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and not isinstance(node.get(part), dict | list):
                    node[part] = {}
                node = node[part]
    return data


def _local(value: str, base: Path) -> str:
    """Make `value` absolute if it names something local (relative paths are relative to the recipe)."""
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    joined = base / candidate
    if (
        _exists(joined)
        or value.startswith((".", "~"))
        or value.endswith((".jsonl", ".json", ".parquet", ".yaml", ".jinja"))
    ):
        return str(joined.resolve())
    return value  # a hub id such as "org/name"


def _exists(path: Path) -> bool:
    """Whether `path` exists; a value too long to be a file name (OSError) names nothing local."""
    try:
        return path.exists()
    except OSError:
        return False


def _absolutize(recipe: Recipe, base: Path) -> Recipe:
    def model(spec: ModelSpec) -> ModelSpec:
        template = spec.chat_template
        if template and "{" not in template:
            template = _local(template, base)
        return spec.model_copy(update={"path": _local(spec.path, base), "chat_template": template})

    data = recipe.data.model_copy(
        update={
            "sft": recipe.data.sft.model_copy(update={"path": _local(recipe.data.sft.path, base)}),
            "preference": recipe.data.preference
            and recipe.data.preference.model_copy(update={"path": _local(recipe.data.preference.path, base)}),
        }
    )
    evaluate = recipe.stages.evaluate
    evaluate = evaluate.model_copy(
        update={
            "items": evaluate.items and _local(evaluate.items, base),
            "heldout_text": evaluate.heldout_text and _local(evaluate.heldout_text, base),
            "domains": evaluate.domains and _local(evaluate.domains, base),
            "preference": evaluate.preference and _local(evaluate.preference, base),
        }
    )
    distill = recipe.stages.distill
    if distill.oracle_teacher:
        distill = distill.model_copy(update={"oracle_teacher": _local(distill.oracle_teacher, base)})
    slurm = recipe.executor.slurm
    if slurm.site_config:
        slurm = slurm.model_copy(update={"site_config": _local(slurm.site_config, base)})
    return recipe.model_copy(
        update={
            "executor": recipe.executor.model_copy(update={"slurm": slurm}),
            "workdir": str((base / Path(recipe.workdir).expanduser()).resolve()),
            **({"cache": str((base / Path(recipe.cache).expanduser()).resolve())} if recipe.cache else {}),
            "pivot": model(recipe.pivot.model_copy(update={"name": "pivot"})),
            "sources": [model(s) for s in recipe.sources],
            "data": data,
            "stages": recipe.stages.model_copy(update={"evaluate": evaluate, "distill": distill}),
        }
    )
