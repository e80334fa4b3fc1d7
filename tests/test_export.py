"""`fuse export` / `fuse import` on a real extract of a tiny model: `datasets.load_dataset` reads the export and finds
exactly what the store decodes; the import rebuilds the store (the same bytes) as a cache entry that a second run
restores instead of extracting; datasets that are not such an export are refused, naming the file and column."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from fuse import export
from fuse.cache import ArtifactCache
from fuse.cli import main
from fuse.data.logprobs import LogprobReader
from fuse.executor import run
from fuse.io import read_json
from fuse.recipe import parse_recipe

from recipes import write_jsonl, write_recipe
from tiny_lm import conversations, shared_models

OFF = {s: {"enabled": False} for s in ("align", "distill", "fpo", "merge", "evaluate", "publish", "score")}
K = 5


def recipe_data(tmp, models, workdir, cache=None, **extract):
    data = write_jsonl(tmp / "sft.jsonl", [{"messages": r["messages"]} for r in conversations(12)])
    return {
        "name": "ex",
        "workdir": str(workdir),
        **({"cache": str(cache)} if cache else {}),
        "pivot": {"path": str(models["llama"])},
        "sources": [{"name": "q", "path": str(models["qwen2"])}],
        "data": {"sft": {"path": str(data)}, "heldout_fraction": 0.0},
        "stages": {**OFF, "extract": {"num_shards": 2, "top_k": K, "batch_tokens": 512, **extract}},
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One extract (2 shards), exported in row groups of a few samples (the streamed path, as at scale)."""
    tmp = tmp_path_factory.mktemp("export")
    models = shared_models(tmp_path_factory)
    recipe = recipe_data(tmp, models, tmp / "a")
    run(parse_recipe(recipe), only=["prepare", "extract.q"], echo=lambda _: None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export, "BATCH_ENTRIES", 200)
        assert main(["export", str(tmp / "a" / "extract.q"), str(tmp / "dataset")]) == 0
    return tmp, models, recipe


def fields(sample):
    return {
        "id": sample.id,
        "text": sample.text,
        "spans": [{"role": s.role, "start": s.start, "end": s.end} for s in sample.spans],
        "input_ids": sample.input_ids,
        "offsets": sample.offsets,
        "mask": sample.mask,
        "topk_ids": sample.topk_ids,
        "topk_logprobs": sample.topk_logprobs,
        "target_logprobs": sample.target_logprobs,
    }


def assert_same(expected, got):
    for name, value in expected.items():
        if isinstance(value, np.ndarray):
            array = np.asarray(got[name])
            assert array.shape == value.shape, name
            assert np.array_equal(array, value, equal_nan=value.dtype.kind == "f"), name
        else:
            assert got[name] == value, name


def test_load_dataset_reads_what_the_store_decodes(exported):
    import datasets

    tmp, _, _ = exported
    store = LogprobReader(tmp / "a" / "extract.q" / "out")
    files = sorted((tmp / "dataset" / "data").glob("*.parquet"))
    assert [f.name for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert pq.ParquetFile(files[0]).num_row_groups > 1  # streamed: bounded row groups
    data = datasets.load_dataset(
        "parquet",
        data_files=str(tmp / "dataset" / "data" / "*.parquet"),
        split="train",
        cache_dir=str(tmp / "hf"),
    ).with_format("numpy")
    assert len(data) == len(store) == 12
    assert set(data.column_names) == {*fields(store[0]), "extra"}
    for i, sample in enumerate(store):
        row = data[i]
        row["spans"] = [{k: (int(v) if k != "role" else v) for k, v in s.items()} for s in row["spans"]]
        assert_same(fields(sample), {k: (v.item() if k in ("id", "text") else v) for k, v in row.items()})
        assert row["topk_logprobs"].dtype == np.float32 and row["topk_ids"].shape[1] == K
    # the folder alone (its card names the data files), and the metadata in every file's schema
    folder = datasets.load_dataset(str(tmp / "dataset"), split="train", cache_dir=str(tmp / "hf2"))
    assert folder["id"] == store.ids
    manifest = read_json(tmp / "a" / "extract.q" / "manifest.json")
    meta = json.loads(pq.read_schema(files[1]).metadata[b"fuse"])
    assert meta["fingerprint"] == manifest["fingerprint"] and meta["top_k"] == K
    assert meta["model"]["name"] == "q" and "tokenizer.json" in meta["tokenizer"]["files"]
    assert meta["settings"]["top_k"] == K and meta["fuse_version"] and meta["shard"]["index"] == 1
    card = (tmp / "dataset" / "README.md").read_text()
    assert "configs:" in card and manifest["fingerprint"] in card and "within 0.01" in card


def test_import_rebuilds_the_store_and_a_run_restores_it(exported, tmp_path, capsys):
    tmp, models, _ = exported
    cache = tmp_path / "cache"
    second = recipe_data(tmp, models, tmp_path / "b", cache=cache)
    path = write_recipe(tmp_path, second)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export, "READ_ROWS", 3)  # batches that split row groups
        assert main(["import", str(tmp / "dataset"), str(path)]) == 0
    assert "restores extract.q from it" in capsys.readouterr().out
    manifest = read_json(tmp / "a" / "extract.q" / "manifest.json")
    entry = ArtifactCache(cache).entry("extract", manifest["fingerprint"])
    original = LogprobReader(tmp / "a" / "extract.q" / "out")
    rebuilt = LogprobReader(entry / "out")
    assert rebuilt.ids == original.ids and rebuilt.meta == original.meta
    for a, b in zip(original, rebuilt, strict=True):
        assert_same(fields(a), fields(b))
    # the same bytes as the run's store (same codec, same shards, same headers): its digest is the original's
    assert read_json(entry / "entry.json")["outputs_digest"] == manifest["outputs_digest"]

    # the entry exports as the run's store did: the same rows
    assert main(["export", str(entry), str(tmp_path / "again")]) == 0
    again = sorted((tmp_path / "again" / "data").glob("*.parquet"))
    for before, after in zip(sorted((tmp / "dataset" / "data").glob("*.parquet")), again, strict=True):
        plain = [pq.read_table(f).replace_schema_metadata(None) for f in (before, after)]
        assert plain[0].equals(plain[1])

    run(parse_recipe(second), only=["prepare", "extract.q"], echo=lambda _: None)
    restored = read_json(tmp_path / "b" / "extract.q" / "manifest.json")
    assert restored["status"] == "done" and restored["cached_from"] == str(entry)
    assert not (tmp_path / "b" / "extract.q" / "logs" / "stage.log").exists()  # nothing extracted
    assert main(["import", str(tmp / "dataset"), "--cache", str(cache)]) == 0  # again: the entry is kept
    assert "already in the cache" in capsys.readouterr().out


