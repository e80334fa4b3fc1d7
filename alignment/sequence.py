"""Sequence alignment of two tokenizations of the same text: which source token starts (and ends) where each
pivot token does, by byte positions (vectorized searchsorted), with an edit-distance DTW fallback.

Positions are UTF-8 byte offsets, so tokens that split one character (byte-level BPE, `<0xNN>` fallback) keep
exact boundaries. Only the text of message contents is aligned; `align_content` restricts to those spans.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fuse.alignment.pieces import VocabPieces, gather_bytes
from fuse.registry import Registry

ONE_TO_ONE, MANY_TO_ONE, UNALIGNED, TEMPLATE = 0, 1, 2, 3
KIND_NAMES = {ONE_TO_ONE: "1:1", MANY_TO_ONE: "many:1", UNALIGNED: "unaligned", TEMPLATE: "template"}


@dataclass(frozen=True)
class SequenceAlignment:
    """Per pivot token: the source token starting at the same byte (-1: none), how the two relate (`kind`), the
    first/last source tokens overlapping its text (-1: none) and whether the last of them ends where it ends.

    MANY_TO_ONE ("same start, different end") has two directions: the source spells the pivot token in several
    pieces (`split`: its first piece is a prefix, so its distribution is over prefixes) or the source token covers
    the pivot token and more (`covers`: sound to project, the pivot token is a prefix of every continuation)."""

    source_index: np.ndarray
    kind: np.ndarray
    cover_first: np.ndarray
    cover_last: np.ndarray
    ends_together: np.ndarray

    @classmethod
    def empty(cls, n: int, kind: int = TEMPLATE) -> SequenceAlignment:
        minus = np.full(n, -1, np.int64)
        return cls(minus, np.full(n, kind, np.int8), minus.copy(), minus.copy(), np.zeros(n, bool))

    @property
    def split(self) -> np.ndarray:
        """Same start, and the pivot token is spelled by several source tokens (source_index .. cover_last)."""
        return (self.kind == MANY_TO_ONE) & (self.cover_last > self.source_index)

    @property
    def covers(self) -> np.ndarray:
        """Same start, and the source token is longer than the pivot token (it covers it)."""
        return (self.kind == MANY_TO_ONE) & (self.cover_last == self.source_index)


ALIGNERS: Registry[Callable[..., SequenceAlignment]] = Registry("alignment method")
ALIGNER_REFERENCES: dict[str, str] = {}


def aligner(name: str, reference_url: str) -> Callable:
    """Register an interchangeable sequence-alignment method (settings: `align.method`)."""

    def register(function: Callable[..., SequenceAlignment]) -> Callable[..., SequenceAlignment]:
        ALIGNERS.add(name, function)
        ALIGNER_REFERENCES[name] = reference_url
        return function

    return register


def align_spans(
    pivot_starts: np.ndarray, pivot_ends: np.ndarray, source_starts: np.ndarray, source_ends: np.ndarray
) -> SequenceAlignment:
    """Core alignment over [start, end) positions in one coordinate system (sorted, non-overlapping per side).
    Empty tokens never align: they stand for no text of their own."""
    p_start, p_end = np.asarray(pivot_starts, np.int64), np.asarray(pivot_ends, np.int64)
    s_start, s_end = np.asarray(source_starts, np.int64), np.asarray(source_ends, np.int64)
    keep = np.flatnonzero(s_end > s_start)
    if keep.size == 0 or p_start.size == 0:
        return SequenceAlignment.empty(p_start.size, UNALIGNED)
    ks, ke = s_start[keep], s_end[keep]
    pos = np.minimum(np.searchsorted(ks, p_start), keep.size - 1)
    same_start = (ks[pos] == p_start) & (p_end > p_start)
    same_end = same_start & (ke[pos] == p_end)
    kind = np.where(same_end, ONE_TO_ONE, np.where(same_start, MANY_TO_ONE, UNALIGNED)).astype(np.int8)
    first = np.searchsorted(ke, p_start, side="right")
    last = np.searchsorted(ks, p_end, side="left") - 1
    covered = (first <= last) & (p_end > p_start)
    cover_first = np.where(covered, keep[np.minimum(first, keep.size - 1)], -1)
    cover_last = np.where(covered, keep[np.maximum(last, 0)], -1)
    ends_together = covered & (ke[np.clip(last, 0, keep.size - 1)] == p_end)
    return SequenceAlignment(
        np.where(same_start, keep[pos], -1), kind, cover_first, cover_last, ends_together
    )


def char_to_byte(text: str) -> np.ndarray:
    """Byte offset of every character offset 0..len(text) (vectorized over UTF-32 code points)."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)
    return np.concatenate(([0], np.cumsum(widths))).astype(np.int64)


def spans_from_offsets(offsets: np.ndarray, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token [start, end) in bytes from a tokenizer's character offsets. Tokens that share a character (byte
    pieces of one emoji) overlap in offsets: each is cut at the next token's start, so only the last keeps it."""
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    to_byte = char_to_byte(text)
    starts, ends = to_byte[offsets[:, 0]], to_byte[offsets[:, 1]]
    if ends.size:
        ends = np.maximum.accumulate(np.minimum(ends, np.append(starts[1:], ends[-1])))
        starts = np.minimum(starts, ends)
    return starts, ends


