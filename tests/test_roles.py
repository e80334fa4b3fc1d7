"""Templates that reject a role (fuse.data.roles): Gemma-2's `System role not supported` gets the system turn
folded into the first user turn exactly as Gemma-3's own template folds it; every original content keeps its span;
a conversation no adaptation fixes is refused with the template's message (the row is skipped, not the stage)."""

from __future__ import annotations

import pytest

from fuse.data.chat import content_spans, render_text
from fuse.data.roles import TemplateRejected, fold_system_turn, render_adapting_roles

# google/gemma-2-9b-it's chat template, as it ships.
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "Seven."},
]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<bos>": 0, "<unk>": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", unk_token="<unk>")


def test_fold_system_turn():
    folded = fold_system_turn(CONVERSATION)
    assert folded == [
        {"role": "user", "content": "You are a terse assistant.\n\nName a prime."},
        {"role": "assistant", "content": "Seven."},
    ]
    assert CONVERSATION[1]["content"] == "Name a prime."  # the input is not changed
    assert fold_system_turn(CONVERSATION[1:]) is None  # nothing to fold


def test_a_rejected_system_turn_is_folded_and_every_content_keeps_its_span(tokenizer):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="System role not supported"):
        render_text(tokenizer, CONVERSATION, GEMMA2)
    text, adapted = render_adapting_roles(lambda m: render_text(tokenizer, m, GEMMA2), CONVERSATION)
    assert adapted
    assert text == (
        "<bos><start_of_turn>user\nYou are a terse assistant.\n\nName a prime.<end_of_turn>\n"
        "<start_of_turn>model\nSeven.<end_of_turn>\n"
    )
    spans = content_spans(text, CONVERSATION)
    assert [(s.role, text[s.start : s.end]) for s in spans] == [
        (m["role"], m["content"]) for m in CONVERSATION
    ]
    plain, adapted = render_adapting_roles(lambda m: render_text(tokenizer, m, GEMMA2), CONVERSATION[1:])
    assert not adapted and plain.startswith("<bos><start_of_turn>user\nName a prime.")


def test_a_conversation_no_fold_fixes_is_refused_with_the_templates_message(tokenizer):
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TemplateRejected, match="roles must alternate"):
        render_adapting_roles(lambda m: render_text(tokenizer, m, GEMMA2), twice)
    system_then_assistant = [CONVERSATION[0], CONVERSATION[2]]
    with pytest.raises(TemplateRejected, match="System role not supported"):
        render_adapting_roles(lambda m: render_text(tokenizer, m, GEMMA2), system_then_assistant)


@pytest.mark.network
def test_the_fold_is_what_gemma3s_own_template_does():
    """Gemma-3's template folds a system turn itself: our fold under Gemma-2's template renders the same text."""
    from real_tokenizers import load

    gemma3 = load("gemma3")
    own = render_text(gemma3, CONVERSATION)
    folded, adapted = render_adapting_roles(lambda m: render_text(gemma3, m, GEMMA2), CONVERSATION)
    assert adapted and folded == own
