"""Local dataset files read row by row before any library parses them, so that a bad row is named by file and line:
`fuse validate` reports it, `prepare` counts and skips it (not UTF-8, a raw NUL byte, not JSON, not an object, too
large to tokenize) instead of dying on it inside `datasets`."""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
BINARY_SUFFIXES = (".parquet", ".arrow")
READ_CHUNK = 1 << 20  # an over-long line is skipped this much at a time, never held whole
ARROW_BATCH_ROWS = 1024
MB = 1e6

TOO_LARGE = "row too large"
NOT_UTF8 = "not UTF-8"
RAW_NUL = "raw NUL byte"
NOT_JSON = "not valid JSON"
NOT_OBJECT = "not a JSON object"
NOT_CSV = "not valid CSV"


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be used: where it is and why. `line` is the line the row starts on in a text file (JSON,
    CSV), its 1-based row number in a Parquet/Arrow file; `reason` is the kind a report counts, `message` the
    details."""

    path: Path
    line: int
    reason: str
    message: str

    def __str__(self) -> str:
        where = (
            f"{self.path}: row {self.line}"
            if self.path.suffix in BINARY_SUFFIXES
            else f"{self.path}:{self.line}"
        )
        return f"{where}: {self.message}"


class UnreadableRow(ValueError):
    """One row's bytes that are not a usable JSON object; `reason` is its kind (TOO_LARGE, NOT_UTF8, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_saved_dataset(path: Path) -> bool:
    """A folder `datasets.Dataset.save_to_disk` (or DatasetDict's) wrote: Arrow files beside its JSON metadata."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def local_data_files(path: Path) -> list[Path]:
    """The data files a local dataset path stands for (itself, or every data file under a folder), all of one kind;
    a `save_to_disk` folder stands for its Arrow files."""
    if is_saved_dataset(path):
        return sorted(path.rglob("*.arrow"))
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
    kinds = {LOCAL_SUFFIXES.get(p.suffix) for p in files}
    if not files or None in kinds or len(kinds) != 1:
        raise ValueError(f"{path} must be .jsonl/.json/.parquet/.arrow/.csv files of one kind")
    return files


def too_large(size: int, limit: int) -> str:
    return f"a row of {_amount(size)}, over the {_amount(limit)} this recipe's max_length can use; shorten or drop it"


def _amount(size: int) -> str:
    return f"{size / MB:.1f} MB" if size >= MB / 10 else f"{size} bytes"


def parse_row(raw: bytes, limit: int | None = None) -> dict[str, Any]:
    """One row's JSON text as an object; raises UnreadableRow saying what is wrong (column numbers within `raw`)."""
    if limit is not None and len(raw) > limit:
        raise UnreadableRow(TOO_LARGE, too_large(len(raw), limit))
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise UnreadableRow(
            NOT_UTF8, f"not UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1})"
        ) from None
    if "\0" in text:
        column = text.index("\0") + 1
        raise UnreadableRow(RAW_NUL, f"a raw NUL byte at column {column} (JSON writes it escaped: \\u0000)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        where = (
            f"column {error.colno}"
            if error.lineno == 1
            else f"line {error.lineno} of the row, column {error.colno}"
        )
        raise UnreadableRow(NOT_JSON, f"not valid JSON: {error.msg.removesuffix(' at')} ({where})") from None
    except RecursionError:
        raise UnreadableRow(NOT_JSON, "not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise UnreadableRow(NOT_OBJECT, f"not a JSON object (a JSON {type(value).__name__})")
    return value


def json_rows(path: Path, limit: int | None = None) -> Iterator[dict[str, Any] | BadRow]:
    """Each row of a JSON Lines file, or of a JSON file holding one array of rows, parsed, or the BadRow it is."""
    if _first_byte(path) == b"[":
        yield from _json_array_rows(path, limit)
        return
    with open(path, "rb") as handle:
        for number, raw, size in _lines(handle, limit):
            if limit is not None and size > limit:
                yield BadRow(path, number, TOO_LARGE, too_large(size, limit))
                continue
            if not raw.strip():
                continue  # blank lines are no rows (as for `datasets`)
            try:
                yield parse_row(raw, limit)
            except UnreadableRow as error:
                yield BadRow(path, number, error.reason, str(error))


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            if stripped := chunk.lstrip():
                return stripped[:1]
    return b""


def _lines(handle, limit: int | None) -> Iterator[tuple[int, bytes, int]]:
    """(number, bytes, size) of each line; with `limit`, a longer line is skipped, not read whole (bytes cut)."""
    if limit is None:
        for number, line in enumerate(handle, 1):
            yield number, line, len(line)
        return
    number = 0
    while line := handle.readline(limit + 1):
        number += 1
        size = len(line)
        while not line.endswith(b"\n") and (more := handle.readline(READ_CHUNK)):
            size += len(more)
            line = more
        yield number, line if size == len(line) else b"", size


def _json_array_rows(path: Path, limit: int | None) -> Iterator[dict[str, Any] | BadRow]:
    """A JSON array read element by element (the file is held once, as `datasets` holds it): each element checked
    on its own text; a syntax error between elements ends the file, since no row boundary can be found past it."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1
        yield BadRow(
            path, line, NOT_UTF8, f"not UTF-8 (byte {error.object[error.start]:#04x}); nothing past it read"
        )
        return
    decoder = json.JSONDecoder(strict=False)  # raw control characters are one row's fault, found below
    index = text.index("[") + 1
    line, counted = 1, 0
    while True:
        index = _skip_space(text, index)
        if text.startswith("]", index):
            return
        line, counted = line + text.count("\n", counted, index), index
        try:
            _, end = decoder.raw_decode(text, index)
        except (json.JSONDecodeError, RecursionError) as error:
            what = (
                f"{error.msg} at line {error.lineno} column {error.colno}"
                if isinstance(error, json.JSONDecodeError)
                else "nested too deeply"
            )
            message = f"not valid JSON: {what}; the rest of the file cannot be read"
            yield BadRow(path, line, NOT_JSON, message)
            return
        try:
            yield parse_row(text[index:end].encode("utf-8"), limit)
        except UnreadableRow as error:
            yield BadRow(path, line, error.reason, str(error))
        index = _skip_space(text, end)
        if text.startswith(",", index):
            index += 1
        elif not text.startswith("]", index):
            line += text.count("\n", counted, index)
            yield BadRow(path, line, NOT_JSON, "not valid JSON: expected ',' or ']' after a row")
            return


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def first_bad_row(path: Path, limit: int | None = None) -> BadRow | None:
    """The first row of a local data file that `prepare` would skip or that is over `limit` bytes."""
    if LOCAL_SUFFIXES.get(path.suffix) == "json":
        return next((row for row in json_rows(path, limit) if isinstance(row, BadRow)), None)
    if limit is None:
        return None  # the typed formats have no unreadable rows of their own; only size is checked
    if path.suffix == ".csv":
        return _csv_oversized(path, limit)
    return _arrow_oversized(path, limit)


def _csv_oversized(path: Path, limit: int) -> BadRow | None:
    """The first CSV row over `limit` characters; the csv module's field limit keeps a huge field from being read."""
    previous = csv.field_size_limit(limit)
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as handle:
            reader, start = csv.reader(handle), 1
            try:
                for row in reader:
                    size = sum(len(field) for field in row)
                    if size > limit:
                        return BadRow(path, start, TOO_LARGE, too_large(size, limit))
                    start = reader.line_num + 1
            except csv.Error as error:
                if "field limit" in str(error):
                    message = f"a field over the {_amount(limit)} this recipe's max_length can use; shorten or drop it"
                    return BadRow(path, start, TOO_LARGE, message)
                return BadRow(path, start, NOT_CSV, f"not valid CSV: {error}")
    finally:
        csv.field_size_limit(previous)
    return None


def _arrow_oversized(path: Path, limit: int) -> BadRow | None:
    """The first Parquet/Arrow row whose strings and binaries hold more than `limit` bytes."""
    seen = 0
    for batch in _arrow_batches(path):
        sizes = sum((arrow_row_bytes(column) for column in batch.columns), np.zeros(batch.num_rows, np.int64))
        over = np.flatnonzero(sizes > limit)
        if over.size:
            return BadRow(path, seen + int(over[0]) + 1, TOO_LARGE, too_large(int(sizes[over[0]]), limit))
        seen += batch.num_rows
    return None


def _arrow_batches(path: Path) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=ARROW_BATCH_ROWS)
        return
    try:  # `datasets` writes .arrow files as IPC streams; others write the IPC file format
        yield from pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        for index in range(reader.num_record_batches):
            yield reader.get_batch(index)


