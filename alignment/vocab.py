"""Vocabulary map source -> pivot: exact byte match, then statistics over aligned pairs (FuseChat), then minimum
edit distance (FuseLLM) as the last resort; every entry tagged with the method that made it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from fuse.alignment.pieces import VocabPieces

UNMAPPED, EXACT, STATS, MINED, ROLE = 0, 1, 2, 3, 4
METHOD_NAMES = {UNMAPPED: "unmapped", EXACT: "exact", STATS: "stats", MINED: "mined", ROLE: "role"}


@dataclass(frozen=True)
class VocabMap:
    target: np.ndarray  # int64 per source id: pivot id, -1 when unmapped
    method: np.ndarray  # int8 per source id: UNMAPPED / EXACT / STATS / MINED / ROLE

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


def build_vocab_map(
    source: VocabPieces,
    pivot: VocabPieces,
    counts: sparse.csr_matrix | None = None,
    needed: np.ndarray | None = None,
    methods: tuple[str, ...] = ("exact", "stats", "mined"),
    min_count: int = 1,
    roles: dict[int, int] | None = None,
) -> VocabMap:
    """Exact for the whole vocabulary; stats and MinED for the source ids still unmapped (MinED only for the
    `needed` ones, e.g. ids that occur in the source's top-K, since it is the costly step).

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
    if "mined" in methods:
        pool = np.flatnonzero(~pivot.special & (pivot.lengths > 0))
        wanted = np.arange(len(source)) if needed is None else np.unique(np.asarray(needed, np.int64))
        for sid in wanted[(target[wanted] < 0) & ~source.special[wanted] & (source.lengths[wanted] > 0)]:
            target[sid] = mined_one(source.pieces[sid], pivot, pool)
            method[sid] = MINED if target[sid] >= 0 else UNMAPPED
    return VocabMap(target, method)
