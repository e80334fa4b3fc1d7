"""fuse.alignment against brute force: every segmentation pair of small strings, random top-K rows, small vocabs;
properties (hypothesis) over locally trained tokenizers of the zoo's four kinds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuse.alignment.content import Rendered, align_content
from fuse.alignment.pieces import VocabPieces, byte_level_decoder, gather_bytes, piece_decoder, vocab_pieces
from fuse.alignment.project import PROJECTED, ProjectOptions, Steps, map_topk, project
from fuse.alignment.sequence import (
    MANY_TO_ONE,
    ONE_TO_ONE,
    TEMPLATE,
    UNALIGNED,
    align_dtw,
    align_spans,
    alignment_from_path,
    char_to_byte,
    dtw_path,
    edit_distance,
    spans_from_offsets,
)
from fuse.alignment.vocab import (
    EXACT,
    FIRST_PIECE,
    MINED,
    STATS,
    UNMAPPED,
    build_vocab_map,
    first_piece_map,
    mined_one,
    pair_counts,
    stats_map,
)


def segmentations(n: int) -> list[list[int]]:
    """Every way to cut n units into tokens, as token end positions."""
    cuts = range(1, n)
    return [sorted(c) + [n] for r in range(n) for c in itertools.combinations(cuts, r)]


def brute_align(p_ends: list[int], s_ends: list[int]) -> tuple[list[int], ...]:
    """Reference: scan positions one by one."""
    p_starts, s_starts = [0, *p_ends[:-1]], [0, *s_ends[:-1]]
    index, kind, first, last, together = [], [], [], [], []
    for a, b in zip(p_starts, p_ends, strict=True):
        match = [i for i, s in enumerate(s_starts) if s == a]
        index.append(match[0] if match else -1)
        kind.append(UNALIGNED if not match else ONE_TO_ONE if s_ends[match[0]] == b else MANY_TO_ONE)
        cover = [i for i, (s, e) in enumerate(zip(s_starts, s_ends, strict=True)) if s < b and e > a]
        first.append(cover[0])
        last.append(cover[-1])
        together.append(s_ends[cover[-1]] == b)
    return index, kind, first, last, together


def as_spans(ends: list[int]) -> tuple[np.ndarray, np.ndarray]:
    ends = np.array(ends)
    return np.r_[0, ends[:-1]], ends


def test_align_spans_matches_brute_force_on_every_segmentation_pair():
    for n in (1, 2, 5, 6):
        for p_ends, s_ends in itertools.product(segmentations(n), repeat=2):
            got = align_spans(*as_spans(p_ends), *as_spans(s_ends))
            want = brute_align(p_ends, s_ends)
            assert got.source_index.tolist() == want[0]
            assert got.kind.tolist() == want[1]
            assert got.cover_first.tolist() == want[2] and got.cover_last.tolist() == want[3]
            assert got.ends_together.tolist() == want[4]


def test_align_spans_skips_empty_tokens():
    # a source token of zero length (a phantom `▁` cut away) never stands for text
    got = align_spans(np.array([0, 2]), np.array([2, 4]), np.array([0, 0, 2]), np.array([0, 2, 4]))
    assert got.source_index.tolist() == [1, 2] and got.kind.tolist() == [ONE_TO_ONE, ONE_TO_ONE]


def test_byte_level_table_is_gpt2s():
    table = byte_level_decoder()
    assert len(table) == 256 and sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 32 and table["Ċ"] == 10 and table["a"] == ord("a")


def test_piece_decoders_from_metadata():
    byte_level = piece_decoder({"type": "ByteLevel"})
    assert byte_level("ĠÃ©") == (" é".encode(), False)
    meta = piece_decoder(
        {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        }
    )
    assert meta("▁hello") == (b" hello", False) and meta("<0xF0>") == (b"\xf0", True)
    assert piece_decoder({"type": "Metaspace", "replacement": "▁"})("▁a▁b") == (b" a b", False)
    with pytest.raises(ValueError, match="WordPiece"):
        piece_decoder({"type": "WordPiece"})


def test_gather_bytes_concatenates_pieces():
    vocab = VocabPieces.from_pieces([b"ab", b"", b"\xf0\x9f", b"c"])
    assert gather_bytes(np.array([0, 2, 1, 3, 0]), vocab).tobytes() == b"ab\xf0\x9fcab"


def test_char_to_byte_and_overlapping_offsets():
    text = "aé😀b"
    assert char_to_byte(text).tolist() == [0, 1, 3, 7, 8]
    # byte-level: two tokens share the emoji's character offsets; only the last one keeps it
    starts, ends = spans_from_offsets(np.array([[0, 2], [2, 3], [2, 3], [3, 4]]), text)
    assert ends.tolist() == [3, 3, 7, 8] and starts.tolist() == [0, 3, 3, 7]


def test_dtw_matches_identical_sequences_one_to_one_and_groups_merges():
    path = dtw_path(["a", "b", "c"], ["a", "b", "c"])
    assert path.tolist() == [[0, 0], [1, 1], [2, 2]]
    got = alignment_from_path(np.array([[0, 0], [1, 0], [2, 1], [2, 2]]), 3, 3)
    assert got.source_index.tolist() == [0, -1, 1]
    assert got.kind.tolist() == [MANY_TO_ONE, UNALIGNED, MANY_TO_ONE]
    assert edit_distance("kitten", "sitting") == 3


def test_dtw_agrees_with_byte_alignment_on_clean_text():
    pieces = [b"the", b" cat", b" sat", b" c", b"at", b" s", b"a", b"t"]
    vocab = VocabPieces.from_pieces(pieces)
    pivot, source = np.array([0, 1, 2]), np.array([0, 3, 4, 5, 6, 7])
    fast = align_spans(*as_spans([3, 7, 11]), *as_spans([3, 5, 7, 9, 10, 11]))
    slow = align_dtw(pivot, source, vocab, vocab)
    assert fast.source_index.tolist() == slow.source_index.tolist() == [0, 1, 3]
    assert fast.kind.tolist() == slow.kind.tolist() == [ONE_TO_ONE, MANY_TO_ONE, MANY_TO_ONE]
    assert fast.ends_together.tolist() == slow.ends_together.tolist() == [True, True, True]
    assert fast.split.tolist() == slow.split.tolist() == [False, True, True]


def brute_map_topk(ids, logprobs, target, n_pivot):
    rows = []
    for r in range(ids.shape[0]):
        acc: dict[int, float] = {}
        for i, lp in zip(ids[r], logprobs[r], strict=True):
            if i >= 0 and np.isfinite(lp) and target[i] >= 0:
                acc[int(target[i])] = acc.get(int(target[i]), 0.0) + float(np.exp(lp))
        rows.append(acc)
    return rows


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_map_topk_sums_collisions_like_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_source, n_pivot, k = 12, 5, 4
    ids = np.array([rng.choice(n_source, k, replace=False) for _ in range(6)])
    probs = rng.dirichlet(np.ones(k + 1), size=6)[:, :k]
    logprobs = np.log(probs)
    logprobs[0, -1] = -np.inf
    target = rng.integers(-1, n_pivot, n_source)
    out_ids, out_probs, kept = map_topk(ids, logprobs, target, n_pivot)
    for r, want in enumerate(brute_map_topk(ids, logprobs, target, n_pivot)):
        got = {int(i): float(p) for i, p in zip(out_ids[r], out_probs[r], strict=True) if i >= 0}
        total = sum(want.values())
        assert got.keys() == want.keys()
        for key in want:  # the teacher's own probabilities: unmapped and beyond-top-K mass stays in the tail
            assert got[key] == pytest.approx(want[key])
        assert kept[r] == pytest.approx(total / np.exp(logprobs[r][np.isfinite(logprobs[r])]).sum())
        if got:
            assert sum(got.values()) == pytest.approx(total) and total < 1.0
            assert list(out_probs[r][out_ids[r] >= 0]) == sorted(got.values(), reverse=True)


def test_vocab_map_methods_against_brute_force():
    pivot = VocabPieces.from_pieces(
        [b"<s>", b" the", b" cat", b"ca", b"t", b" ", b" "],
        special=[1, 0, 0, 0, 0, 0, 0],
        byte_fallback=[0, 0, 0, 0, 0, 1, 0],
    )
    source = VocabPieces.from_pieces(
        [b"<s>", b" the", b" cats", b"xyz", b" ", b"<x>"], special=[1, 0, 0, 0, 0, 1]
    )
    counts = pair_counts(np.array([2, 2, 2, 3]), np.array([2, 2, 3, 0]), 6, 7)
    assert stats_map(counts).tolist() == [-1, -1, 2, 0, -1, -1]
    assert stats_map(counts, min_count=3).tolist() == [-1] * 6
    got = build_vocab_map(source, pivot, counts, needed=np.array([3]))
    # exact: specials only to same-content specials; b" " prefers the regular token over the byte-fallback one
    assert got.target[[0, 1, 4]].tolist() == [0, 1, 6] and (got.method[[0, 1, 4]] == EXACT).all()
    assert got.target[2] == 2 and got.method[2] == STATS
    assert got.method[3] == MINED and got.target[3] != 0  # stats pointed at the special <s>: refused
    assert got.target[5] == -1 and got.method[5] == UNMAPPED
    assert got.coverage()["exact"] == pytest.approx(3 / 6)


def test_first_piece_on_toy_pieces_prefers_the_tokenizer_then_the_longest_prefix():
    pivot = VocabPieces.from_pieces(
        [b"<s>", b" Men", b" Mensch", b"r", b"\xd1", b"\xd1\x80", b"x", b"\xd1"],
        special=[1, 0, 0, 0, 0, 0, 0, 0],
        byte_fallback=[0, 0, 0, 0, 0, 0, 0, 1],
    )
    source = VocabPieces.from_pieces(
        [b" Menschen", b"\xd1\x80\xd0", b"\xd1", b"<s>", b"qq"], special=[0, 0, 0, 1, 0]
    )
    wanted = np.arange(5)
    # no tokenizer: the longest regular prefix; a byte-fallback token only where no regular token has those bytes
    assert first_piece_map(source, pivot, wanted).tolist() == [2, 5, 4, -1, -1]  # never a special token
    # the tokenizer's first id wins where it is a prefix; refused where it is not (" Menschen" -> "x")
    assert first_piece_map(source, pivot, wanted[:1], lambda texts: [[1, 2]]).tolist()[0] == 1
    assert first_piece_map(source, pivot, wanted[:1], lambda texts: [[6]]).tolist()[0] == 2
    got = build_vocab_map(source, pivot, None, needed=wanted, methods=("exact", "first_piece"))
    assert got.method.tolist() == [FIRST_PIECE, FIRST_PIECE, EXACT, EXACT, UNMAPPED]


@pytest.mark.parametrize("pair", [("llama3", "gemma3"), ("gemma3", "llama3"), ("llama2", "qwen3")])
def test_first_piece_is_what_the_pivot_writes_first_on_real_vocabularies(pair):
    """Against a brute-force reference on real vocabularies: every mapped id is a byte prefix of its source token;
    where the source token is whole UTF-8 and the pivot tokenizer's first id for its text is such a prefix, that id;
    otherwise the longest regular pivot token that is one, found by testing every pivot token with the same first
    byte. MinED, on the same ids, is mostly not a prefix (why first_piece exists)."""
    from real_tokenizers import load

    p_tok, s_tok = (load(name) for name in pair)
    pivot, source = vocab_pieces(p_tok), vocab_pieces(s_tok)
    rng = np.random.default_rng(0)
    regular = np.flatnonzero(~source.special & (source.lengths > 0))
    wanted = rng.choice(regular, 400, replace=False)
    encode = lambda texts: p_tok(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    got = first_piece_map(source, pivot, wanted, encode)
    by_first: dict[int, list[int]] = {}
    for pid in np.flatnonzero(~pivot.special & (pivot.lengths > 0)):
        by_first.setdefault(pivot.pieces[pid][0], []).append(int(pid))
    used_tokenizer = 0
    for sid in wanted:
        piece = source.pieces[sid]
        expected = None
        try:
            first = p_tok(piece.decode("utf-8"), add_special_tokens=False)["input_ids"][0]
            if piece.startswith(pivot.pieces[first]) and not pivot.special[first]:
                expected, used_tokenizer = first, used_tokenizer + 1
        except (UnicodeDecodeError, IndexError):
            pass
        if expected is None:
            prefixes = [p for p in by_first.get(piece[0], []) if piece.startswith(pivot.pieces[p])]
            longest = max((pivot.lengths[p] for p in prefixes), default=0)
            best = [p for p in prefixes if pivot.lengths[p] == longest]
            regular_best = [p for p in best if not pivot.byte_fallback[p]]
            expected = min(regular_best or best, default=-1)
        assert got[sid] == expected, (piece, pivot.pieces[got[sid]], pivot.pieces[expected])
        assert piece.startswith(pivot.pieces[got[sid]])
    assert used_tokenizer >= 100  # the tokenizer decides often (less where it prepends a space: llama2)
    pool = np.flatnonzero(~pivot.special & (pivot.lengths > 0))
    mined = [mined_one(source.pieces[s], pivot, pool) for s in wanted[:60]]
    assert (
        np.mean(
            [source.pieces[s].startswith(pivot.pieces[m]) for s, m in zip(wanted[:60], mined, strict=True)]
        )
        < 0.9
    )


def test_mined_matches_brute_force_edit_distance():
    rng = np.random.default_rng(0)
    words = sorted({bytes(rng.choice(list(b"abcde"), rng.integers(1, 6))) for _ in range(200)})
    pivot = VocabPieces.from_pieces(words)
    pool = np.arange(len(words))
    for query in (b"abc", b"eeeee", b"dab", b"cabbage"):
        got = mined_one(query, pivot, pool, width=10)
        best = min(edit_distance(query.decode(), w.decode()) for w in words if w[:1] == query[:1])
        assert edit_distance(query.decode(), words[got].decode()) == best


# ---------------------------------------------------------------- properties over locally trained tokenizers

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Zorbish words: florp, quanzle, mib!",
    "Numbers 12345 and 67, café naïve 中文 😀 tabs\tand  double  spaces.\nNew line.",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(2, 3))",
] * 8


@pytest.fixture(scope="module")
def tokenizers():
    from fuse.zoo.vocab import CHATML, GEMMA_TURNS, LLAMA_INST, VocabSpec, train_tokenizer

    specs = {
        "bytelevel": VocabSpec(
            "bytelevel_bpe",
            400,
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            {"eos": "<|endoftext|>"},
            CHATML,
            split_digits=True,
        ),
        "metaspace_bpe": VocabSpec(
            "metaspace_bpe",
            420,
            ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
            {"unk": "<unk>", "bos": "<s>", "eos": "</s>"},
            LLAMA_INST,
        ),
        "unigram": VocabSpec(
            "metaspace_unigram",
            380,
            ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
            {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"},
            GEMMA_TURNS,
        ),
    }
    return {name: train_tokenizer(TEXTS, spec) for name, spec in specs.items()}


def render(tokenizer, messages):
    from fuse.data.chat import render_chat

    chat = render_chat(tokenizer, messages)
    spans = np.array([[s.start, s.end] for s in chat.spans]).reshape(-1, 2)
    return Rendered(chat.input_ids, spans, chat.text, chat.offsets)


def brute_cover(rendered: Rendered, vocab: VocabPieces) -> list[tuple[int, int, int]]:
    """Reference: (message, content byte, token) for the content bytes of tokens lying inside a content span,
    walking their pieces one by one (a token straddling a span edge carries template text: left out)."""
    out = []
    raw = rendered.text.encode()
    to_byte = char_to_byte(rendered.text)
    for m, (a, b) in enumerate(rendered.content_spans):
        lo, hi, pos = int(to_byte[a]), int(to_byte[b]), None
        for t, tid in enumerate(rendered.ids):
            start_char, end_char = rendered.offsets[t]
            if start_char < a or end_char > b or vocab.special[tid]:
                continue
            piece = vocab.pieces[tid]
            if pos is None:
                pos = int(to_byte[start_char]) - lo
                if piece[:1] == b" " and raw[lo + pos : lo + pos + 1] != b" ":
                    piece = piece[1:]  # a space the tokenizer invented
            out.extend((m, pos + k, t) for k in range(len(piece)))
            pos += len(piece)
        assert pos is None or pos <= hi - lo
    return out


message_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=40
).map(lambda s: s.strip() or "x")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    user=message_text,
    answer=message_text,
    pair=st.sampled_from(
        [("bytelevel", "metaspace_bpe"), ("unigram", "bytelevel"), ("metaspace_bpe", "unigram")]
    ),
)
def test_content_alignment_properties(tokenizers, user, answer, pair):
    pivot_tok, source_tok = (tokenizers[name] for name in pair)
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    pivot, source = render(pivot_tok, messages), render(source_tok, messages)
    p_vocab, s_vocab = vocab_pieces(pivot_tok), vocab_pieces(source_tok)
    result = align_content(pivot, source, p_vocab, s_vocab)
    alignment = result.alignment
    # every content byte is covered by exactly one token on each side (brute force walks the pieces)
    p_cover, s_cover = brute_cover(pivot, p_vocab), brute_cover(source, s_vocab)
    for cover in (p_cover, s_cover):  # no content byte is covered twice
        assert len({c[:2] for c in cover}) == len(cover)
    # a pivot token and the source token said to start with it start at the same content byte
    p_first = {t: (m, pos) for m, pos, t in reversed(p_cover)}
    s_first = {t: (m, pos) for m, pos, t in reversed(s_cover)}
    for j in np.flatnonzero(alignment.source_index >= 0):
        assert p_first[int(j)] == s_first[int(alignment.source_index[j])]
    # template tokens are never aligned; only pivot tokens with content bytes are
    content_tokens = {t for _, _, t in p_cover}
    assert all(
        alignment.kind[j] == TEMPLATE or j in content_tokens or alignment.kind[j] == UNALIGNED
        for j in range(len(pivot.ids))
    )
    assert all(alignment.kind[j] == TEMPLATE for j in range(len(pivot.ids)) if j not in content_tokens)
    # projection: a projected row keeps the mapped share of the source's mass (the rest is the tail), fallbacks
    # are one-hot on the token they predict
    rng = np.random.default_rng(0)
    k = 4
    s_ids = rng.integers(0, len(s_vocab), (len(source.ids), k))
    s_lps = np.log(rng.dirichlet(np.ones(k), len(source.ids)))
    vocab_map = build_vocab_map(s_vocab, p_vocab, needed=np.unique(s_ids))
    options = ProjectOptions("sound", chunk=False)
    steps = Steps.bare(pivot.ids), Steps.bare(source.ids, s_ids, s_lps)
    out = project(alignment, *steps, vocab_map.target, len(p_vocab), options)
    sums = np.exp(out.logprobs.astype(np.float64)).sum(axis=1)
    expected = np.where(np.isnan(out.kept_mass), 1.0, out.kept_mass)
    assert sums == pytest.approx(expected, abs=1e-5)
    fallback = out.signal != PROJECTED
    assert (out.ids[fallback, 0] == pivot.ids[fallback]).all() and np.isnan(out.kept_mass[fallback]).all()


def test_truncated_source_contents_align_with_nothing():
    vocab = VocabPieces.from_pieces([b"<s>", b"ab", b"c", b"a", b"bc"], special=[1, 0, 0, 0, 0])
    pivot = Rendered(
        np.array([0, 1, 2, 0, 1, 2]),
        np.array([[3, 6], [9, 12]]),
        "<s>abc<s>abc",
        np.array([[0, 3], [3, 5], [5, 6], [6, 9], [9, 11], [11, 12]]),
    )
    source = Rendered(np.array([0, 3, 4]), np.array([[3, 6]]), "<s>abc", np.array([[0, 3], [3, 4], [4, 6]]))
    got = align_content(pivot, source, vocab, vocab).alignment
    assert got.kind.tolist() == [TEMPLATE, MANY_TO_ONE, UNALIGNED, TEMPLATE, UNALIGNED, UNALIGNED]
    assert got.source_index.tolist() == [-1, 1, -1, -1, -1, -1]