def arrow_row_bytes(array: Any) -> np.ndarray:
    """Bytes of text each row of an Arrow array holds: its strings and binaries, summed through lists and structs
    (other values count 8 bytes)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
        return pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_struct(kind):
        fields = [arrow_row_bytes(array.field(i)) for i in range(kind.num_fields)]
        return sum(fields, np.zeros(len(array), np.int64))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        offsets = array.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        totals = np.concatenate([[0], np.cumsum(arrow_row_bytes(array.flatten()))])
        return totals[offsets[1:] - offsets[0]] - totals[offsets[:-1] - offsets[0]]
    return np.full(len(array), 8, np.int64)


def first_rows(path: Path, count: int) -> list[Any]:
    """The first `count` rows of a local dataset as prepare reads them (JSON objects, or a table's rows)."""
    if is_saved_dataset(path):
        from datasets import DatasetDict, load_from_disk

        saved = load_from_disk(str(path))
        if isinstance(saved, DatasetDict):
            saved = next(iter(saved.values()))
        return [saved[i] for i in range(min(count, len(saved)))]
    first = local_data_files(path)[0]
    if first.suffix in (".jsonl", ".json"):
        return list(itertools.islice(json_rows(first), count))
    if first.suffix == ".csv":
        with open(first, newline="", encoding="utf-8") as handle:
            return list(itertools.islice(csv.DictReader(handle), count))
    rows: list[Any] = []
    for batch in _arrow_batches(first):
        rows += batch.to_pylist()
        if len(rows) >= count:
            break
    return rows[:count]
