"""Conversations a chat template refuses because of their roles (Gemma-2: `System role not supported`; strict
templates: roles must alternate). The system turn is folded into the first user turn, as those models' own docs and
Gemma-3's template do (`system + "\\n\\n" + user`); a conversation that still does not render is refused with the
template's message, so the caller counts and skips that row instead of losing the stage.

The fold keeps every original content verbatim and in order in the rendered text, so each original message's span
is still found there (`fuse.data.chat.content_spans` over the original messages): the system content ends up
aligned with the system content of a model whose template takes the system role.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

SEPARATOR = "\n\n"  # between the folded system content and the first user content (Gemma-3's template)


class TemplateRejected(ValueError):
    """The chat template refuses this conversation even after adaptation; the message says why."""


def fold_system_turn(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """[system, user, ...] -> [user(system + "\\n\\n" + user), ...]; None when there is nothing to fold (no leading
    system turn, or no user turn right after it)."""
    if len(messages) < 2 or messages[0].get("role") != "system" or messages[1].get("role") != "user":
        return None
    first = dict(messages[1])
    first["content"] = f"{messages[0]['content']}{SEPARATOR}{messages[1]['content']}"
    return [first, *(dict(m) for m in messages[2:])]


def rejects_a_role(error: Exception) -> bool:
    """A template's own refusal of the conversation's roles (raise_exception in the template)."""
    from jinja2.exceptions import TemplateError

    text = str(error).lower()
    return isinstance(error, TemplateError) and "role" in text


def render_adapting_roles(
    render: Callable[[list[dict[str, Any]]], str], messages: Sequence[dict[str, Any]]
) -> tuple[str, bool]:
    """(text, adapted): `render(messages)`, or, when the template rejects a role, `render` of the conversation with
    its system turn folded into the first user turn. Raises TemplateRejected when neither renders."""
    from jinja2.exceptions import TemplateError

    try:
        return render(list(messages)), False
    except TemplateError as error:
        folded = fold_system_turn(messages) if rejects_a_role(error) else None
        if folded is None:
            raise TemplateRejected(f"the chat template refuses the conversation: {error}") from None
        first_error = error
    try:
        return render(folded), True
    except TemplateError as error:
        raise TemplateRejected(
            f"the chat template refuses the conversation ({first_error}), and with the system turn folded into "
            f"the first user turn ({error})"
        ) from None
