"""stages/align.py end to end on two locally trained tokenizers and hand-made extract stores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fuse.context import StageContext
from fuse.dag import build_dag

CONVERSATIONS = [
    [
        {"role": "user", "content": f"What is {i} plus {i + 2}? Answer in words, café."},
        {"role": "assistant", "content": f"The answer is {2 * i + 2}, naïvely computed. 😀"},
    ]
    for i in range(6)
]


def model_folder(root, name, tokenizer):
    folder = root / name
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": len(tokenizer)}))
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    return folder


def extract_store(path, tokenizer, k, rng, shards=2):
    from fuse.data.chat import render_chat
    from fuse.data.logprobs import SampleLogprobs, write_index, write_shard

    samples = []
    for i, messages in enumerate(CONVERSATIONS):
        chat = render_chat(tokenizer, messages)
        rows = chat.num_tokens - 1
        ids = np.array([rng.choice(len(tokenizer), k, replace=False) for _ in range(rows)])
        ids[:, 0] = chat.input_ids[1:]  # the realized token leads, as a trained teacher's would
        lps = np.log(np.sort(rng.dirichlet(np.ones(k), rows), axis=1)[:, ::-1])
        samples.append(
            SampleLogprobs(
                f"s{i}",
                chat.text,
                chat.spans,
                chat.input_ids,
                chat.offsets,
                chat.mask,
                ids,
                lps.astype(np.float32),
                lps[:, 0].astype(np.float32),
            )
        )
    for shard in range(shards):
        write_shard(path / f"shard-{shard:05d}", samples[shard::shards], k, len(tokenizer))
    write_index(path)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    from fuse.recipe import parse_recipe
    from fuse.stages import align as stage
    from fuse.zoo.vocab import CHATML, LLAMA_INST, VocabSpec, train_tokenizer

    texts = [m["content"] for c in CONVERSATIONS for m in c] * 20
    pivot_tok = train_tokenizer(
        texts,
        VocabSpec(
            "bytelevel_bpe",
            330,
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            {"eos": "<|endoftext|>"},
            CHATML,
        ),
    )
    source_tok = train_tokenizer(
        texts,
        VocabSpec(
            "metaspace_bpe",
            340,
            ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
            {"unk": "<unk>", "bos": "<s>", "eos": "</s>"},
            LLAMA_INST,
        ),
    )
    root = tmp_path_factory.mktemp("align")
    (root / "sft.jsonl").write_text("{}\n")
    recipe = parse_recipe(
        {
            "name": "a",
            "workdir": str(root / "run"),
            "pivot": {"path": str(model_folder(root, "pivot", pivot_tok))},
            "sources": [{"name": "src", "path": str(model_folder(root, "src", source_tok))}],
            "data": {"sft": {"path": str(root / "sft.jsonl")}},
            # the model folders hold tokenizers only: nothing to score candidates with (tests/test_candidates.py)
            "stages": {"fpo": {"enabled": False}, "align": {"score_candidates": False}},
        }
    )
    rng = np.random.default_rng(0)
    inputs = {"extract.pivot": root / "pivot_store", "extract.src": root / "src_store"}
    extract_store(inputs["extract.pivot"], pivot_tok, 4, rng)
    extract_store(inputs["extract.src"], source_tok, 5, rng, shards=1)
    ctx = StageContext(recipe, build_dag(recipe)["align.src"], root / "run" / "align.src", inputs)
    ctx.out.mkdir(parents=True)
    stage.run(ctx)
    return ctx, inputs


def test_projected_store_is_in_the_pivot_vocab_and_format(aligned):
    from fuse.data.logprobs import LogprobReader

    ctx, inputs = aligned
    out, pivot = LogprobReader(ctx.out), LogprobReader(inputs["extract.pivot"])
    # wide enough for the larger teacher's top-K plus one (candidate completion may add the gold)
    assert out.ids == pivot.ids and out.vocab_size == pivot.vocab_size and out.top_k == 6
    assert [p.name for p in out.shard_paths] == ["shard-00000", "shard-00001"]
    for sample in out:
        original = pivot.get(sample.id)
        assert (sample.input_ids == original.input_ids).all() and (sample.mask == original.mask).all()
        probs = np.exp(sample.topk_logprobs.astype(np.float64)).sum(axis=1)
        # the teacher's own mass (≤ 1; the rest is the loss's tail bucket); codec error <= 0.01 per entry
        single = sample.topk_logprobs[:, 1] == -np.inf
        assert (probs <= 1.05).all() and (probs[~single] > 0.5).all()
        # one-hot and chunk rows (one id: the gold with its whole-token likelihood) sit on the NEXT token (row t
        # predicts token t+1)
        assert (sample.topk_ids[single, 0] == sample.input_ids[1:][single]).all()


def test_report_counts_cases_and_vocab_map(aligned):
    ctx, _ = aligned
    report = json.loads((ctx.out / "report.json").read_text())
    assert report["samples"] == len(CONVERSATIONS) and report["samples_missing_in_source"] == 0
    shares = report["response_cause_shares"]
    assert sum(shares.values()) == pytest.approx(1.0) and shares["1:1"] > 0.3
    assert sum(report["response_signal_shares"].values()) == pytest.approx(1.0)
    assert report["positions"]["template"]["one_hot"] > 0 and report["positions"]["1:1"]["projected"] > 0
    # every response row is counted once, by cause and signal, and word starts are a subset
    response = report["response_positions"]
    assert (
        sum(sum(r[s] for s in ("projected", "chunk", "pivot_own", "one_hot")) for r in response.values()) > 0
    )
    for cause, row in report["word_start_positions"].items():
        assert all(n <= response[cause][signal] for signal, n in row.items())
    assert "| split |" in (ctx.out / "report.md").read_text() or response["split"]["chunk"] == 0
    assert report["vocab_map_coverage"]["exact"] > 0.5 and 0 < report["topk_mass_kept"]["mean"] <= 1
    vocab_map = np.load(ctx.out / "vocab_map.npz")
    assert vocab_map["target"].shape == vocab_map["method"].shape
    assert (ctx.out / "report.md").read_text().startswith("# Alignment report: align.src")


def test_end_of_turn_is_mapped_and_projected_by_role(aligned):
    """The source ends turns with `</s>`, the pivot with `<|im_end|>` (its EOS is `<|endoftext|>`): the source's
    end token maps to the pivot's end-of-turn token, and the step predicting it is projected, not a fallback."""
    from fuse.alignment.vocab import ROLE
    from fuse.data.logprobs import LogprobReader

    ctx, inputs = aligned
    report = json.loads((ctx.out / "report.json").read_text())
    assert report["end_of_turn"] == {"pivot": "<|im_end|>", "source": "</s>"}
    pivot = LogprobReader(inputs["extract.pivot"])
    source = LogprobReader(inputs["extract.src"])
    pivot_tok, source_tok = (load_tokenizer_at(ctx, name) for name in ("pivot", "src"))
    im_end, eos = pivot_tok.convert_tokens_to_ids("<|im_end|>"), source_tok.convert_tokens_to_ids("</s>")
    vocab_map = np.load(ctx.out / "vocab_map.npz")
    assert vocab_map["target"][eos] == im_end and vocab_map["method"][eos] == ROLE
    out = LogprobReader(ctx.out)
    projected_ends = 0
    for sample in out:
        original, own = pivot.get(sample.id), source.get(sample.id)
        end_rows = np.flatnonzero(original.input_ids[1:] == im_end)
        assistant_end = end_rows[-1]  # the last turn is the assistant's
        # projected: the source's distribution (its realized `</s>` leads with prob < 1), not a one-hot fallback
        assert sample.topk_ids[assistant_end, 0] == im_end
        assert sample.topk_logprobs[assistant_end, 1] > -np.inf
        own_end = np.flatnonzero(own.input_ids[1:] == eos)[-1]
        assert sample.topk_logprobs[assistant_end, 0] == pytest.approx(
            own.topk_logprobs[own_end, 0], abs=0.02
        )
        projected_ends += 1
    assert projected_ends == len(CONVERSATIONS)


