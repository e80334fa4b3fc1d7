"""Vocabulary map source -> pivot: exact byte match, then statistics over aligned pairs (FuseChat), then, for the
source ids still unmapped, either minimum edit distance (FuseLLM, FuseChat) or the first piece (the pivot token the
pivot itself writes first when it spells the source token's text); every entry tagged with the method that made it.

Why the first piece: a source candidate at a position where its token covers the pivot's next token (the pivot spells
it in pieces) says "the text continues with these bytes", so its probability belongs to the pivot token those bytes
begin with. MinED instead picks a pivot token of similar length and spelling, which is a different word more often
than not (Russian "ро" lands on "ра", "<sup>" on "</"): on the real SmolLM2 <- gemma-3 pair, 76% of MinED's entries
are not a prefix of their source token, and they carry most of the projected top-K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from fuse.alignment.pieces import VocabPieces

UNMAPPED, EXACT, STATS, MINED, ROLE, FIRST_PIECE = 0, 1, 2, 3, 4, 5
METHOD_NAMES = {
    UNMAPPED: "unmapped",
    EXACT: "exact",
    STATS: "stats",
    MINED: "mined",
    ROLE: "role",
    FIRST_PIECE: "first_piece",
}


@dataclass(frozen=True)
class VocabMap:
    target: np.ndarray  # int64 per source id: pivot id, -1 when unmapped
    method: np.ndarray  # int8 per source id: a METHOD_NAMES key

    def coverage(self, ids: np.ndarray | None = None) -> dict[str, float]:
        """Share of (the given) source ids mapped by each method."""
        methods = self.method if ids is None else self.method[np.asarray(ids, np.int64)]
        counts = np.bincount(methods, minlength=len(METHOD_NAMES))
        return {METHOD_NAMES[m]: float(counts[m] / max(methods.size, 1)) for m in METHOD_NAMES}


def exact_map(source: VocabPieces, pivot: VocabPieces) -> np.ndarray:
    """Pivot id with the same bytes (special tokens only to special tokens of the same content). Ties: a regular
    token beats a byte-fallback one (both may spell b' '), then the lowest id."""
    index: dict[tuple[bytes, bool], int] = {}
    for pid in sorted(range(len(pivot)), key=lambda i: (bool(pivot.byte_fallback[i]), i), reverse=True):
        if pivot.lengths[pid] > 0:
            index[(pivot.pieces[pid], bool(pivot.special[pid]))] = pid  # later (better) entries overwrite
    return np.array(
        [
            index.get((piece, bool(special)), -1)
            for piece, special in zip(source.pieces, source.special, strict=True)
        ],
        dtype=np.int64,
    )


def pair_counts(
    source_ids: np.ndarray, pivot_ids: np.ndarray, n_source: int, n_pivot: int
) -> sparse.csr_matrix:
    """Sparse co-occurrence counts of aligned (source token, pivot token) pairs; duplicates summed."""
    source_ids, pivot_ids = np.asarray(source_ids, np.int64), np.asarray(pivot_ids, np.int64)
    data = np.ones(source_ids.size, np.int64)
    return sparse.coo_matrix((data, (source_ids, pivot_ids)), shape=(n_source, n_pivot)).tocsr()


def stats_map(counts: sparse.csr_matrix, min_count: int = 1) -> np.ndarray:
    """For each source id, the pivot id it was aligned with most often (ties: lowest pivot id); -1 below
    `min_count` or never seen."""
    counts = counts.tocsr()
    counts.sum_duplicates()
    target = np.full(counts.shape[0], -1, np.int64)
    rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    if rows.size == 0:
        return target
    order = np.lexsort((counts.indices, -counts.data, rows))  # per row: most counts first, then lowest id
    rows, cols, data = rows[order], counts.indices[order], counts.data[order]
    first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    best = first[data[first] >= min_count]
    target[rows[best]] = cols[best]
    return target


def _levenshtein_many(word: np.ndarray, candidates: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Edit distance of one byte string to many (rows of `candidates`, padded with 256), vectorized over rows."""
    n, width = candidates.shape
    previous = np.broadcast_to(np.arange(width + 1), (n, width + 1)).copy()
    for i, byte in enumerate(word, 1):
        current = np.empty_like(previous)
        current[:, 0] = i
        substitute = previous[:, :-1] + (candidates != byte)
        best = np.minimum(previous[:, 1:] + 1, substitute)
        for k in range(width):  # the left neighbour is sequential; the loop is over bytes, not tokens
            current[:, k + 1] = np.minimum(best[:, k], current[:, k] + 1)
        previous = current
    return previous[np.arange(n), lengths]


def mined_one(piece: bytes, pivot: VocabPieces, pool: np.ndarray, width: int = 3) -> int:
    """Pivot id at minimum edit distance from `piece` among regular tokens of similar length (same first byte
    preferred). Ties: longer shared prefix, then lowest id. -1 if the pool is empty."""
    near = pool[np.abs(pivot.lengths[pool] - len(piece)) <= width]
    same_first = near[pivot.flat[pivot.starts[near]] == piece[0]] if piece else near
    candidates = same_first if same_first.size else near
    if candidates.size == 0:
        return -1
    lengths = pivot.lengths[candidates]
    grid = np.full((candidates.size, int(lengths.max())), 256, np.int64)
    mask = np.arange(grid.shape[1]) < lengths[:, None]
    grid[mask] = pivot.flat[
        np.repeat(pivot.starts[candidates], lengths) + (np.cumsum(mask, axis=1)[mask] - 1)
    ]
    word = np.frombuffer(piece, np.uint8).astype(np.int64)
    distance = _levenshtein_many(word, grid, lengths)
    limit = min(grid.shape[1], word.size)
    prefix = np.cumprod(grid[:, :limit] == word[None, :limit], axis=1).sum(axis=1)
    return int(candidates[np.lexsort((candidates, -prefix, distance))[0]])


