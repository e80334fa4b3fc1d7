"""publish: a ready-to-upload Hugging Face folder of the fused model — weights, tokenizer, chat template, and a
model card (huggingface_hub's ModelCard) a Hub user can read: what the model is, how to use it, what it scored with
standard errors (also as `model-index`), the models it came from with their revisions, how it was made (the whole
recipe as a file beside the card) — validated by reloading and generating before it is written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import AutoModelForCausalLM, AutoTokenizer

from fuse.context import StageContext
from fuse.dag import build_dag
from fuse.evaluation import Measurement, measurements
from fuse.hub import check_push_possible, push
from fuse.io import atomic_dir, read_json, sha256_json, write_json_atomic
from fuse.models import identity, load_model, load_tokenizer_dir, pad_id
from fuse.plan import fingerprints
from fuse.recipe import ModelSpec, PublishSettings, Recipe
from fuse.store import environment

log = logging.getLogger(__name__)

RECIPE_FILE = "fuse_recipe.yaml"  # the whole recipe, beside the card that summarizes it
LINEAGE_FILE = "fuse_lineage.json"
LICENSES_FILE = "LICENSES.md"  # what license_link names when the recipe gives no licence of its own
DEFAULT_LICENSE_NAME = "base-model-licenses"


def lineage(recipe: Recipe) -> list[dict[str, str]]:
    """Every stage instance of the run with its fingerprint, parents first."""
    dag = build_dag(recipe)
    prints = fingerprints(recipe, dag)
    return [
        {"instance": i.name, "fingerprint": prints[i.name][0], "parents": list(i.parents)}
        for i in dag.order()
    ]


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(path: str) -> str | None:
    """`path` when it names a Hub repository (org/name), None when it is local (recipe paths are absolute then)."""
    return path if not os.path.isabs(path) and HUB_ID.match(path) and not Path(path).exists() else None


def public_name(path: str) -> str:
    """What a card may say about a model or data path: its hub id, or only the last part of a local path."""
    return hub_id(path) or Path(path).name


def scrub_local_paths(value: Any) -> Any:
    """The recipe as the published folder shows it: absolute local paths reduced to `<local>/name` (they mean
    nothing on the Hub and tell where the run was made)."""
    if isinstance(value, dict):
        return {k: scrub_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_local_paths(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return f"<local>/{Path(value).name}"
    return value


def published_recipe(recipe: Recipe) -> str:
    """The recipe file shipped beside the card: local paths scrubbed, and without the executor (it says where the
    run was made, not what made the model; its env_setup lines and accounts stay private) and the workdir."""
    dumped = recipe.model_dump(mode="json", by_alias=True, exclude={"executor", "workdir"})
    return yaml.safe_dump(scrub_local_paths(dumped), sort_keys=False)


# --------------------------------------------------------------------------------------------- metadata


def base_models(recipe: Recipe) -> tuple[list[str], str | None]:
    """The card's `base_model` and `base_model_relation`, as the Hub's model tree reads them.

    Every hub model that went in, the pivot first: the fused weights are the pivot's, trained on every source's
    distributions and merged, so a model made from several is listed under each of them with relation `merge`
    (the Hub's word for a model made from several parents; it has none for distillation). With only the pivot on
    the Hub (every source local) it is a `finetune` of the pivot. Local paths are never listed: the Hub rejects
    them, and they tell where the run was made."""
    pivot = hub_id(recipe.pivot.path)
    bases = list(dict.fromkeys(m for m in (pivot, *(hub_id(s.path) for s in recipe.sources)) if m))
    if not bases:
        return [], None
    return bases, "finetune" if bases == [pivot] else "merge"


def model_revision(spec: ModelSpec) -> str:
    """The revision the card names a model by, the same string in its table and its metadata: the recipe's pinned
    revision; for an unpinned hub model, the commit the local cache holds (what the run read), else `main` (what
    the fingerprints name it by); for a local folder, `sha256:` and the digest of its files (its identity)."""
    if spec.revision:
        return spec.revision
    if hub_id(spec.path):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec.path, "config.json")
        return Path(cached).parent.name if isinstance(cached, str) else "main"
    return "sha256:" + sha256_json(identity(spec))[:16]


def model_rows(recipe: Recipe) -> list[dict[str, str]]:
    """The models the recipe fused, pivot first: role, name, what the card may call it, revision."""
    specs = [("pivot", recipe.pivot), *(("source", s) for s in recipe.sources)]
    return [
        {
            "role": role,
            "name": spec.name or role,
            "model": public_name(spec.path),
            "revision": model_revision(spec),
        }
        for role, spec in specs
    ]


def license_metadata(settings: PublishSettings) -> dict[str, str]:
    """The card's licence: the recipe's Hub licence id; else `other` with a name and a link (the recipe's, or the
    LICENSES.md publish writes: every model that went in, whose terms the fused model inherits)."""
    if settings.license and settings.license != "other":
        return {"license": settings.license}
    return {
        "license": "other",
        "license_name": settings.license_name or DEFAULT_LICENSE_NAME,
        "license_link": settings.license_link or LICENSES_FILE,
    }


def dataset_of(measurement: Measurement, settings: dict[str, Any], recipe: Recipe) -> dict[str, str | None]:
    """Where a measurement's items came from, for model-index: an lm-eval task by its name; fuse's own held-out
    files by their file name (never their local path), the skill or domain as the config."""
    if measurement.kind == "lm_eval":
        return {"type": measurement.group, "name": measurement.group, "config": None, "split": None}
    key, what = {
        "skill": ("items", "held-out items"),
        "mean": ("items", "held-out items, mean over skills"),
        "preference": ("preference", "held-out preference pairs"),
        "text": ("heldout_text", "held-out text"),
        "domain": ("domains", "held-out responses"),
        "mean_domain": ("domains", "held-out responses, mean over domains"),
    }[measurement.kind]
    source = settings.get(key)
    if source:
        name = public_name(source)
    else:  # held-out text by default: the prepared held-out split of the SFT data
        name = public_name(recipe.data.sft.path)
    stem = name if hub_id(name) else Path(name).stem
    config = measurement.group or ("mean" if measurement.kind.startswith("mean") else None)
    return {"type": stem, "name": f"{what} ({name})", "config": config, "split": "heldout"}


METRIC_NAMES = {"accuracy": "accuracy", "ce_per_byte": "CE per byte (nats, lower is better)"}


def eval_results(metrics: dict[str, Any] | None, model: str, recipe: Recipe) -> list[EvalResult]:
    """The fused model's evaluation as model-index entries: every measurement, and beside it its standard error
    as `<metric>_stderr` (lm-eval's own name for it) where one was measured."""
    if not metrics or model not in metrics.get("models", {}):
        return []
    settings = metrics.get("settings", {})
    found = measurements(metrics["models"][model], metrics.get("skills", []), metrics.get("domains", []))
    results = []
    for m in found:
        dataset = dataset_of(m, settings, recipe)
        common = {
            "task_type": "text-generation",
            "dataset_type": dataset["type"],
            "dataset_name": dataset["name"],
            "dataset_config": dataset["config"],
            "dataset_split": dataset["split"],
        }
        if m.kind == "lm_eval" and settings.get("lm_eval", {}).get("num_fewshot") is not None:
            common["dataset_args"] = {"num_few_shot": settings["lm_eval"]["num_fewshot"]}
        name = METRIC_NAMES.get(m.metric, m.metric)
        results.append(EvalResult(metric_type=m.metric, metric_value=m.value, metric_name=name, **common))
        if m.stderr is not None:
            results.append(
                EvalResult(
                    metric_type=f"{m.metric}_stderr",
                    metric_value=m.stderr,
                    metric_name=f"{name}: standard error",
                    **common,
                )
            )
    return results


def card_data(
    recipe: Recipe, models: list[dict[str, str]], metrics: dict[str, Any] | None, fused: str
) -> ModelCardData:
    """The card's front matter through huggingface_hub: base models and their relation, licence, datasets (hub
    ids only), tags, the evaluation as model-index, and under `fuse` the models with their revisions and the
    merge."""
    bases, relation = base_models(recipe)
    datasets = [d for d in (hub_id(x.path) for x in (recipe.data.sft, recipe.data.preference) if x) if d]
    merge = recipe.stages.merge
    merged = recipe.stages.publish.model == "merge"
    how = {"merge": {"method": merge.method, "parameters": merge.parameters}} if merged else {"joint": True}
    extra: dict[str, Any] = {"base_model_relation": relation} if relation else {}
    return ModelCardData(
        model_name=recipe.name,
        base_model=bases or None,
        datasets=datasets or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[
            "fuse",
            "model-fusion",
            "knowledge-fusion",
            f"merge-{merge.method}" if merged else "joint-distill",
        ],
        eval_results=eval_results(metrics, fused, recipe) or None,
        **license_metadata(recipe.stages.publish),
        **extra,
        fuse={
            "models": models,
            "datasets": [public_name(x.path) for x in (recipe.data.sft, recipe.data.preference) if x],
            **how,
        },
    )


# --------------------------------------------------------------------------------------------- body


def usage_section(repo_id: str | None, trust_remote_code: bool) -> str:
    """A snippet that loads the model and answers one message through its own chat template."""
    model_id = repo_id or "path/to/this/folder"
    trust = ", trust_remote_code=True" if trust_remote_code else ""
    return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model_id = "{model_id}"
tokenizer = AutoTokenizer.from_pretrained(model_id{trust})
model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto", device_map="auto"{trust})

messages = [{{"role": "user", "content": "Explain model fusion in two sentences."}}]
inputs = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
).to(model.device)
output = model.generate(**inputs, max_new_tokens=128)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
```"""


def results_table(metrics: dict[str, Any], fused: str, recipe: Recipe) -> str:
    """One row per measurement of the fused model; columns: it, the pivot and each source (± standard error)."""
    skills, domains = metrics.get("skills", []), metrics.get("domains", [])
    names = list(dict.fromkeys([fused, "pivot", *recipe.source_names]))
    names = [n for n in names if n in metrics["models"]]
    cells = {n: {m.label: m for m in measurements(metrics["models"][n], skills, domains)} for n in names}
    header = ["metric", f"**this model** ({fused})", *names[1:]]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for label, measurement in cells[fused].items():
        row = [label, measurement.format()]
        row += [cells[n][label].format() if label in cells[n] else "–" for n in names[1:]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(markdown: str) -> list[str]:
    """Every file a markdown text links or shows by a relative path (not URLs, not #anchors)."""
    return [t for t in LINK.findall(markdown) if "://" not in t and not t.startswith(("#", "mailto:"))]


def evaluation_parts(metrics_md: str | None) -> tuple[str, list[str]]:
    """evaluate's metrics.md without its own title (it would be a second `#` heading in the card) and without its
    images, and the images it showed (the card shows them once, beside its results table)."""
    if not metrics_md:
        return "", []
    lines = metrics_md.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    images = [target for line in lines for target in IMAGE.findall(line)]
    # its sections nest under the card's: `## lm-evaluation-harness` becomes a fourth-level heading
    kept = [f"##{line}" if line.startswith("## ") else line for line in lines if not IMAGE.search(line)]
    return "\n".join(kept).strip(), images


def evaluation_section(
    metrics: dict[str, Any] | None, metrics_md: str | None, fused: str, recipe: Recipe, images: list[str]
) -> str:
    if not metrics and not metrics_md:
        return "No evaluation was run."
    parts = []
    if metrics and fused in metrics.get("models", {}):
        parts.append(results_table(metrics, fused, recipe))
        parts.append(
            "± one standard error over the evaluation's items (for lm-evaluation-harness tasks, the harness's own); "
            "CE/byte: next-token cross-entropy in nats per UTF-8 byte of held-out text, lower is better. The same "
            "numbers are in this card's metadata (`model-index`)."
        )
    parts += [f"![{Path(image).stem}]({image})" for image in images]
    table, _ = evaluation_parts(metrics_md)
    if table:
        parts.append(f"<details>\n<summary>Every model of the run</summary>\n\n{table}\n\n</details>")
    return "\n\n".join(parts)


def merge_diagnostics_section(merge_md: str | None) -> str:
    """The diagnostics part of merge's merge_report.md (are the targets mergeable, how much of each survived)."""
    if not merge_md or "## Diagnostics" not in merge_md:
        return ""
    return "### Merge diagnostics\n\n" + merge_md.split("## Diagnostics", 1)[1].strip() + "\n"


def teacher_signal_section(align_reports: dict[str, dict[str, Any]]) -> str:
    """Per source, from its align report: was its teacher signal sound (how much was projected, does its top-1
    name the gold token, how often would it be chosen), with the align stage's warnings."""
    if not align_reports:
        return "No alignment reports."
    lines = [
        "| source | response rows with its signal (projected / chunk / scored) | word starts with its signal "
        "| top-1 is gold (source / pivot) | mean p(gold) (source / pivot) "
        "| top-K mass kept | sequences won under min_ce | warnings |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, report in align_reports.items():
        signal, shares = report["teacher_signal"], report["response_signal_shares"]
        starts = report["word_start_signal_shares"]
        wins = signal["fusion_weights"].get("min_ce", {}).get("source", float("nan"))
        lines.append(
            f"| {name} | {shares.get('projected', 0.0):.2f} / {shares.get('chunk', 0.0):.2f} / {shares.get('scored', 0.0):.2f} "
            f"| {sum(starts.get(k, 0.0) for k in ('projected', 'chunk', 'scored')):.2f} "
            f"| {signal['source_top1_is_gold']:.2f} / {signal['pivot_top1_is_gold']:.2f} "
            f"| {signal['source_mean_p_gold']:.3f} / {signal['pivot_mean_p_gold']:.3f} "
            f"| {report['topk_mass_kept']['mean'] or 0.0:.2f} | {wins:.2f} | "
            f"{'; '.join(report.get('warnings', [])) or 'none'} |"
        )
    return "\n".join(lines)


def recipe_summary(recipe: Recipe) -> str:
    """The recipe in a few lines: what went in and each step's deciding settings."""
    s = recipe.stages
    data = recipe.data
    sources = ", ".join(f"{m.name} (`{public_name(m.path)}`)" for m in recipe.sources)
    lines = [
        f"- **Pivot** `{public_name(recipe.pivot.path)}`; **sources** {sources}.",
        f"- **Data**: SFT `{public_name(data.sft.path)}`"
        + (f", preference pairs `{public_name(data.preference.path)}`" if data.preference else "")
        + f"; {data.heldout_fraction:.0%} held out for evaluation.",
        f"- **Align**: positions by {s.align.method}, vocabulary map {s.align.vocab_map}, projection "
        f"{s.align.project}.",
        f"- **Distill** (one target per source): λ = {s.distill.lambda_} on the gold token's CE, the rest "
        f"{s.distill.divergence} to the {s.distill.fusion} fusion of pivot and source distributions; learning rate "
        f"{s.distill.learning_rate:g}, "
        + (f"{s.distill.max_steps} steps." if s.distill.max_steps > 0 else f"{s.distill.epochs:g} epoch(s)."),
    ]
    if (
        s.fpo.enabled and s.publish.model == "merge"
    ):  # fpo runs on the targets or the merge, not distill.joint
        lines.append(
            f"- **FPO** ({s.fpo.placement.replace('_', ' ')}): DPO against a {s.fpo.fusion} fusion of the sources' "
            f"sequence log-probs (normalized by {s.fpo.normalization}), β = {s.fpo.beta or 'default'}."
        )
    if s.publish.model == "joint":
        lines.append(
            f"- **Published**: `distill.joint`, one target taught by the pivot and every source at once (the "
            f"{s.distill.fusion} fusion choosing per sequence among all of them), not a merge of the targets."
        )
        return "\n".join(lines)
    parameters = json.dumps(s.merge.parameters, sort_keys=True)
    lines.append(f"- **Merge**: `{s.merge.method}` with parameters `{parameters}`.")
    return "\n".join(lines)


def license_section(recipe: Recipe, licence: dict[str, str]) -> str:
    if licence["license"] != "other":
        return f"`{licence['license']}` (stages.publish.license)."
    return (
        f"`other` ({licence['license_name']}): a fused model inherits the terms of every model that went into it, "
        f"which only its publisher can reconcile; see [{licence['license_link']}]({licence['license_link']})."
    )


def licenses_file(recipe: Recipe, models: list[dict[str, str]]) -> str:
    """LICENSES.md: every model the fused model was made from, where its licence can be read."""
    rows = []
    for row in models:
        where = (
            f"[its model card](https://huggingface.co/{row['model']})"
            if hub_id(row["model"])
            else "a local model: ask its owner"
        )
        rows.append(f"| {row['role']} | {row['name']} | `{row['model']}` | `{row['revision']}` | {where} |")
    table = "\n".join(rows)
    return f"""# Licences of the models {recipe.name} was made from

{recipe.name} was made by fuse from the models below, by distillation and merging: it inherits the terms of each
one's licence, which only its publisher can reconcile.

| role | name | model | revision | licence |
|---|---|---|---|---|
{table}
"""


def model_card(
    recipe: Recipe,
    lineage_rows: list[dict[str, str]],
    version: str,
    fused: str = "merge",
    metrics: dict[str, Any] | None = None,
    metrics_md: str | None = None,
    merge_md: str | None = None,
    align_reports: dict[str, dict[str, Any]] | None = None,
    images: list[str] | None = None,
) -> ModelCard:
    """The model card: metadata through huggingface_hub, then what the model is, how to use it, its results, the
    models it came from, how it was made and its lineage. `fused`: the fused model's name in evaluate's metrics;
    `images`: evaluate's images, present in the published folder."""
    models = model_rows(recipe)
    data = card_data(recipe, models, metrics, fused)
    licence = license_metadata(recipe.stages.publish)
    joint = recipe.stages.publish.model == "joint"
    steps = ["extract", "align", "distill"] + (
        ["distill.joint"] if joint else (["fpo"] if recipe.stages.fpo.enabled else []) + ["merge"]
    )
    how = "all at once into one target" if joint else "one target per source, then merged"
    sources = ", ".join(f"`{public_name(s.path)}`" for s in recipe.sources)
    model_table = "\n".join(
        f"| {m['role']} | {m['name']} | `{m['model']}` | `{m['revision']}` |" for m in models
    )
    rows = "\n".join(
        f"| `{r['instance']}` | `{r['fingerprint']}` | {', '.join(r['parents']) or '-'} |"
        for r in lineage_rows
    )
    body = f"""
# {recipe.name}

{recipe.name} is a fused language model: the knowledge of {len(recipe.sources)} source model(s) of other
architectures and vocabularies ({sources}) distilled into the pivot `{public_name(recipe.pivot.path)}`, {how}
({" → ".join(steps)}), by fuse {version}. It keeps the pivot's architecture, tokenizer and chat template.

## Usage

{usage_section(recipe.stages.publish.repo_id, recipe.pivot.trust_remote_code)}

## Evaluation

{evaluation_section(metrics, metrics_md, fused, recipe, images or [])}

## Models

The models it was made from, with the revision the run read (a local folder: the digest of its files).

| role | name | model | revision |
|---|---|---|---|
{model_table}

## How it was made

{recipe_summary(recipe)}

The whole recipe: [{RECIPE_FILE}]({RECIPE_FILE}).

### Teacher signal

How well each source's distribution, projected onto the pivot's tokens, predicted the training responses
(measured by the align stage before any training).

{teacher_signal_section(align_reports or {})}

{merge_diagnostics_section(merge_md)}

## License

{license_section(recipe, licence)}

## Lineage

Every stage instance of the run that made this model, with its fingerprint (a hash of its settings, inputs,
model identities and code version); also in [{LINEAGE_FILE}]({LINEAGE_FILE}).

<details>
<summary>{len(lineage_rows)} stage instances</summary>

| instance | fingerprint | parents |
|---|---|---|
{rows}

</details>
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def missing_links(folder: Path, card: ModelCard) -> list[str]:
    """The files the card links, shows or names as its licence that the folder lacks."""
    linked = relative_links(card.text)
    link = card.data.to_dict().get("license_link")
    if link and "://" not in link:
        linked.append(link)
    return [target for target in dict.fromkeys(linked) if not (folder / target).is_file()]


def copy_model(source: Path, target: Path, max_shard_size: str, trust_remote_code: bool = False) -> None:
    """Re-save through transformers: sharded safetensors with an index, config, generation config, tokenizer."""
    spec = ModelSpec(name="fused", path=str(source), trust_remote_code=trust_remote_code)
    model = load_model(spec, dtype="auto")
    model.save_pretrained(target, max_shard_size=max_shard_size, safe_serialization=True)
    load_tokenizer_dir(source, trust_remote_code).save_pretrained(target)


def check_reload_and_generate(folder: Path, trust_remote_code: bool = False) -> str:
    """The folder must load with the Auto classes and generate with its chat template; returns the sample."""
    # the fused model has the pivot's architecture: its code is trusted exactly when the pivot's is
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{folder}: the tokenizer has no chat template")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        output = model.generate(
            **ids,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=pad_id(tokenizer),
        )
    return tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def run(ctx: StageContext) -> None:
    settings = ctx.settings
    if settings.push:
        check_push_possible()
    source = ctx.made_model("model")
    evaluation = ctx.input("evaluation") if ctx.has_input("evaluation") else None
    metrics_md = metrics = None
    if evaluation is not None and (evaluation / "metrics.md").is_file():
        metrics_md = (evaluation / "metrics.md").read_text(encoding="utf-8")
    if evaluation is not None and (evaluation / "metrics.json").is_file():
        metrics = read_json(evaluation / "metrics.json")
    # evaluate's images that are there to copy (a linked file that is missing is left out, never linked)
    images = [i for i in evaluation_parts(metrics_md)[1] if evaluation and (evaluation / i).is_file()]
    merge_report = ctx.input("model") / "merge_report.md"  # absent when fpo ran after merge
    merge_md = merge_report.read_text(encoding="utf-8") if merge_report.is_file() else None
    align_reports = {
        name: read_json(out / "report.json")
        for name, out in ctx.inputs_of("teacher_signal").items()
        if (out / "report.json").is_file()
    }
    fuse_version = environment()["versions"].get("fuse-llm", "unknown")
    rows = lineage(ctx.recipe)
    card = model_card(
        ctx.recipe,
        rows,
        fuse_version,
        ctx.parent("model"),
        metrics,
        metrics_md,
        merge_md,
        align_reports,
        images,
    )
    target = ctx.model_out
    with atomic_dir(target) as tmp:
        copy_model(source, tmp, settings.max_shard_size, ctx.recipe.pivot.trust_remote_code)
        for image in images if evaluation is not None else ():
            (tmp / image).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(evaluation / image, tmp / image)
        (tmp / RECIPE_FILE).write_text(published_recipe(ctx.recipe), encoding="utf-8")
        write_json_atomic(tmp / LINEAGE_FILE, {"fuse_version": fuse_version, "instances": rows})
        if license_metadata(settings).get("license_link") == LICENSES_FILE:
            (tmp / LICENSES_FILE).write_text(
                licenses_file(ctx.recipe, model_rows(ctx.recipe)), encoding="utf-8"
            )
        card.save(tmp / "README.md")
        if missing := missing_links(tmp, card):
            raise RuntimeError(f"publish: the model card links {', '.join(missing)}, which the folder lacks")
        sample = check_reload_and_generate(tmp, ctx.recipe.pivot.trust_remote_code)
        ctx.log.info("publish: the folder reloads and generates (%r)", sample)
    report: dict[str, Any] = {"folder": str(target), "sample": sample, "pushed": False}
    if settings.push:
        report["commit"] = push(target, settings.repo_id, settings.private, settings.revision)
        report["pushed"] = True
        ctx.log.info("publish: pushed to %s", settings.repo_id)
    write_json_atomic(ctx.out / "publish.json", report)