def load_tokenizer_at(ctx, name):
    from fuse.models import load_tokenizer

    return load_tokenizer(ctx.model_spec(name))


def test_teacher_signal_report(aligned):
    ctx, _ = aligned
    report = json.loads((ctx.out / "report.json").read_text())
    signal = report["teacher_signal"]
    assert signal["projected_response_rows"] > 0
    # both hand-made stores put the realized token first: the pivot's top-1 is always gold, the projected
    # source's is gold wherever the vocabulary map sends its top-1 to the same token
    assert signal["pivot_top1_is_gold"] == 1.0 and 0.5 < signal["source_top1_is_gold"] <= 1.0
    assert 0 < signal["source_mean_p_gold"] <= 1 and 0 < signal["pivot_mean_p_gold"] <= 1
    wins = signal["fusion_weights"]["min_ce"]
    assert wins["pivot"] + wins["source"] == pytest.approx(1.0)
    assert set(signal["fusion_weights"]) >= {"min_ce", "avg_ce"}
    # the stores' other top-K ids are random draws over the vocabulary, mostly ids no sample uses; their
    # realized token (top-1) is always used
    unused = signal["mass_on_unemitted_pivot_tokens"]
    assert set(unused) == {"source", "pivot"} and all(0.0 < v < 1.0 for v in unused.values())
    assert isinstance(report["warnings"], list)
    assert "## Teacher signal" in (ctx.out / "report.md").read_text()


def test_role_entries_override_a_same_named_special_token():
    """gpt2's `<|endoftext|>` has the same bytes as Qwen's document end; by role it is the end of the turn."""
    from fuse.alignment.pieces import VocabPieces
    from fuse.alignment.vocab import EXACT, ROLE, build_vocab_map

    special = np.array([True, True, False])
    pivot = VocabPieces.from_pieces([b"<|endoftext|>", b"<|im_end|>", b"a"], special, np.zeros(3, bool))
    source = VocabPieces.from_pieces([b"<|endoftext|>", b"a"], np.array([True, False]), np.zeros(2, bool))
    by_name = build_vocab_map(source, pivot, methods=("exact",))
    assert by_name.target[0] == 0 and by_name.method[0] == EXACT
    by_role = build_vocab_map(source, pivot, methods=("exact",), roles={0: 1})
    assert by_role.target.tolist() == [1, 2] and by_role.method[0] == ROLE


def test_the_model_card_shows_each_sources_teacher_signal(aligned):
    from fuse.stages.publish import teacher_signal_section

    ctx, _ = aligned
    report = json.loads((ctx.out / "report.json").read_text())
    section = teacher_signal_section({"src": report})
    row = next(line for line in section.splitlines() if line.startswith("| src |"))
    signal = report["teacher_signal"]
    assert f"{signal['source_top1_is_gold']:.2f} / {signal['pivot_top1_is_gold']:.2f}" in row
    assert row.rstrip().endswith(f"{'; '.join(report['warnings']) or 'none'} |")
    assert teacher_signal_section({}) == "No alignment reports."
