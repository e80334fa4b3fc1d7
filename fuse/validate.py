"""Checks of a recipe against the world before any work: files exist, models resolve, names are registered.

Each problem is reported with the YAML key it comes from; all problems are reported at once.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

from fuse.dag import build_dag
from fuse.models import ModelLoadError, check_vocab, load_tokenizer, resolve_model_dir
from fuse.recipe import ModelSpec, Recipe, RecipeError
from fuse.recipe.base import quote


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
    for key in ("items", "heldout_text", "domains", "preference"):
        value = getattr(evaluate, key)
        if evaluate.enabled and value and not Path(value).exists():
            problems.append(f"stages.evaluate.{key}: {value} does not exist")
    return problems


HUB_ID_RE = re.compile(r"^[\w.-]+(/[\w.-]+)?\Z")
MIN_ROW_LIMIT = 1 << 20
MAX_BAD_FILES = 10  # files of a dataset folder whose first bad row is listed


def check_contents(recipe: Recipe) -> list[str]:
    """What would otherwise fail deep inside a stage, read up front (cheap: small files, one pass over local data):
    remote code the recipe does not trust, eval items and held-out text that do not parse, data rows that are not
    UTF-8, not JSON (a raw NUL byte) or too large to tokenize, in every layout prepare reads, each with its file and
    line; paths that are neither local nor a hub id."""
    return (
        _remote_code_problems(recipe)
        + _place_problems(recipe)
        + _data_problems(recipe)
        + _format_problems(recipe)
        + _eval_problems(recipe)
    )


def _remote_code_problems(recipe: Recipe) -> list[str]:
    problems = []
    for spec in [recipe.model("pivot"), *recipe.sources]:
        folder = Path(spec.path)
        for name in ("config.json", "tokenizer_config.json"):
            path = folder / name
            if not path.is_file():
                continue
            try:
                auto_map = json.loads(path.read_bytes().decode("utf-8")).get("auto_map")
            except (UnicodeDecodeError, ValueError, AttributeError) as error:
                problems.append(
                    f"{_model_key(recipe, spec)}.path: {path} is not a valid JSON object: {error}"
                )
                continue
            if auto_map and not spec.trust_remote_code:
                named = {c for v in auto_map.values() for c in (v if isinstance(v, list) else [v]) if c}
                classes = ", ".join(sorted(named))
                problems.append(
                    f"{_model_key(recipe, spec)}.trust_remote_code: {path} maps to code shipped with the model "
                    f"({classes}); set trust_remote_code: true if you trust that code"
                )
                break
    return problems


def _place_problems(recipe: Recipe) -> list[str]:
    """A relative path that does not exist would be taken for a hub id and fail minutes later in a stage."""
    named = [(f"{_model_key(recipe, s)}.path", s.path) for s in [recipe.model("pivot"), *recipe.sources]]
    named += [
        (f"data.{k}.path", d.path)
        for k, d in (("sft", recipe.data.sft), ("preference", recipe.data.preference))
        if d
    ]
    problems = []
    for key, value in named:
        if Path(value).is_absolute() or Path(value).exists() or HUB_ID_RE.match(value):
            continue
        problems.append(
            f"{key}: {quote(value)} is not a local path that exists, nor a hub id (name or org/name)"
        )
    return problems


def _row_limit(recipe: Recipe) -> int:
    """Rows longer than this cannot fit any max_length of the recipe (≈64 bytes per token is generous), and cost
    hundreds of bytes of memory per byte to tokenize: refuse them instead of running out of memory in extract."""
    stages = recipe.stages
    longest = max(
        stages.extract.max_length, stages.score.max_length, stages.distill.max_length, stages.fpo.max_length
    )
    return max(MIN_ROW_LIMIT, 64 * longest)


def _data_problems(recipe: Recipe) -> list[str]:
    """Every local data file of the recipe, in every layout prepare reads (a file or a folder of them; JSON Lines,
    a JSON array, CSV, Parquet, Arrow): its first row prepare would skip or that is too large, by file and line."""
    from fuse.data.raw import first_bad_row, local_data_files

    limit = _row_limit(recipe)
    problems = []
    for key, dataset in (("data.sft", recipe.data.sft), ("data.preference", recipe.data.preference)):
        if dataset is None or not Path(dataset.path).exists():
            continue  # a hub dataset, or reported missing by check_files
        try:
            files = local_data_files(Path(dataset.path))
        except ValueError as error:
            problems.append(f"{key}.path: {error}")
            continue
        bad = [row for file in files if (row := first_bad_row(file, limit)) is not None]
        problems += [f"{key}.path: {row}" for row in bad[:MAX_BAD_FILES]]
        if len(bad) > MAX_BAD_FILES:
            problems.append(f"{key}.path: and {len(bad) - MAX_BAD_FILES} more files with a bad row")
    return problems


FORMAT_PROBE_ROWS = 20
SFT_FORMATS = ("messages", "sharegpt", "prompt_response")


def _format_problems(recipe: Recipe) -> list[str]:
    """Each local dataset read as its `format` says, on its first rows: a format that fits none of them (`format:
    sharegpt` on a messages file) is named here, with the format that would fit, not as a stage that drops every
    row an hour later."""
    from fuse.data.prepared import Dropped, preference_row, sft_messages
    from fuse.data.raw import BadRow, first_rows

    problems = []
    for key, spec in (("data.sft", recipe.data.sft), ("data.preference", recipe.data.preference)):
        if spec is None or not Path(spec.path).exists():
            continue
        try:
            rows = [r for r in first_rows(Path(spec.path), FORMAT_PROBE_ROWS) if not isinstance(r, BadRow)]
        except (
            Exception
        ):  # an unreadable file or an oversized field: the row checks report it by file and line
            continue
        if not rows:
            continue

        def reads(fmt: str, row: Any, columns: dict[str, str] = spec.columns) -> str | None:
            try:
                if fmt == "preference":
                    preference_row(row, columns)
                else:
                    sft_messages(row, fmt, columns)
            except KeyError as missing:
                return f"no column {missing}"
            except (Dropped, ValueError, TypeError, AttributeError) as reason:
                return str(reason)
            return None

        failures = [reads(spec.format, row) for row in rows]
        if all(failures):
            fits = [f for f in (*SFT_FORMATS, "preference") if f != spec.format and not reads(f, rows[0])]
            hint = f"; format: {fits[0]} reads it" if fits else ""
            problems.append(
                f"{key}.format: none of the first {len(rows)} rows of {spec.path} reads as {spec.format!r} "
                f"({failures[0]}; its columns: {', '.join(sorted(rows[0]))[:200]}){hint}"
            )
    return problems


# What a recipe can switch on that needs a package beyond fuse's own: (setting, package to import, pip name).
def _optional_dependencies(recipe: Recipe) -> list[tuple[str, str, str]]:
    needs = []
    for stage in ("distill", "fpo"):
        settings = getattr(recipe.stages, stage)
        if not settings.enabled:
            continue
        for tracker in settings.report_to:
            module = {"tensorboard": "tensorboard", "comet_ml": "comet_ml", "azure_ml": "azureml"}.get(
                tracker, tracker
            )
            needs.append((f"stages.{stage}.report_to: {tracker}", module, tracker.replace("_", "-")))
        if settings.attn_implementation in ("flash_attention_2", "flash_attention_3"):
            needs.append((f"stages.{stage}.attn_implementation", "flash_attn", "flash-attn"))
        if settings.liger:
            needs.append((f"stages.{stage}.liger", "liger_kernel", "liger-kernel"))
        if settings.deepspeed.zero_stage or settings.num_processes > 1:
            needs.append((f"stages.{stage}.deepspeed / num_processes", "deepspeed", "deepspeed"))
        if settings.peft is not None:
            needs.append((f"stages.{stage}.peft", "peft", "peft"))
            if settings.peft.load_in_4bit:
                needs.append((f"stages.{stage}.peft.load_in_4bit", "bitsandbytes", "bitsandbytes"))
    for stage in ("extract", "score"):
        if getattr(recipe.stages, stage).enabled and getattr(recipe.stages, stage).backend == "vllm":
            needs.append((f"stages.{stage}.backend: vllm", "vllm", "vllm"))
    if recipe.stages.evaluate.enabled and recipe.stages.evaluate.lm_eval.tasks:
        needs.append(("stages.evaluate.lm_eval.tasks", "lm_eval", "lm-eval"))
    return needs


HF_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")
EXPORT_RE = re.compile(r"""(?:^|[;&\s])export\s+(.+)$""")


def exported_variables(lines: list[str]) -> dict[str, str]:
    """Variables that `export NAME=value` lines set (simple values only: what the jobs' env_setup exports)."""
    found = {}
    for line in lines:
        match = EXPORT_RE.search(line.strip())
        try:
            words = shlex.split(match.group(1)) if match else []
        except ValueError:  # unbalanced quotes: not a line to read values from
            words = []
        for word in words:
            name, sep, value = word.partition("=")
            if sep and re.fullmatch(r"[A-Za-z_]\w*", name) and "$" not in value and "`" not in value:
                found[name] = value.strip("'\"")
    return found


def check_job_cache(recipe: Recipe) -> list[str]:
    """The Hugging Face cache validate reads must be the one the jobs will use: a site or recipe env_setup that
    exports HF_HOME (or HF_HUB_CACHE, HF_HUB_OFFLINE) other than this shell's would make validate check models
    the jobs do not see (and download them where the jobs will not look)."""
    import os

    from fuse.slurm.site import load_site

    if recipe.executor.kind != "slurm":
        return []
    try:
        site = load_site(recipe.executor.slurm.site_config)
    except RecipeError:
        return []  # reported by check_executor
    jobs = exported_variables([*site.env_setup, *recipe.executor.slurm.env_setup])
    differ = [
        f"{name}={jobs[name]} (here: {os.environ.get(name, 'unset')})"
        for name in HF_VARIABLES
        if name in jobs and os.environ.get(name) != jobs[name]
    ]
    if not differ:
        return []
    setting = " ".join(f"{name}={jobs[name]}" for name in HF_VARIABLES if name in jobs)
    return [
        f"executor.slurm.env_setup: the jobs use {', '.join(differ)}: validate would check another cache than "
        f"the jobs read; run `{setting} fuse validate ...`"
    ]


def check_dependencies(recipe: Recipe) -> list[str]:
    """Packages the recipe turns on, importable here (in the environment the jobs share): a missing tracker or
    kernel is found now, not when distill starts."""
    import importlib.util

    return [
        f"{setting} needs the package {pip!r}, which is not installed here (pip install {pip})"
        for setting, module, pip in _optional_dependencies(recipe)
        if importlib.util.find_spec(module) is None
    ]


def check_qlora(recipe: Recipe) -> list[str]:
    """QLoRA (peft.load_in_4bit) keeps the frozen weights in bitsandbytes' 4-bit format, which needs CUDA: on this
    machine for a local run, in the stage's jobs for a SLURM one."""
    stages = [
        name
        for name in ("distill", "fpo")
        if getattr(recipe.stages, name).enabled
        and getattr(recipe.stages, name).peft is not None
        and getattr(recipe.stages, name).peft.load_in_4bit
    ]
    if not stages:
        return []
    if recipe.executor.kind == "slurm":
        from fuse.slurm.site import load_site, resources_for

        try:
            site = load_site(recipe.executor.slurm.site_config)
        except RecipeError:
            return []  # reported by check_executor
        return [
            f"stages.{instance.stage}.peft.load_in_4bit: QLoRA needs a CUDA GPU, and the job of {instance.name} asks "
            f"for none (executor.resources.{instance.stage}.gpus_per_node)"
            for instance in build_dag(recipe).order()
            if instance.stage in stages and not resources_for(recipe, instance, site).gpus_per_node
        ]
    import torch

    if torch.cuda.is_available():
        return []
    return [
        f"stages.{stage}.peft.load_in_4bit: QLoRA needs a CUDA GPU (bitsandbytes' 4-bit weights) and this machine "
        "has none: set load_in_4bit: false (LoRA on full-precision weights) or run where there is a GPU"
        for stage in stages
    ]


def _jsonl_problem(path: Path, limit: int | None = None) -> str | None:
    """The first row that is not UTF-8 or is over `limit` bytes, named by file and line."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if limit is not None and len(line) > limit:
                return (
                    f"{path}:{number}: a row of {len(line) / 1e6:.1f} MB, over the {limit / 1e6:.1f} MB this recipe's "
                    "max_length can use; shorten or drop it"
                )
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return (
                    f"{path}:{number}: not UTF-8 (byte {line[error.start]:#04x} at column {error.start + 1})"
                )
    return None


def _eval_problems(recipe: Recipe) -> list[str]:
    """The evaluate stage's items and held-out text, parsed now rather than after training."""
    from fuse.evaluation import load_domain_samples, load_items, load_preference_pairs, load_texts

    evaluate = recipe.stages.evaluate
    if not evaluate.enabled:
        return []
    problems = []
    for key, value, load in (
        ("items", evaluate.items, load_items),
        ("heldout_text", evaluate.heldout_text, load_texts),
        ("domains", evaluate.domains, load_domain_samples),
        ("preference", evaluate.preference, load_preference_pairs),
    ):
        if not value or not Path(value).is_file():
            continue  # unset, or reported missing by check_files
        problem = _jsonl_problem(Path(value))
        if problem is None:
            try:
                if not load(value):
                    problem = f"{value}: no texts"
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                problem = (
                    str(error)
                    if str(error).startswith(str(value))
                    else f"{value}: {type(error).__name__}: {error}"
                )
        if problem:
            problems.append(f"stages.evaluate.{key}: {problem}")
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
        registry = getattr(importlib.import_module(module_name), registry_name)
        value = getattr(settings, field)
        if value not in registry:
            problems.append(f"{key}: unknown {field} {value!r} (known: {', '.join(sorted(registry))})")
    problems += _merge_parameter_problems(recipe)
    return problems


def _merge_parameter_problems(recipe: Recipe) -> list[str]:
    from fuse.merging.methods import METHODS, MergeConfigError, resolve_params

    merge = recipe.stages.merge
    if not merge.enabled:
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
    from fuse.slurm.site import check_resource_keys, load_site

    problems = []
    site_config = recipe.executor.slurm.site_config
    try:
        site = load_site(site_config)
    except RecipeError as error:
        problems.append(f"executor.slurm.site_config: {error}")
        site = load_site(None)
    dag = build_dag(recipe)
    try:
        check_resource_keys(recipe, dag, site, site_config or "site config")
    except RecipeError as error:
        problems.append(str(error))
    if recipe.executor.kind == "slurm":
        problems += check_tensor_parallel_gpus(recipe, dag, site) + check_job_sizes(recipe, dag, site)
    return problems


def check_tensor_parallel_gpus(recipe: Recipe, dag, site) -> list[str]:
    """A vLLM engine over N GPUs needs a job with at least N GPUs: each extract/score instance's resources against
    its model's tensor_parallel_size (after stages.<stage>.models overrides)."""
    from fuse.slurm.site import resources_for

    problems = []
    for instance in dag.order():
        if instance.stage not in ("extract", "score"):
            continue
        settings = getattr(recipe.stages, instance.stage)
        model = settings.for_model(instance.key)
        pp = int(model.vllm.engine_kwargs.get("pipeline_parallel_size", 1))
        needed = model.tensor_parallel_size * pp
        gpus = resources_for(recipe, instance, site).gpus_per_node
        if settings.backend == "vllm" and gpus != needed:
            what = "too few" if gpus < needed else f"{gpus - needed} would sit idle"
            problems.append(
                f"executor.resources.{instance.name}: {gpus} GPUs per node ({what}), but {instance.name} runs vLLM "
                f"on tensor_parallel_size {model.tensor_parallel_size} x pipeline_parallel_size {pp} = {needed} "
                f"(stages.{instance.stage}.models.{instance.key} or stages.{instance.stage}.tensor_parallel_size)"
            )
    return problems


def check_job_sizes(recipe: Recipe, dag, site) -> list[str]:
    """Every SLURM job asks for memory and time (from the recipe or the site's defaults): without them the
    cluster's defaults decide, often a few GB and an hour, and the job dies late. `fuse plan --estimate` says how
    much each needs."""
    from fuse.slurm.site import resources_for

    missing = []
    for instance in dag.order():
        resources = resources_for(recipe, instance, site)
        lacks = [name for name in ("mem", "time") if getattr(resources, name) is None]
        if lacks:
            missing.append(f"{instance.name} ({', '.join(lacks)})")
    if not missing:
        return []
    return [
        f"executor.resources: jobs without memory or time and no site default: {', '.join(missing)}; set them "
        "(`fuse plan --estimate` sizes each) or give the site config a `default`"
    ]


# One plain conversation every chat template must write back: a template that drops or rewrites contents would
# make extract find no content and align fall back everywhere — a teacherless distill with no error.
PROBE_CONVERSATION = (
    {"role": "user", "content": "Which colour is the sky on a clear day? Answer briefly."},
    {"role": "assistant", "content": "Blue, because air scatters blue light the most."},
)


def check_template(spec: ModelSpec, tokenizer, template: str | None) -> None:
    """Render the probe conversation with `template` (None: the tokenizer's own) and find every content in it."""
    from fuse.data.chat import ChatRenderError, TemplateTimeout, content_spans, render_text

    try:
        text = render_text(tokenizer, PROBE_CONVERSATION, template)
    except TemplateTimeout as error:
        raise ModelLoadError(f"model {spec.name!r}: {error}") from None
    except Exception as error:  # jinja raises its own errors (TemplateError, UndefinedError, ...)
        raise ModelLoadError(
            f"model {spec.name!r}: the chat template fails on a plain user/assistant conversation: "
            f"{type(error).__name__}: {error}"
        ) from None
    try:
        content_spans(text, PROBE_CONVERSATION)
    except ChatRenderError as error:
        raise ModelLoadError(
            f"model {spec.name!r}: the chat template does not write message contents back ({error}); "
            f"rendered: {text[:200]!r}"
        ) from None


def check_models(recipe: Recipe) -> list[str]:
    """Load each tokenizer and config (no weights): resolvable, has a chat template that writes contents back,
    vocab sizes consistent."""
    from transformers import AutoConfig

    problems = []
    needs_template = recipe.stages.extract.enabled or recipe.stages.score.enabled
    pivot_template = None
    for spec in [recipe.model("pivot"), *recipe.sources]:
        key = _model_key(recipe, spec)
        try:
            directory = resolve_model_dir(spec, weights=False)  # configs and tokenizers: no weights
            tokenizer = load_tokenizer(spec, require_chat_template=needs_template)
            config = AutoConfig.from_pretrained(directory, trust_remote_code=spec.trust_remote_code)
            check_vocab(spec, config, tokenizer)
            if spec.name == "pivot":
                pivot_template = tokenizer.chat_template
            if needs_template:
                own = recipe.stages.extract.template == "own" or spec.name == "pivot"
                check_template(spec, tokenizer, None if own else pivot_template)
        except (ModelLoadError, OSError, ValueError) as error:
            problems.append(f"{key}: {error}")
    return problems


def require_files(recipe: Recipe) -> None:
    """The cheap checks `fuse run` and `fuse submit` make before any work; one error listing every problem."""
    problems = check_files(recipe)
    problems += check_contents(recipe) if not problems else []
    if problems:
        raise RecipeError(
            "the recipe does not fit the files it names:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def check_push(recipe: Recipe) -> list[str]:
    """A push that cannot happen (offline, no token) is reported now, not after the whole run."""
    publish = recipe.stages.publish
    if not (publish.enabled and publish.push):
        return []
    from fuse.hub import check_push_possible

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
    if files:  # the environment the jobs run in (a laptop's --no-load check does without)
        problems += check_dependencies(recipe) + check_job_cache(recipe) + check_qlora(recipe)
        found = check_files(recipe)
        problems = found + (check_contents(recipe) if not found else []) + problems
    if load and not problems:
        problems += check_models(recipe) + check_push(recipe)
    if problems:
        raise RecipeError(
            "the recipe does not fit the files it names:\n" + "\n".join(f"  - {p}" for p in problems)
        )