def region_spans(
    ids: np.ndarray, vocab: VocabPieces, content: bytes, first_start: int = 0
) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """Exact [start, end) of a region's tokens relative to its content, from their bytes, if the tokens spell
    the content from byte `first_start` on. A leading space that the tokenizer invented (Metaspace prepends `▁`;
    a template space merged into the first token) is cut from the first token, which is then flagged unsound.
    None when the bytes do not match (normalizers that rewrite text): use offsets or DTW instead."""
    ids = np.asarray(ids, np.int64)
    spelled = gather_bytes(ids, vocab).tobytes()
    lengths = vocab.lengths[ids]
    for skip in (0, 1):
        if spelled[skip:] == content[first_start : first_start + len(spelled) - skip] and (
            skip == 0 or spelled[:1] == b" "
        ):
            ends = first_start - skip + np.cumsum(lengths)
            return np.maximum(ends - lengths, first_start), ends, bool(skip)
    return None


@lru_cache(maxsize=1 << 20)
def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (plain DP; memoized because token strings repeat)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def dtw_path(pivot: Sequence[str], source: Sequence[str]) -> np.ndarray:
    """FuseLLM-style dynamic time warping over token strings with edit-distance costs; the path as (k, 2)."""
    n, m = len(pivot), len(source)
    inf = float("inf")
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    cost[0][0] = 0.0
    for i in range(1, n + 1):
        row, above, a = cost[i], cost[i - 1], pivot[i - 1]
        for j in range(1, m + 1):
            row[j] = edit_distance(a, source[j - 1]) + min(above[j], row[j - 1], above[j - 1])
    path, i, j = [], n, m
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        step = min((cost[i - 1][j - 1], 0), (cost[i - 1][j], 1), (cost[i][j - 1], 2))[1]
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    return np.array(path[::-1], dtype=np.int64).reshape(-1, 2)


def alignment_from_path(path: np.ndarray, n_pivot: int, n_source: int) -> SequenceAlignment:
    """Turn a monotone DTW path into the same per-pivot-token view the byte aligner gives: a pivot and a source
    token 'start together' when each is the other's first partner; 1:1 when they are each other's only one."""
    if n_pivot == 0 or n_source == 0 or path.size == 0:
        return SequenceAlignment.empty(n_pivot, UNALIGNED)
    p, s = path[:, 0], path[:, 1]
    p_first = np.full(n_pivot, -1, np.int64)
    s_first = np.full(n_source, -1, np.int64)
    p_first[p[::-1]] = s[::-1]  # reversed so the first cell of each run wins
    s_first[s[::-1]] = p[::-1]
    p_last = np.full(n_pivot, -1, np.int64)
    p_last[p] = s
    p_count, s_count = np.bincount(p, minlength=n_pivot), np.bincount(s, minlength=n_source)
    together = s_first[p_first] == np.arange(n_pivot)
    single = (p_count == 1) & (s_count[p_first] == 1)
    kind = np.where(together & single, ONE_TO_ONE, np.where(together, MANY_TO_ONE, UNALIGNED)).astype(np.int8)
    s_last = np.full(n_source, -1, np.int64)
    s_last[s] = p
    ends_together = (p_last >= 0) & (s_last[np.maximum(p_last, 0)] == np.arange(n_pivot))
    return SequenceAlignment(np.where(together, p_first, -1), kind, p_first, p_last, ends_together)


@aligner("dtw", reference_url="https://arxiv.org/abs/2401.10491")
def align_dtw(
    pivot_ids: np.ndarray, source_ids: np.ndarray, pivot: VocabPieces, source: VocabPieces, **_: object
) -> SequenceAlignment:
    """Edit-distance DTW over token strings (FuseLLM/FuseChat): for tokenizers whose pieces or offsets
    cannot be trusted. Quadratic, in Python: regions only, never whole corpora."""
    p_text = [pivot.text(int(i)) for i in pivot_ids]
    s_text = [source.text(int(i)) for i in source_ids]
    return alignment_from_path(dtw_path(p_text, s_text), len(p_text), len(s_text))


@aligner("offsets", reference_url="https://arxiv.org/abs/2408.07990")
def align_offsets(
    pivot_ids: np.ndarray,
    source_ids: np.ndarray,
    pivot: VocabPieces,
    source: VocabPieces,
    pivot_spans: tuple[np.ndarray, np.ndarray] | None = None,
    source_spans: tuple[np.ndarray, np.ndarray] | None = None,
) -> SequenceAlignment:
    """Byte-position alignment (exact, vectorized); DTW only where either side's positions are unknown."""
    if pivot_spans is None or source_spans is None:
        return align_dtw(pivot_ids, source_ids, pivot, source)
    return align_spans(*pivot_spans, *source_spans)
