"""fuse.alignment.project: what each pivot row receives, by cause, under every option; the chunk likelihood against
a brute-force byte walk on real tokenizers; candidate completion against a dense transcription of its rule."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from fuse.alignment.content import Rendered, align_content
from fuse.alignment.pieces import VocabPieces, vocab_pieces
from fuse.alignment.project import (
    CAUSES,
    CHUNK,
    COVERS,
    FIRST,
    INSIDE,
    ONE,
    ONE_HOT,
    PIVOT_OWN,
    PROJECTED,
    SPLIT,
    WITHIN,
    ProjectOptions,
    Steps,
    complete_rows,
    completion_matrix,
    project,
)
from fuse.alignment.sequence import align_spans, char_to_byte
from fuse.alignment.vocab import pair_counts

# pivot ids: 0 "a", 1 "bcd", 2 "e", 3 "fg", 4 "h", 5 "b", 6 "x"
PIVOT = VocabPieces.from_pieces([b"a", b"bcd", b"e", b"fg", b"h", b"b", b"x"])
# source ids: 0 "a", 1 "b", 2 "cd", 3 "efg", 4 "h", 5 "x", 6 "e"
SOURCE = VocabPieces.from_pieces([b"a", b"b", b"cd", b"efg", b"h", b"x", b"e"])
# the vocabulary map: "cd" maps nowhere, "efg" (longer than any pivot token) to the pivot token it begins with
TARGET = np.array([0, 5, -1, 2, 4, 6, 2])


def spans(tokens: list[int], vocab: VocabPieces) -> tuple[np.ndarray, np.ndarray]:
    ends = np.cumsum([len(vocab.pieces[t]) for t in tokens])
    return np.r_[0, ends[:-1]], ends


def abcdefgh() -> tuple:
    """The text "abcdefgh": pivot a|bcd|e|fg|h, source a|b|cd|efg|h. Pivot row 1 ("bcd") is split by the source
    (b + cd, ending together), row 2 ("e") is covered by the source's "efg", row 3 ("fg") starts inside it."""
    p_tokens, s_tokens = [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]
    alignment = align_spans(*spans(p_tokens, PIVOT), *spans(s_tokens, SOURCE))
    nan = np.nan
    np.seterr(divide="ignore")  # log(0) = -inf: an empty slot
    source = Steps(
        np.array(s_tokens),
        np.array([[-1, -1], [1, 5], [2, -1], [3, 6], [4, -1]]),
        np.log(np.array([[0, 0], [0.5, 0.2], [0.4, 0], [0.3, 0.1], [0.9, 0]])),
        np.log(np.array([nan, 0.5, 0.4, 0.3, 0.9])),
    )
    pivot = Steps(
        np.array(p_tokens),
        np.array([[-1, -1, -1], [6, 1, 5], [2, 0, -1], [3, 4, -1], [4, -1, -1]]),
        np.log(np.array([[0, 0, 0], [0.3, 0.1, 0.05], [0.6, 0.1, 0], [0.5, 0.2, 0], [0.7, 0, 0]])),
        np.log(np.array([nan, 0.1, 0.6, 0.5, 0.7])),
    )
    return alignment, pivot, source


def row(projection, j: int) -> dict[int, float]:
    ids, lps = projection.ids[j], projection.logprobs[j].astype(np.float64)
    return {int(i): float(np.exp(lp)) for i, lp in zip(ids, lps, strict=True) if i >= 0}


def test_causes_by_direction():
    alignment, pivot, source = abcdefgh()
    out = project(alignment, pivot, source, TARGET, len(PIVOT))
    assert out.cause.tolist() == [FIRST, SPLIT, COVERS, INSIDE, ONE]
    assert set(out.counts()) == set(CAUSES)


