"""align.<source>: project the source's teacher top-K onto the pivot's tokens and vocabulary.

Reads the log-prob stores of extract.<source> and extract.pivot; writes, under out/, the projected store (same
format, pivot vocab, one shard per pivot shard + index.json), vocab_map.npz and report.json / report.md.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fuse.alignment.content import ContentAlignment, Rendered, align_content
from fuse.alignment.pieces import VocabPieces, vocab_pieces
from fuse.alignment.project import CASE_NAMES, project
from fuse.alignment.sequence import MANY_TO_ONE, ONE_TO_ONE, SequenceAlignment
from fuse.alignment.vocab import build_vocab_map, pair_counts
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


def count_pairs(
    ctx: StageContext,
    pivot_store: Any,
    source_store: Any,
    vocabs: tuple,
    end_of_turn: tuple[int, int] | None = None,
) -> tuple[Any, np.ndarray]:
    """Pass 1: aligned (source id, pivot id) pairs for the statistics-based map, and the source ids in top-K."""
    settings = ctx.settings
    kinds = (ONE_TO_ONE,) if settings.stats_pairs == "one_to_one" else (ONE_TO_ONE, MANY_TO_ONE)
    src_pairs, piv_pairs, needed = [], [], []
    for pivot in pivot_store:
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
    return counts, np.unique(np.concatenate(needed or [np.zeros(0, np.int64)]))


def project_sample(
    pivot: SampleLogprobs,
    source: SampleLogprobs | None,
    alignment: Any,
    vocab_map: VocabMap,
    n_pivot: int,
    top_k: int,
    allow: tuple[int, ...],
) -> Projection:
    """Row j of the projection predicts pivot token j; store row t predicts token t+1, hence the one-row shifts."""
    if source is None:
        ids, lps = np.full((1, top_k), -1, np.int64), np.full((1, top_k), -np.inf)
    else:
        ids = np.vstack([np.full((1, top_k), -1, np.int64), source.topk_ids[:, :top_k]])
        lps = np.vstack([np.full((1, top_k), -np.inf), source.topk_logprobs[:, :top_k]])
    return project(alignment, pivot.input_ids, ids, lps, vocab_map.target, n_pivot, allow)


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


class Tally:
    """Everything report.json counts, accumulated over samples."""

    def __init__(self) -> None:
        self.cases: Counter = Counter()
        self.regions: Counter = Counter()
        self.response_cases: Counter = Counter()
        self.kept: list[float] = []
        self.samples = self.missing = 0
        self.signal: Counter = Counter()  # teacher signal at the projected response rows
        self.ce: list[tuple[float, float]] = []  # per sample: (pivot, source) CE per response byte

    def add(
        self, pivot: SampleLogprobs, source: SampleLogprobs | None, projection: Projection, regions: Counter
    ) -> None:
        self.samples += 1
        self.missing += int(source is None)
        self.cases.update(projection.counts())
        self.regions.update(regions)
        # rows that train (mask of the predicted token), the share that matters to distill
        case = projection.case[1:][pivot.mask[1:]]
        self.response_cases.update(
            {CASE_NAMES[c]: int(n) for c, n in zip(*np.unique(case, return_counts=True), strict=True)}
        )
        kept = projection.kept_mass[1:]
        self.kept.append(kept[np.isfinite(kept)])
        self.add_signal(pivot, projection)
        if source is not None:
            self.ce.append((ce_per_byte(pivot), ce_per_byte(source)))

    def add_signal(self, pivot: SampleLogprobs, projection: Projection) -> None:
        """At response rows where the source was projected: does its top-1 name the gold next token, and what
        probability does it give it — next to the pivot's own extract at the same rows."""
        rows = np.flatnonzero(pivot.mask[1:] & np.isfinite(projection.kept_mass[1:]))
        gold = pivot.input_ids[1:][rows]
        pivot_gold = np.exp(np.nan_to_num(pivot.target_logprobs[rows].astype(np.float64), nan=-np.inf))
        self.signal.update(
            rows=int(rows.size),
            source_top1_gold=int((projection.ids[1:][rows, 0] == gold).sum()),
            pivot_top1_gold=int((pivot.topk_ids[rows, 0] == gold).sum()),
            source_p_gold=float(np.exp(projection.realized[1:][rows].astype(np.float64)).sum()),
            pivot_p_gold=float(pivot_gold.sum()),
        )

    def teacher_signal(self) -> dict[str, Any]:
        """The source's signal where it is projected, and how each fusion function would weigh the two teachers
        (mean weight per teacher over sequences; for min_ce, the share of sequences each teacher wins)."""
        rows = max(self.signal["rows"], 1)
        ce = torch.tensor(self.ce or [[0.0, 0.0]], dtype=torch.float64)
        weights = {
            name: dict(zip(("pivot", "source"), FUSIONS[name].fn(ce).mean(dim=0).tolist(), strict=True))
            for name in FUSIONS
        }
        return {
            "projected_response_rows": self.signal["rows"],
            "source_top1_is_gold": self.signal["source_top1_gold"] / rows,
            "pivot_top1_is_gold": self.signal["pivot_top1_gold"] / rows,
            "source_mean_p_gold": self.signal["source_p_gold"] / rows,
            "pivot_mean_p_gold": self.signal["pivot_p_gold"] / rows,
            "ce_per_byte": {"pivot": float(ce[:, 0].mean()), "source": float(ce[:, 1].mean())},
            "fusion_weights": weights,
        }

    def report(self, vocab_map: VocabMap, needed: np.ndarray) -> dict[str, Any]:
        kept = np.concatenate(self.kept) if self.kept else np.zeros(0)

        def shares(counter: Counter) -> dict[str, float]:
            total = sum(counter.values())
            return {name: n / total for name, n in sorted(counter.items())} if total else {}

        projected = sum(n for name, n in self.cases.items() if name.startswith("projected"))
        content = projected + self.cases["fallback_unaligned"] + self.cases["fallback_unmapped"]
        return {
            "samples": self.samples,
            "samples_missing_in_source": self.missing,
            "positions": dict(self.cases),
            "position_shares": shares(self.cases),
            "response_position_shares": shares(self.response_cases),
            "content_positions": content,
            "content_shares": {
                "1:1": self.cases["projected_1:1"] / max(content, 1),
                "many:1": self.cases["projected_many:1"] / max(content, 1),
                "fallback": (content - projected) / max(content, 1),
            },
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
def _projected_share(report: dict[str, Any]) -> float:
    shares = report["response_position_shares"]
    return shares.get("projected_1:1", 0.0) + shares.get("projected_many:1", 0.0)


def _mapped_share(report: dict[str, Any]) -> float:
    coverage = report["vocab_map_coverage_topk_ids"]
    return coverage.get("exact", 1.0) + coverage.get("role", 0.0)


SIGNAL_CHECKS = (
    ("response rows projected", _projected_share, 0.5),
    ("top-K mass kept by the vocabulary map", lambda r: r["topk_mass_kept"]["mean"] or 0.0, 0.8),
    ("top-K ids mapped exactly or by role", _mapped_share, 0.8),
)


def signal_warnings(report: dict[str, Any]) -> list[str]:
    """One line per check a source fails (each names the measured share and the threshold)."""
    warnings = []
    for what, measure, floor in SIGNAL_CHECKS:
        value = measure(report)
        if value < floor:
            warnings.append(f"{what}: {value:.2f} (below {floor:.2f})")
    signal = report["teacher_signal"]
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


def report_markdown(report: dict[str, Any], name: str) -> str:
    lines = [f"# Alignment report: {name}", "", "| content positions | share |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["content_shares"].items()]
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
        f"At the {signal['projected_response_rows']} response positions where the source is projected:",
        "",
        "| | source (projected) | pivot (own) |",
        "|---|---|---|",
        f"| top-1 is the gold next token | {signal['source_top1_is_gold']:.3f} | {signal['pivot_top1_is_gold']:.3f} |",
        f"| mean p(gold) | {signal['source_mean_p_gold']:.3f} | {signal['pivot_mean_p_gold']:.3f} |",
        f"| CE per response byte (own tokens) | {signal['ce_per_byte']['source']:.3f} | "
        f"{signal['ce_per_byte']['pivot']:.3f} |",
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
    p_vocab = sized(vocab_pieces(load_tokenizer(ctx.model_spec("pivot"))), pivot_store.vocab_size)
    source_tokenizer = load_tokenizer(ctx.model_spec(source_name))
    s_vocab = sized(vocab_pieces(source_tokenizer), source_store.vocab_size)
    vocabs = (p_vocab, s_vocab)
    roles, end_of_turn = turn_roles(pivot_store, source_store, vocabs, source_tokenizer.eos_token_id)
    counts, needed = count_pairs(ctx, pivot_store, source_store, vocabs, end_of_turn)
    methods = tuple(settings.vocab_map.split("+"))
    vocab_map = build_vocab_map(s_vocab, p_vocab, counts, needed, methods, settings.min_stat_count, roles)
    with atomic_write(ctx.out / "vocab_map.npz") as handle:
        np.savez(handle, target=vocab_map.target, method=vocab_map.method)
    allow = (ONE_TO_ONE,) if settings.project == "one_to_one" else (ONE_TO_ONE, MANY_TO_ONE)
    tally, done = Tally(), 0
    for shard in pivot_store.shards():
        with LogprobWriter(
            ctx.out / shard.path.name,
            source_store.top_k,
            pivot_store.vocab_size,
            model=pivot_store.model,
            meta={"aligned_from": source_store.model},
        ) as writer:
            for pivot in shard:
                source = source_store.get(pivot.id) if pivot.id in source_store else None
                content = align_sample(pivot, source, vocabs, settings.method, end_of_turn)
                projection = project_sample(
                    pivot,
                    source,
                    content.alignment,
                    vocab_map,
                    pivot_store.vocab_size,
                    source_store.top_k,
                    allow,
                )
                writer.add(projected_sample(pivot, projection))
                tally.add(pivot, source, projection, content.regions)
                done += 1
                ctx.progress(done, len(pivot_store), "sample")
    write_index(ctx.out)
    report = tally.report(vocab_map, needed)
    report["end_of_turn"] = end_of_turn_names(end_of_turn, p_vocab, s_vocab)
    report["warnings"] = signal_warnings(report)
    for warning in report["warnings"]:
        ctx.log.warning("%s: teacher signal: %s", ctx.instance.name, warning)
    write_json_atomic(ctx.out / "report.json", report)
    write_text_atomic(ctx.out / "report.md", report_markdown(report, ctx.instance.name))
    ctx.log.info(
        "%s: content 1:1 %.3f many:1 %.3f fallback %.3f",
        ctx.instance.name,
        *report["content_shares"].values(),
    )
