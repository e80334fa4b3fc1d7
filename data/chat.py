"""A conversation rendered with a tokenizer's chat template, with each message's content span in the text,
tokenized with character offsets, and the response mask (tokens inside assistant contents + end of turn).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from fuse.data.logprobs import ContentSpan

log = logging.getLogger(__name__)

RENDER_TIME_LIMIT_S = 5.0  # one conversation; real templates take milliseconds


class ChatRenderError(ValueError):
    """A conversation the template cannot render, or whose contents it does not reproduce verbatim."""

    reason = "content not verbatim in the rendered text"  # how a stage counts the rows it skips for it


class TemplateRefused(ChatRenderError):
    """The chat template refuses the conversation, even with its system turn folded into the first user turn."""

    reason = "the chat template refuses the conversation"


class TokenOutOfRange(ChatRenderError):
    """A conversation whose tokens include an id past the model's output (an added token of a tokenizer larger
    than the embedding, spelled out in the text): the model cannot read it."""

    reason = "token past the model's output"


@dataclass
class RenderedChat:
    """One rendered conversation: text, content spans, tokens, offsets [T, 2] and response mask [T]."""

    text: str
    spans: list[ContentSpan]
    input_ids: np.ndarray
    offsets: np.ndarray
    mask: np.ndarray
    truncated: bool = False
    adapted: bool = False  # the template refused a role: the system turn was folded into the first user turn

    @property
    def num_tokens(self) -> int:
        return int(len(self.input_ids))


class TemplateTimeout(RuntimeError):
    """A chat template still rendering one conversation after RENDER_TIME_LIMIT_S: a loop that will not end. Not a
    ChatRenderError: no row is to blame, so no stage counts and skips it."""


def render_text(tokenizer: Any, messages: Sequence[dict[str, str]], chat_template: str | None = None) -> str:
    """The conversation as the (given, else the tokenizer's) chat template writes it, within RENDER_TIME_LIMIT_S."""
    with time_limit(
        RENDER_TIME_LIMIT_S,
        f"the chat template did not render a conversation of {len(messages)} messages within "
        f"{RENDER_TIME_LIMIT_S:g} s (a loop that does not end?)",
    ):
        return tokenizer.apply_chat_template(
            list(messages), chat_template=chat_template, tokenize=False, add_generation_prompt=False
        )


@contextmanager
def time_limit(seconds: float, message: str) -> Iterator[None]:
    """Raise TemplateTimeout(message) in the block once it has run `seconds`. A SIGALRM timer, so only in the main
    thread (elsewhere: no limit) and only where no sooner timer is set; the previous handler and timer are put
    back, the time the block took taken off the previous timer."""
    previous_delay, previous_interval = signal.getitimer(signal.ITIMER_REAL)
    if threading.current_thread() is not threading.main_thread() or 0 < previous_delay <= seconds:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TemplateTimeout(message)

    previous_handler = signal.signal(signal.SIGALRM, expire)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL if previous_handler is None else previous_handler)
        if previous_delay:
            left = max(previous_delay - (time.monotonic() - started), 1e-6)
            signal.setitimer(signal.ITIMER_REAL, left, previous_interval)


def content_spans(text: str, messages: Sequence[dict[str, str]], where: str = "") -> list[ContentSpan]:
    """Each message's content located in the rendered text, in order, each after the previous one.

    Templates that trim contents are handled by looking for the stripped content when the raw one is absent.
    """
    spans, cursor = [], 0
    for number, message in enumerate(messages):
        content = message["content"]
        start = text.find(content, cursor)
        if start < 0 and content.strip() != content:
            content = content.strip()
            start = text.find(content, cursor)
        if start < 0:
            raise ChatRenderError(
                f"{where}message {number} ({message['role']}): its content does not appear verbatim in the text "
                f"rendered by the chat template (the template rewrites it?)"
            )
        spans.append(ContentSpan(message["role"], start, start + len(content)))
        cursor = start + len(content)
    return spans


def covering_offsets(offsets: np.ndarray, text_length: int) -> np.ndarray:
    """Offsets that tile the text: a gap before a token (a space a byte-level tokenizer trims from `Ġword`'s
    offsets) is given to that token, so each token covers the text it stands for."""
    fixed = np.asarray(offsets, dtype=np.int64).reshape(-1, 2).copy()
    previous_end = 0
    for t in range(len(fixed)):
        start, end = fixed[t]
        if end <= start and start == 0 and t > 0:  # a special token added with (0, 0): place it at the cursor
            start = end = previous_end
        if start > previous_end:
            start = previous_end
        fixed[t] = (start, max(end, start))
        previous_end = max(previous_end, fixed[t, 1])
    np.clip(fixed, 0, text_length, out=fixed)
    return fixed


def response_mask(
    offsets: np.ndarray,
    spans: Sequence[ContentSpan],
    roles: Sequence[str] = ("assistant",),
    end_of_turn: bool = True,
) -> np.ndarray:
    """Tokens overlapping a content span of `roles`; with `end_of_turn`, also the token right after each such
    span (the end-of-turn / EOS marker a model must learn to emit)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    mask = np.zeros(len(offsets), dtype=bool)
    for span in spans:
        if span.role not in roles or span.end <= span.start:
            continue
        inside = (offsets[:, 0] < span.end) & (offsets[:, 1] > span.start)
        mask |= inside
        if end_of_turn and inside.any():
            after = int(np.flatnonzero(inside)[-1]) + 1
            if after < len(mask):
                mask[after] = True
    return mask


def tokenize_with_offsets(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the rendered text (the template wrote the special tokens, so none are added) + offsets."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    offsets = covering_offsets(np.asarray(encoded["offset_mapping"], dtype=np.int64), len(text))
    return ids, offsets


def render_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    chat_template: str | None = None,
    max_length: int | None = None,
    where: str = "",
    vocab_size: int | None = None,
) -> RenderedChat:
    """Render, locate contents, tokenize, mask; cut to `max_length` tokens when given (flagged `truncated`).
    With `vocab_size` (the model's output size), a token id past it raises TokenOutOfRange naming it."""
    from fuse.data.roles import TemplateRejected, render_adapting_roles

    try:
        text, adapted = render_adapting_roles(
            lambda conversation: render_text(tokenizer, conversation, chat_template), messages
        )
    except TemplateRejected as error:
        raise TemplateRefused(f"{where}{error}") from None
    spans = content_spans(text, messages, where)
    ids, offsets = tokenize_with_offsets(tokenizer, text)
    if vocab_size is not None and ids.size and int(ids.max()) >= vocab_size:
        bad = int(ids[ids >= vocab_size][0])
        raise TokenOutOfRange(
            f"{where}token {bad} {tokenizer.convert_ids_to_tokens(bad)!r} is past the model's {vocab_size} "
            f"output rows (the text spells out a token the model cannot read)"
        )
    mask = response_mask(offsets, spans)
    chat = RenderedChat(text, spans, ids, offsets, mask, adapted=adapted)
    if max_length is not None and chat.num_tokens > max_length:
        chat = truncate(chat, max_length)
    return chat


def truncate(chat: RenderedChat, max_length: int) -> RenderedChat:
    """The first `max_length` tokens; the text is cut where the last kept token ends, spans clipped to it."""
    end = int(chat.offsets[max_length - 1, 1])
    spans = [ContentSpan(s.role, s.start, min(s.end, end)) for s in chat.spans if s.start < end]
    return RenderedChat(
        chat.text[:end],
        spans,
        chat.input_ids[:max_length],
        np.minimum(chat.offsets[:max_length], end),
        chat.mask[:max_length],
        truncated=True,
        adapted=chat.adapted,
    )
