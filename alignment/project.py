"""Distribution projection: what each pivot step receives from a source, and why.

Row j predicts pivot token j. What the source can say about it depends on how the two tokenizations relate at
that token (its `cause`):

- `1:1`: a source token spells the same text; the step before it predicts the same next text.
- `source_covers`: a source token starts there and is longer (the pivot token is its prefix). Each of that
  step's candidates maps to the pivot token it begins with: sound in this direction.
- `split`: the source spells the pivot token in several pieces, so its step is a distribution over first
  pieces (prefixes): a prefix's probability is not the whole token's (" dun" is also " dunmur").
- `inside_token`: the pivot token starts inside a source token, so no source step predicts it.
- `no_source_text`: the source has no token over this text (its rendering was cut, or it lacks the message).
- `template`: chat-template tokens, which are never aligned; `first_token`: nothing predicts the source's first
  token.

What the row then receives (its `signal`):

- `projected`: the source's top-K mapped into the pivot vocabulary. Used at 1:1 rows, at `source_covers` rows
  unless `project: one_to_one`, and at `split` rows only with `project: same_start` (FuseChat's many:1, unsound).
- `chunk`: at a `split` row whose pieces end where the pivot token ends, the source's likelihood of the whole
  token, the sum of its pieces' realized log-probs (ALM's chunk likelihood on the gold path, Minixhofer et al.
  2025). The gold gets exactly that probability; the rest is the tail, unless `complete` places it.
- `scored`: the source's exact probability of each candidate pivot token's text, asked of the source model in its
  own tokenization (`score_candidates`; alignment/candidates.py): the gold, the pivot's top-K and the words the
  source's likely first pieces begin.
- `within`: at an `inside_token` row, the source's candidates for the token that covers it, conditioned on the
  pivot pieces already written inside that token (`within`): the gold's probability is the share of the candidates'
  mass consistent with the text so far that also continues with the gold's text. Over a word the pivot spells in
  pieces, the first piece's projection times these conditionals multiplies back to the source's probability of the
  word (the chain rule; exact where the top-K holds all of the mass). The rest is the tail, as at chunk rows.
- `pivot_own`: where no source signal reaches the row, the pivot's own distribution (`fallback: pivot`).
- `one_hot`: the gold next token (the shifted label), the last resort.

`complete` (candidate completion): each source candidate's mass is spread over every pivot token the corpus aligned
it with (same start), in the corpus's proportions, where the vocabulary map puts it all on one id. A prefix such as
" dun", which the pivot's vocabulary also holds as a token it never emits here, then lands on the words it begins
(" dundel") instead. At a chunk row the gold keeps its exact chunk probability, the first piece passes on only the
rest of its mass, and nothing else lands on the gold.

Normalization (the same for every teacher): a sparse teacher keeps the probabilities its model gave, and the mass
outside its ids (beyond the top-K, or on ids the vocabulary map could not place) stays in the loss's tail bucket.
That is the teacher's true distribution coarse-grained onto {ids} ∪ {rest}, whose optimum for the student is still
the teacher. Renormalizing over the mapped ids (FuseChat's softmax over the top-K) would move the tail's mass onto
the top-K and make a projected source sharper than it is, and sharper than the pivot, whose extract keeps its tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from fuse.alignment.pieces import VocabPieces
from fuse.alignment.sequence import ONE_TO_ONE, TEMPLATE, UNALIGNED, SequenceAlignment

# What the text at a pivot token is, compared with the source's tokens.
CAUSES = ("1:1", "source_covers", "split", "inside_token", "no_source_text", "template", "first_token")
ONE, COVERS, SPLIT, INSIDE, NO_TEXT, TEMPLATE_ROW, FIRST = range(len(CAUSES))
# What the row receives.
SIGNALS = ("projected", "chunk", "scored", "pivot_own", "one_hot", "within")
PROJECTED, CHUNK, SCORED, PIVOT_OWN, ONE_HOT, WITHIN = range(len(SIGNALS))
SOURCE_SIGNALS = ("projected", "chunk", "scored", "within")  # what the source itself says about the row
PROJECT_MODES = ("one_to_one", "sound", "same_start")


@dataclass(frozen=True)
class ProjectOptions:
    """align settings that decide what each row receives (see the module docstring)."""

    project: str = "sound"
    chunk: bool = True
    complete: bool = False
    fallback: str = "one_hot"
    chunk_rest: str = "tail"
    within: bool = False
    within_norm: str = "bound"

    def __post_init__(self) -> None:
        if self.project not in PROJECT_MODES:
            raise ValueError(f"project: {self.project!r} is not one of {', '.join(PROJECT_MODES)}")
        if self.fallback not in ("one_hot", "pivot"):
            raise ValueError(f"fallback: {self.fallback!r} is not one of one_hot, pivot")
        if self.within_norm not in ("bound", "topk"):
            raise ValueError(f"within_norm: {self.within_norm!r} is not one of bound, topk")
        if self.chunk_rest not in ("tail", "pivot"):
            raise ValueError(f"chunk_rest: {self.chunk_rest!r} is not one of tail, pivot")


@dataclass(frozen=True)
class Steps:
    """One model's teacher rows on its own tokens, shifted so that row i is the step predicting token i (row 0
    predicts nothing: ids -1, log-probs -inf, realized NaN)."""

    tokens: np.ndarray  # [n]
    ids: np.ndarray  # [n, K], -1 = padding
    logprobs: np.ndarray  # [n, K], -inf = padding
    realized: np.ndarray  # [n], log p(token i | tokens before it)

    @classmethod
    def bare(
        cls, tokens: np.ndarray, ids: np.ndarray | None = None, logprobs: np.ndarray | None = None
    ) -> Steps:
        """Steps already indexed by the token they predict, without realized log-probs (or without any rows)."""
        n = len(tokens)
        if ids is None:
            ids, logprobs = np.full((n, 1), -1, np.int64), np.full((n, 1), -np.inf)
        return cls(
            np.asarray(tokens, np.int64), np.asarray(ids, np.int64), np.asarray(logprobs), np.full(n, np.nan)
        )

    @classmethod
    def shifted(
        cls, tokens: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, realized: np.ndarray
    ) -> Steps:
        """From a store's rows (row t predicts token t + 1)."""
        k = ids.shape[1]
        return cls(
            np.asarray(tokens, np.int64),
            np.vstack([np.full((1, k), -1, np.int64), np.where(np.isfinite(logprobs), ids, -1)]),
            np.vstack([np.full((1, k), -np.inf), np.asarray(logprobs, np.float64)]),
            np.r_[np.nan, np.asarray(realized, np.float64)],
        )


