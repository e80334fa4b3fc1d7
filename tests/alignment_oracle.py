"""A brute-force alignment oracle that works from the text itself: each content token's position in its message's
*raw* content (found by searching the text the template wrote inside the raw content — no whitespace rule, no
token pieces), used to check the aligner on real templates (tests and bench/align_templates.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from fuse.alignment.sequence import MANY_TO_ONE, ONE_TO_ONE

# Contents that start and end with whitespace, as ShareGPT-style data has them, with a system turn.
PADDED_CONVERSATION = [
    {"role": "user", "content": "\n  What is the capital of France?  \n"},
    {
        "role": "assistant",
        "content": " \nThe capital of France is Paris.\n\nIt lies on the Seine;   really.\n ",
    },
    {"role": "user", "content": "   And of Italy?"},
    {"role": "assistant", "content": "\n\nRome, of course. Tabs\tand 1234 numbers."},
]


def raw_positions(rendered, messages: list[dict[str, str]], vocab) -> dict[int, tuple[int, int, int]]:
    """token index -> (message number, start, end) in bytes of that message's raw content."""
    positions = {}
    special = vocab.special[np.asarray(rendered.ids, np.int64)]
    # byte pieces of one character (an emoji split by byte-level BPE) share its character offsets: characters
    # cannot place them, so the oracle leaves them out (the aligner places them by bytes)
    offsets = [tuple(o) for o in np.asarray(rendered.offsets).tolist()]
    shared = {o for o, n in Counter(offsets).items() if n > 1}
    for number, ((a, b), message) in enumerate(zip(rendered.content_spans, messages, strict=True)):
        written = rendered.text[a:b]
        lead = message["content"].find(written)
        assert lead >= 0, "the template rewrote a content beyond trimming"
        for t, (start, end) in enumerate(rendered.offsets):
            if special[t] or not (a <= start and end <= b) or end <= start or (start, end) in shared:
                continue
            raw_start = len(message["content"][: lead + start - a].encode())
            positions[t] = (number, raw_start, raw_start + len(rendered.text[start:end].encode()))
    return positions


@dataclass
class OracleCheck:
    made: int  # pivot steps the aligner joined to a source step (1:1 or many:1)
    wrong: list[int]  # of those, the ones joining tokens that start at different text
    recall: float  # share of the oracle's same-start pairs the aligner made


def oracle_check(alignment, pivot, source, messages, p_vocab, s_vocab) -> OracleCheck:
    p_raw, s_raw = raw_positions(pivot, messages, p_vocab), raw_positions(source, messages, s_vocab)
    by_start = {(number, start): t for t, (number, start, _) in s_raw.items()}
    made = np.flatnonzero(np.isin(alignment.kind, (ONE_TO_ONE, MANY_TO_ONE)))
    # checkable pairs: both tokens are content the oracle can place (end-of-turn steps are checked elsewhere)
    content = [j for j in made if j in p_raw and int(alignment.source_index[j]) in s_raw]
    wrong = [int(j) for j in content if s_raw[int(alignment.source_index[j])][:2] != p_raw[j][:2]]
    oracle = [j for j, (number, start, _) in p_raw.items() if (number, start) in by_start]
    recall = float(np.isin(oracle, made).mean()) if oracle else 0.0
    return OracleCheck(len(content), wrong, recall)
