"""Content-span restriction: each model renders a conversation with its own chat template, so only the text of
message contents is aligned (message by message, positions relative to the content); template tokens never are.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from fuse.alignment.pieces import VocabPieces, gather_bytes
from fuse.alignment.sequence import (
    ALIGNERS,
    ONE_TO_ONE,
    TEMPLATE,
    UNALIGNED,
    SequenceAlignment,
    char_to_byte,
    region_spans,
    spans_from_offsets,
)


@dataclass(frozen=True)
class Rendered:
    """One conversation as one model tokenized it: token ids plus where each message's content lies, either as
    character spans in `text` (with per-token character `offsets`) or as token ranges `content_tokens`."""

    ids: np.ndarray
    content_spans: np.ndarray | None = None  # (m, 2) character [start, end) in `text`
    text: str | None = None
    offsets: np.ndarray | None = None  # (n, 2) character offsets of every token in `text`
    content_tokens: np.ndarray | None = None  # (m, 2) token [start, end) of each content


@dataclass(frozen=True)
class Region:
    """The tokens [start, stop) of one message content and their byte spans relative to that content."""

    start: int
    stop: int
    spans: tuple[np.ndarray, np.ndarray] | None
    phantom: bool = False  # first token carries a space that is not content text
    how: str = "bytes"
    straddling: int | None = (
        None  # a token holding template text and the content's first bytes (" L" of Lorpel)
    )


@dataclass
class ContentAlignment:
    alignment: SequenceAlignment  # over every pivot token; template tokens have kind TEMPLATE
    regions: Counter = field(default_factory=Counter)  # how each message region was positioned/aligned
    # pivot row -> the source token that opens the same content while also holding text that is not the content's:
    # a space its tokenizer invented (Metaspace) or one of the template's merged into it (" L" of "[/INST] Lorpel").
    # Its step predicted " Lorpel", not "Lorpel", so it is never projected, but the text can still be scored there.
    openings: dict[int, int] = field(default_factory=dict)


def leading_space_bytes(content: bytes) -> int:
    """Bytes of whitespace before a content's first visible character (what Jinja's `| trim` removes)."""
    text = content.decode("utf-8", errors="surrogateescape")
    return len(text[: len(text) - len(text.lstrip())].encode("utf-8", errors="surrogateescape"))


def _offset_regions(rendered: Rendered, vocab: VocabPieces) -> list[Region]:
    """Each content's tokens with byte spans measured from the content's first visible character.

    That origin is the same on both sides whatever either template did to the content's edges: a template that
    trims (`| trim`: Llama-3, Gemma) drops leading whitespace the other side keeps, and positions measured from
    each side's span start would then be off by the stripped bytes for the whole message. Tokens standing for
    whitespace the other side does not have get negative positions and align with nothing.
    """
    starts, ends = spans_from_offsets(rendered.offsets, rendered.text)
    to_byte, raw = char_to_byte(rendered.text), rendered.text.encode("utf-8")
    textual = ~vocab.special[np.asarray(rendered.ids, np.int64)]
    regions = []
    for a, b in np.asarray(rendered.content_spans, np.int64).reshape(-1, 2):
        lo, hi = int(to_byte[a]), int(to_byte[b])
        inside = np.flatnonzero((starts >= lo) & (ends <= hi) & textual)
        if inside.size == 0:
            regions.append(Region(0, 0, (np.zeros(0, np.int64), np.zeros(0, np.int64))))
            continue
        t0, t1 = int(inside[0]), int(inside[-1]) + 1
        origin = lo + leading_space_bytes(raw[lo:hi])
        across = np.flatnonzero((starts < origin) & (ends > origin) & textual)
        straddling = int(across[-1]) if across.size else None
        exact = region_spans(rendered.ids[t0:t1], vocab, raw[lo:hi], int(starts[t0]) - lo)
        if exact is not None:
            spans = (exact[0] + lo - origin, exact[1] + lo - origin)
            regions.append(Region(t0, t1, spans, exact[2], "bytes", straddling))
        else:  # the tokens do not spell the text (a normalizer rewrote it): trust the tokenizer's offsets
            spans = (starts[t0:t1] - origin, ends[t0:t1] - origin)
            regions.append(Region(t0, t1, spans, False, "offsets", straddling))
    return regions


def _token_regions(
    pivot: Rendered, source: Rendered, p_vocab: VocabPieces, s_vocab: VocabPieces
) -> list[tuple[Region, Region]]:
    """Without text: both sides' content tokens must spell the same bytes, up to one invented leading space."""
    pairs = []
    for (p0, p1), (s0, s1) in zip(pivot.content_tokens, source.content_tokens, strict=True):
        p_ids, s_ids = pivot.ids[p0:p1], source.ids[s0:s1]
        pb, sb = gather_bytes(p_ids, p_vocab).tobytes(), gather_bytes(s_ids, s_vocab).tobytes()
        content = sb if pb[:1] == b" " and pb[1:] == sb else pb
        p_exact, s_exact = region_spans(p_ids, p_vocab, content), region_spans(s_ids, s_vocab, content)
        p_spans = None if p_exact is None or s_exact is None else p_exact[:2]
        s_spans = None if p_spans is None else s_exact[:2]
        pairs.append(
            (
                Region(
                    int(p0), int(p1), p_spans, bool(p_exact and p_exact[2]), "bytes" if p_spans else "dtw"
                ),
                Region(
                    int(s0), int(s1), s_spans, bool(s_exact and s_exact[2]), "bytes" if s_spans else "dtw"
                ),
            )
        )
    return pairs