@dataclass(frozen=True)
class Projection:
    """Pivot-vocabulary top-K per predicted token (ids padded with -1, log-probs with -inf), the gold token's
    log-prob under it, each row's cause and signal, whether the vocabulary map placed nothing of a projectable
    row (`unmapped`), and the share of source top-K mass that survived the map (NaN where not projected)."""

    ids: np.ndarray
    logprobs: np.ndarray
    realized: np.ndarray
    cause: np.ndarray
    signal: np.ndarray
    unmapped: np.ndarray
    kept_mass: np.ndarray

    def counts(self, rows: np.ndarray | None = None) -> dict[str, dict[str, int]]:
        """{cause: {signal: rows}} over `rows` (a boolean mask; default: all), plus `unmapped` per cause."""
        rows = np.ones(self.cause.size, bool) if rows is None else rows
        table = np.zeros((len(CAUSES), len(SIGNALS) + 1), np.int64)
        np.add.at(table, (self.cause[rows], self.signal[rows]), 1)
        np.add.at(table[:, -1], self.cause[rows & self.unmapped], 1)
        names = (*SIGNALS, "unmapped")
        return {cause: dict(zip(names, map(int, table[c]), strict=True)) for c, cause in enumerate(CAUSES)}


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
    return sorted_rows(np.arange(rows_n)[:, None].repeat(k, 1), mapped, probs, rows_n, k, n_pivot) + (
        _kept(mapped, probs),
    )


