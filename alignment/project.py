"""Distribution projection: each pivot step gets the source's top-K distribution from the source step that
predicts the same next text, mapped into the pivot vocabulary (colliding ids summed), or else a one-hot on the
gold next token. Every case is counted.

Normalization (the same for every teacher): a sparse teacher keeps the probabilities its model gave, and the mass
outside its ids (beyond the top-K, or on ids the vocabulary map could not place) stays in the loss's tail bucket.
That is the teacher's true distribution coarse-grained onto {ids} ∪ {rest}, whose optimum for the student is still
the teacher. Renormalizing over the mapped ids (FuseChat's softmax over the top-K) would move the tail's mass onto
the top-K and make a projected source sharper than it is, and sharper than the pivot, whose extract keeps its tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fuse.alignment.sequence import MANY_TO_ONE, ONE_TO_ONE, TEMPLATE, UNALIGNED, SequenceAlignment

# Cases per pivot step (indexed by the token it predicts).
(
    PROJECTED_1TO1,
    PROJECTED_MANY,
    FALLBACK_UNALIGNED,
    FALLBACK_TEMPLATE,
    FALLBACK_UNMAPPED,
    FALLBACK_NO_SOURCE,
) = range(6)
CASE_NAMES = {
    PROJECTED_1TO1: "projected_1:1",
    PROJECTED_MANY: "projected_many:1",
    FALLBACK_UNALIGNED: "fallback_unaligned",
    FALLBACK_TEMPLATE: "fallback_template",
    FALLBACK_UNMAPPED: "fallback_unmapped",
    FALLBACK_NO_SOURCE: "fallback_first_token",
}


@dataclass(frozen=True)
class Projection:
    """Pivot-vocabulary top-K per predicted token (ids padded with -1, log-probs with -inf), the gold token's
    log-prob under it, the case, and the share of source top-K mass that survived the vocab map (NaN: fallback)."""

    ids: np.ndarray
    logprobs: np.ndarray
    realized: np.ndarray
    case: np.ndarray
    kept_mass: np.ndarray

    def counts(self) -> dict[str, int]:
        tally = np.bincount(self.case, minlength=len(CASE_NAMES))
        return {CASE_NAMES[c]: int(tally[c]) for c in CASE_NAMES}


def map_topk(
    ids: np.ndarray, logprobs: np.ndarray, target: np.ndarray, n_pivot: int
) -> tuple[np.ndarray, ...]:
    """Map rows of source top-K ids through `target` (-1 = unmapped), sum probabilities of ids that collide and
    sort each row by probability (not renormalized: see the module docstring). Returns (ids, probs, kept share of
    the row's top-K mass)."""
    ids, logprobs = np.asarray(ids, np.int64), np.asarray(logprobs, np.float64)
    rows_n, k = ids.shape
    valid = (ids >= 0) & np.isfinite(logprobs)
    mapped = np.where(valid, target[np.where(valid, ids, 0)], -1)
    probs = np.where(valid, np.exp(np.where(valid, logprobs, 0.0)), 0.0)
    ok = mapped >= 0
    key = (np.arange(rows_n)[:, None] * n_pivot + mapped)[ok]
    unique, inverse = np.unique(key, return_inverse=True)
    summed = np.bincount(inverse, weights=probs[ok])
    rows, cols = unique // n_pivot, unique % n_pivot
    order = np.lexsort((cols, -summed, rows))
    rows, cols, summed = rows[order], cols[order], summed[order]
    rank = np.arange(rows.size) - np.searchsorted(rows, rows)
    kept = np.bincount(rows, weights=summed, minlength=rows_n)
    out_ids = np.full((rows_n, k), -1, np.int64)
    out_probs = np.zeros((rows_n, k))
    out_ids[rows, rank] = cols
    out_probs[rows, rank] = summed
    total = probs.sum(axis=1)
    return out_ids, out_probs, np.divide(kept, total, out=np.zeros(rows_n), where=total > 0)


def project(
    alignment: SequenceAlignment,
    pivot_gold: np.ndarray,
    source_ids: np.ndarray,
    source_logprobs: np.ndarray,
    target: np.ndarray,
    n_pivot: int,
    allow: tuple[int, ...] = (ONE_TO_ONE, MANY_TO_ONE),
) -> Projection:
    """Row j of every array predicts pivot token j (`pivot_gold[j]`); row i of the source arrays predicts source
    token i. A pivot row is projected from source row `alignment.source_index[j]` when the kind is allowed and
    some top-K mass maps; otherwise it is one-hot on `pivot_gold[j]`, i.e. the shifted label, never the input."""
    gold = np.asarray(pivot_gold, np.int64)
    n, k = gold.size, source_ids.shape[1]
    source_row = alignment.source_index
    usable = np.isin(alignment.kind, allow) & (source_row > 0)  # source row 0 predicts nothing (no context)
    rows = np.flatnonzero(usable)
    m_ids, m_probs, kept = map_topk(
        source_ids[source_row[rows]], source_logprobs[source_row[rows]], target, n_pivot
    )
    mapped = m_ids[:, 0] >= 0
    rows, m_ids, m_probs, kept = rows[mapped], m_ids[mapped], m_probs[mapped], kept[mapped]
    case = np.select(
        [alignment.kind == TEMPLATE, alignment.kind == UNALIGNED, source_row == 0, np.ones(n, bool)],
        [FALLBACK_TEMPLATE, FALLBACK_UNALIGNED, FALLBACK_NO_SOURCE, FALLBACK_UNMAPPED],
    ).astype(np.int8)
    case[rows] = np.where(alignment.kind[rows] == ONE_TO_ONE, PROJECTED_1TO1, PROJECTED_MANY)
    ids = np.full((n, k), -1, np.int64)
    ids[:, 0] = gold
    probs = np.zeros((n, k))
    probs[:, 0] = 1.0
    ids[rows], probs[rows] = m_ids, m_probs
    with np.errstate(divide="ignore"):
        logprobs = np.where(ids >= 0, np.log(probs), -np.inf)
    hit = ids == gold[:, None]
    realized = np.where(hit.any(axis=1), np.where(hit, logprobs, 0.0).sum(axis=1), -np.inf)
    kept_mass = np.full(n, np.nan)
    kept_mass[rows] = kept
    return Projection(ids, logprobs.astype(np.float32), realized.astype(np.float32), case, kept_mass)