def test_a_recipe_that_would_not_use_it_is_told_why(exported, tmp_path, capsys):
    tmp, models, _ = exported
    other = recipe_data(tmp, models, tmp_path / "c", cache=tmp_path / "cache", top_k=K + 1)
    assert main(["import", str(tmp / "dataset"), str(write_recipe(tmp_path, other))]) == 1
    assert "settings changed: top_k" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def rewrite(source, target, change):
    """A copy of the export whose first data file went through `change(table, meta) -> (table, meta)`."""
    shutil.copytree(source, target)
    first = sorted((target / "data").glob("*.parquet"))[0]
    table = pq.read_table(first)
    meta = json.loads(table.schema.metadata[b"fuse"])
    table, meta = change(table.replace_schema_metadata(None), meta)
    if meta is not None:
        table = table.replace_schema_metadata({b"fuse": json.dumps(meta).encode()})
    pq.write_table(table, first)
    return first


def edited_logprob(table, meta):
    import pyarrow as pa

    column = table.column("topk_logprobs").to_pylist()
    column[2][1][0] += 0.003  # off the codec's grid: the store would not hold it as given
    field = table.schema.field("topk_logprobs")
    return table.set_column(
        table.schema.get_field_index(field.name), field, pa.array(column, field.type)
    ), meta


CASES = {
    "wrong K": (lambda t, m: (t, {**m, "top_k": K + 1}), f"column 'topk_ids' holds {K} entries a row"),
    "missing column": (
        lambda t, m: (t.drop_columns(["target_logprobs"]), m),
        "column 'target_logprobs' missing",
    ),
    "unknown version": (lambda t, m: (t, {**m, "version": 99}), "version 99; this fuse reads version(s) 1"),
    "not an export": (lambda t, m: (t, None), "no fuse metadata"),
    "edited values": (edited_logprob, "column 'topk_logprobs': values the store's codec does not hold"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_dataset_that_is_not_an_export_is_refused(exported, tmp_path, capsys, case):
    tmp, _, _ = exported
    change, message = CASES[case]
    first = rewrite(tmp / "dataset", tmp_path / "dataset", change)
    assert main(["import", str(tmp_path / "dataset"), "--cache", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    assert f"{first}: " in err and message in err, err
    assert not list((tmp_path / "cache").glob("extract/*"))  # nothing half-made is left in the cache


def test_export_refuses_what_is_not_a_finished_store(exported, tmp_path, capsys):
    tmp, _, _ = exported
    assert main(["export", str(tmp / "a" / "prepare"), str(tmp_path / "x")]) == 1
    assert "fuse exports extract" in capsys.readouterr().err
    assert main(["export", str(tmp / "a" / "extract.q"), str(tmp / "dataset")]) == 1  # never over an export
    assert "not an empty folder" in capsys.readouterr().err