def test_one_to_one_refuses_both_directions_and_falls_back_to_the_gold():
    alignment, pivot, source = abcdefgh()
    out = project(alignment, pivot, source, TARGET, len(PIVOT), ProjectOptions("one_to_one", chunk=False))
    assert out.signal.tolist() == [ONE_HOT, ONE_HOT, ONE_HOT, ONE_HOT, PROJECTED]
    for j in range(4):
        assert row(out, j) == {j: 1.0}  # the token the row predicts
    assert row(out, 4) == pytest.approx(
        {4: 0.9}
    )  # the tail keeps the 0.1 the source did not put on its top-K


def test_sound_projects_the_covering_source_token_and_chunks_the_split_one():
    alignment, pivot, source = abcdefgh()
    out = project(alignment, pivot, source, TARGET, len(PIVOT), ProjectOptions("sound", chunk=True))
    assert out.signal.tolist() == [ONE_HOT, CHUNK, PROJECTED, ONE_HOT, PROJECTED]
    assert row(out, 1) == pytest.approx({1: 0.5 * 0.4})  # "bcd" = p("b") · p("cd" | "b"), nothing else
    assert out.realized[1] == pytest.approx(np.log(0.2))
    assert row(out, 2) == pytest.approx({2: 0.4})  # "efg" and "e" both begin with the pivot's "e"
    off = project(alignment, pivot, source, TARGET, len(PIVOT), ProjectOptions("sound", chunk=False))
    assert off.signal[1] == ONE_HOT and row(off, 1) == {1: 1.0}


def test_same_start_projects_the_prefix_distribution_as_fusechat_does():
    alignment, pivot, source = abcdefgh()
    out = project(alignment, pivot, source, TARGET, len(PIVOT), ProjectOptions("same_start", chunk=False))
    assert out.signal[1] == PROJECTED and row(out, 1) == pytest.approx({5: 0.5, 6: 0.2})  # gold "bcd" gets 0


def test_pivot_fallback_gives_the_pivots_own_row():
    alignment, pivot, source = abcdefgh()
    out = project(
        alignment, pivot, source, TARGET, len(PIVOT), ProjectOptions("sound", True, fallback="pivot")
    )
    assert out.signal.tolist() == [ONE_HOT, CHUNK, PROJECTED, PIVOT_OWN, PROJECTED]  # row 0 has no pivot step
    assert row(out, 3) == pytest.approx({3: 0.5, 4: 0.2})
    assert out.realized[3] == pytest.approx(np.log(0.5))


def counts() -> sparse.csr_matrix:
    """Aligned (source, pivot) pair counts: "b" began "bcd" 3 times and "b" once, "x" began "x", "efg" began
    "e", "h" was "h"; the source's "e" never occurred."""
    pairs = [(1, 1)] * 3 + [(1, 5), (5, 6), (3, 2), (3, 2), (4, 4)]
    return pair_counts(
        np.array([s for s, _ in pairs]), np.array([w for _, w in pairs]), len(SOURCE), len(PIVOT)
    )


def test_complete_spreads_each_candidate_over_the_pivot_tokens_the_corpus_aligned_it_with():
    alignment, pivot, source = abcdefgh()
    options = ProjectOptions("sound", chunk=True, complete=True)
    out = project(alignment, pivot, source, TARGET, len(PIVOT), options, completion_matrix(counts()))
    # gold "bcd" keeps its chunk likelihood 0.2; "b" passes on the rest of its mass (0.5 − 0.2) to what else it
    # was aligned with ("b": the gold is left out and the rest renormalized); "x" goes to "x"
    assert row(out, 1) == pytest.approx({1: 0.2, 5: 0.3, 6: 0.2})
    # "efg" was aligned with "e"; the source's "e" never was: the vocabulary map's id
    assert row(out, 2) == pytest.approx({2: 0.4})
    assert out.kept_mass[2] == pytest.approx(1.0) and np.isnan(out.kept_mass[1])
    with pytest.raises(ValueError, match="complete needs"):
        project(alignment, pivot, source, TARGET, len(PIVOT), options)


