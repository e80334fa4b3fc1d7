"""The extract stage on tiny real models: outputs equal a direct forward pass, sharding, resume after an
interruption, the pivot-template option, overlength truncate/skip, and the bad-input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fuse.backends import BackendError
from fuse.backends.hf import TransformersBackend, length_batches
from fuse.data.chat import render_chat
from fuse.data.logprobs import MAX_ERROR, LogprobReader
from fuse.executor import StageFailed, run
from fuse.recipe import parse_recipe

from recipes import write_jsonl
from tiny_lm import conversations, shared_models

OFF = {s: {"enabled": False} for s in ("align", "distill", "fpo", "merge", "evaluate", "publish", "score")}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_models(tmp_path_factory)


def extract_recipe(tmp_path, models, **extract):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": r["messages"]} for r in conversations(24)])
    return parse_recipe(
        {
            "name": "ex",
            "workdir": str(tmp_path / "run"),
            "pivot": {"path": str(models["llama"])},
            "sources": [{"name": "q", "path": str(models["qwen2"])}],
            "data": {"sft": {"path": str(data)}, "heldout_fraction": 0.0},
            "stages": {**OFF, "extract": {"num_shards": 3, "top_k": 5, "batch_tokens": 512, **extract}},
        }
    )


def run_extract(recipe, model="q"):
    run(recipe, only=["prepare", f"extract.{model}"], echo=lambda _: None)
    return LogprobReader(recipe.workdir + f"/extract.{model}/out")


def direct(model_dir, messages, template=None):
    """The reference: the rendered text through an unbatched forward pass, full log-softmax."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    chat = render_chat(tokenizer, messages, template)
    with torch.no_grad():
        logits = model(torch.as_tensor(chat.input_ids)[None]).logits[0, :-1]
    return chat, torch.log_softmax(logits, -1).numpy()


def test_extract_matches_a_direct_forward(tmp_path, models):
    reader = run_extract(extract_recipe(tmp_path, models))
    assert len(reader) == 24 and len(reader.shard_paths) == 3 and reader.top_k == 5
    report = json.loads((tmp_path / "run/extract.q/out/report.json").read_text())
    assert report["samples"] == 24 and report["counts"]["rows"] == 24
    rows = {r["id"]: r for r in _prepared_rows(tmp_path)}
    for sample in list(reader)[::5]:
        chat, lp = direct(models["qwen2"], rows[sample.id]["messages"])
        np.testing.assert_array_equal(sample.input_ids, chat.input_ids)
        np.testing.assert_array_equal(sample.mask, chat.mask)
        assert sample.text == chat.text and sample.spans == chat.spans
        top = np.take_along_axis(lp, sample.topk_ids, 1)
        assert np.abs(top - sample.topk_logprobs).max() <= MAX_ERROR
        assert np.abs(np.sort(lp, 1)[:, ::-1][:, :5] - sample.topk_logprobs).max() <= MAX_ERROR
        realized = lp[np.arange(len(lp)), chat.input_ids[1:]]
        assert np.abs(realized - sample.target_logprobs).max() <= MAX_ERROR


def _prepared_rows(tmp_path):
    from fuse.data.prepared import load_split

    return list(load_split(tmp_path / "run/prepare/out", "sft", "train"))


def test_resume_after_interruption_is_identical(tmp_path, models, monkeypatch):
    reference = run_extract(extract_recipe(tmp_path / "a", models))
    calls = []
    original = TransformersBackend.logprobs

    def interrupted(self, sequences, top_k):
        calls.append(len(sequences))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed in the middle of shard 1
        return original(self, sequences, top_k)

    monkeypatch.setattr(TransformersBackend, "logprobs", interrupted)
    recipe = extract_recipe(tmp_path / "b", models)
    with pytest.raises(KeyboardInterrupt):
        run_extract(recipe)
    out = tmp_path / "b/run/extract.q"
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000.done"]
    assert not (out / "out/shard-00001").exists()
    first_shard_written = (out / "out/shard-00000/header.json").stat().st_mtime_ns
    calls.clear()

    def counted(self, sequences, top_k):
        calls.append(len(sequences))
        return original(self, sequences, top_k)

    monkeypatch.setattr(TransformersBackend, "logprobs", counted)
    resumed = run_extract(recipe)
    assert len(calls) == 2  # only shards 1 and 2 ran again
    assert (out / "out/shard-00000/header.json").stat().st_mtime_ns == first_shard_written
    for a, b in zip(reference.shards(), resumed.shards(), strict=True):
        assert a.header["files"] == b.header["files"]  # byte-identical (sha256 of every array)


def test_pivot_template_and_overlength(tmp_path, models):
    reader = run_extract(extract_recipe(tmp_path, models, template="pivot", max_length=24, overlength="skip"))
    report = json.loads((tmp_path / "run/extract.q/out/report.json").read_text())
    skipped = report["counts"]["skipped: longer than max_length"]
    assert 0 < skipped < 24 and len(reader) == 24 - skipped
    assert all(s.text.startswith("<s>[INST]") or s.text.startswith("<s><<SYS>>") for s in reader)
    truncated = run_extract(extract_recipe(tmp_path / "t", models, max_length=24, overlength="truncate"))
    report = json.loads((tmp_path / "t/run/extract.q/out/report.json").read_text())
    assert report["counts"]["truncated"] > 0 and len(truncated) == 24
    assert max(s.num_tokens for s in truncated) == 24
    assert sum(bool(s.extra.get("truncated")) for s in truncated) == report["counts"]["truncated"]


def test_model_without_chat_template_is_a_clear_error(tmp_path, models):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(models["qwen2"], bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    recipe = extract_recipe(tmp_path, {"llama": models["llama"], "qwen2": bare})
    with pytest.raises(StageFailed, match="no chat template"):
        run_extract(recipe)


def test_backend_refuses_k_beyond_vocab_and_overlong_sequences(models):
    from transformers import AutoModelForCausalLM

    backend = TransformersBackend(AutoModelForCausalLM.from_pretrained(models["llama"]), 256, "llama")
    with pytest.raises(BackendError, match="top_k=100000"):
        backend.logprobs([np.arange(5)], 100000)
    with pytest.raises(BackendError, match="sequence 1 has 600 tokens"):
        backend.logprobs([np.arange(5), np.zeros(600, dtype=np.int64)], 5)


def test_length_batches_respect_the_budget():
    lengths = [5, 50, 7, 48, 3, 20, 20]
    batches = length_batches(lengths, 100)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 100 or len(batch) == 1
    assert batches[0][0] == 1  # longest first
