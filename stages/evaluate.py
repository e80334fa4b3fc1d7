"""The evaluate stage: per-skill exact-match accuracy, per-byte cross-entropy of held-out text and per-domain
CE/byte next to the domain's limit, for every model of the run, each with its standard error over the items.

Models come from the recipe (pivot, sources) and from the parents' `out/model` folders (targets, fused model, SFT
baseline); the math lives in fuse.evaluation so it can be used outside a run.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

from fuse import code_exec, compare, evaluation, item_scores
from fuse.context import StageContext
from fuse.data.prepared import load_split
from fuse.evaluation import load_texts, markdown_table
from fuse.fingerprint import files_digest
from fuse.io import sha256_json, write_bytes_atomic, write_json_atomic, write_text_atomic
from fuse.plan import stage_version
from fuse.plots import plot_accuracy
from fuse.recipe import ModelSpec

MADE = (
    "targets",
    "fused",
    "sft_baseline",
    "controls",
)  # `include` groups whose models the run made (input roles)


def models_to_evaluate(ctx: StageContext) -> dict[str, ModelSpec]:
    """Recipe models under their recipe names, made models under their instance names (e.g. 'distill.llama')."""
    include = set(ctx.settings.include)
    models: dict[str, ModelSpec] = {"pivot": ctx.model_spec("pivot")} if "pivot" in include else {}
    if "sources" in include:
        models |= {name: ctx.model_spec(name) for name in ctx.recipe.source_names}
    for role in (r for r in MADE if r in include):
        for name, folder in ctx.made_models(role).items():
            models[name] = ctx.made_model_spec(folder, name.replace(".", "-"))
    return models


def heldout_texts(ctx: StageContext) -> list[str]:
    """settings.heldout_text, else the contents of the prepared held-out SFT conversations."""
    if ctx.settings.heldout_text:
        return load_texts(ctx.settings.heldout_text)
    if not ctx.has_input("data"):
        return []

    try:
        rows = load_split(ctx.input("data"), "sft", "heldout")
    except FileNotFoundError:
        return []
    return ["\n".join(m["content"] for m in row["messages"]) for row in rows]


def check_inputs(ctx: StageContext, models: dict[str, ModelSpec]) -> None:
    """Fail before any model is loaded if a file the stage needs is missing."""
    settings = ctx.settings
    for key in ("items", "heldout_text", "domains", "preference"):
        value = getattr(settings, key)
        if value and not Path(value).is_file():
            raise FileNotFoundError(f"stages.evaluate.{key}: {value} does not exist")
    made = {name for role in MADE for name in ctx.inputs_of(role)}
    for name, spec in models.items():
        if name in made and not Path(spec.path).is_dir():
            raise FileNotFoundError(f"evaluate: {name} has no model folder at {spec.path}")


# what a model's answers depend on; README, lineage and the rest of the folder do not count
WEIGHT_AND_TOKENIZER = (
    "*.safetensors",
    "tokenizer*.json",
    "special_tokens_map.json",
    "chat_template*",
    "*.model",
)
CONFIGS = ("config.json", "generation_config.json")
# how a model runs, not what it computes: a trained model saved with its KV cache off is the same model
RUNTIME_CONFIG_KEYS = ("transformers_version", "use_cache")


def same_model_key(spec: ModelSpec) -> str | None:
    """A digest of a local model folder's weights, tokenizer and configs (their own `_name_or_path`-style keys left
    out): two folders with the same key answer everything alike, so one is evaluated and the other reuses its result
    (a merge of one target is that target). None for a hub model or a folder without safetensors weights."""
    folder = Path(spec.path)
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        return None
    files = sorted({p for pattern in WEIGHT_AND_TOKENIZER for p in folder.glob(pattern) if p.is_file()})
    configs = {}
    for name in CONFIGS:
        if (folder / name).is_file():
            config = json.loads((folder / name).read_text())
            configs[name] = {
                k: v for k, v in config.items() if not k.startswith("_") and k not in RUNTIME_CONFIG_KEYS
            }
    return sha256_json({"files": files_digest(files), "configs": configs, "trust": spec.trust_remote_code})


# ------------------------------------------------------------------ one model's results, kept across runs
EVALUATION_KEY = "evaluation_key"  # a model's entry under the cache's evaluate.model/ (metrics.json names it)
CACHE_STAGE = "evaluate.model"
RESULT = "result.json"


def result_settings(settings: Any) -> dict[str, Any]:
    """The settings a model's results depend on (which models are evaluated and the table's layout do not)."""
    import torch
    import transformers

    return {
        "max_new_tokens": settings.max_new_tokens,
        "batch_size": settings.batch_size,  # left padding: a batch's greedy answers may differ in the last bit
        "code_timeout_s": settings.code_timeout_s,
        "lm_eval": settings.lm_eval.model_dump(mode="json") if settings.lm_eval is not None else None,
        "stage": stage_version("evaluate"),
        "device": "cuda" if torch.cuda.is_available() else "cpu",  # float32 on CPU, the model's dtype on GPU
        "libraries": [torch.__version__, transformers.__version__],
    }


def asked_digest(settings: Any, items: list, texts: list[str], domains: list, pairs: list) -> str:
    """What every model of the stage is asked, as a digest: the data's contents and the settings' values."""
    data = [[dataclasses.asdict(x) for x in rows] for rows in (items, domains, pairs)] + [texts]
    return sha256_json({"settings": result_settings(settings), "data": data})


def evaluation_key(model_key: str, asked: str) -> str:
    """A model's evaluation: its same_model_key with the digest of the data and settings it is evaluated on."""
    return sha256_json({"model": model_key, "asked": asked})


