"""Candidate scoring, the pure half: which pivot tokens to ask the source about at a row, and how the source's
answers (the probability that the text continues with each candidate's text) become a distribution over the pivot's
next token. The model half (tokenizing each candidate in the source's context and scoring it) is in stages/align.py.

At a row where both tokenizations have a boundary, the source can be asked for the exact probability of any text
that follows: p_src(" dundel" | context) is the product of its pieces' probabilities, whatever its spelling. The
candidates are the gold, the pivot's own top-K and the pivot tokens that the source's likely first pieces begin in
the corpus (`completion_matrix`), so the words the source expects are asked about even where the pivot does not
expect them. Two candidates can be prefixes of one another (" dun", " dundel"): their events nest, so each keeps
only what its children in the candidates' prefix tree leave (`exclusive`).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from fuse.alignment.pieces import VocabPieces


def text_ids(vocab: VocabPieces) -> dict[bytes, int]:
    """The id of each non-empty, non-special piece, by its bytes."""
    return {piece: i for i, piece in enumerate(vocab.pieces) if piece and not vocab.special[i]}


def extensions(vocab: VocabPieces, emitted: np.ndarray, per_token: int = 8) -> dict[int, list[int]]:
    """For each pivot token that is a proper prefix of tokens the pivot emits (`emitted`: how often each id
    occurs in its tokenization of the data), the `per_token` most emitted of those: " hal" → " halkel"."""
    by_bytes = text_ids(vocab)
    found: dict[int, list[int]] = {}
    for e in np.flatnonzero(emitted):
        piece = vocab.pieces[e]
        for k in range(1, len(piece)):
            prefix = by_bytes.get(piece[:k])
            if prefix is not None:
                found.setdefault(prefix, []).append(int(e))
    return {p: sorted(es, key=lambda e: (-emitted[e], e))[:per_token] for p, es in found.items()}


def candidate_ids(
    gold: int,
    pivot_ids: np.ndarray,
    source_ids: np.ndarray,
    source_probs: np.ndarray,
    completion: sparse.csr_matrix,
    target: np.ndarray,
    usable: np.ndarray,
    limit: int,
    longer: dict[int, list[int]] | None = None,
    respell: np.ndarray | None = None,
    per_piece: int = 4,
) -> np.ndarray:
    """The pivot ids to score at one row, most important first, at most `limit`: the gold; then for each source
    candidate (most probable first) the `per_piece` pivot tokens the corpus aligned it with most often and the
    vocabulary map's id (the words the source expects); then the pivot's own top-K. `respell` maps ids to the form
    the row needs (at a content's opening, " Nixjun" → the pivot's token for "Nix…"). Each id comes with the
    emitted tokens it is a prefix of (`longer`, from `extensions`), or not at all when they do not fit, so a prefix
    never keeps the mass of the words it begins. Only `usable` ids (text a tokenizer can spell)."""
    base: list[int] = [gold]
    for s in np.asarray(source_ids)[np.argsort(-np.asarray(source_probs), kind="stable")]:
        if s < 0:
            continue
        start, stop = completion.indptr[s], completion.indptr[s + 1]
        order = np.argsort(-completion.data[start:stop], kind="stable")[:per_piece]
        base += [int(i) for i in completion.indices[start:stop][order]]
        if target[s] >= 0:
            base.append(int(target[s]))
    base += [int(i) for i in pivot_ids if i >= 0]
    if respell is not None:
        base = [int(respell[w]) for w in base]
    longer = longer or {}
    out: dict[int, None] = {}
    for w in base:
        group = [i for i in (w, *longer.get(w, ())) if usable[i] and i not in out]
        if w == gold or len(out) + len(group) <= limit:
            out.update(dict.fromkeys(group))
    return np.array(list(out)[:limit], np.int64)


def first_token_without_space(vocab: VocabPieces) -> np.ndarray:
    """Per id: for a token that begins with a space, the longest token spelling a prefix of the same text without
    it (" Nixjun" → "Nix", the first token a greedy tokenizer would write at a content's opening); else itself."""
    by_bytes = text_ids(vocab)
    out = np.arange(len(vocab), dtype=np.int64)
    for i, piece in enumerate(vocab.pieces):
        if piece[:1] == b" " and len(piece) > 1 and not vocab.special[i]:
            text = piece[1:]
            out[i] = next((by_bytes[text[:k]] for k in range(len(text), 0, -1) if text[:k] in by_bytes), i)
    return out


def exclusive(ids: np.ndarray, probs: np.ndarray, vocab: VocabPieces) -> np.ndarray:
    """Each candidate's probability that the text continues with its bytes, less what its children in the
    candidates' prefix tree take (the nearest candidates that extend it; disjoint among themselves), clamped at 0:
    the probability that the next pivot token is this one rather than a longer candidate."""
    spelled = [vocab.pieces[int(i)] for i in ids]
    probs = np.asarray(probs, np.float64)
    out = probs.copy()
    for a, text in enumerate(spelled):
        longer = [b for b, other in enumerate(spelled) if len(other) > len(text) and other.startswith(text)]
        children = [
            b
            for b in longer
            if not any(
                len(spelled[b]) > len(spelled[c]) and spelled[b].startswith(spelled[c])
                for c in longer
                if c != b
            )
        ]
        out[a] = max(probs[a] - probs[children].sum(), 0.0)
    return out


def spellable(vocab: VocabPieces) -> np.ndarray:
    """Bool per id: a non-special token whose bytes are non-empty, valid UTF-8 text (a candidate can be written
    out as text for the source's tokenizer; byte pieces of a character cannot)."""
    usable = np.zeros(len(vocab), bool)
    for i, piece in enumerate(vocab.pieces):
        if piece and not vocab.special[i]:
            try:
                piece.decode("utf-8")
            except UnicodeDecodeError:
                continue
            usable[i] = True
    return usable
