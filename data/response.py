"""How well a teacher predicts a sample's responses: CE per byte of the assistant contents, comparable across
tokenizers and chat templates (the input of the fusion functions, and of the align stage's teacher-signal report).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fuse.data.logprobs import SampleLogprobs

# A realized token outside a teacher's top-K has no stored log-prob (-inf / NaN): count it at this floor so one
# such token cannot decide the sequence's CE on its own.
LOGPROB_FLOOR = float(np.log(1e-6))


def response_bytes(sample: SampleLogprobs) -> int:
    """Bytes of the assistant contents: the same text for every model, so CE per byte compares tokenizers."""
    return sum(len(sample.text[s.start : s.end].encode()) for s in sample.spans if s.role == "assistant")


def content_rows(sample: SampleLogprobs) -> np.ndarray:
    """Store rows (row t predicts token t+1) whose predicted token lies inside an assistant content.

    The end-of-turn token is left out on purpose: it spells no byte of the response, and each template has its own
    (one token for ChatML, none for a template that only appends EOS…), so counting it would let the template,
    not the teacher, decide which teacher looks better on short answers. Every teacher is measured on the same
    bytes, by the tokens that spell them.
    """
    offsets = np.asarray(sample.offsets, np.int64).reshape(-1, 2)
    inside = np.zeros(len(offsets), dtype=bool)
    for span in sample.spans:
        if span.role == "assistant" and span.end > span.start:
            inside |= (offsets[:, 0] < span.end) & (offsets[:, 1] > span.start)
    return np.flatnonzero(inside[1:] & np.asarray(sample.mask, bool)[1:])


def ce_per_byte(sample: SampleLogprobs) -> float:
    """−Σ log p(realized token) over the tokens of the assistant contents, per content byte."""
    rows = content_rows(sample)
    realized = np.nan_to_num(sample.target_logprobs[rows].astype(np.float64), nan=LOGPROB_FLOOR)
    nll = -np.maximum(realized, LOGPROB_FLOOR).sum()
    return float(nll / max(response_bytes(sample), 1))
