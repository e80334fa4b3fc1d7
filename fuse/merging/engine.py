"""The streaming merge: one tensor name at a time, every model read through memory maps, written as it is done.

Peak memory ≈ (number of models + 3) × the largest tensor in float32 (one of them the diagnostics' re-read
buffer). A killed merge resumes at the first tensor that had not reached the disk (the staging folder
`.<output>.partial` keeps finished work).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fuse.io import publish_dir, read_json, sha256_json, write_json_atomic, write_text_atomic
from fuse.merging.checkpoint import (
    CheckpointReader,
    ShardWriter,
    parse_size,
    plan_shards,
    shard_names,
    write_index,
)
from fuse.merging.config import MergeConfig
from fuse.merging.diagnostics import delta_gram, diagnostics_markdown, summarize, tensor_record
from fuse.merging.methods import Merged, MergeMethod, MethodParams, get_method, resolve_params
from fuse.merging.preflight import TensorPlan, load_config, preflight

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass
class MergeInputs:
    """Open readers and the resolved method for one merge."""

    base: CheckpointReader
    models: dict[str, CheckpointReader]
    method: MergeMethod
    params: MethodParams
    pool: ThreadPoolExecutor
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    def close(self) -> None:
        self.pool.shutdown()
        for reader in [self.base, *self.models.values()]:
            reader.close()


def open_inputs(config: MergeConfig) -> MergeInputs:
    method = get_method(config.method)
    params = resolve_params(method, config.parameters, [m.parameters for m in config.models], config.seed)
    models = {m.label: CheckpointReader(m.path) for m in config.models}
    threads = min(config.read_threads, len(models) + 1)
    return MergeInputs(
        CheckpointReader(config.base_model), models, method, params, ThreadPoolExecutor(threads)
    )


def read_deltas(inputs: MergeInputs, name: str, rows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The base tensor and the stacked deltas of every model (first `rows` rows for padded vocab tensors)."""
    base = inputs.base.read(name, _float_dtype(inputs.base, name))
    head = base if rows is None else base[:rows]
    deltas = torch.empty((len(inputs.models), *head.shape), dtype=base.dtype)

    def load(slot: int, reader: CheckpointReader) -> None:
        reader.read_into(name, deltas[slot]).sub_(head)

    list(inputs.pool.map(load, range(len(inputs.models)), inputs.models.values()))
    return base, deltas


def _float_dtype(reader: CheckpointReader, name: str) -> torch.dtype | None:
    """Tensors are merged in float32 (float64 ones stay float64)."""
    return torch.float32 if reader.tensors[name].dtype != torch.float64 else None


def merged_dots(
    inputs: MergeInputs, name: str, head: torch.Tensor, merged_delta: torch.Tensor
) -> list[float]:
    """⟨Δ_merged, Δ_i⟩ per model. The method overwrote the deltas, so each is read again into one buffer (the
    pages were just read: the page cache serves them); peak memory grows by one tensor, not by n."""
    buffer = torch.empty_like(head)
    flat = merged_delta.reshape(-1)
    return [
        float(torch.dot(r.read_into(name, buffer).sub_(head).reshape(-1), flat))
        for r in inputs.models.values()
    ]


def merge_tensor(inputs: MergeInputs, plan: TensorPlan) -> torch.Tensor:
    """The merged tensor `plan.name`, in the planned output dtype; stats recorded in `inputs.stats`."""
    if plan.kind == "copy":
        return inputs.base.read(plan.name).to(plan.out.dtype)
    base, deltas = read_deltas(inputs, plan.name, plan.rows)
    head = base if plan.rows is None else base[: plan.rows]
    gram = delta_gram(deltas)  # before a method overwrites the deltas
    if len(inputs.models) == 1 and inputs.method.max_models is None:
        # one target merges to itself with every method that merges any number of models: pruning or
        # re-weighting its only delta (SCE's variance is zero everywhere, TIES/DARE drop entries) could only throw
        # its learning away. slerp, defined on the base and exactly one model, is applied.
        target = next(iter(inputs.models.values())).read(plan.name, head.dtype)
        merged = Merged(target if plan.rows is None else target[: plan.rows], kept=1.0, weights=[1.0])
        dots = gram[0]
    else:
        merged = inputs.method.fn(plan.name, head, deltas, inputs.params)
        dots = None
    del deltas
    merged_delta = merged.tensor - head
    if dots is None:
        dots = merged_dots(inputs, plan.name, head, merged_delta)
    result = merged.tensor if plan.rows is None else torch.cat([merged.tensor, base[plan.rows :]])
    inputs.stats[plan.name] = {
        "numel": head.numel(),
        "kept": merged.kept,
        "weights": merged.weights,
        **tensor_record(plan.name, head, gram, merged_delta, dots),
        **({"rows": plan.rows, "base_rows": base.shape[0]} if plan.rows is not None else {}),
    }
    return result.to(plan.out.dtype)


