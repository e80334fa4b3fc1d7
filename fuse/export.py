"""`fuse export` / `fuse import`: an extract's teacher log-prob store as a parquet dataset that `datasets.load_dataset`
reads with no fuse installed, and such a dataset back into the shared cache as that extract's entry, so a recipe whose
extract has the same fingerprint restores it instead of extracting (teams share extraction as FuseChat shares data).

    <out>/README.md                              the dataset card: columns, precision, model, settings, provenance
    <out>/fuse_export.json                       the dataset's metadata (below), readable without parquet
    <out>/data/train-00000-of-00004.parquet     one file per store shard, one row per sample, in the store's order

Every parquet file carries the metadata in its schema (key "fuse"): format and version, the stage instance, its
fingerprint with the parts it hashes and the parent outputs it was made from, the model's identity, K, the extract
settings, the fuse version, and its own shard's header facts, so that one file describes itself.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuse.cache import ENTRY
from fuse.data.logprobs import (
    ContentSpan,
    LogprobReader,
    LogprobWriter,
    SampleLogprobs,
    ShardReader,
    StoreError,
    shard_name,
    write_index,
)
from fuse.io import atomic_dir, read_json, write_json_atomic, write_text_atomic
from fuse.store import MANIFEST, environment, output_problems

FORMAT = "fuse-teacher-logprobs"
VERSION = 1
READABLE = (1,)  # dataset versions `fuse import` reads
KEY = b"fuse"  # the parquet schema metadata key
DATA = "data"
CARD = "README.md"
METADATA_FILE = "fuse_export.json"
STAGES = ("extract",)
BATCH_ENTRIES = 1 << 22  # top-K entries (rows x K) per written row group: ~32 MB of ids and log-probs at most
READ_ROWS = 64  # samples per batch read back by `fuse import`


class ExportError(ValueError):
    """A store that cannot be exported, or a dataset that cannot be imported; the message names the file (and the
    column)."""


def columns(top_k: int) -> Any:
    """The dataset's schema: one row per sample; rows t of the top-K columns predict token t+1."""
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("text", pa.string()),
            (
                "spans",
                pa.list_(pa.struct([("role", pa.string()), ("start", pa.int32()), ("end", pa.int32())])),
            ),
            ("input_ids", pa.list_(pa.int32())),
            ("offsets", pa.list_(pa.list_(pa.int32(), 2))),
            ("mask", pa.list_(pa.bool_())),
            ("topk_ids", pa.list_(pa.list_(pa.int32(), top_k))),
            ("topk_logprobs", pa.list_(pa.list_(pa.float32(), top_k))),
            ("target_logprobs", pa.list_(pa.float32())),
            ("extra", pa.string()),
        ]
    )


# --------------------------------------------------------------------------------------------- the store to export


@dataclass(frozen=True)
class FinishedStore:
    """A done extract instance, of a run store or a cache entry: its outputs and what names them."""

    folder: Path
    record: dict[str, Any]  # the instance's manifest or the entry's record

    @property
    def out(self) -> Path:
        return self.folder / "out"


def find_store(path: str | Path) -> FinishedStore:
    """The done instance at `path`: a run store's instance folder (<workdir>/extract.q), a cache entry
    (<cache>/extract/<fingerprint>), or the out/ folder of either; its outputs checked against their digests."""
    folder = Path(path)
    if folder.name == "out" and not (folder / MANIFEST).is_file() and not (folder / ENTRY).is_file():
        folder = folder.parent
    if (folder / ENTRY).is_file():
        record = read_json(folder / ENTRY)
    elif (folder / MANIFEST).is_file():
        record = read_json(folder / MANIFEST)
        if record.get("status") != "done":
            raise ExportError(f"{folder}: {record.get('instance')} is {record.get('status')}, not done")
    else:
        raise ExportError(
            f"{folder}: neither a stage instance of a run store ({MANIFEST}) nor a cache entry ({ENTRY})"
        )
    if record.get("stage") not in STAGES:
        raise ExportError(
            f"{folder}: a {record.get('stage')} stage's output; fuse exports {', '.join(STAGES)}"
        )
    damaged = output_problems(folder / "out", record.get("outputs") or {})
    if damaged or not record.get("outputs"):
        raise ExportError(f"{folder}: outputs missing or changed since it finished: {', '.join(damaged[:3])}")
    return FinishedStore(folder, record)


