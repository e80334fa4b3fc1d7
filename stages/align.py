"""align.<source>: project the source's teacher top-K onto the pivot's tokens and vocabulary.

Reads the log-prob stores of extract.<source> and extract.pivot; writes, under out/, the projected store (same
format, pivot vocab, one shard per pivot shard + index.json), vocab_map.npz and report.json / report.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fuse.alignment.candidates import (
    candidate_ids,
    exclusive,
    extensions,
    spellable,
)
from fuse.alignment.content import ContentAlignment, Rendered, align_content
from fuse.alignment.pieces import VocabPieces, vocab_pieces
from fuse.alignment.project import (
    CHUNK,
    COVERS,
    ONE,
    PROJECTED,
    SCORED,
    SIGNALS,
    SOURCE_SIGNALS,
    SPLIT,
    TEMPLATE_ROW,
    ProjectOptions,
    Steps,
    causes,
    completion_matrix,
    project,
)
from fuse.alignment.sequence import MANY_TO_ONE, ONE_TO_ONE, SequenceAlignment
from fuse.alignment.vocab import build_vocab_map, pair_counts
from fuse.backends import make_backend
from fuse.context import StageContext
from fuse.data.logprobs import LogprobReader, LogprobWriter, SampleLogprobs, write_index
from fuse.data.response import ce_per_byte
from fuse.io import atomic_write, write_json_atomic, write_text_atomic
from fuse.losses import FUSIONS
from fuse.models import load_tokenizer

if TYPE_CHECKING:
    from fuse.alignment.pieces import VocabPieces
    from fuse.alignment.project import Projection
    from fuse.alignment.vocab import VocabMap
    from fuse.data.logprobs import SampleLogprobs


def sized(pieces: VocabPieces, size: int) -> VocabPieces:
    """Pieces cut or padded (empty, unmappable) to a store's vocab size, i.e. the model's output size: models pad
    their embeddings past the tokenizer, and some tokenizers hold ids past the embedding."""
    if size < len(pieces):  # a tokenizer larger than the model's output (Gemma-3): those ids never occur here
        return VocabPieces.from_pieces(
            list(pieces.pieces[:size]), pieces.special[:size], pieces.byte_fallback[:size]
        )
    if size == len(pieces):
        return pieces
    extra = size - len(pieces)
    return VocabPieces.from_pieces(
        list(pieces.pieces) + [b""] * extra,
        np.r_[pieces.special, np.ones(extra, bool)],
        np.r_[pieces.byte_fallback, np.zeros(extra, bool)],
    )


def rendered(sample: SampleLogprobs) -> Any:
    spans = np.array([[s.start, s.end] for s in sample.spans], np.int64).reshape(-1, 2)
    return Rendered(sample.input_ids, spans, sample.text, sample.offsets)


def align_sample(
    pivot: SampleLogprobs,
    source: SampleLogprobs | None,
    vocabs: tuple,
    method: str,
    end_of_turn: tuple[int, int] | None = None,
) -> Any:
    """The content alignment of one sample (all TEMPLATE when the source lacks it)."""
    if source is None:
        return ContentAlignment(SequenceAlignment.empty(pivot.num_tokens))
    return align_content(rendered(pivot), rendered(source), vocabs[0], vocabs[1], method, end_of_turn)


@dataclass(frozen=True)
class Corpus:
    """What align learns from the whole corpus before projecting anything (one pass over both stores)."""

    vocabs: tuple[VocabPieces, VocabPieces]  # (pivot, source), sized to the stores
    end_of_turn: tuple[int, int] | None  # (pivot id, source id)
    counts: Any  # sparse (source id, pivot id) counts of tokens starting at the same byte
    emitted: np.ndarray  # per pivot id: how often the pivot's tokenization of the data uses it
    vocab_map: VocabMap


def count_pairs(
    settings: Any,
    pivot_store: Any,
    source_store: Any,
    vocabs: tuple,
    end_of_turn: tuple[int, int] | None = None,
) -> tuple[Any, np.ndarray, np.ndarray]:
    """Pass 1: aligned (source id, pivot id) pairs for the statistics-based map, the source ids in top-K, and
    how often each pivot id occurs in the pivot's tokens."""
    kinds = (ONE_TO_ONE,) if settings.stats_pairs == "one_to_one" else (ONE_TO_ONE, MANY_TO_ONE)
    src_pairs, piv_pairs, needed = [], [], []
    emitted = np.zeros(pivot_store.vocab_size, np.int64)
    for pivot in pivot_store:
        emitted += np.bincount(pivot.input_ids, minlength=pivot_store.vocab_size)[: pivot_store.vocab_size]
        source = source_store.get(pivot.id) if pivot.id in source_store else None
        if source is None:
            continue
        alignment = align_sample(pivot, source, vocabs, settings.method, end_of_turn).alignment
        chosen = np.flatnonzero(np.isin(alignment.kind, kinds))
        src_pairs.append(source.input_ids[alignment.source_index[chosen]])
        piv_pairs.append(pivot.input_ids[chosen])
        needed.append(np.unique(source.topk_ids))
    counts = pair_counts(
        np.concatenate(src_pairs or [np.zeros(0)]),
        np.concatenate(piv_pairs or [np.zeros(0)]),
        len(vocabs[1]),
        len(vocabs[0]),
    )
    return counts, np.unique(np.concatenate(needed or [np.zeros(0, np.int64)])), emitted