def evaluation_cache(ctx: StageContext) -> Any:
    """The recipe's shared cache (fuse.cache), where a model's results are kept under its evaluation_key: a variant
    or a rerun evaluates only the models it changed (the pivot, the sources, an unchanged target come back)."""
    from fuse.cache import ArtifactCache, cache_root, trusted_groups

    root = cache_root(ctx.recipe)
    return ArtifactCache(root, trusted_groups(ctx.recipe)) if root is not None else None


def cached_result(cache: Any, key: str, log: Any) -> dict[str, Any] | None:
    """The result stored under `key` when the entry is there, trusted and intact (ArtifactCache.lookup), else None."""
    from fuse.cache import UntrustedEntry

    try:
        record = cache.lookup(CACHE_STAGE, key, {})
        if record is None:
            return None
        return json.loads((cache.entry(CACHE_STAGE, key) / "out" / RESULT).read_text(encoding="utf-8"))
    except (UntrustedEntry, OSError, ValueError) as error:
        log.warning("evaluation cache entry %s not used (%s): evaluating the model", key, error)
        return None


def store_result(cache: Any, key: str, name: str, result: dict[str, Any], log: Any) -> None:
    """Keep a model's result (scores per item included) in the cache; a result that is not plain JSON (an
    lm-eval sample with other types) or an unwritable cache leaves the run as it is, with a warning."""
    from fuse.cache import UntrustedEntry

    try:
        text = json.dumps(result, allow_nan=True)
        cache.add(CACHE_STAGE, key, lambda out: _write_result(out, text), {"instance": name, "inputs": {}})
    except (TypeError, ValueError, OSError, UntrustedEntry) as error:
        log.warning("%s: results not kept in the cache (%s)", name, error)


def _write_result(out: Path, text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / RESULT, text)