def region_pairs(
    pivot: Rendered, source: Rendered, p_vocab: VocabPieces, s_vocab: VocabPieces
) -> list[tuple[Region, Region]]:
    """Matching content regions of both renderings (same message count required)."""
    if all(r.text is not None and r.offsets is not None for r in (pivot, source)):
        p_regions, s_regions = _offset_regions(pivot, p_vocab), _offset_regions(source, s_vocab)
        # truncation may cut one side's conversation earlier: its missing contents align with nothing
        empty = Region(0, 0, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        s_regions = (s_regions + [empty] * len(p_regions))[: len(p_regions)]
        return list(zip(p_regions, s_regions, strict=True))
    if pivot.content_tokens is None or source.content_tokens is None:
        raise ValueError("each rendering needs text + offsets + content_spans, or content_tokens")
    return _token_regions(pivot, source, p_vocab, s_vocab)


def _shift(index: np.ndarray, offset: int) -> np.ndarray:
    """Region-local source indices to sample indices (-1 stays -1)."""
    return np.where(index >= 0, index + offset, -1)


def _ends_together(p: Region, s: Region) -> bool:
    """Both contents end at the same text (positions from the first visible character: trims do not matter)."""
    if p.spans is None or s.spans is None or not (p.spans[1].size and s.spans[1].size):
        return False
    return int(p.spans[1][-1]) == int(s.spans[1][-1])


def align_content(
    pivot: Rendered,
    source: Rendered,
    p_vocab: VocabPieces,
    s_vocab: VocabPieces,
    method: str = "offsets",
    end_of_turn: tuple[int, int] | None = None,
) -> ContentAlignment:
    """Align message contents only; every pivot token outside them is TEMPLATE (projection falls back to gold).

    With `end_of_turn` = (pivot id, source id), the step that predicts each side's end-of-turn token right after the
    same content is aligned too: both models predict "the turn ends here" after the same text, whatever the tokens
    are called (FuseChat maps the source's end-of-turn token to the pivot's explicitly)."""
    aligner = ALIGNERS[method]
    n = len(pivot.ids)
    out = SequenceAlignment.empty(n, TEMPLATE)
    result = ContentAlignment(out)
    for p, s in region_pairs(pivot, source, p_vocab, s_vocab):
        if p.stop == p.start:
            continue
        part = aligner(
            pivot.ids[p.start : p.stop],
            source.ids[s.start : s.stop],
            p_vocab,
            s_vocab,
            pivot_spans=p.spans,
            source_spans=s.spans,
        )
        index, kind = _shift(part.source_index, s.start), part.kind.copy()
        if p.phantom:
            kind[0] = UNALIGNED
        if s.phantom:  # the source's first step predicted text with an invented space: unsound
            kind[index == s.start] = UNALIGNED
        opener = s.start if s.phantom else s.straddling
        if opener is not None and not p.phantom and p.spans is not None and p.spans[0][:1].tolist() == [0]:
            result.openings[p.start] = opener
        index[kind == UNALIGNED] = -1
        out.source_index[p.start : p.stop], out.kind[p.start : p.stop] = index, kind
        out.cover_first[p.start : p.stop], out.cover_last[p.start : p.stop] = (
            _shift(part.cover_first, s.start),
            _shift(part.cover_last, s.start),
        )
        out.ends_together[p.start : p.stop] = part.ends_together
        exact = method != "dtw" and p.spans is not None and s.spans is not None
        result.regions[("bytes" if p.how == s.how == "bytes" else "offsets") if exact else "dtw"] += 1
        if end_of_turn is not None and exact and _ends_together(p, s):
            p_end, s_end = p.stop, s.stop
            if (
                p_end < n
                and s_end < len(source.ids)
                and int(pivot.ids[p_end]) == end_of_turn[0]
                and int(source.ids[s_end]) == end_of_turn[1]
            ):
                out.source_index[p_end], out.kind[p_end] = s_end, ONE_TO_ONE
                out.cover_first[p_end] = out.cover_last[p_end] = s_end
                out.ends_together[p_end] = True
                result.regions["end_of_turn"] += 1
    return result