def _kept(mapped: np.ndarray, probs: np.ndarray) -> np.ndarray:
    total = probs.sum(axis=1)
    kept = np.where(mapped >= 0, probs, 0.0).sum(axis=1)
    return np.divide(kept, total, out=np.zeros(len(total)), where=total > 0)


def sorted_rows(
    rows: np.ndarray, cols: np.ndarray, probs: np.ndarray, rows_n: int, width: int, n_pivot: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scattered (row, pivot id, prob) entries (-1 ids skipped) summed per (row, id) and laid out as [rows_n,
    width] by descending probability; entries past `width` in a row are dropped (their mass joins the tail)."""
    ok = (cols >= 0) & (probs > 0)
    key = (np.asarray(rows)[ok] * n_pivot + cols[ok]).astype(np.int64)
    unique, inverse = np.unique(key, return_inverse=True)
    summed = np.bincount(inverse, weights=probs[ok])
    r, c = unique // n_pivot, unique % n_pivot
    order = np.lexsort((c, -summed, r))
    r, c, summed = r[order], c[order], summed[order]
    rank = np.arange(r.size) - np.searchsorted(r, r)
    keep = rank < width
    out_ids = np.full((rows_n, width), -1, np.int64)
    out_probs = np.zeros((rows_n, width))
    out_ids[r[keep], rank[keep]] = c[keep]
    out_probs[r[keep], rank[keep]] = summed[keep]
    return out_ids, out_probs


def chunk_logprobs(alignment: SequenceAlignment, source: Steps) -> np.ndarray:
    """Per pivot row: the source's log-likelihood of the whole pivot token where the source spells it in pieces
    that end with it (sum of the pieces' realized log-probs), else NaN."""
    realized = source.realized
    finite = np.isfinite(realized)
    total = np.r_[0.0, np.cumsum(np.where(finite, realized, 0.0))]
    bad = np.r_[0, np.cumsum(~finite)]
    first, last = alignment.source_index, alignment.cover_last
    ok = alignment.split & alignment.ends_together & (first > 0)
    first, last = np.where(ok, first, 0), np.where(ok, last, 0)
    clean = bad[last + 1] - bad[first] == 0
    return np.where(ok & clean, total[last + 1] - total[first], np.nan)


def within_logprobs(
    alignment: SequenceAlignment,
    gold: np.ndarray,
    source: Steps,
    pivot_pieces: VocabPieces,
    source_pieces: VocabPieces,
    norm: str = "bound",
) -> np.ndarray:
    """Per pivot row: at an `inside_token` row whose token ends inside (or with) the source token s covering it,
    log M(e + g) − log(M(e) + r) (norm "bound"; "topk": − log M(e), the top-K's consistent mass alone, as if nothing
    outside the top-K continued e), else NaN. e: the text of the pivot pieces from s's start to the row (the pieces
    must start where s starts), g: the gold piece's text, M(x): the probability, at the source step predicting s,
    of its top-K candidates whose text starts with x, r: that step's mass outside its top-K (it may be consistent
    with e: counting it keeps the teacher from being sharper than the source). NaN where the source's own token
    does not spell e + g (its text was rewritten) or no candidate does."""
    n = gold.size
    out = np.full(n, np.nan)
    inside = (alignment.kind == UNALIGNED) & (alignment.cover_first >= 0)
    inside &= alignment.cover_last == alignment.cover_first
    written: dict[int, bytes] = {}  # s -> the pivot pieces' text from s's start so far
    for j in range(n):
        s = int(alignment.cover_first[j])
        if alignment.covers[j] and alignment.source_index[j] > 0:  # the first piece, where s starts
            written[int(alignment.source_index[j])] = pivot_pieces.pieces[gold[j]]
            continue
        if not inside[j] or s not in written:
            written.pop(s, None)
            continue
        e, x = written[s], written[s] + pivot_pieces.pieces[gold[j]]
        written[s] = x
        if not source_pieces.pieces[source.tokens[s]].startswith(x):
            continue
        ids, logprobs = source.ids[s], source.logprobs[s]
        valid = (ids >= 0) & np.isfinite(logprobs)
        probs = np.exp(logprobs[valid])
        texts = [source_pieces.pieces[i] for i in ids[valid]]
        m_e = sum(p for p, t in zip(probs, texts, strict=True) if t.startswith(e))
        m_x = sum(p for p, t in zip(probs, texts, strict=True) if t.startswith(x))
        rest = max(0.0, 1.0 - float(probs.sum())) if norm == "bound" else 0.0
        if m_x > 0:
            out[j] = np.log(m_x) - np.log(m_e + rest)
    return out


def pivot_shaped_rest(pivot: Steps, rows: np.ndarray, gold_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At chunk rows: the pivot's own distribution with the gold set to the source's chunk probability p, the
    distribution closest to the pivot's (least KL) that does so: every other id w gets (1 − p)·π_w / (1 − π_gold).
    Its ids other than the gold, padded with -1 / 0, [rows, K]."""
    ids = pivot.ids[rows]
    others = (ids >= 0) & (ids != pivot.tokens[rows, None])
    pi = np.where(others, np.exp(pivot.logprobs[rows]), 0.0)
    pi_gold = np.exp(np.nan_to_num(pivot.realized[rows], nan=-np.inf))
    scale = np.divide(1.0 - gold_p, 1.0 - pi_gold, out=np.zeros(len(rows)), where=pi_gold < 1.0)
    # a pivot whose top-K outweighs its own 1 − π_gold (the codec's rounding) is capped at the rest, 1 − p
    scale = np.minimum(
        scale, np.divide(1.0 - gold_p, pi.sum(axis=1), out=np.zeros(len(rows)), where=pi.sum(axis=1) > 0)
    )
    return np.where(others, ids, -1), pi * scale[:, None]


def place_exact_gold(
    ids: np.ndarray, probs: np.ndarray, rows: np.ndarray, gold_p: np.ndarray, pivot: Steps, rest: str
) -> None:
    """At `rows` (chunk or within rows), in place: the gold first at its exact probability `gold_p[row]`, the rest
    in the tail, or (rest "pivot") on the pivot's own candidates (pivot_shaped_rest)."""
    ids[rows, 0], probs[rows, 0] = pivot.tokens[rows], gold_p[rows]
    if rest == "pivot":
        shaped = pivot_shaped_rest(pivot, rows, gold_p[rows])
        k = shaped[0].shape[1]
        ids[rows, 1 : k + 1], probs[rows, 1 : k + 1] = shaped


def causes(alignment: SequenceAlignment) -> np.ndarray:
    kind, row = alignment.kind, alignment.source_index
    return np.select(
        [
            kind == TEMPLATE,
            (kind == UNALIGNED) & (alignment.cover_first >= 0),
            kind == UNALIGNED,
            row == 0,
            kind == ONE_TO_ONE,
            alignment.covers,
        ],
        [TEMPLATE_ROW, INSIDE, NO_TEXT, FIRST, ONE, COVERS],
        default=SPLIT,
    ).astype(np.int8)


def completion_matrix(counts: sparse.spmatrix) -> sparse.csr_matrix:
    """The corpus's conditional P(pivot token | source token starting at the same byte), from the aligned pair
    counts: row s spreads a source token over every pivot token it was aligned with, where FuseChat's statistical
    map keeps only the most frequent one."""
    counts = sparse.csr_matrix(counts, dtype=np.float64)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    return sparse.diags(np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)) @ counts


def complete_rows(
    rows: np.ndarray,
    source_ids: np.ndarray,
    source_probs: np.ndarray,
    completion: sparse.csr_matrix,
    target: np.ndarray,
    excluded: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate completion of scattered source entries (pivot row, source id, probability): each source id's
    mass spread over the pivot tokens the corpus aligned it with (`completion`), renormalized without the row's
    `excluded` pivot id (a chunk row's gold, whose probability is fixed; -1: none); an id the corpus never aligned
    goes to the vocabulary map's id instead. Returns scattered (row, pivot id, probability)."""
    completion = completion.tocsr()
    valid = (source_ids >= 0) & (source_probs > 0)
    rows, source_ids, source_probs = rows[valid], source_ids[valid], source_probs[valid]
    lengths = completion.indptr[source_ids + 1] - completion.indptr[source_ids]
    seen = lengths > 0
    group = np.repeat(np.flatnonzero(seen), lengths[seen])
    offsets = np.arange(group.size) - np.repeat(np.cumsum(lengths[seen]) - lengths[seen], lengths[seen])
    at = completion.indptr[source_ids[group]] + offsets
    pivot_ids, weights = completion.indices[at].astype(np.int64), completion.data[at]
    weights = np.where(pivot_ids == excluded[rows[group]], 0.0, weights)
    totals = np.bincount(group, weights=weights, minlength=source_ids.size)
    spread = source_probs[group] * np.divide(
        weights, totals[group], out=np.zeros_like(weights), where=totals[group] > 0
    )
    mapped = target[source_ids[~seen]]
    mapped = np.where(mapped == excluded[rows[~seen]], -1, mapped)
    return (
        np.r_[rows[group], rows[~seen]],
        np.r_[pivot_ids, mapped],
        np.r_[spread, source_probs[~seen]],
    )


def project(
    alignment: SequenceAlignment,
    pivot: Steps,
    source: Steps,
    target: np.ndarray,
    n_pivot: int,
    options: ProjectOptions = ProjectOptions(),
    completion: sparse.csr_matrix | None = None,
    scored: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
    vocabs: tuple[VocabPieces, VocabPieces] | None = None,
) -> Projection:
    """What each pivot row receives from the source (module docstring). Row j of `pivot` predicts pivot token j
    (`pivot.tokens[j]`, the shifted label), row i of `source` predicts source token i; `completion`
    (`completion_matrix` of the corpus's aligned pairs) is needed by `complete`; `scored` maps rows to the pivot ids
    the source model was asked about and their exclusive probabilities (they replace anything else there);
    `vocabs` (pivot, source) is needed by `within`."""
    gold = pivot.tokens
    n = gold.size
    width = max(source.ids.shape[1], pivot.ids.shape[1]) + 1
    cause = causes(alignment)
    chunk_lp = chunk_logprobs(alignment, source) if options.chunk else np.full(n, np.nan)
    if options.within:
        if vocabs is None:
            raise ValueError("project: within needs both vocabularies' pieces")
        within_lp = within_logprobs(alignment, gold, source, *vocabs, norm=options.within_norm)
    else:
        within_lp = np.full(n, np.nan)
    is_within = np.isfinite(within_lp) & (cause == INSIDE)
    is_chunk = np.isfinite(chunk_lp) & (cause == SPLIT)
    projectable = (cause == ONE) | ((cause == COVERS) & (options.project != "one_to_one"))
    projectable |= (cause == SPLIT) & (options.project == "same_start") & ~is_chunk
    rows = np.flatnonzero(projectable)
    src_rows = alignment.source_index
    ids, probs = np.full((n, width), -1, np.int64), np.zeros((n, width))
    kept_mass = np.full(n, np.nan)
    if options.complete:
        if completion is None:
            raise ValueError("project: complete needs the corpus's aligned pair counts (completion_matrix)")
        rows = np.flatnonzero(projectable | is_chunk)
        k = source.ids.shape[1]
        s_ids = source.ids[src_rows[rows]]
        s_probs = given = np.where(s_ids >= 0, np.exp(source.logprobs[src_rows[rows]]), 0.0)
        # a chunk row's first piece leaves the gold's exact chunk probability out of its mass
        gold_p = np.where(is_chunk[rows], np.exp(np.nan_to_num(chunk_lp[rows], nan=-np.inf)), 0.0)
        first = s_ids == source.tokens[src_rows[rows], None]
        s_probs = np.where(first & is_chunk[rows, None], np.maximum(s_probs - gold_p[:, None], 0.0), s_probs)
        excluded = np.where(is_chunk, gold, -1)
        r, c, p = complete_rows(
            np.repeat(rows, k), s_ids.ravel(), s_probs.ravel(), completion, target, excluded
        )
        chunks = np.flatnonzero(is_chunk)
        r, c, p = np.r_[r, chunks], np.r_[c, gold[chunks]], np.r_[p, np.exp(chunk_lp[chunks])]
        ids, probs = sorted_rows(r, c, p, n, width, n_pivot)
        placed = np.bincount(r[c >= 0], weights=p[c >= 0], minlength=n)
        total = np.bincount(np.repeat(rows, k), weights=given.ravel(), minlength=n)
        kept_mass = np.divide(placed, total, out=np.full(n, np.nan), where=projectable & (total > 0))
    else:
        m_ids, m_probs, kept = map_topk(
            source.ids[src_rows[rows]], source.logprobs[src_rows[rows]], target, n_pivot
        )
        ids[rows, : m_ids.shape[1]], probs[rows, : m_ids.shape[1]] = m_ids, m_probs
        kept_mass[rows] = kept
        place_exact_gold(ids, probs, np.flatnonzero(is_chunk), np.exp(chunk_lp), pivot, options.chunk_rest)
    # a within row, like a chunk row: the gold at its exact probability, the rest in the tail or pivot-shaped
    place_exact_gold(ids, probs, np.flatnonzero(is_within), np.exp(within_lp), pivot, options.chunk_rest)
    unmapped = projectable & (ids[:, 0] < 0)
    signal = np.where(is_chunk, CHUNK, np.where(projectable & ~unmapped, PROJECTED, ONE_HOT)).astype(np.int8)
    signal[is_within] = WITHIN
    for j, (cand, p) in (scored or {}).items():
        order = np.argsort(-p, kind="stable")[:width]
        ids[j], probs[j] = -1, 0.0
        ids[j, : order.size], probs[j, : order.size] = cand[order], p[order] / max(p.sum(), 1.0)
        signal[j], unmapped[j] = SCORED, False
    fallback = signal == ONE_HOT
    if options.fallback == "pivot":
        own = fallback & (pivot.ids[:, 0] >= 0)
        k = pivot.ids.shape[1]
        ids[own], probs[own] = -1, 0.0
        ids[own, :k] = pivot.ids[own]
        probs[own, :k] = np.where(pivot.ids[own] >= 0, np.exp(pivot.logprobs[own]), 0.0)
        signal[own] = PIVOT_OWN
        fallback &= ~own
    ids[fallback], probs[fallback] = -1, 0.0
    ids[fallback, 0], probs[fallback, 0] = gold[fallback], 1.0
    kept_mass[signal != PROJECTED] = np.nan
    with np.errstate(divide="ignore"):
        logprobs = np.where(ids >= 0, np.log(probs), -np.inf)
    hit = ids == gold[:, None]
    realized = np.where(hit.any(axis=1), np.where(hit, logprobs, 0.0).sum(axis=1), -np.inf)
    return Projection(
        ids, logprobs.astype(np.float32), realized.astype(np.float32), cause, signal, unmapped, kept_mass
    )