def longest_prefix(piece: bytes, by_bytes: dict[bytes, int]) -> int:
    """The pivot id of the longest pivot token whose bytes begin `piece` (-1 if none)."""
    for end in range(len(piece), 0, -1):
        found = by_bytes.get(piece[:end])
        if found is not None:
            return found
    return -1


def first_piece_map(
    source: VocabPieces,
    pivot: VocabPieces,
    wanted: np.ndarray,
    encode: Callable[[list[str]], list[list[int]]] | None = None,
) -> np.ndarray:
    """For each `wanted` source id: the pivot id the pivot writes first when it spells that token's bytes.

    `encode` (the pivot tokenizer on a batch of texts) decides where it can: its first id is kept when that token's
    bytes begin the source token's (a tokenizer that prepends a space to every text, or normalizes, fails that test).
    Otherwise, and for pieces that are not whole UTF-8 (byte-fallback and partial characters), the longest regular
    pivot token that is a byte prefix of the piece. -1 where nothing is (an empty piece). Context-free: inside a
    word, the pivot's merges can start the same text differently (the corpus statistics map catches those)."""
    target = np.full(len(source), -1, np.int64)
    by_bytes: dict[bytes, int] = {}
    # regular tokens, lowest id first among equal bytes; byte-fallback `<0xNN>` only where no regular token has them
    for pid in np.flatnonzero(~pivot.special & (pivot.lengths > 0))[::-1]:
        if not pivot.byte_fallback[pid] or pivot.pieces[pid] not in by_bytes:
            by_bytes[pivot.pieces[pid]] = int(pid)
    wanted = np.asarray(wanted, np.int64)
    texts, tried = [], []
    for sid in wanted:
        try:
            texts.append(source.pieces[sid].decode("utf-8"))
            tried.append(int(sid))
        except UnicodeDecodeError:
            pass
    if encode is not None and texts:
        for sid, ids in zip(tried, encode(texts), strict=True):
            first = ids[0] if ids and 0 <= ids[0] < len(pivot) else -1
            regular = first >= 0 and pivot.lengths[first] > 0 and not pivot.special[first]
            if regular and source.pieces[sid].startswith(pivot.pieces[first]):
                target[sid] = first
    for sid in wanted[target[wanted] < 0]:
        target[sid] = longest_prefix(source.pieces[sid], by_bytes)
    return target


def build_vocab_map(
    source: VocabPieces,
    pivot: VocabPieces,
    counts: sparse.csr_matrix | None = None,
    needed: np.ndarray | None = None,
    methods: tuple[str, ...] = ("exact", "stats", "mined"),
    min_count: int = 1,
    roles: dict[int, int] | None = None,
    encode: Callable[[list[str]], list[list[int]]] | None = None,
) -> VocabMap:
    """Exact for the whole vocabulary; stats and MinED for the source ids still unmapped (MinED only for the
    `needed` ones, e.g. ids that occur in the source's top-K, since it is the costly step).

    `encode` (the pivot tokenizer on a batch of texts) serves `first_piece` (`first_piece_map`).
    `roles` maps source ids to pivot ids by what they do, before anything else: the source's end-of-turn token
    goes to the pivot's, never to a pivot token that merely has the same name (gpt2's `<|endoftext|>` is Qwen's
    document end, not the end of a chat turn, which is `<|im_end|>`)."""
    target = np.full(len(source), -1, np.int64)
    method = np.zeros(len(source), np.int8)
    if "exact" in methods:
        target = exact_map(source, pivot)
        method[target >= 0] = EXACT
    for source_id, pivot_id in (roles or {}).items():
        if 0 <= source_id < len(source) and 0 <= pivot_id < len(pivot):
            target[source_id], method[source_id] = pivot_id, ROLE
    if "stats" in methods and counts is not None:
        stats = stats_map(counts, min_count)
        # text tokens only: a special pivot target would put template mass inside content
        fill = (target < 0) & (stats >= 0) & ~source.special & ~pivot.special[np.maximum(stats, 0)]
        target[fill], method[fill] = stats[fill], STATS
    candidates = np.arange(len(source)) if needed is None else np.unique(np.asarray(needed, np.int64))

    def still_unmapped() -> np.ndarray:
        """The needed regular source ids nothing has mapped yet (MinED's and first_piece's work)."""
        keep = (target[candidates] < 0) & ~source.special[candidates] & (source.lengths[candidates] > 0)
        return candidates[keep]

    if "mined" in methods:
        pool = np.flatnonzero(~pivot.special & (pivot.lengths > 0))
        for sid in still_unmapped():
            target[sid] = mined_one(source.pieces[sid], pivot, pool)
            method[sid] = MINED if target[sid] >= 0 else UNMAPPED
    if "first_piece" in methods:
        wanted = still_unmapped()
        first = first_piece_map(source, pivot, wanted, encode)
        target[wanted] = first[wanted]
        method[wanted] = np.where(first[wanted] >= 0, FIRST_PIECE, UNMAPPED)
    return VocabMap(target, method)
