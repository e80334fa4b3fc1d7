"""The sbatch script of one stage instance: the settings all jobs of a submission share, and the sandboxed Jinja
template (fuse/slurm/job.sbatch.j2 or the recipe's own), rendered with recipe strings quoted for sbatch and bash."""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from importlib import resources as package_files
from pathlib import Path
from typing import Any

from fuse.dag import Instance
from fuse.recipe import Recipe, RecipeError, Resources
from fuse.slurm.site import SiteConfig
from fuse.stage_table import STAGE_TABLE
from fuse.store import RunStore

TEMPLATE = "job.sbatch.j2"
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class JobSettings:
    """What every job script of one submission shares."""

    recipe_path: Path  # the submission's snapshot of the resolved recipe
    python: str
    env_setup: tuple[str, ...]
    grace: int
    template: str | None = None  # a custom Jinja template file; default: fuse/slurm/job.sbatch.j2


def job_settings(
    recipe: Recipe, site: SiteConfig, recipe_path: Path, recipe_dir: Path | None = None
) -> JobSettings:
    slurm = recipe.executor.slurm
    template = slurm.template
    if template and recipe_dir is not None and not Path(template).expanduser().is_absolute():
        template = str(recipe_dir / template)
    grace = slurm.signal_grace_seconds if "signal_grace_seconds" in slurm.model_fields_set else None
    return JobSettings(
        recipe_path=recipe_path,
        python=slurm.python or site.python or sys.executable,
        # the site's lines, then the recipe's; a line the recipe repeats from the site is run once
        env_setup=tuple(dict.fromkeys((*site.env_setup, *slurm.env_setup))),
        grace=grace if grace is not None else (site.signal_grace_seconds or slurm.signal_grace_seconds),
        template=template,
    )


def log_pattern(store: RunStore, instance: Instance) -> Path:
    """SLURM's output file, as a filename pattern: our %A/%a/%j, in a folder whose own "%" are literal. A requeued
    job appends to the same one (--open-mode=append)."""
    name = "slurm-%A_%a.out" if instance.num_shards > 1 else "slurm-%j.out"
    return Path(literal_in_pattern(str(store.logs(instance.name)))) / name


def literal_in_pattern(text: str) -> str:
    """`text` in a SLURM filename pattern (--output, --error), where "%j", "%x", "%A"... are replaced: "%%" is a "%"."""
    return text.replace("%", "%%")


def stage_command(settings: JobSettings, instance: Instance) -> str:
    command = shlex.join(
        [settings.python, "-m", "fuse", "run-stage", str(settings.recipe_path), instance.name]
    )
    return command + (' --shard "$SLURM_ARRAY_TASK_ID"' if instance.num_shards > 1 else "")


def sbatch_arg(value: Any) -> str:
    """One argument on an #SBATCH line. sbatch splits those lines itself (not bash): whitespace separates, ' and "
    quote, # starts a comment, backslash escapes even inside quotes — so shlex.quote's form is read back intact
    once backslashes are ruled out, and control characters were refused when the recipe was read."""
    text = str(value)
    if "\\" in text or CONTROL.search(text):
        raise RecipeError(f"{text!r}: a backslash or control character cannot go on an #SBATCH line")
    return shlex.quote(text)


def shell_quote(value: Any) -> str:
    text = str(value)
    if CONTROL.search(text):
        raise RecipeError(f"{text!r}: control characters cannot go into a job script")
    return shlex.quote(text)


def _template(path: str | None) -> Any:
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment

    if path:
        try:
            source = Path(path).expanduser().read_text(encoding="utf-8")
        except OSError as error:
            raise RecipeError(f"executor.slurm.template: cannot read {path}: {error}") from None
    else:
        source = (package_files.files("fuse.slurm") / TEMPLATE).read_text(encoding="utf-8")
    # Sandboxed: a template is a recipe input, and `fuse submit --dry-run` must not run code from it
    environment = SandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )
    environment.filters.update(q=shell_quote, sbatch_arg=sbatch_arg)
    try:
        return environment.from_string(source)
    except jinja2.TemplateError as error:
        raise RecipeError(f"executor.slurm.template: {path or TEMPLATE}: {error}") from None


def render_job(recipe: Recipe, instance: Instance, resources: Resources, settings: JobSettings) -> str:
    """The sbatch script of one stage instance."""
    import jinja2

    template = _template(settings.template)
    try:
        return template.render(
            run_name=recipe.name,
            workdir=recipe.workdir,
            instance=instance.name,
            job_name=f"{recipe.name}.{instance.name}",
            log=str(log_pattern(RunStore(recipe.workdir), instance)),
            grace=settings.grace,
            r=resources,
            env_setup=settings.env_setup,
            multinode=STAGE_TABLE[instance.stage].trains and resources.nodes > 1,
            command=stage_command(settings, instance),
        )
    except jinja2.TemplateError as error:  # SecurityError (the sandbox), undefined names, filters' refusals
        raise RecipeError(f"executor.slurm.template: {settings.template or TEMPLATE}: {error}") from None