def _plan_key(config: MergeConfig, plans: list[TensorPlan], inputs: MergeInputs) -> str:
    """What the staging folder's finished work depends on: config, tensor plan, input file sizes and times."""
    files = sorted({str(i.file) for r in [inputs.base, *inputs.models.values()] for i in r.tensors.values()})
    stamps = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    layout = [(p.name, p.kind, p.rows, str(p.out.dtype), p.out.shape) for p in plans]
    return sha256_json([config.model_dump(exclude={"output", "read_threads"}), layout, stamps])


def _staging(output: Path, key: str) -> Path:
    """The staging folder, kept when it belongs to the same merge (resume), emptied otherwise."""
    staging = output.parent / f".{output.name}.partial"
    stamp = staging / "merge-plan.json"
    if staging.is_dir() and (not stamp.is_file() or read_json(stamp).get("key") != key):
        log.info("discarding %s: it belongs to another merge", staging)
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        write_json_atomic(stamp, {"key": key})
    return staging


def _append_stats(path: Path, name: str, stats: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"name": name, **stats}) + "\n")


def _load_stats(path: Path) -> dict[str, dict[str, Any]]:
    stats = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            stats[entry.pop("name")] = entry
    return stats


def write_shards(
    inputs: MergeInputs,
    plans: list[TensorPlan],
    staging: Path,
    max_shard_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Every planned shard into `staging`, skipping finished shards and finished tensors. Returns the files."""
    by_name = {p.name: p for p in plans}
    shards = plan_shards([p.out for p in plans], max_shard_size)
    names = shard_names(len(shards))
    stats_file = staging / "tensor-stats.jsonl"
    done = 0
    for filename, shard in zip(names, shards, strict=True):
        if (staging / filename).is_file():
            done += len(shard)
            continue
        writer = ShardWriter(staging, filename, shard)
        try:
            for tensor in shard:
                if tensor.name not in writer.done:
                    merged = merge_tensor(inputs, by_name[tensor.name])
                    # stats before the tensor's done-record: a kill in between redoes the tensor, never loses them
                    _append_stats(stats_file, tensor.name, inputs.stats.get(tensor.name, {}))
                    writer.write(tensor.name, merged)
                done += 1
                if progress:
                    progress(done, len(plans))
            writer.finish()
        finally:
            writer.close()
    write_index(staging, shards)
    return names


def _write_config(staging: Path, base_dir: Path, dtype: str) -> None:
    config = load_config(base_dir)
    if config and dtype != "auto":
        config["torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"] = dtype
    if config:
        write_json_atomic(staging / "config.json", config)


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    """The base's tokenizer, chat template and generation config, copied as files."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def read_chat_template(folder: Path) -> str | None:
    """A checkpoint's chat template as its files hold it (chat_template.jinja, chat_template.json or
    tokenizer_config.json; of a named set, the default one)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        value = read_json(folder / name).get("chat_template") if (folder / name).is_file() else None
        if isinstance(value, list):
            value = next((t.get("template") for t in value if t.get("name") == "default"), None)
        if isinstance(value, str) and value:
            return value
    return None


def chat_template_for(config: MergeConfig) -> str | None:
    """The template `chat_template` asks for: its text, or for auto the most common template of the base and
    the models (mergekit's rule; None when none has one)."""
    if config.chat_template != "auto":
        return config.chat_template
    folders = [config.base_model, *(m.path for m in config.models)]
    templates = [t.strip() for t in (read_chat_template(Path(f)) for f in folders) if t]
    return Counter(templates).most_common(1)[0][0] if templates else None


def write_chat_template(folder: Path, template: str) -> None:
    """`template` as the folder's chat template: chat_template.jinja, and no other copy that could win over it."""
    write_text_atomic(folder / "chat_template.jinja", template)
    (folder / "chat_template.json").unlink(missing_ok=True)
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        settings = read_json(tokenizer_config)
        if settings.pop("chat_template", None) is not None:
            write_json_atomic(tokenizer_config, settings)


def run_merge(
    config: MergeConfig,
    output: str | Path | None = None,
    tokenizer_vocab: int | None = None,
    finish_folder: Callable[[Path], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Merge `config` into `output` (a full HF checkpoint folder) and return the report.

    `finish_folder(staging)` adds files before the folder is renamed into place (default: copy the base's
    tokenizer files); the caller writes the report where it wants it.
    """
    output = Path(output or config.output)
    if not str(output):
        raise ValueError("no output folder given")
    started = time.monotonic()
    inputs = open_inputs(config)
    try:
        plans = preflight(inputs.base, inputs.models, config.dtype, tokenizer_vocab)
        staging = _staging(output, _plan_key(config, plans, inputs))
        inputs.stats = _load_stats(staging / "tensor-stats.jsonl")
        files = write_shards(inputs, plans, staging, parse_size(config.max_shard_size), progress)
    finally:
        inputs.close()
    _write_config(staging, Path(config.base_model), config.dtype)
    (finish_folder or (lambda folder: copy_tokenizer_files(Path(config.base_model), folder)))(staging)
    template = chat_template_for(config) if config.chat_template else None
    if template:
        write_chat_template(staging, template)
    report = build_report(
        config, plans, _load_stats(staging / "tensor-stats.jsonl"), files, time.monotonic() - started
    )
    for name in ("merge-plan.json", "tensor-stats.jsonl"):
        (staging / name).unlink(missing_ok=True)
    publish_dir(staging, output)
    return report


def build_report(
    config: MergeConfig,
    plans: list[TensorPlan],
    stats: dict[str, dict[str, Any]],
    files: list[str],
    seconds: float,
) -> dict[str, Any]:
    """Per-method parameters, per-tensor weights and kept shares, and their element-weighted summary."""
    method = get_method(config.method)
    params = resolve_params(method, config.parameters, [m.parameters for m in config.models], config.seed)
    labels = [m.label for m in config.models]
    merged = [s for s in stats.values() if s.get("numel")]
    kept = [s for s in merged if s.get("kept") is not None]
    weighted = [s for s in merged if s.get("weights")]
    summary: dict[str, Any] = {
        "tensors": len(plans),
        "merged_tensors": len(merged),
        "copied_tensors": sum(p.kind == "copy" for p in plans),
        "padded_vocab_tensors": {p.name: {"common_rows": p.rows} for p in plans if p.kind == "rows"},
        "kept_share": sum(s["kept"] * s["numel"] for s in kept) / sum(s["numel"] for s in kept)
        if kept
        else None,
    }
    if len(labels) == 1 and method.max_models is None:  # copied unchanged (merge_tensor)
        summary["single_target"] = labels[0]
    if weighted:
        weighted_total = sum(s["numel"] for s in weighted)
        summary["mean_weights"] = {
            label: sum(s["weights"][i] * s["numel"] for s in weighted) / weighted_total
            for i, label in enumerate(labels)
        }
    return {
        **({"name": config.name} if config.name else {}),
        "method": {"name": method.name, "paper": method.paper, "reference_url": method.reference_url},
        "parameters": params.shared,
        "models": [
            {"name": label, "path": m.path, "parameters": {k: v[i] for k, v in params.per_model.items()}}
            for i, (label, m) in enumerate(zip(labels, config.models, strict=True))
        ],
        "base_model": config.base_model,
        "dtype": config.dtype,
        "seed": config.seed,
        "files": files,
        "seconds": round(seconds, 3),
        "summary": summary,
        "diagnostics": summarize(stats, labels),
        "tensors": stats,
    }


def report_markdown(report: dict[str, Any]) -> str:
    """A short human-readable merge report."""
    summary = report["summary"]
    lines = [
        f"# Merge report: {report['method']['name']}"
        + (f" ({report['name']})" if report.get("name") else ""),
        "",
        f"Method: {report['method']['paper']} ({report['method']['reference_url']})",
        "",
        f"Base: `{report['base_model']}` · dtype {report['dtype']} · seed {report['seed']}"
        + (f" · {report['seconds']} s" if "seconds" in report else ""),
        "",
        f"Shared parameters: `{json.dumps(report['parameters'])}`",
        "",
        "| model | parameters | mean weight |",
        "|---|---|---|",
    ]
    means = summary.get("mean_weights", {})
    for model in report["models"]:
        mean = f"{means[model['name']]:.4f}" if model["name"] in means else "-"
        lines.append(f"| {model['name']} | `{json.dumps(model['parameters'])}` | {mean} |")
    kept = summary["kept_share"]
    lines += [
        "",
        f"Tensors: {summary['tensors']} ({summary['merged_tensors']} merged, "
        f"{summary['copied_tensors']} copied from the base); share of delta entries kept: "
        f"{'-' if kept is None else f'{kept:.4f}'}",
    ]
    if summary.get("single_target"):
        lines.append(
            f"- one target ({summary['single_target']}): copied unchanged, the method was not applied"
        )
    for name, info in summary["padded_vocab_tensors"].items():
        lines.append(f"- `{name}`: merged the {info['common_rows']} common rows, kept the base's other rows")
    if report.get("diagnostics"):
        lines += ["", diagnostics_markdown(report["diagnostics"]).rstrip()]
    return "\n".join(lines) + "\n"
