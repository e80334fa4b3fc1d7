"""Each vocabulary entry's exact UTF-8 bytes, read from the tokenizer's own decoder metadata.

Byte-level `Ġ` tokens, `▁` space markers (Metaspace / Replace decoders), byte-fallback `<0xNN>` tokens and added
tokens all become raw bytes, so two tokenizations of one text can be compared byte for byte; no model-name guessing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def byte_level_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode table, inverted: the printable character standing for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


@dataclass(frozen=True)
class VocabPieces:
    """Bytes of every token id, flattened for vectorized gathers (`flat[starts[i]:starts[i]+lengths[i]]`)."""

    pieces: tuple[bytes, ...]
    special: np.ndarray  # bool per id: added/special tokens, never aligned as text
    byte_fallback: np.ndarray  # bool per id: `<0xNN>` tokens
    lengths: np.ndarray  # int64 per id
    starts: np.ndarray  # int64 per id, into `flat`
    flat: np.ndarray  # uint8, all pieces concatenated

    @classmethod
    def from_pieces(
        cls,
        pieces: Sequence[bytes],
        special: Sequence[bool] | None = None,
        byte_fallback: Sequence[bool] | None = None,
    ) -> VocabPieces:
        n = len(pieces)
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=n)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)
        return cls(
            pieces=tuple(pieces),
            special=np.zeros(n, bool) if special is None else np.asarray(special, bool),
            byte_fallback=np.zeros(n, bool) if byte_fallback is None else np.asarray(byte_fallback, bool),
            lengths=lengths,
            starts=starts,
            flat=flat,
        )

    def __len__(self) -> int:
        return len(self.pieces)

    def text(self, token_id: int) -> str:
        return self.pieces[token_id].decode("utf-8", errors="replace")


def _decoder_steps(decoder: dict[str, Any] | None) -> list[dict[str, Any]]:
    if decoder is None:
        return []
    if decoder["type"] == "Sequence":
        return [step for child in decoder["decoders"] for step in _decoder_steps(child)]
    return [decoder]


def piece_decoder(decoder: dict[str, Any] | None) -> Callable[[str], tuple[bytes, bool]]:
    """A function from one token string to (its bytes, whether it is a byte-fallback token), built from the
    `decoder` section of tokenizer.json. Strip/Fuse steps act on whole sequences (e.g. dropping the space that
    Metaspace prepends to the first word), so per piece they are ignored; `alignment.sequence` handles that space."""
    steps = _decoder_steps(decoder)
    kinds = {step["type"] for step in steps}
    unsupported = kinds - {"ByteLevel", "Replace", "Metaspace", "ByteFallback", "Fuse", "Strip"}
    if unsupported:
        raise ValueError(f"tokenizer decoder steps {sorted(unsupported)} are not supported for alignment")
    replaces = [(s["pattern"]["String"], s["content"]) for s in steps if s["type"] == "Replace"]
    replaces += [(s["replacement"], " ") for s in steps if s["type"] == "Metaspace"]
    table = byte_level_decoder() if "ByteLevel" in kinds else None
    fallback = "ByteFallback" in kinds

    def decode(token: str) -> tuple[bytes, bool]:
        match = _BYTE_TOKEN.match(token) if fallback else None
        if match:
            return bytes([int(match.group(1), 16)]), True
        if table is not None and all(c in table for c in token):
            return bytes(table[c] for c in token), False
        for old, new in replaces:
            token = token.replace(old, new)
        return token.encode("utf-8"), False

    return decode


def vocab_pieces(tokenizer: Any) -> VocabPieces:
    """The bytes of every id of a HF fast tokenizer (`PreTrainedTokenizerFast` / `tokenizers.Tokenizer`)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    spec = json.loads(backend.to_str())
    decode = piece_decoder(spec.get("decoder"))
    vocab = backend.get_vocab(with_added_tokens=True)
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    size = max(vocab.values()) + 1
    pieces, special, fallback = [b""] * size, [False] * size, [False] * size
    for token, token_id in vocab.items():
        if added.get(token_id, {}).get("special", False):
            # Special tokens stand for themselves; other added tokens (Gemma's `▁▁` runs) decode like the vocab.
            pieces[token_id], special[token_id] = token.encode("utf-8"), True
        else:
            pieces[token_id], fallback[token_id] = decode(token)
    return VocabPieces.from_pieces(pieces, special, fallback)


def gather_bytes(ids: np.ndarray, vocab: VocabPieces) -> np.ndarray:
    """The concatenated bytes of a token sequence, as uint8, without a per-token Python loop."""
    ids = np.asarray(ids, dtype=np.int64)
    lengths = vocab.lengths[ids]
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.uint8)
    shift = vocab.starts[ids] - (np.cumsum(lengths) - lengths)
    return vocab.flat[np.repeat(shift, lengths) + np.arange(total)]
