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
    log = (tmp_path / "run/extract.q/logs/stage.log").read_text()
    assert "extract.q shard 0: " in log and " tokens/s, elapsed " in log and ", ETA " in log  # per batch
    peaks = json.loads((tmp_path / "run/extract.q/manifest.json").read_text())["peak_memory"]
    assert peaks["shards_measured"] == 3 and peaks["host_rss_peak_mb"] > 50


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
    header = json.loads((out / "out/shard-00000/header.json").read_text())
    assert header["meta"]["dtype"] == "float32"  # what the model ran in, recorded beside the backend
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


# --------------------------------------------------------------------------------------------- the chunked head

# (architecture, vocab, config extras): untied / tied / padded vocabularies and every post-processing after lm_head
# that the chunked head reproduces (Gemma-2/3 softcapping, Cohere scale, Granite divisor).
HEADS = [
    ("llama", 1000, {}),
    ("qwen2", 1536, {"tie_word_embeddings": True}),  # tied, and padded: ids drawn below 1000 only
    ("gemma2", 777, {"final_logit_softcapping": 5.0}),
    ("gemma3_text", 1024, {"final_logit_softcapping": 5.0}),
    ("gpt2", 999, {}),
    ("cohere", 512, {"logit_scale": 3.0}),
    ("granite", 512, {"logits_scaling": 0.25}),
]


def tiny_model(arch: str, vocab: int, **extra):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    sizes |= {"num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 256}
    if arch == "gpt2":
        sizes = {
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 2,
            "n_positions": 256,
            "bos_token_id": 0,
            "eos_token_id": 0,
        }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=vocab, **sizes, **extra))
    with torch.no_grad():  # logits large enough that a missing softcap or scale would show
        model.get_output_embeddings().weight.mul_(20.0)
    return model.eval()


def full_forward(model, sequences, top_k):
    """Today's computation: one unbatched forward per sequence, the full log-softmax."""
    import torch

    out = []
    for seq in sequences:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.as_tensor(seq)[None]).logits[0, :-1].float(), -1)
        top = lp.topk(top_k)
        out.append((top.indices.numpy(), top.values.numpy(), lp[torch.arange(len(seq) - 1), seq[1:]].numpy()))
    return out


def head_rows_seen(model):
    """Record how many positions each call of the output head gets."""
    seen = []
    model.get_output_embeddings().register_forward_hook(
        lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1]).shape[0])
    )
    return seen


@pytest.mark.parametrize("arch,vocab,extra", HEADS, ids=[h[0] for h in HEADS])
def test_chunked_head_equals_the_full_forward(arch, vocab, extra):
    from fuse.backends.hf import output_head

    model = tiny_model(arch, vocab, **extra)
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, min(vocab, 1000), n) for n in (40, 17, 2, 33, 64)]
    seen = head_rows_seen(model)
    backend = TransformersBackend(model, batch_tokens=128, name=arch, head_chunk_tokens=7)
    got = backend.logprobs(sequences, 5)
    assert output_head(model) is not None  # reproduced, not the full-forward fallback
    assert max(seen[2:]) <= 7  # after the probe (full forward + head, 16 positions): a chunk at a time
    for result, (ids, values, target) in zip(got, full_forward(model, sequences, 5), strict=True):
        assert np.abs(result.topk_logprobs - values).max() < 2e-5
        assert np.abs(result.target_logprobs - target).max() < 2e-5
        distinct = np.diff(values, axis=1).min(axis=1) < -1e-4  # rows without near-ties: same ids, same order
        np.testing.assert_array_equal(result.topk_ids[distinct], ids[distinct])


def test_unknown_post_processing_falls_back_to_the_full_forward():
    import torch
    from transformers import LlamaForCausalLM

    from fuse.backends.hf import output_head

    class Shifted(LlamaForCausalLM):  # an architecture that does something after lm_head we do not know about
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 1.5 + torch.linspace(0, 3, out.logits.shape[-1])
            return out

    base = tiny_model("llama", 300)
    model = Shifted(base.config).eval()
    model.load_state_dict(base.state_dict())
    sequences = [np.arange(3, 30), np.arange(50, 60)]
    got = TransformersBackend(model, 64, head_chunk_tokens=4).logprobs(sequences, 4)
    assert output_head(model) is None
    for result, (_, values, target) in zip(got, full_forward(model, sequences, 4), strict=True):
        assert np.abs(result.topk_logprobs - values).max() < 2e-5
        assert np.abs(result.target_logprobs - target).max() < 2e-5


def test_evaluate_ce_goes_through_the_chunked_head():
    import torch

    from fuse.backends.hf import summed_nll

    model = tiny_model("gemma3_text", 1024, final_logit_softcapping=5.0)
    sequences = [list(range(5, 45)), list(range(100, 112)), [7, 8]]
    seen = head_rows_seen(model)
    nll = summed_nll(model, sequences, chunk=8)
    assert max(seen[2:]) <= 8
    reference = sum(-float(t.sum()) for _, _, t in full_forward(model, [np.array(s) for s in sequences], 1))
    assert nll == pytest.approx(reference, rel=1e-5)
    del torch


def test_progress_line_reads_in_plain_logs():
    from fuse.backends import Progress

    progress = Progress("extract.x shard 0", 10, "rows")
    progress.start -= 10.0  # as if 10 s went by
    progress.update(4, 2000)
    line = progress.line()
    assert line.startswith("extract.x shard 0: 4/10 rows (40.0%), 2000 tokens, ") and "tokens/s" in line
    assert line.endswith("ETA 0:15")  # 6 rows left at 0.4 rows/s


SHARED_PREFIX = [
    *HEADS,
    # sliding-window layers (every other one) whose window the later boundaries pass
    ("gemma3_text", 1024, {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}),
    ("qwen2", 1536, {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
    ("llama", 1000, {"_attn_implementation": "eager"}),
]


@pytest.mark.parametrize(
    "arch,vocab,extra", SHARED_PREFIX, ids=[f"{h[0]}-{i}" for i, h in enumerate(SHARED_PREFIX)]
)
def test_shared_prefix_scoring_equals_one_forward_per_continuation(arch, vocab, extra):
    """Candidate scoring's packed forward (every boundary's continuations after one prefix, each under its own
    mask and positions) against the brute force: each prefix + continuation run alone, its tokens' log-probs
    summed. Multi-token continuations, single-token ones, boundaries past a sliding window, and parts split
    between forwards (packed_tokens 5)."""
    import torch

    from fuse.backends.hf import shared_prefix_logprobs

    model = tiny_model(arch, vocab, **extra)
    rng = np.random.default_rng(1)
    top = min(vocab, 1000)
    sequence = rng.integers(0, top, 40).tolist()
    asks = [
        (b, [rng.integers(0, top, n).tolist() for n in (1, 3, 2, 1)] + [sequence[b : b + 2]])
        for b in (1, 5, 17, 30, 39)
    ]

    def alone(prefix: list[int], continuation: list[int]) -> float:
        with torch.no_grad():
            logits = model(torch.tensor([prefix + continuation])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        return float(sum(logp[len(prefix) - 1 + t, tok] for t, tok in enumerate(continuation)))

    for packed in (1024, 5):
        got = shared_prefix_logprobs(model, sequence, asks, packed_tokens=packed)
        for (b, continuations), scores in zip(asks, got, strict=True):
            want = [alone(sequence[:b], c) for c in continuations]
            np.testing.assert_allclose(scores, want, atol=2e-4, err_msg=f"boundary {b}, packed {packed}")