def dataset_metadata(found: FinishedStore, reader: LogprobReader) -> dict[str, Any]:
    """What names the data (fingerprint and its parts, the parent outputs it was made from, model, settings, K) and
    what `fuse import` rebuilds the store from (each shard's header facts, the stage's report)."""
    record, parts = found.record, found.record.get("parts") or {}
    first = reader.shard(0).header if reader.shard_paths else {}
    shards = []
    for j, path in enumerate(reader.shard_paths):
        header = read_json(path / "header.json")
        shards.append(
            {
                "name": path.name,
                "index": j,
                "num_samples": header["num_samples"],
                "num_tokens": header["num_tokens"],
                "model": header["model"],
                "meta": header["meta"],
            }
        )
    report = found.out / "report.json"
    return {
        "format": FORMAT,
        "version": VERSION,
        "stage": record["stage"],
        "instance": record.get("instance"),
        "fingerprint": record["fingerprint"],
        "model": reader.model,
        "tokenizer": tokenizer_identity(reader.model),
        "top_k": reader.top_k,
        "vocab_size": reader.vocab_size,
        "num_samples": len(reader),
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "settings": parts.get("settings"),
        "fuse_version": environment()["versions"].get("fuse-llm"),
        "git_sha": environment().get("git_sha"),
        "exported_at": time.time(),
        "parts": parts,
        "inputs": record.get("inputs") or {},
        "outputs_digest": record.get("outputs_digest"),
        "store": {k: first.get(k) for k in ("format", "version", "codec", "id_bytes")},
        "report": read_json(report) if report.is_file() else None,
        "shards": shards,
    }


