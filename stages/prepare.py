"""prepare: load the SFT and preference datasets named in the recipe, normalize them to one schema, drop and
count malformed rows, split off a held-out part by id, and write Arrow folders."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Value, load_dataset
from datasets.utils.logging import disable_progress_bar

from fuse.context import StageContext
from fuse.data.prepared import Dropped, is_heldout, preference_row, row_id, sft_messages
from fuse.io import atomic_dir, write_json_atomic
from fuse.recipe import DatasetSpec, RecipeError

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
MAX_EXAMPLES = 20


def load_raw(spec: DatasetSpec, key: str):
    """A local JSONL/JSON/Parquet file or folder of them, or a hub dataset, as a `datasets.Dataset`."""
    path = Path(spec.path)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
        kinds = {LOCAL_SUFFIXES.get(p.suffix) for p in files}
        if not files or None in kinds or len(kinds) != 1:
            raise RecipeError(f"{key}.path: {path} must be .jsonl/.json/.parquet/.csv files of one kind")
        try:
            return load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
        except Exception as error:
            raise RecipeError(f"{key}.path: cannot read {path}: {error}") from None
    return load_dataset(spec.path, spec.name, split=spec.split, revision=spec.revision)


def normalize(
    dataset, spec: DatasetSpec, key: str, kind: str, min_chars: int
) -> tuple[list[dict], dict[str, Any]]:
    rows, reasons, examples, seen = [], Counter(), [], set()
    for index, raw in enumerate(dataset):
        if spec.max_rows is not None and index >= spec.max_rows:
            break
        try:
            if kind == "sft":
                row: dict[str, Any] = {"messages": sft_messages(raw, spec.format, spec.columns, min_chars)}
            else:
                row = preference_row(raw, spec.columns, min_chars)
        except KeyError as missing:
            raise RecipeError(
                f"{key}: {spec.path} row {index} has no column {missing} (columns: {sorted(raw)}; map yours with "
                f"{key}.columns)"
            ) from None
        except Dropped as reason:
            reasons[str(reason)] += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append({"row": index, "reason": str(reason)})
            continue
        row = {"id": row_id(row), **row}
        if row["id"] in seen:
            reasons["duplicate row"] += 1
            continue
        seen.add(row["id"])
        rows.append(row)
    read = min(len(dataset), spec.max_rows or len(dataset))
    report = {
        "file": spec.path,
        "rows_read": read,
        "rows_kept": len(rows),
        "dropped": dict(reasons),
        "dropped_examples": examples,
    }
    if not rows:
        raise RecipeError(f"{key}: no usable rows in {spec.path} ({dict(reasons) or 'empty'})")
    return rows, report


def features(kind: str):
    message = {"role": Value("string"), "content": Value("string")}
    if kind == "sft":
        return Features({"id": Value("string"), "messages": [message]})
    return Features(
        {"id": Value("string"), "prompt": [message], "chosen": Value("string"), "rejected": Value("string")}
    )


def write_splits(rows: list[dict], out: Path, kind: str, fraction: float, seed: int) -> dict[str, int]:
    counts = {}
    for split in ("train", "heldout"):
        chosen = [r for r in rows if is_heldout(r["id"], fraction, seed) == (split == "heldout")]
        counts[split] = len(chosen)
        with atomic_dir(out / split) as tmp:
            schema = features(kind)
            columns = {name: [row[name] for row in chosen] for name in schema}  # keeps the schema when empty
            Dataset.from_dict(columns, features=schema).save_to_disk(str(tmp))
    return counts


def run(ctx: StageContext) -> None:
    disable_progress_bar()  # the executor shows progress; per-split bars only clutter the log
    data = ctx.recipe.data
    min_chars = ctx.settings.min_response_chars
    report: dict[str, Any] = {}
    for kind, key, spec in (
        ("sft", "data.sft", data.sft),
        ("preference", "data.preference", data.preference),
    ):
        if spec is None:
            continue
        if kind == "preference" and spec.format != "preference":
            raise RecipeError(f"{key}.format must be 'preference' (got {spec.format!r})")
        rows, part = normalize(load_raw(spec, key), spec, key, kind, min_chars)
        part["splits"] = write_splits(rows, ctx.out / kind, kind, data.heldout_fraction, data.seed)
        report[kind] = part
        ctx.log.info(
            "%s: kept %d of %d rows; dropped %s", kind, part["rows_kept"], part["rows_read"], part["dropped"]
        )
    write_json_atomic(ctx.out / "report.json", report)