def brute_complete(rows, source_ids, source_probs, counts, target, excluded) -> dict[tuple[int, int], float]:
    """The rule entry by entry: spread over the aligned pivot tokens (the excluded one left out, renormalized),
    else the map's id unless excluded."""
    out: dict[tuple[int, int], float] = {}
    dense = counts.toarray().astype(float)
    for r, s, p in zip(rows, source_ids, source_probs, strict=True):
        if s < 0 or p <= 0:
            continue
        if dense[s].sum() > 0:
            weights = dense[s].copy()
            if excluded[r] >= 0:
                weights[excluded[r]] = 0.0
            for w in np.flatnonzero(weights):
                out[(r, w)] = out.get((r, w), 0.0) + p * weights[w] / weights.sum()
        elif target[s] >= 0 and target[s] != excluded[r]:
            out[(r, int(target[s]))] = out.get((r, int(target[s])), 0.0) + p
    return out


@pytest.mark.parametrize("seed", range(10))
def test_complete_rows_matches_entry_by_entry_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_source, n_pivot, n_rows, k = 9, 7, 5, 4
    pairs = rng.integers(0, [n_source, n_pivot], (30, 2))
    pairs = pairs[pairs[:, 0] < 6]  # source ids 6..8 never aligned
    table = pair_counts(pairs[:, 0], pairs[:, 1], n_source, n_pivot)
    target = rng.integers(-1, n_pivot, n_source)
    rows = np.repeat(np.arange(n_rows), k)
    source_ids = rng.integers(-1, n_source, rows.size)
    source_probs = rng.dirichlet(np.ones(k), n_rows).ravel() * 0.9
    excluded = rng.integers(-1, n_pivot, n_rows)
    r, c, p = complete_rows(rows, source_ids, source_probs, completion_matrix(table), target, excluded)
    got: dict[tuple[int, int], float] = {}
    for key, value in zip(zip(r.tolist(), c.tolist(), strict=True), p.tolist(), strict=True):
        if key[1] >= 0 and value > 0:
            got[key] = got.get(key, 0.0) + value
    want = brute_complete(rows, source_ids, source_probs, table, target, excluded)
    assert got.keys() == {key for key, v in want.items() if v > 0}
    for key, value in want.items():
        assert got.get(key, 0.0) == pytest.approx(value, abs=1e-12)


def render(tokenizer, text: str) -> Rendered:
    """The text after a BOS-like first token (a source's token 0 is never predicted), as one content span."""
    encoded = tokenizer("§" + text, add_special_tokens=False, return_offsets_mapping=True)
    return Rendered(
        np.array(encoded["input_ids"]),
        np.array([[1, len(text) + 1]]),
        "§" + text,
        np.array(encoded["offset_mapping"]),
    )


def byte_ranges(rendered: Rendered, vocab: VocabPieces) -> dict[int, tuple[int, int]]:
    """Brute force: each content token's [start, end) in the text's bytes, walking the pieces one after another
    from the first content token's start (byte-level pieces of one character share its offsets)."""
    to_byte, raw = char_to_byte(rendered.text), rendered.text.encode()
    out, pos = {}, None
    for a, b in rendered.content_spans:
        for t, (start, end) in enumerate(rendered.offsets):
            if start < a or end > b or vocab.special[rendered.ids[t]]:
                continue
            piece = vocab.pieces[rendered.ids[t]]
            if pos is None:
                pos = int(to_byte[start])
                if piece[:1] == b" " and raw[pos : pos + 1] != b" ":
                    piece = piece[1:]  # a space the tokenizer invented
            if piece:
                out[t] = (pos, pos + len(piece))
            pos += len(piece)
    return out