def tokenizer_identity(model: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer's part of the model's identity: a hub model's id and revision, a local one's tokenizer files."""
    if "hub_id" in model:
        return {"hub_id": model["hub_id"], "revision": model.get("revision")}
    names = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template")
    return {"files": {f: d for f, d in (model.get("files") or {}).items() if f.startswith(names)}}


# --------------------------------------------------------------------------------------------- export


def data_file(index: int, count: int) -> str:
    """The Hub's split naming, so the Hub and `load_dataset(folder)` see one `train` split."""
    return f"{DATA}/train-{index:05d}-of-{count:05d}.parquet"


def export_store(source: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the store at `source` (see find_store) as the dataset `out` (a new folder, which appears whole or not
    at all), shard by shard, decoded through the store's own reader; returns the dataset's metadata."""
    found = find_store(source)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty folder; export into a new one")
    reader = LogprobReader(found.out)
    meta = dataset_metadata(found, reader)
    count = len(reader.shard_paths)
    with atomic_dir(out) as tmp:
        (tmp / DATA).mkdir()
        for j in range(count):
            write_data_file(tmp / data_file(j, count), reader.shard(j), {**meta, "shard": meta["shards"][j]})
        write_json_atomic(tmp / METADATA_FILE, meta)
        write_text_atomic(tmp / CARD, dataset_card(meta))
    return meta


def write_data_file(path: Path, shard: ShardReader, meta: dict[str, Any]) -> None:
    """One store shard as one parquet file, in row groups of at most BATCH_ENTRIES top-K entries."""
    import pyarrow.parquet as pq

    schema = columns(shard.top_k).with_metadata({KEY: json.dumps(meta).encode()})
    with pq.ParquetWriter(path, schema) as writer:
        batch: list[SampleLogprobs] = []
        entries = 0
        for sample in shard:
            batch.append(sample)
            entries += sample.topk_ids.size
            if entries >= BATCH_ENTRIES:
                writer.write_table(samples_table(batch, schema))
                batch, entries = [], 0
        if batch or not len(shard):
            writer.write_table(samples_table(batch, schema))


def samples_table(samples: list[SampleLogprobs], schema: Any) -> Any:
    import pyarrow as pa

    k = schema.field("topk_ids").type.value_type.list_size
    spans = [[{"role": s.role, "start": s.start, "end": s.end} for s in x.spans] for x in samples]
    arrays = [
        pa.array([x.id for x in samples], pa.string()),
        pa.array([x.text for x in samples], pa.string()),
        pa.array(spans, schema.field("spans").type),
        _nested([x.input_ids for x in samples], np.int32),
        _nested([x.offsets for x in samples], np.int32, 2),
        _nested([x.mask for x in samples], np.bool_),
        _nested([x.topk_ids for x in samples], np.int32, k),
        _nested([x.topk_logprobs for x in samples], np.float32, k),
        _nested([x.target_logprobs for x in samples], np.float32),
        pa.array([json.dumps(x.extra) if x.extra else None for x in samples], pa.string()),
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def _nested(arrays: list[np.ndarray], dtype: Any, width: int | None = None) -> Any:
    """Per-sample arrays [n_i] (or [n_i, width]) as one list<value> (or list<fixed_size_list<value, width>>)."""
    import pyarrow as pa

    lengths = [len(a) for a in arrays]
    flat = np.concatenate([np.asarray(a).reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    values = pa.array(flat.astype(dtype))
    if width is not None:
        values = pa.FixedSizeListArray.from_arrays(values, width)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def dataset_card(meta: dict[str, Any]) -> str:
    model, k = meta["model"], meta["top_k"]
    who = model.get("hub_id") or model.get("name")
    revision = f" (revision {model['revision']})" if model.get("revision") else ""
    provenance = {key: meta[key] for key in ("instance", "fingerprint", "model", "tokenizer", "settings")}
    provenance |= {key: meta[key] for key in ("fuse_version", "git_sha", "store")}
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: {DATA}/*.parquet
tags:
- fuse
- knowledge-distillation
- teacher-logprobs
---
# Teacher log-probs: {who}{revision}

The top-{k} next-token log-probs of `{who}` over {meta["num_samples"]} conversations ({meta["num_tokens"]} tokens),
each in the model's own tokenization and chat template, with the log-prob of the token that follows. Written by
`fuse export` from the stage instance `{meta["instance"]}` (fingerprint `{meta["fingerprint"]}`), fuse
{meta["fuse_version"]}.

## Load

```python
from datasets import load_dataset

data = load_dataset("parquet", data_files="{DATA}/*.parquet", split="train")  # or load_dataset("<this folder>")
data = data.with_format("numpy")  # topk_logprobs of a row: float32 [T-1, {k}]
```

## Columns (one row per sample; T tokens)

| column | type | meaning |
|---|---|---|
| id | string | the sample's id in the prepared data |
| text | string | the conversation rendered with the chat template |
| spans | list of (role, start, end) | each message's content in `text`, characters [start, end) |
| input_ids | int32 [T] | the model's token ids of `text` |
| offsets | int32 [T, 2] | the characters [start, end) of `text` each token covers |
| mask | bool [T] | token t is a response token (a loss position) |
| topk_ids | int32 [T-1, {k}] | row t: the {k} most likely ids for token t+1, most likely first |
| topk_logprobs | float32 [T-1, {k}] | their log-probs (descending; -inf: an empty slot) |
| target_logprobs | float32 [T-1] | row t: the log-prob of the realized token input_ids[t+1] (NaN: unknown) |
| extra | string (JSON) or null | per-sample facts, e.g. {{"truncated": true}} |

Row t predicts token t+1: nothing predicts the first token, so the top-K columns have T-1 rows; row t counts for a
loss when mask[t+1] is set.

## Precision

The values are what fuse's log-prob store decodes, not the engine's raw output. The store codes log-probs in steps
of 0.0199 nats, each within 0.01 of the model's value (a row no code holds is kept exactly), and realized
log-probs the same way; token ids, offsets and texts are exact. `fuse import` rebuilds the store from exactly these
values.

## Use it in fuse

```
fuse import <this folder> RECIPE.yaml     # into the recipe's cache (or --cache DIR)
fuse run RECIPE.yaml                       # restores {meta["instance"]} from the cache instead of extracting
```

A recipe restores it when its `{meta["instance"]}` has this fingerprint (same model, tokenizer, data, template and
extract settings) and its prepared data are the ones this store was extracted from.

## Provenance

```json
{json.dumps(provenance, indent=2)}
```
"""


# --------------------------------------------------------------------------------------------- import


def read_metadata(path: Path) -> dict[str, Any]:
    """A data file's fuse metadata and columns, checked: format, version, stage, and every column's type for K."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as error:  # noqa: BLE001 - pyarrow's errors for a file that is no parquet vary
        raise ExportError(f"{path}: not a readable parquet file ({error})") from None
    raw = (schema.metadata or {}).get(KEY)
    if raw is None:
        raise ExportError(f"{path}: no fuse metadata in its schema (key 'fuse'): not written by fuse export")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise ExportError(f"{path}: its fuse metadata is not JSON") from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") not in READABLE:
        raise ExportError(
            f"{path}: {FORMAT} version {meta.get('version')!r}; this fuse reads version(s) "
            f"{', '.join(map(str, READABLE))}: import it with the fuse that exported it (fuse_version "
            f"{meta.get('fuse_version')})"
        )
    if meta.get("stage") not in STAGES:
        raise ExportError(f"{path}: a {meta.get('stage')!r} stage's output; fuse imports {', '.join(STAGES)}")
    for name in ("fingerprint", "top_k", "vocab_size", "shard", "instance"):
        if meta.get(name) is None:
            raise ExportError(f"{path}: its fuse metadata has no {name!r}")
    for expected in columns(int(meta["top_k"])):
        if expected.name not in schema.names:
            raise ExportError(f"{path}: column {expected.name!r} missing")
        got = plain_type(schema.field(expected.name).type)
        if got.equals(expected.type):
            continue
        width = getattr(getattr(got, "value_type", None), "list_size", None)
        if expected.name.startswith("topk_") and width not in (None, meta["top_k"]):
            raise ExportError(
                f"{path}: column {expected.name!r} holds {width} entries a row; its metadata says top_k "
                f"{meta['top_k']}"
            )
        raise ExportError(f"{path}: column {expected.name!r} is {got}, expected {expected.type}")
    return meta


def plain_type(kind: Any) -> Any:
    """`kind` with the names parquet writers give list items ("item", "element") and 64-bit offsets left out."""
    import pyarrow as pa

    if pa.types.is_fixed_size_list(kind):
        return pa.list_(plain_type(kind.value_type), kind.list_size)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return pa.list_(plain_type(kind.value_type))
    if pa.types.is_struct(kind):
        return pa.struct([(field.name, plain_type(field.type)) for field in kind])
    return pa.string() if pa.types.is_large_string(kind) else kind


SAME = ("format", "version", "stage", "instance", "fingerprint", "top_k", "vocab_size", "parts", "inputs")


def read_export(folder: str | Path) -> tuple[dict[str, Any], list[Path]]:
    """The dataset's metadata and its data files in shard order, each file checked, all of one store, none missing."""
    folder = Path(folder)
    if not folder.exists():
        raise ExportError(f"{folder}: no such dataset folder")
    files = sorted((folder / DATA).glob("*.parquet")) if folder.is_dir() else [folder]
    if not files:
        raise ExportError(f"{folder}: no {DATA}/*.parquet files (a `fuse export` folder)")
    metas = [read_metadata(path) for path in files]
    first = metas[0]
    for path, meta in zip(files, metas, strict=True):
        for key in SAME:
            if meta.get(key) != first.get(key):
                raise ExportError(
                    f"{path}: its {key!r} differs from {files[0]}'s: files of two exports mixed"
                )
    order = sorted(range(len(files)), key=lambda i: metas[i]["shard"]["index"])
    files, metas = [files[i] for i in order], [metas[i] for i in order]
    count = len(first.get("shards") or [])
    if [m["shard"]["index"] for m in metas] != list(range(count)):
        found = sorted(m["shard"]["index"] for m in metas)
        raise ExportError(f"{folder}: shards {found} of {count}; every shard's file is needed")
    return {**first, "shard_metas": [m["shard"] for m in metas]}, files


def samples_of(path: Path, top_k: int) -> Iterator[SampleLogprobs]:
    """The samples of one data file, batch by batch."""
    import pyarrow.parquet as pq

    names = [field.name for field in columns(top_k)]
    for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS, columns=names):
        for name in names:
            if name != "extra" and batch.column(name).null_count:
                raise ExportError(f"{path}: column {name!r} has empty (null) rows")
        cols = {name: batch.column(name) for name in names}
        per_sample = {
            "input_ids": _split(cols["input_ids"], np.int64),
            "offsets": _split(cols["offsets"], np.int64, 2),
            "mask": _split(cols["mask"], np.bool_),
            "topk_ids": _split(cols["topk_ids"], np.int64, top_k),
            "topk_logprobs": _split(cols["topk_logprobs"], np.float32, top_k),
            "target_logprobs": _split(cols["target_logprobs"], np.float32),
        }
        spans, extra = cols["spans"].to_pylist(), cols["extra"].to_pylist()
        for i, (sample_id, text) in enumerate(
            zip(cols["id"].to_pylist(), cols["text"].to_pylist(), strict=True)
        ):
            yield SampleLogprobs(
                id=sample_id,
                text=text,
                spans=[ContentSpan(s["role"], s["start"], s["end"]) for s in spans[i]],
                extra=json.loads(extra[i]) if extra[i] else {},
                **{name: arrays[i] for name, arrays in per_sample.items()},
            )


def _split(column: Any, dtype: Any, width: int | None = None) -> list[np.ndarray]:
    """A list<...> column as one array per row (sliced batches included)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    values = column.flatten()
    if width is not None:
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False).astype(dtype)
    if width is not None:
        flat = flat.reshape(-1, width)
    return np.split(flat, np.cumsum(lengths)[:-1])


def write_store(meta: dict[str, Any], files: list[Path], out: Path) -> None:
    """The log-prob store the dataset was exported from, rebuilt under `out`: each file as its shard (with the
    shard's header facts), index.json and report.json; then read back and compared value by value with the files."""
    out.mkdir(parents=True, exist_ok=True)
    top_k, vocab = int(meta["top_k"]), int(meta["vocab_size"])
    for j, (path, shard) in enumerate(zip(files, meta["shard_metas"], strict=True)):
        with LogprobWriter(
            out / shard_name(j), top_k, vocab, shard.get("model"), shard.get("meta")
        ) as writer:
            try:
                for sample in samples_of(path, top_k):
                    writer.add(sample)
            except StoreError as error:
                raise ExportError(f"{path}: {error}") from None
        if len(writer) != shard["num_samples"]:
            raise ExportError(f"{path}: {len(writer)} rows, its metadata says {shard['num_samples']}")
    write_index(out, len(files))
    if meta.get("report") is not None:
        write_json_atomic(out / "report.json", meta["report"])
    for j, path in enumerate(files):
        check_same(path, ShardReader(out / shard_name(j)), top_k)


FIELDS = ("input_ids", "offsets", "mask", "topk_ids", "topk_logprobs", "target_logprobs")


def check_same(path: Path, shard: ShardReader, top_k: int) -> None:
    """Every value the rebuilt shard decodes equals the data file's: a dataset whose values are not a store's
    decoding (edited, or made by something else) is refused rather than silently quantized."""
    for sample, decoded in zip(samples_of(path, top_k), shard, strict=True):
        for name in FIELDS:
            if not np.array_equal(getattr(sample, name), getattr(decoded, name), equal_nan=name != "mask"):
                raise ExportError(
                    f"{path}: sample {sample.id!r}, column {name!r}: values the store's codec does not hold as "
                    "given (not a fuse export's, or edited since)"
                )
        if (sample.id, sample.text, sample.spans, sample.extra) != (
            decoded.id,
            decoded.text,
            decoded.spans,
            decoded.extra,
        ):
            raise ExportError(f"{path}: sample {sample.id!r}: id, text, spans or extra changed on the way")


def import_export(folder: str | Path, cache: Any) -> tuple[dict[str, Any], Path, bool]:
    """The dataset at `folder` as the cache entry of the instance it was exported from (stage, fingerprint); the
    metadata, the entry folder, and False when the cache holds that fingerprint already (left as it is)."""
    meta, files = read_export(folder)
    record = {
        "instance": meta["instance"],
        "inputs": meta.get("inputs") or {},
        "parts": meta.get("parts"),
        "made_in": f"fuse import {Path(folder).resolve()}",
    }
    added = cache.add(meta["stage"], meta["fingerprint"], lambda out: write_store(meta, files, out), record)
    return meta, cache.entry(meta["stage"], meta["fingerprint"]), added


# --------------------------------------------------------------------------------------------- a recipe's view


def recipe_match(meta: dict[str, Any], recipe: Any) -> list[str]:
    """Why `recipe` would not restore the imported instance (empty: it will, or its parents are not done yet):
    no such instance, another fingerprint (which parts differ), or parents that wrote other outputs."""
    from fuse.dag import build_dag
    from fuse.plan import fingerprints
    from fuse.store import describe_change

    dag = build_dag(recipe)
    name = meta["instance"]
    if name not in dag.instances:
        same = sorted(n for n in dag.instances if n.startswith(f"{meta['stage']}."))
        return [
            f"the recipe has no instance {name} (its {meta['stage']} instances: {', '.join(same) or 'none'})"
        ]
    fingerprint, parts = fingerprints(recipe, dag)[name]
    if fingerprint != meta["fingerprint"]:
        return [
            f"its {name} has fingerprint {fingerprint}: {describe_change(meta.get('parts') or {}, parts)}"
        ]
    now = parents_now(meta, recipe)
    wanted = meta.get("inputs") or {}
    return [
        f"{parent} in {recipe.workdir} wrote other outputs ({digest}) than the store was extracted from "
        f"({wanted.get(parent)})"
        for parent, digest in now.items()
        if digest is not None and digest != wanted.get(parent)
    ]


def parents_now(meta: dict[str, Any], recipe: Any) -> dict[str, str | None]:
    """The outputs digest of each parent of the imported instance in the recipe's run store (None: not done)."""
    from fuse.dag import build_dag
    from fuse.store import RunStore

    return RunStore(recipe.workdir).inputs_of(build_dag(recipe)[meta["instance"]].parents)


# --------------------------------------------------------------------------------------------- CLI


def cmd_export(args: argparse.Namespace) -> int:
    meta = export_store(args.store, args.out)
    print(
        f"{meta['instance']}: {meta['num_samples']} samples, {meta['num_tokens']} tokens, top-{meta['top_k']} "
        f"-> {args.out} ({len(meta['shards'])} parquet files; load_dataset('parquet', "
        f"data_files='{Path(args.out) / DATA}/*.parquet'))"
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from fuse.cache import ArtifactCache, cache_root
    from fuse.cli import recipe_of
    from fuse.recipe import RecipeError

    recipe = recipe_of(args) if args.recipe else None
    root = Path(args.cache) if args.cache else cache_root(recipe)
    if root is None:
        raise RecipeError(
            "fuse import: name the cache (--cache DIR), or a recipe with `cache:` (or $FUSE_ARTIFACT_CACHE set)"
        )
    if recipe is not None:
        meta, _ = read_export(args.dataset)
        problems = recipe_match(meta, recipe)
        if problems:
            raise ExportError(
                f"{args.dataset}: {args.recipe} would not use this store: {'; '.join(problems)} "
                "(import it with --cache alone to keep it anyway)"
            )
    meta, entry, added = import_export(args.dataset, ArtifactCache(root))
    state = "imported as" if added else "already in the cache:"
    print(f"{meta['instance']} ({meta['num_samples']} samples) {state} {entry}")
    if recipe is not None:
        pending = [parent for parent, digest in parents_now(meta, recipe).items() if digest is None]
        when = f", once its {', '.join(pending)} has run on the exporter's data" if pending else ""
        print(f"`fuse run {args.recipe}` restores {meta['instance']} from it instead of extracting{when}")
    return 0


def add_parser(sub: Any) -> None:
    from fuse.cli import add_set_option

    p = sub.add_parser(
        "export",
        help="an extract's teacher log-probs as a parquet dataset (datasets.load_dataset reads it; no fuse needed)",
    )
    p.add_argument("store", help="a done instance folder (<workdir>/extract.NAME) or a cache entry folder")
    p.add_argument("out", help="the dataset folder to write (new)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser(
        "import",
        help="a `fuse export` dataset into the shared cache as its extract instance: runs restore it, not extract",
    )
    p.add_argument("dataset", help="the exported folder")
    p.add_argument("recipe", nargs="?", help="check this recipe restores it; its cache is the default")
    p.add_argument(
        "--cache", help="the cache folder (default: the recipe's `cache:` or $FUSE_ARTIFACT_CACHE)"
    )
    add_set_option(p)
    p.set_defaults(handler=cmd_import)