def run(ctx: StageContext) -> None:
    settings = ctx.settings
    models = models_to_evaluate(ctx)
    check_inputs(ctx, models)
    items = evaluation.load_items(settings.items, settings.max_items_per_skill) if settings.items else []
    texts = heldout_texts(ctx)
    domains = evaluation.load_domain_samples(settings.domains) if settings.domains else []
    pairs = evaluation.load_preference_pairs(settings.preference) if settings.preference else []
    if not items:
        ctx.log.warning("stages.evaluate.items is not set: no skill accuracy, only per-byte CE")
    if not texts:
        ctx.log.warning(
            "no held-out text (stages.evaluate.heldout_text, or a prepared sft/heldout split): no CE"
        )
    results: dict[str, Any] = {}
    seen: dict[str, str] = {}  # same_model_key -> the model evaluated under it
    cache = evaluation_cache(ctx)
    asked = asked_digest(settings, items, texts, domains, pairs)
    for done, (name, spec) in enumerate(models.items()):
        key = same_model_key(spec)
        if key is not None and key in seen:
            ctx.log.info("%s: the same weights, tokenizer and configs as %s: its results", name, seen[key])
            results[name] = copy.deepcopy(results[seen[key]]) | {"path": spec.path, "same_as": seen[key]}
            ctx.progress(done + 1, len(models), "model")
            continue
        if key is not None:
            seen[key] = name
        stored = evaluation_key(key, asked) if key is not None else None
        cached = cached_result(cache, stored, ctx.log) if cache is not None and stored else None
        if cached is not None:
            ctx.log.info(
                "%s: evaluated before on the same data and settings: its results from %s", name, cache.root
            )
            results[name] = cached | {"path": spec.path, EVALUATION_KEY: stored, "cached": True}
            ctx.progress(done + 1, len(models), "model")
            continue
        ctx.log.info("evaluating %s (%s)", name, spec.path)
        results[name] = evaluation.evaluate_model(
            spec,
            items,
            texts,
            settings.max_new_tokens,
            settings.batch_size,
            domains,
            settings.lm_eval,
            pairs,
            code_exec.Limits(timeout_s=settings.code_timeout_s),
        )
        if stored:
            results[name][EVALUATION_KEY] = stored
            if cache is not None:
                store_result(cache, stored, name, results[name], ctx.log)
        ctx.progress(done + 1, len(models), "model")
    scores = item_scores.scores_table(
        results, [i.skill for i in items], [d.domain for d in domains], evaluation.ITEMS
    )
    for result in results.values():
        result.pop(evaluation.ITEMS, None)
    metrics = evaluation.collect_metrics(results, items, texts, domains)
    write_outputs(ctx.out, metrics, settings, scores)
    ctx.log.info("evaluation:\n%s", evaluation.markdown_table(metrics))


def lm_eval_markdown(metrics: dict[str, Any]) -> list[str]:
    """lm-evaluation-harness results, one row per model, one column per task metric, `value ± stderr` as the harness
    computed it (empty without tasks)."""
    rows = {name: r["lm_eval"] for name, r in metrics["models"].items() if r.get("lm_eval")}
    columns = sorted({(task, m) for table in rows.values() for task, values in table.items() for m in values})
    if not columns:
        return []
    lines = ["## lm-evaluation-harness", "", "| model | " + " | ".join(f"{t} {m}" for t, m in columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for name, table in rows.items():
        errors = metrics["models"][name].get("lm_eval_stderr", {})
        cells = [_with_stderr(table, errors, t, m) for t, m in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _with_stderr(table: dict, errors: dict, task: str, metric: str) -> str:
    if metric not in table.get(task, {}):
        return "–"
    error = errors.get(task, {}).get(metric)
    return f"{table[task][metric]:.3f}" + (f" ± {error:.3f}" if error is not None else "")


def significance(scores: Any, names: list[str]) -> tuple[dict[str, str | None] | None, str]:
    """The significantly best model per column, and every model's paired difference to the SFT-only baseline (else
    the pivot), from the per-item scores; (None, "") when there is nothing to pair."""
    frame = scores.to_pandas()
    if frame.empty or len(names) < 2:
        return None, ""
    baseline = compare.default_baseline(names)
    found = compare.differences(frame, names, baseline) if baseline else {}
    return compare.best_models(frame, names), compare.differences_markdown(found, baseline or "")


def write_outputs(out: Path, metrics: dict[str, Any], settings: Any, scores: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", metrics | {"settings": settings.model_dump(mode="json")})
    item_scores.write_scores(out / item_scores.FILE, scores)
    best, paired = significance(scores, list(metrics["models"]))
    lines = ["# Evaluation", "", markdown_table(metrics, best)]
    lines.append(
        "Accuracy: exact match of the greedy answer (own chat template) on held-out items, or for code items "
        "the share whose program passes its tests (sandboxed, time-limited); "
        "CE/byte: next-token cross-entropy in nats per UTF-8 byte of held-out text (lower is better); "
        "CE <domain>: the same over held-out responses of that domain given their prompt (own chat template); "
        "limit: the domain generator's own NLL per byte of those responses, the floor no model beats in "
        "expectation; ± one standard error over the items (the mean of skills or domains: of the mean).\n"
    )
    if best is not None:
        lines.append(compare.SIGNIFICANCE_NOTE.strip() + f" Every item's score: {item_scores.FILE}.\n")
    if paired:
        lines.append(paired)
    lines += lm_eval_markdown(metrics)
    png = io.BytesIO()
    if plot_accuracy(metrics, png):
        write_bytes_atomic(out / "accuracy.png", png.getvalue())
        lines.append("![accuracy per skill](accuracy.png)\n")
    write_text_atomic(out / "metrics.md", "\n".join(lines))
