"""The score stage: per-pair sums of response log-probs equal a direct computation; a trained target's folder
is found through its parent."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from fuse.context import StageContext
from fuse.dag import build_dag
from fuse.data.scores import COLUMNS, load_table
from fuse.executor import run
from fuse.recipe import parse_recipe
from fuse.stages import score

from recipes import write_jsonl
from tiny_lm import corpus, shared_models

OFF = {s: {"enabled": False} for s in ("evaluate", "publish", "merge")}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_models(tmp_path_factory)


def pairs(n: int = 10) -> list[dict]:
    texts = corpus(3 * n, seed=5)
    return [
        {"prompt": texts[3 * i], "chosen": texts[3 * i + 1] + " ü", "rejected": texts[3 * i + 2]}
        for i in range(n)
    ]


def score_recipe(tmp_path, models, heldout_fraction: float = 0.0, max_length: int = 2048):
    sft = write_jsonl(
        tmp_path / "sft.jsonl",
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
    )
    pref = write_jsonl(tmp_path / "pref.jsonl", pairs())
    return parse_recipe(
        {
            "name": "sc",
            "workdir": str(tmp_path / "run"),
            "pivot": {"path": str(models["llama"])},
            "sources": [{"name": "q", "path": str(models["qwen2"])}],
            "data": {
                "sft": {"path": str(sft)},
                "preference": {"path": str(pref), "format": "preference"},
                "heldout_fraction": heldout_fraction,
            },
            "stages": {
                **OFF,
                "score": {"num_shards": 2, "batch_tokens": 256, "max_length": max_length},
                "fpo": {"max_length": max_length},
            },
        }
    )


def direct_sum(model_dir, prompt: str, response: str) -> tuple[float, int]:
    """Reference: one unbatched forward; tokens overlapping the response's characters plus the next one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    start = text.rindex(response)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    inside = [
        i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < start + len(response) and b > start
    ]
    positions = [*inside, inside[-1] + 1]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return float(sum(lp[t - 1, ids[t]] for t in positions)), len(positions)


def test_score_sums_equal_a_direct_computation(tmp_path, models):
    recipe = score_recipe(tmp_path, models)
    run(recipe, only=["prepare", "score.q"], echo=lambda _: None)
    out = tmp_path / "run/score.q/out"
    table = load_table(out).to_pylist()
    assert len(table) == 10 and sorted(p.name for p in out.glob("scores-*.parquet")) == [
        "scores-00000.parquet",
        "scores-00001.parquet",
    ]
    assert pq.read_table(out / "scores-00000.parquet").column_names == list(COLUMNS)
    from fuse.data.prepared import load_split

    rows = {r["id"]: r for r in load_split(tmp_path / "run/prepare/out", "preference", "train")}
    for record in table[::3]:
        row = rows[record["id"]]
        for side in ("chosen", "rejected"):
            logp, tokens = direct_sum(models["qwen2"], row["prompt"][0]["content"], row[side])
            assert record[f"{side}_logp"] == pytest.approx(logp, abs=1e-3)
            assert record[f"{side}_tokens"] == tokens
            assert record[f"{side}_bytes"] == len(row[side].encode("utf-8"))
        assert record["chosen_logp"] != record["rejected_logp"]


def test_target_model_comes_from_the_parent_folder(tmp_path, models):
    recipe = score_recipe(tmp_path, models)
    run(recipe, only=["prepare"], echo=lambda _: None)
    instance = build_dag(recipe)["score.target-q"]
    parent = tmp_path / "distill-out"
    shutil.copytree(models["qwen2"], parent / "model")  # stands in for the distilled target
    ctx = StageContext(
        recipe,
        instance,
        tmp_path / "run/score.target-q",
        {"prepare": tmp_path / "run/prepare/out", "distill.q": parent},
    )
    assert score.scored_spec(ctx).path == str(parent / "model")
    ctx.out.mkdir(parents=True)
    for shard in range(instance.num_shards):
        ctx.shard = shard
        score.run(ctx)
    ctx.shard = None
    score.finalize(ctx)
    target = load_table(ctx.out).to_pylist()
    run(recipe, only=["score.q"], echo=lambda _: None)
    source = load_table(tmp_path / "run/score.q/out").to_pylist()
    assert np.allclose([r["chosen_logp"] for r in target], [r["chosen_logp"] for r in source])


def test_heldout_pairs_are_scored_and_truncated_sides_flagged(tmp_path, models):
    """fpo's held-out metrics need the held-out pairs' scores (the fused reference), and a side the model's
    tokenizer made longer than max_length is flagged, its bytes those of the scored prefix, not the whole text."""
    from fuse.data.prepared import load_split

    recipe = score_recipe(tmp_path, models, heldout_fraction=0.4, max_length=40)
    run(recipe, only=["prepare", "score.q"], echo=lambda _: None)
    prepared = tmp_path / "run/prepare/out"
    rows = {r["id"]: r for split in ("train", "heldout") for r in load_split(prepared, "preference", split)}
    heldout = {r["id"] for r in load_split(prepared, "preference", "heldout")}
    table = load_table(tmp_path / "run/score.q/out").to_pylist()
    assert heldout and heldout <= {r["id"] for r in table} and len(table) == len(rows)
    flagged = [(r, side) for r in table for side in ("chosen", "rejected") if r[f"{side}_truncated"]]
    assert flagged, "max_length 40 must truncate some responses"
    for record, side in flagged:  # (the cut may fall after the content, before the end-of-turn token)
        assert 0 <= record[f"{side}_bytes"] <= len(rows[record["id"]][side].encode())
    assert any(r[f"{s}_bytes"] < len(rows[r["id"]][s].encode()) for r, s in flagged)
    whole = [(r, s) for r in table for s in ("chosen", "rejected") if not r[f"{s}_truncated"]]
    assert all(r[f"{s}_bytes"] == len(rows[r["id"]][s].encode()) for r, s in whole)


def test_a_pair_scored_packed_equals_its_sides_scored_apart(tmp_path, models):
    """The transformers backend scores a pair in one packed forward (pair_sums); a backend without it (vLLM) scores
    the two sides as full sequences: the same records, to float rounding."""
    from collections import Counter

    from fuse.backends.hf import TransformersBackend
    from fuse.models import load_model, load_tokenizer
    from fuse.recipe import ModelSpec

    spec = ModelSpec(name="q", path=str(models["qwen2"]))
    tokenizer = load_tokenizer(spec)
    backend = TransformersBackend(load_model(spec, dtype="float32"))

    class Apart:  # the backend's sequence path only
        logprobs = staticmethod(backend.logprobs)

    rows = [
        {**p, "id": f"p{i}", "prompt": [{"role": "user", "content": p["prompt"]}]}
        for i, p in enumerate(pairs(6))
    ]
    batches: list[int] = []
    backend.on_batch = lambda sequences, tokens: batches.append(sequences)
    packed = score.score_rows(backend, tokenizer, rows, 2048, Counter())
    assert batches == []  # every pair went through pair_sums, none through the sequence path
    apart = score.score_rows(Apart(), tokenizer, rows, 2048, Counter())
    assert [r["id"] for r in packed] == [r["id"] for r in apart] and len(packed) == 6
    for a, b in zip(packed, apart, strict=True):
        for side in ("chosen", "rejected"):
            assert a[f"{side}_logp"] == pytest.approx(b[f"{side}_logp"], abs=1e-4)
            assert a[f"{side}_tokens"] == b[f"{side}_tokens"]
