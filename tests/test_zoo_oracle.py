"""The zoo's oracle teacher: exact against the chain rule and against brute force over every response of a small
domain, and its store on the pivot extract's own ids, tokens and mask."""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from fuse.data.chat import render_chat
from fuse.data.logprobs import LogprobReader
from fuse.zoo import ZOO_MODELS, ZooSettings, data_files, domain_splits, tokenizer_corpus, world
from fuse.zoo.oracle import next_token_distributions, write_oracle_store, write_zoo_oracle
from fuse.zoo.vocab import train_tokenizer

PIVOT_VOCAB = 832  # the zoo pivot's output rows: len(tokenizer) padded to 64


@pytest.fixture(scope="module")
def tokenizer():
    """The zoo pivot's tokenizer, trained on the same corpus as the zoo build's (about 2 s)."""
    settings = ZooSettings()
    splits = world.split_world(
        settings.seed, settings.n_eval, settings.sft_phrasings, settings.pref_phrasings
    )
    general = world.general_documents(settings.seed, "train", settings.n_general_docs)
    corpus = tokenizer_corpus(splits, domain_splits(settings), general, settings.seed)
    return train_tokenizer(corpus, ZOO_MODELS[0].vocab)


def oracle_of(domain: world.Domain, tokenizer, prompt: str, response: str):
    chat = render_chat(tokenizer, world_chat(prompt, response))
    span = chat.spans[-1]
    rows = next_token_distributions(
        domain, tokenizer, chat.text, span.start, span.end, chat.input_ids, chat.offsets
    )
    return chat, rows


