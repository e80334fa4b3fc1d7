"""publish: a ready-to-upload Hugging Face folder of the fused model — weights, tokenizer, chat template, a model
card with lineage and the evaluation table — validated by reloading and generating before it is written."""

from __future__ import annotations

import json
import logging
import os
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from fuse.context import StageContext
from fuse.dag import build_dag
from fuse.hub import check_push_possible, push
from fuse.io import atomic_dir, read_json, write_json_atomic
from fuse.models import load_model, load_tokenizer_dir, pad_id
from fuse.plan import fingerprints
from fuse.recipe import ModelSpec, Recipe

log = logging.getLogger(__name__)


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
    """The recipe as the card shows it: absolute local paths reduced to `<local>/name` (they mean nothing on the
    Hub and tell where the run was made)."""
    if isinstance(value, dict):
        return {k: scrub_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_local_paths(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return f"<local>/{Path(value).name}"
    return value


def card_metadata(recipe: Recipe, merge_settings: dict[str, Any]) -> dict[str, Any]:
    """The card's front matter, as the Hub reads it for merged models: every hub model that went in (pivot and
    sources) under `base_model` with `base_model_relation: merge`, a `license`, datasets only when they are hub
    ids; local paths never (the Hub rejects them, and they leak where the run was made)."""
    bases = [m for m in (hub_id(s.path) for s in (recipe.pivot, *recipe.sources)) if m]
    datasets = [d for d in (hub_id(x.path) for x in (recipe.data.sft, recipe.data.preference) if x) if d]
    metadata: dict[str, Any] = {}
    if bases:
        metadata = {"base_model": list(dict.fromkeys(bases)), "base_model_relation": "merge"}
    metadata["license"] = recipe.stages.publish.license or "other"
    if datasets:
        metadata["datasets"] = datasets
    return {
        **metadata,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["fuse", "model-fusion", "knowledge-fusion", f"merge-{merge_settings['method']}"],
        "fuse": {
            "pivot": public_name(recipe.pivot.path),
            "sources": [
                {"name": s.name, "model": public_name(s.path), "revision": s.revision} for s in recipe.sources
            ],
            "datasets": [public_name(x.path) for x in (recipe.data.sft, recipe.data.preference) if x],
            "merge": merge_settings,
        },
    }


def evaluation_section(metrics_md: str | None) -> str:
    """evaluate's metrics.md without its own title, which would be a second `#` heading in the card."""
    if not metrics_md:
        return "No evaluation was run."
    lines = metrics_md.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip()


def merge_diagnostics_section(merge_md: str | None) -> str:
    """The diagnostics part of merge's merge_report.md (are the targets mergeable, how much of each survived)."""
    if not merge_md or "## Diagnostics" not in merge_md:
        return ""
    return "\n\n### Diagnostics\n\n" + merge_md.split("## Diagnostics", 1)[1].strip()


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


def model_card(
    recipe: Recipe,
    metrics_md: str | None,
    lineage_rows: list[dict[str, str]],
    version: str,
    merge_md: str | None = None,
    align_reports: dict[str, dict[str, Any]] | None = None,
) -> str:
    merge = recipe.stages.merge.model_dump(mode="json", exclude={"enabled"})
    metadata = yaml.safe_dump(card_metadata(recipe, merge), sort_keys=False).strip()
    sources = "\n".join(
        f"| {s.name} | `{public_name(s.path)}` | {s.revision or 'main'} |" for s in recipe.sources
    )
    steps = ["extract", "align", "distill"] + (["fpo"] if recipe.stages.fpo.enabled else []) + ["merge"]
    # the executor says where it ran, not what made the model; its env_setup lines and accounts stay private
    recipe_yaml = yaml.safe_dump(
        scrub_local_paths(recipe.model_dump(mode="json", by_alias=True, exclude={"executor", "workdir"})),
        sort_keys=False,
    )
    rows = "\n".join(
        f"| `{r['instance']}` | `{r['fingerprint']}` | {', '.join(r['parents']) or '-'} |"
        for r in lineage_rows
    )
    return f"""---
{metadata}
---

# {recipe.name}

A fused model made by fuse {version}: knowledge of {len(recipe.sources)} source models of
different architectures and vocabularies fused into the pivot `{public_name(recipe.pivot.path)}`
({" → ".join(steps)}).

## Sources

| name | model | revision |
|---|---|---|
{sources}

## Teacher signal

How well each source's distribution, projected onto the pivot's tokens, predicted the training responses
(measured by the align stage before any training).

{teacher_signal_section(align_reports or {})}

## Merge

Method `{merge["method"]}` with parameters `{json.dumps(merge["parameters"], sort_keys=True)}`.{merge_diagnostics_section(merge_md)}

## Evaluation

{evaluation_section(metrics_md)}

## Lineage

Every stage instance of the run that made this model, with its fingerprint (a hash of its settings, inputs,
model identities and code version).

| instance | fingerprint | parents |
|---|---|---|
{rows}

## Recipe

```yaml
{recipe_yaml.strip()}
```
"""


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
    metrics_md = None
    if ctx.has_input("evaluation") and (ctx.input("evaluation") / "metrics.md").is_file():
        metrics_md = (ctx.input("evaluation") / "metrics.md").read_text(encoding="utf-8")
    merge_report = ctx.input("model") / "merge_report.md"  # absent when fpo ran after merge
    merge_md = merge_report.read_text(encoding="utf-8") if merge_report.is_file() else None
    align_reports = {
        name: read_json(out / "report.json")
        for name, out in ctx.inputs_of("teacher_signal").items()
        if (out / "report.json").is_file()
    }
    try:
        fuse_version = version("fuse-llm")
    except PackageNotFoundError:
        fuse_version = "unknown"
    rows = lineage(ctx.recipe)
    target = ctx.model_out
    with atomic_dir(target) as tmp:
        copy_model(source, tmp, settings.max_shard_size, ctx.recipe.pivot.trust_remote_code)
        (tmp / "README.md").write_text(
            model_card(ctx.recipe, metrics_md, rows, fuse_version, merge_md, align_reports), encoding="utf-8"
        )
        write_json_atomic(tmp / "fuse_lineage.json", {"fuse_version": fuse_version, "instances": rows})
        sample = check_reload_and_generate(tmp, ctx.recipe.pivot.trust_remote_code)
        ctx.log.info("publish: the folder reloads and generates (%r)", sample)
    report: dict[str, Any] = {"folder": str(target), "sample": sample, "pushed": False}
    if settings.push:
        report["commit"] = push(target, settings.repo_id, settings.private, settings.revision)
        report["pushed"] = True
        ctx.log.info("publish: pushed to %s", settings.repo_id)
    write_json_atomic(ctx.out / "publish.json", report)