@pytest.mark.parametrize("pair", [("qwen3", "llama2"), ("gemma3", "qwen3"), ("llama3", "llama2")])
def test_chunk_is_the_sum_of_the_pieces_that_spell_the_pivot_token(pair):
    """On real vocabularies: every pivot token the source spells in pieces that end with it gets the sum of those
    pieces' realized log-probs, found here by walking bytes, and every other row no chunk."""
    from real_tokenizers import load

    p_tok, s_tok = (load(name) for name in pair)
    text = "Unbelievably, 12345 naïve Pelvinoids and x**2 indented\n    code: 北京 Bürgermeister 3.14159."
    pivot, source = render(p_tok, text), render(s_tok, text)
    vocabs = vocab_pieces(p_tok), vocab_pieces(s_tok)
    alignment = align_content(pivot, source, *vocabs).alignment
    rng = np.random.default_rng(0)
    realized = np.r_[np.nan, np.log(rng.uniform(0.05, 1.0, len(source.ids) - 1))]
    steps = (
        Steps.bare(pivot.ids),
        Steps(
            source.ids, np.full((len(source.ids), 1), -1), np.full((len(source.ids), 1), -np.inf), realized
        ),
    )
    out = project(
        alignment, *steps, np.full(len(vocabs[1]), -1), len(vocabs[0]), ProjectOptions("sound", True)
    )
    p_bytes, s_bytes = byte_ranges(pivot, vocabs[0]), byte_ranges(source, vocabs[1])
    chunks = 0
    for j, (start, end) in p_bytes.items():
        pieces = sorted(i for i, (a, b) in s_bytes.items() if a >= start and b <= end)
        tiled = (
            len(pieces) > 1
            and s_bytes[pieces[0]][0] == start
            and s_bytes[pieces[-1]][1] == end
            and all(s_bytes[x][1] == s_bytes[y][0] for x, y in zip(pieces, pieces[1:], strict=False))
            and pieces[0] > 0
        )
        if tiled:
            chunks += 1
            assert out.signal[j] == CHUNK, (pair, j)
            assert out.realized[j] == pytest.approx(realized[pieces].sum(), rel=1e-5)
        else:
            assert out.signal[j] != CHUNK, (pair, j)
    assert chunks > 0  # the text has words one side spells whole and the other in pieces


def test_chunk_rest_shaped_by_the_pivot_is_the_least_kl_change_of_its_distribution():
    alignment, pivot, source = abcdefgh()
    options = ProjectOptions("sound", chunk=True, chunk_rest="pivot")
    out = project(alignment, pivot, source, TARGET, len(PIVOT), options)
    # the pivot's row 1: "x" 0.3, "bcd" (gold) 0.1, "b" 0.05; the gold set to 0.2, the others scaled by 0.8 / 0.9
    assert row(out, 1) == pytest.approx({1: 0.2, 6: 0.3 * 0.8 / 0.9, 5: 0.05 * 0.8 / 0.9})
    # the same as minimizing KL(t ‖ π) over distributions t with t(gold) = 0.2, by brute force on the buckets
    pi = np.array([0.1, 0.3, 0.05, 0.55])  # gold, "x", "b", the pivot's tail
    best = min(
        (
            np.array([0.2, a, b, 0.8 - a - b])
            for a in np.linspace(0, 0.8, 161)
            for b in np.linspace(0, 0.8, 161)
            if a + b <= 0.8
        ),
        key=lambda t: float(np.sum(np.where(t > 0, t * np.log(np.where(t > 0, t, 1) / pi), 0.0))),
    )
    assert best[1:3] == pytest.approx([0.3 * 0.8 / 0.9, 0.05 * 0.8 / 0.9], abs=0.006)


def test_within_conditions_the_covering_tokens_candidates_on_the_pieces_written():
    alignment, pivot, source = abcdefgh()
    out = project(
        alignment, pivot, source, TARGET, len(PIVOT), ProjectOptions(within=True), vocabs=(PIVOT, SOURCE)
    )
    assert out.signal.tolist() == [ONE_HOT, CHUNK, PROJECTED, WITHIN, PROJECTED]
    # "fg" after "e" inside the source's "efg": candidates "efg" 0.3 and "e" 0.1 begin with "e", 0.6 is outside the
    # top-K and may too; only "efg" continues with "fg": 0.3 / (0.4 + 0.6), the rest in the tail
    assert row(out, 3) == pytest.approx({3: 0.3})
    off = project(alignment, pivot, source, TARGET, len(PIVOT), ProjectOptions(within=False))
    assert off.signal[3] == ONE_HOT
    with pytest.raises(ValueError, match="within needs"):
        project(alignment, pivot, source, TARGET, len(PIVOT), ProjectOptions(within=True))