def world_chat(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def test_chain_rule_gives_each_responses_exact_nll(tokenizer):
    """Σ −log p_oracle(realized token) over the response rows is −log p(response): any wrong candidate, capital,
    space or end probability breaks it. Every distribution sums to 1 and holds the realized token. (The pivot
    writes nearly every reachable step of these chains as one token; words cut in several tokens are the next
    test's.)"""
    for domain in world.domains(0):
        rng = random.Random(f"oracle-{domain.name}")
        for _ in range(50):
            response, nll = world.sample_response(domain, rng)
            chat, rows = oracle_of(domain, tokenizer, domain.prompt(0), response)
            ids, counted = chat.input_ids, np.flatnonzero(chat.mask[1:])
            assert set(counted) <= set(rows), response  # every row the loss counts is defined
            for t, distribution in rows.items():
                assert math.fsum(distribution.values()) == pytest.approx(1.0, abs=1e-12)
                assert min(distribution.values()) > 0 and int(ids[t + 1]) in distribution
            total = -math.fsum(math.log(rows[t][int(ids[t + 1])]) for t in counted)
            assert total == pytest.approx(world.response_nll(domain, response), abs=1e-9), response
            assert total == pytest.approx(nll, abs=1e-9)


def shared_prefix_domain() -> world.Domain:
    """Options whose pivot tokens share their first pieces: starts 'D' 'el' 'tam' / 'D' 'el' 'pel' / 'D' 'un' 'wes'
    (after a '.': 'Ġ' 'D' ...), successors 'Ġp' 'el' 'tam' / 'Ġp' 'elvin'; sentences of one to three words, so
    every response can be enumerated."""
    successors = {
        "deltam": (("peltam", 0.5), ("pelvin", 0.3), ("nixgor", 0.2)),
        "delpel": (("nixgor", 0.6), ("nixwes", 0.4)),
        "dunwes": (("deltam", 0.7), ("peltam", 0.3)),
        "nixwes": (("pelvin", 1.0),),
        "peltam": (("pelvin", 0.5), ("delpel", 0.5)),
        "pelvin": (("peltam", 0.6), ("nixgor", 0.4)),
        "nixgor": (("deltam", 0.5), ("dunwes", 0.5)),
    }
    starts = (("deltam", 0.35), ("delpel", 0.25), ("dunwes", 0.2), ("nixwes", 0.2))
    return world.Domain("tiny", "pivot", tuple(successors), starts, successors, 0.4, 1, 3, 2)


def every_response(domain: world.Domain) -> dict[str, float]:
    """Every response with its probability, by walking every path of the chain."""
    sentences, frontier = [], [([w], p) for w, p in domain.starts]
    while frontier:
        words, p = frontier.pop()
        p_end = domain.end_probability(len(words))
        if p_end > 0:
            sentences.append((world.render_sentence(words), p * p_end))
        if p_end < 1:
            frontier += [(words + [w], p * (1 - p_end) * q) for w, q in domain.successors[words[-1]]]
    responses: dict[str, float] = defaultdict(float)
    for first, p in sentences:
        for second, q in sentences:
            responses[f"{first} {second}"] += p * q
    return responses


def test_oracle_equals_brute_force_over_every_whole_tokenized_chat(tokenizer):
    """p(token t+1 | tokens ≤ t) by summing the probabilities of every response whose whole rendered chat, tokenized
    as one text, starts with those tokens: no pre-token reasoning, so it checks the oracle's premise too."""
    domain = shared_prefix_domain()
    for a, b in (("Deltam", "Delpel"), (" Deltam", " Dunwes"), (" peltam", " pelvin")):  # the case under test
        assert tokenizer.tokenize(a)[0] == tokenizer.tokenize(b)[0], (a, b)
    prompt, responses = "Write a short tiny note.", every_response(domain)
    assert math.fsum(responses.values()) == pytest.approx(1.0, abs=1e-12)
    chats = {r: render_chat(tokenizer, world_chat(prompt, r)) for r in responses}
    following: dict[tuple[int, ...], dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for response, p in responses.items():
        ids = tuple(int(i) for i in chats[response].input_ids)
        for n in range(len(ids)):
            following[ids[:n]][ids[n]] += p
    for response in responses:
        chat, rows = oracle_of(domain, tokenizer, prompt, response)
        ids = tuple(int(i) for i in chat.input_ids)
        for t, distribution in rows.items():
            brute = following[ids[: t + 1]]
            total = math.fsum(brute.values())
            assert set(distribution) == set(brute), (response, t)
            for token, p in distribution.items():
                assert p == pytest.approx(brute[token] / total, abs=1e-12), (response, t)


def write_sft(folder: Path) -> tuple[Path, list[dict]]:
    """The zoo's SFT file (skills, domains, general rows) and its domain rows."""
    domains = world.split_domains(0, 1, 16, 1)
    files = data_files(world.split_world(0), [], domains, world.general_documents(0, "sft", 4))
    path = folder / "data" / "sft.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(files["data/sft.jsonl"])
    rows = [json.loads(line) for line in files["data/sft.jsonl"].splitlines()]
    return path, [r for r in rows if r["id"].rsplit("-", 1)[0] in domains.sft]


def extract_renderings(tokenizer, domain_rows: list[dict], max_length: int) -> list:
    """(prepared row, chat) as prepare and the pivot's extract make them, with their own functions."""
    from fuse.recipe import DatasetSpec
    from fuse.stages.extract import render_rows
    from fuse.stages.prepare import normalize

    spec = DatasetSpec(path="sft.jsonl", format="messages")
    prepared, _ = normalize(domain_rows, spec, "data.sft", "sft", 1)
    return render_rows(tokenizer, prepared, None, max_length, "truncate", Counter(), PIVOT_VOCAB)


@pytest.mark.parametrize("max_length", [128, 24])
def test_store_is_on_the_pivot_extracts_rows_and_round_trips(tokenizer, tmp_path, max_length):
    sft, domain_rows = write_sft(tmp_path)
    index = write_oracle_store(sft, tokenizer, world.domains(0), tmp_path / "oracle", PIVOT_VOCAB, max_length)
    store = LogprobReader(tmp_path / "oracle")
    expected = extract_renderings(tokenizer, domain_rows, max_length)
    assert index["num_samples"] == len(store) == len(expected) == 64
    assert store.vocab_size == PIVOT_VOCAB and store.meta["max_length"] == max_length
    by_domain, support = {d.name: d for d in world.domains(0)}, 0
    for raw, (row, chat), sample in zip(domain_rows, expected, store, strict=True):
        assert sample.id == row["id"] and sample.text == chat.text and sample.spans == chat.spans
        for name in ("input_ids", "offsets", "mask"):
            np.testing.assert_array_equal(getattr(sample, name), getattr(chat, name), err_msg=name)
        assert sample.extra == ({"truncated": True} if chat.truncated else {})
        domain = by_domain[raw["id"].rsplit("-", 1)[0]]
        _, rows = oracle_of(domain, tokenizer, *(m["content"] for m in row["messages"]))
        check_rows(sample, rows)
        support = max(support, *(len(rows[t]) for t in rows if t < len(sample.target_logprobs)))
    assert store.top_k == support  # the widest distribution the store holds


def check_rows(sample, rows: dict[int, dict[int, float]]) -> None:
    """Each row's top-K is the oracle's support (log-probs within the store's 0.01 bound); rows the oracle does not
    define hold the realized token at log-prob 0."""
    for t in range(len(sample.target_logprobs)):
        distribution = rows.get(t, {int(sample.input_ids[t + 1]): 1.0})
        stored = {
            int(i): float(lp)
            for i, lp in zip(sample.topk_ids[t], sample.topk_logprobs[t], strict=True)
            if np.isfinite(lp)
        }
        assert set(stored) == set(distribution), t
        for token, p in distribution.items():
            assert stored[token] == pytest.approx(math.log(p), abs=0.01)
        assert sample.target_logprobs[t] == pytest.approx(
            math.log(distribution[int(sample.input_ids[t + 1])]), abs=0.01
        )


def test_zoo_folder_wrapper_loads_the_pivot_as_extract_does(tokenizer, tmp_path):
    sft, _ = write_sft(tmp_path)
    pivot = tmp_path / "models" / "pivot"
    tokenizer.save_pretrained(pivot)
    (pivot / "config.json").write_text(json.dumps({"vocab_size": PIVOT_VOCAB}))
    write_zoo_oracle(tmp_path, 0, tmp_path / "oracle")
    write_oracle_store(sft, tokenizer, world.domains(0), tmp_path / "direct", PIVOT_VOCAB)
    reloaded, direct = LogprobReader(tmp_path / "oracle"), LogprobReader(tmp_path / "direct")
    assert reloaded.ids == direct.ids and reloaded.vocab_size == PIVOT_VOCAB
    for a, b in zip(reloaded, direct, strict=True):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
