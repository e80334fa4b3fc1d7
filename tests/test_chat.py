"""Chat rendering: content spans found in the rendered text, offsets that tile it, the response mask."""

from __future__ import annotations

import numpy as np
import pytest

from fuse.data.chat import ChatRenderError, content_spans, covering_offsets, render_chat, response_mask
from fuse.data.logprobs import ContentSpan

from tiny_lm import conversations, shared_models


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    return {
        arch: AutoTokenizer.from_pretrained(path) for arch, path in shared_models(tmp_path_factory).items()
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_spans_offsets_and_mask(tokenizers, arch):
    tokenizer = tokenizers[arch]
    for row in conversations(12):
        chat = render_chat(tokenizer, row["messages"])
        assert [chat.text[s.start : s.end] for s in chat.spans] == [
            m["content"].strip() for m in row["messages"]
        ]
        assert [s.role for s in chat.spans] == [m["role"] for m in row["messages"]]
        # offsets tile the text: each token starts where the previous one ended, the last ends at the end
        assert chat.offsets[0, 0] == 0 and chat.offsets[-1, 1] == len(chat.text)
        np.testing.assert_array_equal(chat.offsets[1:, 0], chat.offsets[:-1, 1])
        assert tokenizer.decode(chat.input_ids.tolist()).replace(" ", "") == chat.text.replace(" ", "")
        masked = "".join(chat.text[a:b] for (a, b), m in zip(chat.offsets, chat.mask, strict=True) if m)
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        for answer in answers:  # every answer is inside the masked text, user text is not
            assert answer.split()[-1] in masked
        user = [m["content"] for m in row["messages"] if m["role"] == "user"][0]
        eot = "</s>" if arch == "llama" else "<|im_end|>"
        assert masked.count(eot) == len(answers)  # end of each assistant turn is learned
        assert user not in masked


def test_truncate_keeps_text_and_spans_consistent(tokenizers):
    tokenizer = tokenizers["qwen2"]
    row = conversations(4)[1]
    full = render_chat(tokenizer, row["messages"])
    cut = render_chat(tokenizer, row["messages"], max_length=full.num_tokens // 2)
    assert cut.truncated and cut.num_tokens == full.num_tokens // 2
    assert full.text.startswith(cut.text) and cut.offsets[-1, 1] == len(cut.text)
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[: cut.num_tokens])
    assert all(s.end <= len(cut.text) for s in cut.spans)


def test_pivot_template_on_another_tokenizer(tokenizers):
    row = conversations(2)[0]
    chat = render_chat(tokenizers["llama"], row["messages"], chat_template=tokenizers["qwen2"].chat_template)
    assert chat.text.startswith("<|im_start|>")
    assert chat.mask.any()


def test_content_rewritten_by_template_is_an_error():
    with pytest.raises(ChatRenderError, match="message 1 \\(assistant\\)"):
        content_spans(
            "user: hi\nassistant: HELLO",
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        )


def test_covering_offsets_and_mask_units():
    fixed = covering_offsets(np.array([[0, 3], [4, 9], [9, 10], [0, 0]]), 10)
    assert fixed.tolist() == [[0, 3], [3, 9], [9, 10], [10, 10]]
    spans = [ContentSpan("user", 0, 3), ContentSpan("assistant", 4, 9)]
    assert response_mask(fixed, spans).tolist() == [False, True, True, False]
    assert response_mask(fixed, spans, end_of_turn=False).tolist() == [False, True, False, False]


GEMMA2_STYLE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}"
)
STRICT = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"


def test_a_template_rejecting_the_system_role_is_adapted_and_counted(tokenizers):
    """Gemma-2's template refuses system turns: the row is rendered with the system turn folded into the first
    user turn (every content still found), counted by extract; a template that refuses anyway skips the row."""
    from collections import Counter

    from fuse.stages.extract import render_rows

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
    ]
    chat = render_chat(tokenizers["llama"], messages, GEMMA2_STYLE)
    assert chat.adapted and [s.role for s in chat.spans] == ["system", "user", "assistant"]
    assert [chat.text[s.start : s.end] for s in chat.spans] == [m["content"] for m in messages]
    counts: Counter = Counter()
    rows = [{"id": "r1", "messages": messages}]
    assert len(render_rows(tokenizers["llama"], rows, GEMMA2_STYLE, 512, "truncate", counts)) == 1
    assert counts["system turn folded into the first user turn"] == 1
    assert render_rows(tokenizers["llama"], rows, STRICT, 512, "truncate", counts) == []
    assert counts["skipped: the chat template refuses the conversation"] == 1
