"""Standard benchmarks through lm-evaluation-harness, on any model folder the evaluate stage measures: the tasks
named in `stages.evaluate.lm_eval` (hub tasks such as mmlu, or the recipe's own task YAMLs over local files), with
the transformers backend sharded over a node's GPUs or the vLLM backend tensor parallel for big models.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuse.recipe import LmEvalSettings

log = logging.getLogger(__name__)


class LmEvalError(RuntimeError):
    pass


@dataclass(frozen=True)
class LmEvalResult:
    """A model's lm-eval results: {task: {metric: value}}, the harness's standard errors in the same shape, and
    every sample's metric in doc order ({task: {metric: [value per doc]}}) for paired comparisons."""

    metrics: dict[str, dict[str, float]]
    stderr: dict[str, dict[str, float]] = field(default_factory=dict)
    per_sample: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def model_arguments(model_dir: str | os.PathLike, settings: LmEvalSettings, trust_remote_code: bool) -> dict:
    """lm-eval's model_args for `settings.backend`."""
    arguments: dict[str, Any] = {
        "pretrained": str(model_dir),
        "dtype": settings.dtype,
        "trust_remote_code": trust_remote_code,
    }
    if settings.backend == "hf" and settings.parallelize:
        arguments["parallelize"] = True  # accelerate's device_map over every visible GPU
    if settings.backend == "vllm":
        arguments["tensor_parallel_size"] = settings.tensor_parallel_size
    return arguments


def metrics_table(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results, without the standard errors and aliases."""
    table: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        table[task] = {
            name.split(",", 1)[0]: float(value)
            for name, value in values.items()
            if isinstance(value, int | float) and "_stderr" not in name and name != "sample_len"
        }
    return table


def stderr_table(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: its standard error}} as the harness computed it (bootstrap or analytic); N/A left out."""
    table: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        errors = {
            name.split(",", 1)[0].removesuffix("_stderr"): float(value)
            for name, value in values.items()
            if "_stderr" in name and isinstance(value, int | float) and math.isfinite(value)
        }
        if errors:
            table[task] = errors
    return table


def per_sample_table(
    results: dict[str, Any], metrics: dict[str, dict[str, float]]
) -> dict[str, dict[str, list[float]]]:
    """{task: {metric: [value of each doc, in doc_id order]}} for the metrics the harness scores per sample
    (acc, exact_match…; corpus-level ones such as bleu or perplexity have no per-sample number and are left out)."""
    table: dict[str, dict[str, list[float]]] = {}
    for task, samples in (results.get("samples") or {}).items():
        ordered = sorted(samples, key=lambda sample: sample.get("doc_id", 0))
        columns = {
            metric: [float(sample[metric]) for sample in ordered]
            for metric in metrics.get(task, {})
            if ordered and all(isinstance(sample.get(metric), int | float | bool) for sample in ordered)
        }
        if columns:
            table[task] = columns
    return table


def run_lm_eval(
    model_dir: str | os.PathLike, settings: LmEvalSettings, trust_remote_code: bool = False
) -> LmEvalResult:
    """Run `settings.tasks` on the model in `model_dir`: metrics, their standard errors and per-sample scores. An
    unknown task name is an error naming stages.evaluate.lm_eval.tasks before the model is loaded."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LmEvalError(
            "stages.evaluate.lm_eval: lm-evaluation-harness is not installed (pip install lm-eval)"
        ) from None
    manager = TaskManager(include_path=settings.include_path)
    unknown = [t for t in settings.tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor in {settings.include_path})" if settings.include_path else ""
        raise LmEvalError(f"stages.evaluate.lm_eval.tasks: unknown task(s) {', '.join(unknown)}{where}")
    results = lm_eval.simple_evaluate(
        model=settings.backend,
        model_args=model_arguments(model_dir, settings, trust_remote_code),
        tasks=list(settings.tasks),
        num_fewshot=settings.num_fewshot,
        limit=settings.limit,
        batch_size=settings.batch_size,
        device=None if settings.parallelize or settings.backend == "vllm" else _device(),
        task_manager=manager,
        apply_chat_template=settings.apply_chat_template,
        log_samples=True,  # per-sample scores: paired comparisons between models
        random_seed=settings.seed,
        numpy_random_seed=settings.seed,
        torch_random_seed=settings.seed,
        fewshot_random_seed=settings.seed,
    )
    if results is None:  # lm-eval returns None on non-zero ranks
        return LmEvalResult({})
    table = metrics_table(results)
    log.info("lm-eval on %s: %s", Path(model_dir).name, table)
    return LmEvalResult(table, stderr_table(results), per_sample_table(results, table))


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
