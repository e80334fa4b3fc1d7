"""Pre-flight check of a merge: every tensor name, shape and vocabulary row count compared before any work.

All mismatches are collected and reported at once; padded embeddings / LM heads (row counts that differ only
because the vocabulary was padded) become "merge the common rows, keep the base's extra rows".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fuse.io import read_json
from fuse.merging.checkpoint import CheckpointReader, OutTensor


class PreflightError(ValueError):
    """The models cannot be merged; the message lists every mismatch."""


@dataclass(frozen=True)
class TensorPlan:
    name: str
    kind: str  # "merge" | "copy" (not floating point: the base's value) | "rows" (padded vocab rows)
    rows: int | None  # for "rows": how many leading rows every model has
    out: OutTensor


def load_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    return read_json(path) if path.is_file() else {}


def vocab_size(config: dict[str, Any]) -> int | None:
    value = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return int(value) if value is not None else None


def _is_vocab_tensor(shape: tuple[int, ...], config: dict[str, Any]) -> bool:
    """An embedding or LM head: its first axis is the model's (padded) vocabulary."""
    return len(shape) == 2 and shape[0] == vocab_size(config)


def _check_tensor(
    name: str,
    base_shape: tuple[int, ...],
    shapes: dict[str, tuple[int, ...]],
    configs: dict[str, dict[str, Any]],
    base_config: dict[str, Any],
    tokenizer_vocab: int | None,
) -> tuple[int | None, list[str]]:
    """Common row count if only vocab padding differs (None when shapes are equal) and any problems."""
    if all(shape == base_shape for shape in shapes.values()):
        return None, []
    problems = []
    rows = base_shape[0] if base_shape else 0
    vocab_ok = _is_vocab_tensor(base_shape, base_config)
    for model, shape in shapes.items():
        if shape == base_shape:
            continue
        if vocab_ok and _is_vocab_tensor(shape, configs[model]) and shape[1:] == base_shape[1:]:
            rows = min(rows, shape[0])
        else:
            problems.append(f"{name}: {model} has shape {list(shape)}, the base {list(base_shape)}")
    if not problems and tokenizer_vocab is not None and rows < tokenizer_vocab:
        problems.append(
            f"{name}: only {rows} rows are common to all models but the tokenizer has "
            f"{tokenizer_vocab} tokens (the row counts differ by more than padding)"
        )
    return rows, problems


def _tie_problems(base_config: dict[str, Any], configs: dict[str, dict[str, Any]]) -> list[str]:
    tied = base_config.get("tie_word_embeddings")
    return [
        f"tie_word_embeddings: {model} has {config.get('tie_word_embeddings')}, the base {tied}"
        for model, config in configs.items()
        if config.get("tie_word_embeddings", tied) != tied
    ]


def preflight(
    base: CheckpointReader,
    models: dict[str, CheckpointReader],
    out_dtype: str = "auto",
    tokenizer_vocab: int | None = None,
) -> list[TensorPlan]:
    """The per-tensor plan in the base's tensor order, or a PreflightError listing every mismatch."""
    base_config = load_config(base.directory)
    configs = {name: load_config(reader.directory) for name, reader in models.items()}
    problems = _tie_problems(base_config, configs)
    tied = bool(base_config.get("tie_word_embeddings"))
    for model, reader in models.items():
        missing = sorted(set(base.tensors) - set(reader.tensors))
        extra = sorted(set(reader.tensors) - set(base.tensors))
        if missing:
            problems.append(f"{model} lacks {len(missing)} tensor(s) the base has: {', '.join(missing[:8])}")
        if extra and not tied:  # a tied model may still store its head; the base's tying decides the output
            problems.append(f"{model} has {len(extra)} tensor(s) the base lacks: {', '.join(extra[:8])}")
    plans = []
    for name, info in base.tensors.items():
        shapes = {m: r.tensors[name].shape for m, r in models.items() if name in r.tensors}
        rows, tensor_problems = _check_tensor(name, info.shape, shapes, configs, base_config, tokenizer_vocab)
        problems.extend(tensor_problems)
        floating = info.dtype.is_floating_point and all(
            r.tensors[name].dtype.is_floating_point for r in models.values() if name in r.tensors
        )
        kind = "copy" if not floating else ("rows" if rows is not None else "merge")
        dtype = info.dtype if out_dtype == "auto" or not floating else getattr(torch, out_dtype)
        plans.append(TensorPlan(name, kind, rows, OutTensor(name, dtype, info.shape)))
    if problems:
        raise PreflightError(
            f"cannot merge {', '.join(models)} into base {base.directory}: "
            f"{len(problems)} mismatch(es):\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return plans
