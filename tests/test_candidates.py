"""Candidate scoring (stages/align.py's CandidateScorer, alignment/candidates.py): on the zoo's pivot and Llama
source, every scored candidate equals the source model's own log-likelihood of that text computed directly, the
gold's score equals the extract's, and the exclusive probabilities against a brute-force prefix tree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fuse.alignment.candidates import candidate_ids, exclusive, extensions, spellable
from fuse.alignment.pieces import VocabPieces, vocab_pieces
from fuse.alignment.project import completion_matrix
from fuse.alignment.vocab import build_vocab_map


def test_exclusive_subtracts_the_nearest_longer_candidates():
    vocab = VocabPieces.from_pieces([b" d", b" dun", b" dundel", b" dunmur", b" dundelx", b" x"])
    ids = np.array([0, 1, 2, 3, 4, 5])
    probs = np.array([0.9, 0.7, 0.4, 0.2, 0.05, 0.1])
    got = exclusive(ids, probs, vocab)
    # " d" ⊃ " dun" ⊃ {" dundel" ⊃ " dundelx", " dunmur"}; " x" stands alone
    want = [0.9 - 0.7, 0.7 - 0.4 - 0.2, 0.4 - 0.05, 0.2, 0.05, 0.1]
    assert got == pytest.approx(want)
    assert exclusive(np.array([1, 2]), np.array([0.3, 0.5]), vocab).tolist() == [0.0, 0.5]  # clamped at 0


def test_extensions_name_the_most_emitted_words_a_prefix_begins():
    vocab = VocabPieces.from_pieces(
        [b" hal", b" halkel", b" halmur", b" h", b" x", b"<s>"], special=[0] * 5 + [1]
    )
    emitted = np.array([0, 5, 9, 0, 3, 7])
    assert extensions(vocab, emitted) == {0: [2, 1], 3: [2, 1]}  # most emitted first
    assert extensions(vocab, emitted, per_token=1)[0] == [2]
    completion = completion_matrix(np.zeros((1, 6)))
    got = candidate_ids(
        4,
        np.array([0]),
        np.array([-1]),
        np.array([0.0]),
        completion,
        np.array([-1]),
        spellable(vocab),
        10,
        extensions(vocab, emitted),
    )
    assert got.tolist() == [
        4,
        0,
        2,
        1,
    ]  # the prefix is asked with the words it begins, so `exclusive` splits it


def test_candidate_ids_order_and_limit():
    vocab = VocabPieces.from_pieces([b"a", b"b", b"c", b"d", b"\xe2", b"<s>"], special=[0, 0, 0, 0, 0, 1])
    usable = spellable(vocab)
    assert usable.tolist() == [True, True, True, True, False, False]  # half a character, a special token
    completion = completion_matrix(np.array([[0, 0, 3, 1, 0, 0], [0, 0, 0, 0, 0, 0]]))
    got = candidate_ids(
        0,
        np.array([1, 4, -1]),
        np.array([1, 0]),
        np.array([0.2, 0.7]),
        completion,
        np.array([5, 3]),
        usable,
        10,
    )
    # gold; source 0 (p 0.7): corpus c, d, map 5 (special: left out); source 1: map d; then the pivot's usable top-K
    assert got.tolist() == [0, 2, 3, 1]
    assert candidate_ids(
        0,
        np.array([1, 4, -1]),
        np.array([1, 0]),
        np.array([0.2, 0.7]),
        completion,
        np.array([5, 3]),
        usable,
        2,
    ).tolist() == [0, 2]


@pytest.fixture(scope="module")
def scored(zoo):
    from transformers import AutoModelForCausalLM

    from fuse.backends.hf import TransformersBackend
    from fuse.data.chat import render_chat
    from fuse.data.logprobs import SampleLogprobs
    from fuse.models import load_tokenizer
    from fuse.recipe import ModelSpec
    from fuse.stages.align import CandidateScorer, align_sample, steps_of

    tokenizers = {m: load_tokenizer(ModelSpec(path=str(zoo.models[m]))) for m in ("pivot", "llama")}
    model = AutoModelForCausalLM.from_pretrained(zoo.models["llama"], dtype=torch.float32).eval()
    pivot_model = AutoModelForCausalLM.from_pretrained(zoo.models["pivot"], dtype=torch.float32).eval()
    backends = {"llama": TransformersBackend(model), "pivot": TransformersBackend(pivot_model)}
    rows = [json.loads(line) for line in zoo.sft.read_text().splitlines()]
    rows = [r for r in rows if r["id"].startswith(("weather", "market"))][:6]

    def extract(name, messages, i):
        chat = render_chat(tokenizers[name], messages)
        out = backends[name].logprobs([chat.input_ids], 10)[0]
        return SampleLogprobs(
            f"s{i}",
            chat.text,
            chat.spans,
            chat.input_ids,
            chat.offsets,
            chat.mask,
            out.topk_ids,
            out.topk_logprobs,
            out.target_logprobs,
        )

    pairs = [
        (extract("pivot", r["messages"], i), extract("llama", r["messages"], i)) for i, r in enumerate(rows)
    ]
    vocabs = (vocab_pieces(tokenizers["pivot"]), vocab_pieces(tokenizers["llama"]))
    counts = np.zeros((len(vocabs[1]), len(vocabs[0])))
    contents = [align_sample(p, s, vocabs, "offsets") for p, s in pairs]
    alignments = [c.alignment for c in contents]
    for (p, s), a in zip(pairs, alignments, strict=True):
        same = a.source_index > 0
        np.add.at(counts, (s.input_ids[a.source_index[same]], p.input_ids[same]), 1)
    vocab_map = build_vocab_map(vocabs[1], vocabs[0], methods=("exact",))
    scorer = CandidateScorer(
        backends["llama"], tokenizers["llama"], vocabs[0], completion_matrix(counts), vocab_map.target, 12
    )
    results = [
        scorer.score(p, s, c, (steps_of(p, 10), steps_of(s, 10)))
        for (p, s), c in zip(pairs, contents, strict=True)
    ]
    return scorer, pairs, contents, results, model, tokenizers["llama"], vocabs[0]


def test_scores_are_the_source_models_own_likelihood_of_the_text(scored):
    scorer, pairs, contents, results, model, tokenizer, p_vocab = scored
    report = scorer.report()
    assert report["rows_scored"] > 20 and report["gold_checked"] > 20
    assert report["gold_vs_extract_max_abs_diff"] < 1e-4  # the gold, as the extract scored the same tokens
    checked = 0
    for (pivot, source), content, rows in zip(pairs, contents, results, strict=True):
        boundaries = scorer.rows(pivot, content)
        # every scored row has a boundary; a response's opening word (the source's first token also holding a
        # space) is scored like any other
        opening = {j for j in content.openings if j > 0 and pivot.mask[j]}
        assert set(rows) <= set(boundaries) and opening <= set(rows)
        for j, (ids, probs) in list(rows.items())[:3]:
            boundary = boundaries[j]
            end = scorer.context_end(source, boundary, int(pivot.input_ids[j]))
            raw = []
            for w in ids:  # direct: the model's log-softmax over the whole text, summed past the boundary
                tokens = tokenizer(source.text[:end] + p_vocab.pieces[w].decode(), add_special_tokens=False)[
                    "input_ids"
                ]
                with torch.no_grad():
                    logp = torch.log_softmax(model(torch.tensor([tokens])).logits[0].double(), -1)
                raw.append(float(sum(logp[t - 1, tokens[t]] for t in range(boundary, len(tokens)))))
            assert probs == pytest.approx(
                exclusive(ids, np.exp(raw), p_vocab), rel=1e-4, abs=1e-6
            )  # float32 backend, float64 here
            assert probs.sum() <= 1.0 + 1e-6
            checked += 1
    assert checked >= 10


def test_the_domains_successors_are_found_and_scored(scored):
    """On the source's own domain, the scored distribution names several words with real mass, where the
    projection of a first piece named a prefix: at scored word starts the top candidate holds < 0.99."""
    _, pairs, _, results, _, _, p_vocab = scored
    spread = [
        probs.max()
        for (pivot, _), rows in zip(pairs, results, strict=True)
        for j, (ids, probs) in rows.items()
        if p_vocab.pieces[int(pivot.input_ids[j])][:1] == b" " and probs.sum() > 0.5
    ]
    assert len(spread) > 10 and np.mean(np.array(spread) < 0.99) > 0.5


def test_full_sequences_through_the_backend_agree_with_the_shared_prefix(scored):
    """vLLM has no `.model`: the scorer sends whole sequences through `backend.logprobs` instead."""
    from fuse.stages.align import CandidateScorer, steps_of

    scorer, pairs, contents, results, _, tokenizer, p_vocab = scored

    class SequencesOnly:
        def __init__(self, backend):
            self.logprobs, self.max_length = backend.logprobs, backend.max_length

    other = CandidateScorer(
        SequencesOnly(scorer.backend), tokenizer, p_vocab, scorer.completion, scorer.target, scorer.limit
    )
    for (pivot, source), content, want in list(zip(pairs, contents, results, strict=True))[:2]:
        got = other.score(pivot, source, content, (steps_of(pivot, 10), steps_of(source, 10)))
        assert got.keys() == want.keys()
        for j, (ids, probs) in got.items():
            assert ids.tolist() == want[j][0].tolist()
            assert probs == pytest.approx(want[j][1], rel=1e-4, abs=1e-6)
