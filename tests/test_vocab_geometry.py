"""Tokenizers larger than the model's output (Gemma-3: 262,145 entries, 262,144 embedding rows), on the real file."""

from __future__ import annotations

import logging
from collections import Counter
from types import SimpleNamespace

import pytest

from fuse.models import ModelLoadError, check_tokenizer_fits

from real_tokenizers import load

pytestmark = pytest.mark.network
SPEC = SimpleNamespace(name="gemma3", path="/models/gemma-3")


def test_added_tokens_past_the_output_are_accepted_and_named(caplog):
    tokenizer = load("gemma3")
    assert len(tokenizer) == 262_145
    with caplog.at_level(logging.WARNING, logger="fuse.models"):
        check_tokenizer_fits(SPEC, tokenizer, 262_144)
    assert "262144 '<image_soft_token>'" in caplog.text


def test_ordinary_vocabulary_past_the_output_is_an_error():
    with pytest.raises(ModelLoadError, match=r"ordinary vocabulary ids lie past them .*vocab-size mismatch"):
        check_tokenizer_fits(SPEC, load("gemma3"), 200_000)


def test_a_row_that_spells_out_an_id_past_the_output_is_skipped_with_its_id(caplog):
    from fuse.stages.extract import render_rows

    tokenizer = load("gemma3")
    rows = [
        {
            "id": "fine",
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
        },
        {
            "id": "row-7",
            "messages": [
                {"role": "user", "content": "What is <image_soft_token>?"},
                {"role": "assistant", "content": "A placeholder."},
            ],
        },
    ]
    counts: Counter = Counter()
    with caplog.at_level(logging.WARNING):
        kept = render_rows(tokenizer, rows, None, 512, "truncate", counts, vocab_size=262_144)
    assert [row["id"] for row, _ in kept] == ["fine"]
    assert counts["skipped: token past the model's output"] == 1
    assert "row row-7: token 262144 '<image_soft_token>'" in caplog.text
    # without the model's size (the old behaviour) the row would go through and index past the embedding
    assert len(render_rows(tokenizer, rows, None, 512, "truncate", Counter())) == 2
