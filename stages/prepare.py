"""prepare: load the SFT and preference datasets named in the recipe, normalize them to one schema, drop and
count malformed rows, split off a held-out part by id, and write Arrow folders."""

from __future__ import annotations

from collections import Counter
from itertools import chain
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Value, load_dataset
from datasets.utils.logging import disable_progress_bar

from fuse.context import StageContext
from fuse.data.prepared import Dropped, is_heldout, preference_row, row_id, sft_messages
from fuse.data.raw import LOCAL_SUFFIXES, BadRow, is_saved_dataset, json_rows, local_data_files
from fuse.io import atomic_dir, write_json_atomic
from fuse.recipe import DatasetSpec, RecipeError

MAX_EXAMPLES = 20


def load_raw(spec: DatasetSpec, key: str):
    """A local JSONL/JSON/Parquet/Arrow/CSV file or folder of them, or a hub dataset, as rows. JSON is read row by
    row here (a row that is not a JSON object comes as the BadRow it is, counted and skipped); the rest through
    `datasets`."""
    path = Path(spec.path)
    if not path.exists():
        return load_dataset(spec.path, spec.name, split=spec.split, revision=spec.revision)
    if is_saved_dataset(path):  # datasets' save_to_disk: a Dataset, or a DatasetDict split by spec.split
        from datasets import DatasetDict, load_from_disk

        saved = load_from_disk(str(path))
        if isinstance(saved, DatasetDict):
            if spec.split not in saved:
                raise RecipeError(
                    f"{key}.split: {spec.split!r} is not a split of {path} ({', '.join(saved)})"
                )
            saved = saved[spec.split]
        return saved
    try:
        files = local_data_files(path)
    except ValueError as error:
        raise RecipeError(f"{key}.path: {error}") from None
    kind = LOCAL_SUFFIXES[files[0].suffix]
    if kind == "json":
        return chain.from_iterable(json_rows(file) for file in files)
    try:
        return load_dataset(kind, data_files=[str(p) for p in files], split="train")
    except Exception as error:
        raise RecipeError(f"{key}.path: cannot read {path}: {error}") from None


def normalize(
    dataset, spec: DatasetSpec, key: str, kind: str, min_chars: int
) -> tuple[list[dict], dict[str, Any]]:
    """Normalized rows and the report of what was dropped and why. A column missing from a typed dataset (or from
    every row of a JSON file) is a recipe error; from some rows only, those rows are dropped."""
    rows, reasons, examples, seen = [], Counter(), [], set()
    columns = getattr(dataset, "column_names", None)
    read, present, missing = 0, set(), {}
    for index, raw in enumerate(dataset):
        if spec.max_rows is not None and index >= spec.max_rows:
            break
        read += 1
        if not isinstance(raw, BadRow):
            present.update(raw)
        try:
            row = _normal_row(raw, spec, kind, min_chars)
        except KeyError as error:
            name = error.args[0]
            message = (
                f"{key}: {spec.path} row {index} has no column {error} (columns: {sorted(raw)}; map yours with "
                f"{key}.columns)"
            )
            if columns is not None:
                raise RecipeError(message) from None
            missing.setdefault(name, message)
            reasons[f"no column {name!r}"] += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(_example(index, raw, f"no column {name!r}"))
            continue
        except Dropped as reason:
            reasons[str(reason)] += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(_example(index, raw, str(reason)))
            continue
        row = {"id": row_id(row), **row}
        if row["id"] in seen:
            reasons["duplicate row"] += 1
            continue
        seen.add(row["id"])
        rows.append(row)
    absent = [message for name, message in missing.items() if name not in present]
    if absent:
        raise RecipeError(absent[0])
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


def _normal_row(raw: Any, spec: DatasetSpec, kind: str, min_chars: int) -> dict[str, Any]:
    """One raw row normalized; raises Dropped with the reason it cannot be used, KeyError for a missing column."""
    if isinstance(raw, BadRow):
        raise Dropped(raw.reason)
    if kind == "sft":
        return {"messages": sft_messages(raw, spec.format, spec.columns, min_chars)}
    return preference_row(raw, spec.columns, min_chars)


def _example(index: int, raw: Any, reason: str) -> dict[str, Any]:
    """A dropped row for the report: its index, and for an unreadable one its file, line and what is wrong."""
    if isinstance(raw, BadRow):
        return {"row": index, "file": str(raw.path), "line": raw.line, "reason": raw.message}
    return {"row": index, "reason": reason}


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
        for bad in part["dropped_examples"]:
            if "line" in bad:
                ctx.log.warning(
                    "%s: skipped row %d, %s:%d: %s", kind, bad["row"], bad["file"], bad["line"], bad["reason"]
                )
    write_json_atomic(ctx.out / "report.json", report)