def pivot_encoder(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    """Texts -> the pivot's ids for each, without special tokens (the first-piece vocabulary map)."""

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    return encode


def read_corpus(
    settings: Any, pivot_store: Any, source_store: Any, pivot_tokenizer: Any, source_tokenizer: Any
) -> tuple[Corpus, np.ndarray]:
    """Both vocabularies, the end-of-turn pair, the aligned pair counts and the vocabulary map; with the source
    ids that occur in its top-K (for the report's coverage)."""
    vocabs = (
        sized(vocab_pieces(pivot_tokenizer), pivot_store.vocab_size),
        sized(vocab_pieces(source_tokenizer), source_store.vocab_size),
    )
    roles, end_of_turn = turn_roles(pivot_store, source_store, vocabs, source_tokenizer.eos_token_id)
    counts, needed, emitted = count_pairs(settings, pivot_store, source_store, vocabs, end_of_turn)
    methods = tuple(settings.vocab_map.split("+"))
    vocab_map = build_vocab_map(
        vocabs[1],
        vocabs[0],
        counts,
        needed,
        methods,
        settings.min_stat_count,
        roles,
        pivot_encoder(pivot_tokenizer),
    )
    return Corpus(vocabs, end_of_turn, counts, emitted, vocab_map), needed


class CandidateScorer:
    """Scores candidate pivot tokens under the source model (alignment/candidates.py has the pure half): each
    candidate's text is appended to the source's own rendering at the row's boundary, tokenized by the source's
    tokenizer, and its tokens' log-probs summed, by the extract backend. Counts what it could not score, and how
    far its score of the gold is from the extract's (the same tokens under the same backend: a built-in check)."""

    def __init__(
        self,
        backend: Any,
        tokenizer: Any,
        p_vocab: VocabPieces,
        completion: Any,
        target: np.ndarray,
        limit: int,
        emitted: np.ndarray | None = None,
    ) -> None:
        self.backend, self.tokenizer, self.p_vocab = backend, tokenizer, p_vocab
        self.completion, self.target, self.limit = completion, target, limit
        self.usable = spellable(p_vocab)
        self.longer = extensions(p_vocab, emitted) if emitted is not None else {}
        # at a content's opening the source's pieces carry a space the content does not: " Nixjun" → "Nixjun"
        by_bytes = {piece: i for i, piece in enumerate(p_vocab.pieces) if piece and not p_vocab.special[i]}
        self.unspaced = np.array(
            [
                by_bytes.get(piece[1:], i) if piece[:1] == b" " else i
                for i, piece in enumerate(p_vocab.pieces)
            ],
            np.int64,
        )
        self.counts: Counter = Counter()
        self.gold_diff = 0.0

    def rows(self, pivot: SampleLogprobs, content: ContentAlignment) -> dict[int, int]:
        """Response rows where the source has a token starting at the same byte (or opening the same content
        with a space of its own, `ContentAlignment.openings`) and the gold is plain text: row -> that token."""
        alignment = content.alignment
        scorable = np.isin(causes(alignment), (ONE, COVERS, SPLIT))
        boundary = np.where(scorable, alignment.source_index, -1)
        for j, opener in content.openings.items():  # where no source token starts with the content's text
            if boundary[j] < 0:
                boundary[j], scorable[j] = opener, True
        rows = np.r_[False, pivot.mask[1:]] & scorable & (boundary > 0) & self.usable[pivot.input_ids]
        return {int(j): int(boundary[j]) for j in np.flatnonzero(rows)}

    def context_end(self, source: SampleLogprobs, boundary: int, gold: int) -> int | None:
        """The character where the source's text continues with the gold's text (a tokenizer's offsets may or may
        not count a word's leading space), or None."""
        start, text = int(source.offsets[boundary][0]), self.p_vocab.pieces[gold].decode("utf-8")
        return next(
            (c for c in (start, start - 1, start + 1) if c >= 0 and source.text.startswith(text, c)), None
        )

    def score(
        self,
        pivot: SampleLogprobs,
        source: SampleLogprobs,
        content: ContentAlignment,
        steps: tuple[Steps, Steps],
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        p_steps, s_steps = steps
        asked: list[tuple[int, int, int]] = []  # (row, candidate, boundary)
        texts: list[str] = []
        for j, boundary in self.rows(pivot, content).items():
            gold = int(pivot.input_ids[j])
            end = self.context_end(source, boundary, gold)
            if end is None:
                self.counts["rows_without_context"] += 1
                continue
            s_probs = np.where(s_steps.ids[boundary] >= 0, np.exp(s_steps.logprobs[boundary]), 0.0)
            candidates = candidate_ids(
                gold,
                p_steps.ids[j],
                s_steps.ids[boundary],
                s_probs,
                self.completion,
                self.target,
                self.usable,
                self.limit,
                self.longer,
                self.unspaced if j in content.openings and self.p_vocab.pieces[gold][:1] != b" " else None,
            )
            for w in candidates:
                asked.append((int(j), int(w), boundary))
                texts.append(source.text[:end] + self.p_vocab.pieces[w].decode("utf-8"))
        sequences, kept = [], []
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        for (j, w, boundary), ids in zip(asked, encoded, strict=True):
            if len(ids) <= boundary or ids[:boundary] != source.input_ids[:boundary].tolist():
                self.counts["candidates_merging_with_context"] += 1
            elif len(ids) > self.backend.max_length:
                self.counts["candidates_too_long"] += 1
            else:
                sequences.append(np.asarray(ids, np.int64))
                kept.append((j, w, boundary))
        by_row: dict[int, list[tuple[int, float]]] = {}
        for (j, w, boundary), ids, logprob in zip(
            kept, sequences, self.logprobs(kept, sequences), strict=True
        ):
            by_row.setdefault(j, []).append((w, logprob))
            if w == int(pivot.input_ids[j]) and (stored := self.stored(source, ids, boundary)) is not None:
                self.gold_diff = max(self.gold_diff, abs(logprob - stored))
                self.counts["gold_checked"] += 1
        scored = {}
        for j, items in by_row.items():
            ids = np.array([w for w, _ in items], np.int64)
            if (
                int(pivot.input_ids[j]) not in ids
            ):  # the gold could not be asked: the row keeps its other signal
                self.counts["rows_gold_unscored"] += 1
                continue
            scored[j] = (ids, exclusive(ids, np.exp(np.array([lp for _, lp in items])), self.p_vocab))
            self.counts["rows_scored"] += 1
            self.counts["candidates_scored"] += len(items)
        return scored

    def logprobs(self, kept: list[tuple[int, int, int]], sequences: list[np.ndarray]) -> list[float]:
        """Each candidate's summed log-prob past its boundary: through the transformers model in one packed
        forward for all of a sample's rows (`shared_prefix_logprobs`: every candidate sees the source's text up to
        its row's boundary), or the backend's full sequences (vLLM caches the shared prefixes itself)."""
        if not sequences:
            return []
        shared = getattr(self.backend, "shared_prefix_logprobs", None)
        if shared is None:
            results = self.backend.logprobs(sequences, 1)
            return [
                float(r.target_logprobs[b - 1 :].astype(np.float64).sum())
                for (_, _, b), r in zip(kept, results, strict=True)
            ]
        rows: dict[int, list[int]] = {}
        for index, (j, _, _) in enumerate(kept):
            rows.setdefault(j, []).append(index)
        # every candidate's ids begin with the source's own up to its boundary: the longest of those is the prefix
        last = max(range(len(kept)), key=lambda i: kept[i][2])
        sequence = sequences[last][: kept[last][2]]
        asks = [(kept[m[0]][2], [sequences[i][kept[i][2] :] for i in m]) for m in rows.values()]
        out = np.zeros(len(kept))
        for members, scores in zip(rows.values(), shared(sequence, asks), strict=True):
            out[members] = scores
        return out.tolist()

    @staticmethod
    def stored(source: SampleLogprobs, ids: list[int] | np.ndarray, boundary: int) -> float | None:
        """The extract's own log-prob of the same tokens, where the candidate is spelled as the source spelled it."""
        tail = np.asarray(ids[boundary:])
        stop = boundary + tail.size
        if stop > source.num_tokens or not np.array_equal(source.input_ids[boundary:stop], tail):
            return None
        return float(np.asarray(source.target_logprobs[boundary - 1 : stop - 1], np.float64).sum())

    def report(self) -> dict[str, Any]:
        return dict(self.counts) | {"gold_vs_extract_max_abs_diff": self.gold_diff}


def project_options(settings: Any) -> ProjectOptions:
    """The projection's options from the align settings."""
    return ProjectOptions(
        settings.project,
        settings.chunk,
        settings.complete,
        settings.fallback,
        settings.chunk_rest,
        settings.within,
        settings.within_norm,
    )


def steps_of(sample: SampleLogprobs | None, top_k: int) -> Steps:
    """A store's sample as teacher steps on its own tokens (row i predicts token i); a missing source: no steps."""
    if sample is None:
        return Steps.bare(np.zeros(1, np.int64))
    return Steps.shifted(
        sample.input_ids,
        sample.topk_ids[:, :top_k],
        sample.topk_logprobs[:, :top_k],
        np.asarray(sample.target_logprobs, np.float64),
    )


def projected_sample(pivot: SampleLogprobs, projection: Projection) -> SampleLogprobs:
    ids, lps = projection.ids[1:], projection.logprobs[1:]
    return SampleLogprobs(
        id=pivot.id,
        text=pivot.text,
        spans=pivot.spans,
        input_ids=pivot.input_ids,
        offsets=pivot.offsets,
        mask=pivot.mask,
        topk_ids=np.where(ids >= 0, ids, 0),
        topk_logprobs=np.where(ids >= 0, lps, -np.inf),
        target_logprobs=projection.realized[1:],
        extra=dict(pivot.extra),
    )


def end_of_turn_id(store: Any, special: np.ndarray, limit: int = 64) -> int | None:
    """The special token this store's renderings end assistant turns with: the first special token after an
    assistant content (at most 3 tokens on), most often over the first `limit` samples. Read from the data, so it
    is the token the template really writes, whatever it is called."""
    seen: Counter = Counter()
    for number, sample in enumerate(store):
        if number >= limit:
            break
        starts = np.asarray(sample.offsets)[:, 0]
        for span in sample.spans:
            after = np.flatnonzero(starts >= span.end)[:3] if span.role == "assistant" else []
            marks = [int(sample.input_ids[t]) for t in after if special[int(sample.input_ids[t])]]
            seen.update(marks[:1])
    return seen.most_common(1)[0][0] if seen else None


def turn_roles(
    pivot_store: Any, source_store: Any, vocabs: tuple, source_eos: int | None
) -> tuple[dict[int, int], tuple[int, int] | None]:
    """Vocabulary entries mapped by role (the source's end-of-turn and EOS tokens to the pivot's end-of-turn
    token), and the (pivot, source) end-of-turn pair that content alignment uses."""
    pivot_end = end_of_turn_id(pivot_store, vocabs[0].special)
    source_end = end_of_turn_id(source_store, vocabs[1].special)
    if pivot_end is None:
        return {}, None
    roles = {s: pivot_end for s in (source_end, source_eos) if s is not None}
    return roles, (pivot_end, source_end) if source_end is not None else None


def end_of_turn_names(
    end_of_turn: tuple[int, int] | None, p_vocab: VocabPieces, s_vocab: VocabPieces
) -> dict[str, Any]:
    if end_of_turn is None:
        return {"pivot": None, "source": None}
    names = (p_vocab.pieces[end_of_turn[0]], s_vocab.pieces[end_of_turn[1]])
    return {
        side: name.decode("utf-8", "replace") for side, name in zip(("pivot", "source"), names, strict=True)
    }


def word_starts(pivot: SampleLogprobs, projection: Projection, p_vocab: VocabPieces) -> np.ndarray:
    """Rows predicting a token that begins a word: it starts with whitespace, or it opens a message content."""
    first = np.array([p_vocab.pieces[int(t)][:1] in (b" ", b"\n", b"\t") for t in pivot.input_ids])
    opens = np.r_[False, projection.cause[:-1] == TEMPLATE_ROW] & (projection.cause != TEMPLATE_ROW)
    return first | opens


def signal_shares(table: dict[str, dict[str, int]]) -> dict[str, float]:
    """{signal: share of the rows} from a {cause: {signal: rows}} table."""
    totals = {name: sum(row[name] for row in table.values()) for name in SIGNALS}
    rows = sum(totals.values())
    return {name: n / rows for name, n in totals.items()} if rows else {}


def add_tables(total: dict[str, dict[str, int]], part: dict[str, dict[str, int]]) -> None:
    for cause, row in part.items():
        for name, n in row.items():
            total.setdefault(cause, {}).setdefault(name, 0)
            total[cause][name] += n


class Tally:
    """Everything report.json counts, accumulated over samples."""

    def __init__(self, p_vocab: VocabPieces, emitted: np.ndarray | None = None) -> None:
        self.p_vocab = p_vocab
        self.emitted = emitted  # per pivot id: how often the pivot's tokenization of the fusion set uses it
        self.tables: dict[str, dict[str, dict[str, int]]] = {"all": {}, "response": {}, "word_start": {}}
        self.regions: Counter = Counter()
        self.kept: list[float] = []
        self.samples = self.missing = 0
        self.signal: Counter = Counter()  # teacher signal at the projected response rows
        self.ce: list[tuple[float, float]] = []  # per sample: (pivot, source) CE per response byte

    def add(
        self, pivot: SampleLogprobs, source: SampleLogprobs | None, projection: Projection, regions: Counter
    ) -> None:
        self.samples += 1
        self.missing += int(source is None)
        self.regions.update(regions)
        # rows that train (mask of the predicted token): the share that matters to distill
        train = np.r_[False, pivot.mask[1:]]
        for name, rows in (
            ("all", None),
            ("response", train),
            ("word_start", train & word_starts(pivot, projection, self.p_vocab)),
        ):
            add_tables(self.tables[name], projection.counts(rows))
        kept = projection.kept_mass[1:]
        self.kept.append(kept[np.isfinite(kept)])
        self.add_signal(pivot, projection)
        if source is not None:
            self.ce.append((ce_per_byte(pivot), ce_per_byte(source)))

    def add_signal(self, pivot: SampleLogprobs, projection: Projection) -> None:
        """At response rows with a source signal (projected, chunk or scored): does its top-1 name the gold next token,
        and what probability does it give it — next to the pivot's own extract at the same rows."""
        signal = projection.signal[1:]
        rows = np.flatnonzero(pivot.mask[1:] & np.isin(signal, (PROJECTED, CHUNK, SCORED)))
        gold = pivot.input_ids[1:][rows]
        pivot_gold = np.exp(np.nan_to_num(pivot.target_logprobs[rows].astype(np.float64), nan=-np.inf))
        full = signal[rows] != CHUNK  # a chunk row names only the gold: its top-1 says nothing
        self.signal.update(
            rows=int(rows.size),
            distribution_rows=int(full.sum()),
            source_top1_gold=int((projection.ids[1:][rows, 0] == gold)[full].sum()),
            pivot_top1_gold=int((pivot.topk_ids[rows, 0] == gold)[full].sum()),
            source_p_gold=float(np.exp(projection.realized[1:][rows].astype(np.float64)).sum()),
            pivot_p_gold=float(pivot_gold.sum()),
        )
        if self.emitted is not None:  # mass on pivot ids the pivot never emits: prefixes such as " dun"
            projected = rows[full]
            for side, ids, lps in (
                ("source", projection.ids[1:][projected], projection.logprobs[1:][projected]),
                ("pivot", pivot.topk_ids[projected], pivot.topk_logprobs[projected]),
            ):
                probs = np.where(ids >= 0, np.exp(lps.astype(np.float64)), 0.0)
                never = (self.emitted[np.clip(ids, 0, None)] == 0) & (ids >= 0)
                self.signal.update(
                    {f"{side}_mass": float(probs.sum()), f"{side}_unused": float(probs[never].sum())}
                )

    def teacher_signal(self) -> dict[str, Any]:
        """The source's signal where it reaches a row, and how each fusion function would weigh the two teachers
        (mean weight per teacher over sequences; for min_ce, the share of sequences each teacher wins)."""
        rows, full = max(self.signal["rows"], 1), max(self.signal["distribution_rows"], 1)
        ce = torch.tensor(self.ce or [[0.0, 0.0]], dtype=torch.float64)
        weights = {
            name: dict(zip(("pivot", "source"), FUSIONS[name].fn(ce).mean(dim=0).tolist(), strict=True))
            for name in FUSIONS
        }
        return {
            "projected_response_rows": self.signal["rows"],
            "source_top1_is_gold": self.signal["source_top1_gold"] / full,
            "pivot_top1_is_gold": self.signal["pivot_top1_gold"] / full,
            "source_mean_p_gold": self.signal["source_p_gold"] / rows,
            "pivot_mean_p_gold": self.signal["pivot_p_gold"] / rows,
            "ce_per_byte": {"pivot": float(ce[:, 0].mean()), "source": float(ce[:, 1].mean())},
            "mass_on_unemitted_pivot_tokens": {
                side: self.signal[f"{side}_unused"] / self.signal[f"{side}_mass"]
                for side in ("source", "pivot")
                if self.signal[f"{side}_mass"] > 0
            },
            "fusion_weights": weights,
        }

    def report(self, vocab_map: VocabMap, needed: np.ndarray) -> dict[str, Any]:
        kept = np.concatenate(self.kept) if self.kept else np.zeros(0)
        response = self.tables["response"]
        rows = sum(sum(row[s] for s in SIGNALS) for row in response.values())
        return {
            "samples": self.samples,
            "samples_missing_in_source": self.missing,
            "positions": self.tables["all"],
            "response_positions": response,
            "word_start_positions": self.tables["word_start"],
            "response_cause_shares": {
                cause: sum(row[s] for s in SIGNALS) / max(rows, 1) for cause, row in response.items()
            },
            "response_signal_shares": signal_shares(response),
            "word_start_signal_shares": signal_shares(self.tables["word_start"]),
            "topk_mass_kept": {
                "mean": float(kept.mean()) if kept.size else None,
                "p10": float(np.quantile(kept, 0.1)) if kept.size else None,
            },
            "regions_by_method": dict(self.regions),
            "vocab_map_coverage": vocab_map.coverage(),
            "vocab_map_coverage_topk_ids": vocab_map.coverage(needed) if needed.size else {},
            "teacher_signal": self.teacher_signal(),
        }


# Where a source's signal is doubtful enough to say so before any GPU hour goes into training on it.
def source_share(report: dict[str, Any], rows: str = "response") -> float:
    """The share of response (or word-start) rows that receive the source's signal: projected, chunk, scored or
    within."""
    shares = report[f"{rows}_signal_shares"]
    return sum(shares.get(name, 0.0) for name in SOURCE_SIGNALS)


def _mapped_share(report: dict[str, Any]) -> float:
    """The share of top-K ids mapped by what they spell (exact bytes, role, or the pivot's first piece of them);
    statistics and MinED are guesses."""
    coverage = report["vocab_map_coverage_topk_ids"]
    return coverage.get("exact", 1.0) + coverage.get("role", 0.0) + coverage.get("first_piece", 0.0)


SIGNAL_CHECKS = (
    ("response rows with a source signal", source_share, 0.5),
    ("top-K mass kept by the vocabulary map", lambda r: r["topk_mass_kept"]["mean"] or 0.0, 0.8),
    ("top-K ids mapped by their spelling (exact, role or first piece)", _mapped_share, 0.8),
)


def signal_warnings(report: dict[str, Any]) -> list[str]:
    """One line per check a source fails (each names the measured share and the threshold)."""
    warnings = []
    for what, measure, floor in SIGNAL_CHECKS:
        value = measure(report)
        if value < floor:
            warnings.append(f"{what}: {value:.2f} (below {floor:.2f})")
    signal = report["teacher_signal"]
    unused = signal.get("mass_on_unemitted_pivot_tokens", {})
    if unused.get("source", 0.0) > max(0.1, 2 * unused.get("pivot", 0.0)):
        warnings.append(
            f"{unused['source']:.2f} of the projected source mass lands on pivot tokens the pivot never emits on "
            f"this data (its own: {unused.get('pivot', 0.0):.2f}): prefixes mapped as whole tokens; "
            "stages.align.complete spreads them over the words they begin"
        )
    # compared only where the pivot predicts the responses at all (untrained models give both ~0)
    if (
        signal["pivot_mean_p_gold"] >= 0.05
        and signal["source_mean_p_gold"] < 0.5 * signal["pivot_mean_p_gold"]
    ):
        warnings.append(
            f"projected source gives the gold token p={signal['source_mean_p_gold']:.3f} on average, less than "
            f"half the pivot's own {signal['pivot_mean_p_gold']:.3f}: alignment or vocabulary map suspect"
        )
    return warnings


def positions_markdown(report: dict[str, Any]) -> list[str]:
    """What the response rows receive, by cause: one row per cause, one column per signal."""
    response = report["response_positions"]
    rows = max(sum(sum(r[s] for s in SIGNALS) for r in response.values()), 1)
    lines = [
        "## What the response positions receive",
        "",
        "Share of response positions, by how the pivot token relates to the source's tokens (rows) and what it "
        "receives (columns); `unmapped`: projectable, but the vocabulary map placed none of the source's top-K.",
        "",
        f"| cause | {' | '.join(SIGNALS)} | unmapped |",
        "|---|" + "---|" * (len(SIGNALS) + 1),
    ]
    for cause, row in response.items():
        if any(row.values()):
            cells = [f"{row[s] / rows:.3f}" for s in (*SIGNALS, "unmapped")]
            lines.append(f"| {cause} | {' | '.join(cells)} |")
    totals = report["response_signal_shares"]
    lines.append(f"| **all** | {' | '.join(f'{totals.get(s, 0.0):.3f}' for s in SIGNALS)} | |")
    starts = report["word_start_signal_shares"]
    lines += [
        "",
        "At word starts (tokens that begin with whitespace or open a message): "
        + ", ".join(f"{s} {starts.get(s, 0.0):.3f}" for s in SIGNALS),
    ]
    return lines


def report_markdown(report: dict[str, Any], name: str) -> str:
    lines = [f"# Alignment report: {name}", "", *positions_markdown(report)]
    lines += [
        "",
        f"Top-K mass kept after mapping: mean {report['topk_mass_kept']['mean']}",
        "",
        "| vocab map method | share of source vocab | share of top-K ids |",
        "|---|---|---|",
    ]
    topk = report["vocab_map_coverage_topk_ids"]
    lines += [f"| {k} | {v:.3f} | {topk.get(k, 0.0):.3f} |" for k, v in report["vocab_map_coverage"].items()]
    return "\n".join(lines + ["", *teacher_signal_markdown(report)]) + "\n"


def teacher_signal_markdown(report: dict[str, Any]) -> list[str]:
    signal = report["teacher_signal"]
    lines = [
        "## Teacher signal",
        "",
        f"At the {signal['projected_response_rows']} response positions with a source signal (projected, chunk or scored):",
        "",
        "| | source | pivot (own) |",
        "|---|---|---|",
        f"| top-1 is the gold next token (projected rows) | {signal['source_top1_is_gold']:.3f} | {signal['pivot_top1_is_gold']:.3f} |",
        f"| mean p(gold) | {signal['source_mean_p_gold']:.3f} | {signal['pivot_mean_p_gold']:.3f} |",
        f"| CE per response byte (own tokens) | {signal['ce_per_byte']['source']:.3f} | "
        f"{signal['ce_per_byte']['pivot']:.3f} |",
        "| top-K mass on pivot tokens the pivot never emits here (projected rows) | "
        + " | ".join(
            f"{signal.get('mass_on_unemitted_pivot_tokens', {}).get(side, float('nan')):.3f}"
            for side in ("source", "pivot")
        )
        + " |",
        "",
        "| fusion | pivot's mean weight | source's mean weight |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {w['pivot']:.3f} | {w['source']:.3f} |" for n, w in signal["fusion_weights"].items()]
    warnings = report.get("warnings", [])
    lines += ["", "Warnings:" if warnings else "No warnings: the source's signal looks sound."]
    return lines + [f"- {w}" for w in warnings]


def run(ctx: StageContext) -> None:
    settings, source_name = ctx.settings, ctx.instance.key
    source_store = LogprobReader(ctx.input("source_logprobs"))
    pivot_store = LogprobReader(ctx.input("pivot_logprobs"))
    source_tokenizer = load_tokenizer(ctx.model_spec(source_name))
    corpus, needed = read_corpus(
        settings, pivot_store, source_store, load_tokenizer(ctx.model_spec("pivot")), source_tokenizer
    )
    vocabs, end_of_turn, vocab_map = corpus.vocabs, corpus.end_of_turn, corpus.vocab_map
    p_vocab, s_vocab = vocabs
    with atomic_write(ctx.out / "vocab_map.npz") as handle:
        np.savez(handle, target=vocab_map.target, method=vocab_map.method)
    options = project_options(settings)
    completion = completion_matrix(corpus.counts) if settings.complete or settings.score_candidates else None
    scorer, emitted = None, corpus.emitted
    if settings.score_candidates:
        extract = ctx.recipe.stages.extract.for_model(source_name)  # that source's own backend settings
        backend = make_backend(
            extract.backend, ctx.model_spec(source_name), extract, str(ctx.dir / "scratch")
        )
        scorer = CandidateScorer(
            backend, source_tokenizer, p_vocab, completion, vocab_map.target, settings.max_candidates, emitted
        )
    width = max(source_store.top_k, pivot_store.top_k) + 1  # what `project` lays out per row
    tally, done = Tally(p_vocab, emitted), 0
    for shard in pivot_store.shards():
        with LogprobWriter(
            ctx.out / shard.path.name,
            width,
            pivot_store.vocab_size,
            model=pivot_store.model,
            meta={"aligned_from": source_store.model},
        ) as writer:
            for pivot in shard:
                source = source_store.get(pivot.id) if pivot.id in source_store else None
                content = align_sample(pivot, source, vocabs, settings.method, end_of_turn)
                steps = steps_of(pivot, pivot_store.top_k), steps_of(source, source_store.top_k)
                scored = (
                    scorer.score(pivot, source, content, steps)
                    if scorer is not None and source is not None
                    else None
                )
                projection = project(
                    content.alignment,
                    *steps,
                    vocab_map.target,
                    pivot_store.vocab_size,
                    options,
                    completion,
                    scored,
                    vocabs,
                )
                writer.add(projected_sample(pivot, projection))
                tally.add(pivot, source, projection, content.regions)
                done += 1
                ctx.progress(done, len(pivot_store), "sample")
    write_index(ctx.out)
    report = tally.report(vocab_map, needed)
    if scorer is not None:
        scorer.backend.close()
        report["candidate_scoring"] = scorer.report()
    report["end_of_turn"] = end_of_turn_names(end_of_turn, p_vocab, s_vocab)
    report["warnings"] = signal_warnings(report)
    for warning in report["warnings"]:
        ctx.log.warning("%s: teacher signal: %s", ctx.instance.name, warning)
    write_json_atomic(ctx.out / "report.json", report)
    write_text_atomic(ctx.out / "report.md", report_markdown(report, ctx.instance.name))
    ctx.log.info(
        "%s: response rows with a source signal %.3f (word starts %.3f)",
        ctx.instance.name,
        source_share(report),
        source_share(report, "word_start"),
    )