@pytest.mark.parametrize("pair", [("llama3", "gemma3"), ("llama2", "qwen3")])
def test_within_matches_a_brute_force_prefix_sum_and_carries_the_chain_rule(pair):
    """On real vocabularies, every pivot token that starts inside a source token (and ends in it) gets
    P(text so far + its text) / P(text so far) under the source's distribution at that token, found here by walking
    bytes and summing a dense distribution over every candidate; over a word, the first piece's mass times these
    conditionals is the source's probability of the word's text."""
    from real_tokenizers import load

    p_tok, s_tok = (load(name) for name in pair)
    text = "Die Bürgermeisterin unterzeichnete Menschenrechtserklärungen; 北京的人权宣言 und Unabhängigkeit."
    pivot, source = render(p_tok, text), render(s_tok, text)
    vocabs = vocab_pieces(p_tok), vocab_pieces(s_tok)
    alignment = align_content(pivot, source, *vocabs).alignment
    rng = np.random.default_rng(0)
    n_s, k = len(source.ids), 24
    # a full distribution (nothing outside the top-K) at every source step: the token itself and random others
    ids = np.stack([np.r_[t, rng.choice(len(vocabs[1]), k - 1, replace=False)] for t in source.ids])
    probs = rng.dirichlet(np.ones(k), size=n_s)
    steps = Steps(source.ids, ids, np.log(probs), np.log(probs[:, 0]))
    options = ProjectOptions("sound", chunk=True, within=True)
    out = project(
        alignment,
        Steps.bare(pivot.ids),
        steps,
        np.full(len(vocabs[1]), -1),
        len(vocabs[0]),
        options,
        vocabs=vocabs,
    )
    raw = pivot.text.encode()
    p_bytes, s_bytes = byte_ranges(pivot, vocabs[0]), byte_ranges(source, vocabs[1])
    first_content = min(s_bytes)

    def prefix_mass(s: int, prefix: bytes) -> float:
        return sum(p for c, p in zip(ids[s], probs[s], strict=True) if vocabs[1].pieces[c].startswith(prefix))

    within = 0
    for j, (start, end) in p_bytes.items():
        covering = [s for s, (a, b) in s_bytes.items() if a < start and end <= b]
        if not covering or covering[0] == first_content:
            assert out.signal[j] != WITHIN, (pair, j)
            continue
        s = covering[0]
        a = s_bytes[s][0]
        if not any(
            pa == a for pa, _ in p_bytes.values()
        ):  # no pivot token starts where the source token does
            continue
        expected = prefix_mass(s, raw[a:end]) / prefix_mass(s, raw[a:start])
        within += 1
        assert out.signal[j] == WITHIN, (pair, j)
        assert np.exp(out.realized[j]) == pytest.approx(expected, rel=1e-5)
    assert within > 0  # the text has words the source writes whole and the pivot in pieces
    # the chain rule, per covered word: the pieces' conditionals multiply to P(word) / P(first piece)
    words = 0
    for s, (a, b) in s_bytes.items():
        rows = sorted(j for j, (start, end) in p_bytes.items() if a <= start and end <= b)
        if len(rows) > 1 and p_bytes[rows[0]][0] == a and all(out.signal[j] == WITHIN for j in rows[1:]):
            product = float(np.exp(sum(out.realized[j] for j in rows[1:])))
            first = raw[a : p_bytes[rows[0]][1]]
            assert product == pytest.approx(prefix_mass(s, raw[a:b]) / prefix_mass(s, first), rel=1e-5)
            words += 1
    assert words > 0


def test_within_topk_norm_divides_by_the_consistent_top_k_mass_alone():
    alignment, pivot, source = abcdefgh()
    options = ProjectOptions(within=True, within_norm="topk")
    out = project(alignment, pivot, source, TARGET, len(PIVOT), options, vocabs=(PIVOT, SOURCE))
    assert row(out, 3) == pytest.approx({3: 0.3 / 0.4})  # "efg" of the 0.4 that begins with "e"
