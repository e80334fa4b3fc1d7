"""The teacher log-prob store: per sample, a model's tokenization of the rendered chat and, per position, its
top-K next-token log-probs and the realized next token's log-prob, in compact, checksummed, memory-mapped shards.

Layout (format "fuse-logprobs", version 2). A store is a folder of shard folders, each written atomically:

    <out>/shard-00000/header.json       sizes + sha256 of every file below, K, vocab, codec, model, sample ids
                      samples.jsonl     one line per sample: {"id", "text", "spans": [[role, start, end], ...]}
                      meta_index.npy    int64 [n+1]  byte offset of each line of samples.jsonl
                      token_index.npy   int64 [n+1]  first token of each sample in the token arrays
                      input_ids.npy     uint8/16/32 [T]   the model's own token ids of the rendered text
                      offsets.npy       uint16/32 [T, 2]  [start, end) characters of each token in its text
                      mask.npy          uint8 [ceil(T/8)] packed bits: token t is a loss/response token
                      payload.bin       per sample, one zlib stream of its rows' log-prob payload (below)
                      payload_index.npy int64 [n+1]  byte offset of each sample's stream in payload.bin
                      exc_rows.npy      uint32 [M]    rows whose top-K the codec cannot hold within the bound
                      exc_logprobs.npy  float32 [M, K]  ... stored exactly
                      out_rows.npy      uint32 [M2]   rows whose realized log-prob no code holds (NaN = unknown)
                      out_logprobs.npy  float32 [M2]  ... stored exactly
    <out>/index.json                    written by the stage's finalize: shards and their sample counts

Rows: a sample of T tokens has T-1 rows; row t is the distribution that predicts token t+1 (there is no row
for the first token, and padding is never stored). Rows of sample i are [token_index[i] - i,
token_index[i+1] - i - 1). `mask[t]` is about token t, so row t counts for the loss when `mask[t+1]` is set.

Codec "dpcm-zlib" (a sample's R rows; byte planes, so that zlib sees each byte position's own statistics):
  rank     uint8 [R] (uint16 planes when K > 254)  rank of the realized token in the row's top-K; K: not there
  ids      the top-K ids row by row, less the realized token's entry where rank < K (it is input_ids[t+1]),
           little-endian in as many byte planes as the vocabulary needs (3 for 152k-262k vocabularies)
  codes    uint16 [R, K] in 2 planes: the top-1 log-prob in steps of 0.0199 below 0, then the gaps between
           successive ranks, closed loop in float32, so every decoded value is within 0.01 of its input;
           65535 = -inf from here on (projected distributions with fewer than K entries)
  realized uint16 [rows with rank K] in 2 planes: the realized log-prob below the row's last decoded value
Rows that no code holds within the bound (a gap beyond 1304 nats, NaN) are kept exactly in the exception tables.
Version 1 shards (fixed-width "dpcm8" codes, realized log-probs outside the top-K kept as float32) still read.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fuse.io import atomic_dir, read_json, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

FORMAT = "fuse-logprobs"
VERSION = 2
CODEC = "dpcm-zlib"
READABLE = {1: "dpcm8", 2: "dpcm-zlib"}  # version -> codec this reader decodes
MAX_ERROR = 0.01
STEP = 0.0199  # < 0.02 so that rounding stays within the 0.01 bound despite float32 arithmetic
CODE_INF = 65535  # "-inf from here on" (log-probs) / "kept exactly" (realized log-probs)
CODE_MAX = 65534
ZLIB_LEVEL = 6
# version 1 ("dpcm8"): read only
TOP_STEP = 2.0**-8  # top-1 log-prob: 12 bits cover [-16, 0)
GAP_STEP = 0.0199
TOP_MAX_CODE = 4095
GAP1_INF = 4095  # 12-bit gap-1 code meaning "-inf from here on"
GAP_INF = 255  # 8-bit gap code meaning "-inf from here on"
SHARD_GLOB = "shard-*"
INDEX_FILE = "index.json"
HEADER_FILE = "header.json"
PAYLOAD_FILE = "payload.bin"


class StoreError(RuntimeError):
    """A store that is missing, incomplete, corrupt, or not what the reader was asked for."""


@dataclass(frozen=True)
class ContentSpan:
    """One message's content in the rendered text: characters [start, end)."""

    role: str
    start: int
    end: int


@dataclass
class SampleLogprobs:
    """One sample as written and as read back (log-probs decoded to float32, ids as int64).

    input_ids [T], offsets [T, 2], mask [T] bool, topk_ids [T-1, K], topk_logprobs [T-1, K] (sorted
    descending, -inf = empty slot), target_logprobs [T-1] (log-prob of input_ids[t+1] at row t; NaN = unknown).
    """

    id: str
    text: str
    spans: list[ContentSpan]
    input_ids: np.ndarray
    offsets: np.ndarray
    mask: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprobs: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)  # small JSON-able per-sample facts (e.g. truncated)

    @property
    def num_tokens(self) -> int:
        return int(len(self.input_ids))

    def validate(self, top_k: int) -> None:
        t = self.num_tokens
        if t < 2:
            raise StoreError(f"sample {self.id!r}: needs at least 2 tokens, has {t}")
        shapes = {
            "offsets": (self.offsets.shape, (t, 2)),
            "mask": (self.mask.shape, (t,)),
            "topk_ids": (self.topk_ids.shape, (t - 1, top_k)),
            "topk_logprobs": (self.topk_logprobs.shape, (t - 1, top_k)),
            "target_logprobs": (self.target_logprobs.shape, (t - 1,)),
        }
        for name, (got, want) in shapes.items():
            if tuple(got) != want:
                raise StoreError(f"sample {self.id!r}: {name} has shape {tuple(got)}, expected {want}")
        if np.isnan(self.topk_logprobs).any():
            raise StoreError(f"sample {self.id!r}: NaN in topk_logprobs")


def narrowest_uint(max_value: int) -> np.dtype:
    """The narrowest unsigned integer dtype holding 0..max_value."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


# --------------------------------------------------------------------------------------------- codec


def sort_topk(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by log-prob descending (stable, so equal values keep their order)."""
    order = np.argsort(-logprobs.astype(np.float64), axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(logprobs, order, -1)


def quantize_logprobs(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted [R, K] log-probs -> (codes [R, K] uint16, rows the codes do not hold within MAX_ERROR [R] bool).

    Code j is the gap below the value decoded so far (0 for j = 0) in steps of STEP, closed loop in float32 as
    the decoder computes it, so errors never accumulate; CODE_INF ends a row (-inf from there on)."""
    lp = logprobs.astype(np.float64)
    rows, k = lp.shape
    codes = np.zeros((rows, k), dtype=np.int64)
    rec = np.zeros(rows, dtype=np.float32)
    ended = np.zeros(rows, dtype=bool)
    for j in range(k):
        ended |= np.isneginf(lp[:, j])
        gap = np.round((rec.astype(np.float64) - lp[:, j]) / STEP)
        code = np.clip(np.nan_to_num(gap, nan=0.0, posinf=CODE_MAX, neginf=0.0), 0, CODE_MAX)
        codes[:, j] = np.where(ended, CODE_INF, code)
        rec = rec - (np.where(ended, 0, code) * STEP).astype(np.float32)
    decoded = dequantize_logprobs(codes)
    with np.errstate(invalid="ignore"):  # -inf - -inf where both are empty slots: masked just below
        error = np.where(np.isneginf(lp), 0.0, np.abs(decoded.astype(np.float64) - lp))
    same_inf = (np.isneginf(decoded) == np.isneginf(lp)).all(axis=1)
    bad = ~(same_inf & (np.nan_to_num(error, nan=1.0, posinf=1.0) <= MAX_ERROR).all(axis=1))
    return codes.astype(np.uint16), bad


def dequantize_logprobs(codes: np.ndarray) -> np.ndarray:
    """Inverse of quantize_logprobs (without the exceptions): [R, K] float32."""
    codes = codes.astype(np.int64)
    ended = np.logical_or.accumulate(codes == CODE_INF, axis=1)
    steps = (np.where(ended, 0, codes) * STEP).astype(np.float32)
    out = np.empty(codes.shape, dtype=np.float32)
    rec = np.zeros(len(codes), dtype=np.float32)
    for j in range(codes.shape[1]):  # a running float32 sum, exactly as the encoder computed it
        rec = rec - steps[:, j]
        out[:, j] = rec
    out[ended] = -np.inf
    return out


def quantize_realized(last: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Realized log-probs below their row's last decoded top-K value -> (codes uint16, kept exactly [bool])."""
    with np.errstate(invalid="ignore"):
        gap = np.round((last.astype(np.float64) - target) / STEP)
        code = np.clip(np.nan_to_num(gap, nan=0.0, posinf=CODE_MAX, neginf=0.0), 0, CODE_MAX).astype(np.int64)
        decoded = last - (code * STEP).astype(np.float32)
        exact = ~(np.abs(decoded.astype(np.float64) - target) <= MAX_ERROR)
    return np.where(exact, CODE_INF, code).astype(np.uint16), exact


def id_bytes(vocab_size: int) -> int:
    """Byte planes a token id of this vocabulary needs."""
    return max(1, (int(vocab_size - 1).bit_length() + 7) // 8)


def _planes(values: np.ndarray, nbytes: int) -> bytes:
    """Little-endian byte planes, plane after plane: zlib then sees each byte position's own statistics."""
    raw = np.ascontiguousarray(values, dtype="<u8").view(np.uint8).reshape(-1, 8)
    return np.ascontiguousarray(raw[:, :nbytes].T).tobytes()


def _from_planes(data: np.ndarray, count: int, nbytes: int) -> np.ndarray:
    planes = data[: count * nbytes].reshape(nbytes, count).astype(np.int64)
    return sum((planes[b] << (8 * b) for b in range(nbytes)), np.zeros(count, dtype=np.int64))


def pack_payload(
    ranks: np.ndarray, ids: np.ndarray, codes: np.ndarray, realized: np.ndarray, top_k: int, nbytes: int
) -> bytes:
    """One sample's payload (see the module docstring) as one zlib stream."""
    keep = ranks[:, None] != np.arange(top_k)[None]  # the realized token's entry is input_ids[t+1]
    parts = (
        _planes(ranks, 1 if top_k < 255 else 2),
        _planes(ids[keep], nbytes),
        _planes(codes.ravel(), 2),
        _planes(realized, 2),
    )
    return zlib.compress(b"".join(parts), ZLIB_LEVEL)


def unpack_payload(
    blob: bytes, rows: int, top_k: int, nbytes: int, next_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of pack_payload: ranks [R], ids [R, K] int64, codes [R, K], realized codes [rows with rank K]."""
    data = np.frombuffer(zlib.decompress(blob), dtype=np.uint8)
    position = 0

    def take(count: int, width: int) -> np.ndarray:
        nonlocal position
        values = _from_planes(data[position:], count, width)
        position += count * width
        return values

    ranks = take(rows, 1 if top_k < 255 else 2)
    keep = ranks[:, None] != np.arange(top_k)[None]
    ids = np.empty((rows, top_k), dtype=np.int64)
    ids[keep] = take(int(keep.sum()), nbytes)
    ids[~keep] = np.asarray(next_ids, dtype=np.int64)[ranks < top_k]  # row order: one entry per such row
    codes = take(rows * top_k, 2).reshape(rows, top_k)
    realized = take(int((ranks == top_k).sum()), 2)
    if position != len(data):
        raise StoreError(f"payload of {rows} rows: {len(data)} bytes, expected {position}")
    return ranks, ids, codes, realized


# version 1 codec ("dpcm8"), kept to read version 1 shards


def encode_logprobs(logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted [R, K] log-probs -> (head [R, 3] uint8, gaps [R, K-2] uint8, exception row mask [R])."""
    lp = logprobs.astype(np.float64)
    rows, k = lp.shape
    top_code = np.clip(np.round(-np.nan_to_num(lp[:, 0], neginf=-1e9) / TOP_STEP), 0, TOP_MAX_CODE)
    rec = (-top_code * TOP_STEP).astype(np.float32)
    codes = np.zeros((rows, max(k - 1, 0)), dtype=np.int64)
    for j in range(1, k):
        limit, inf_code = (GAP1_INF - 1, GAP1_INF) if j == 1 else (GAP_INF - 1, GAP_INF)
        gap = np.round((rec.astype(np.float64) - lp[:, j]) / GAP_STEP)
        code = np.where(np.isneginf(lp[:, j]), inf_code, np.clip(np.nan_to_num(gap, posinf=limit), 0, limit))
        codes[:, j - 1] = code
        rec = np.where(code == inf_code, rec, rec - (code * GAP_STEP).astype(np.float32))
    head = _pack_head(top_code.astype(np.int64), codes[:, 0] if k > 1 else np.zeros(rows, np.int64))
    gaps = codes[:, 1:].astype(np.uint8)
    decoded = decode_logprobs(head, gaps, k)
    same_inf = np.isneginf(decoded) == np.isneginf(lp)
    with np.errstate(invalid="ignore"):  # -inf - -inf where both are empty slots: masked just below
        error = np.where(np.isneginf(lp), 0.0, np.abs(decoded.astype(np.float64) - lp))
    bad = ~(same_inf.all(axis=1) & (np.nan_to_num(error, nan=1.0, posinf=1.0) <= MAX_ERROR).all(axis=1))
    return head, gaps, bad


def _pack_head(top: np.ndarray, gap1: np.ndarray) -> np.ndarray:
    head = np.empty((len(top), 3), dtype=np.uint8)
    head[:, 0] = top >> 4
    head[:, 1] = ((top & 0xF) << 4) | (gap1 >> 8)
    head[:, 2] = gap1 & 0xFF
    return head


def decode_logprobs(head: np.ndarray, gaps: np.ndarray, k: int) -> np.ndarray:
    """Inverse of encode_logprobs, without the exceptions: [R, K] float32."""
    head = head.astype(np.int64)
    top = (head[:, 0] << 4) | (head[:, 1] >> 4)
    gap1 = ((head[:, 1] & 0xF) << 8) | head[:, 2]
    out = np.empty((len(head), k), dtype=np.float32)
    out[:, 0] = (-top * TOP_STEP).astype(np.float32)
    if k == 1:
        return out
    codes = np.concatenate([gap1[:, None], gaps.astype(np.int64)], axis=1)
    inf = np.concatenate([gap1[:, None] == GAP1_INF, gaps == GAP_INF], axis=1)
    steps = np.where(inf, 0, codes * GAP_STEP).astype(np.float32)
    # The encoder subtracts step by step in float32; a running sum reproduces the same values.
    rec = out[:, :1].copy()
    for j in range(k - 1):
        rec = rec - steps[:, j : j + 1]
        out[:, j + 1 : j + 2] = rec
    out[:, 1:][np.logical_or.accumulate(inf, axis=1)] = -np.inf
    return out


def realized_ranks(topk_ids: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Rank of each row's realized next token within its top-K ids, or K when it is not there."""
    hit = topk_ids == targets[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), k)


# --------------------------------------------------------------------------------------------- writer


class LogprobWriter:
    """Collects samples for one shard and writes the shard folder atomically on `close()` (or on leaving a
    `with` block without an error). The header, with sizes and checksums, is the last file written."""

    def __init__(
        self,
        path: str | os.PathLike,
        top_k: int,
        vocab_size: int,
        model: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.top_k = int(top_k)
        self.vocab_size = int(vocab_size)
        self.model = model or {}
        self.meta = meta or {}
        self.id_dtype = narrowest_uint(self.vocab_size - 1)
        self.id_bytes = id_bytes(self.vocab_size)
        self._parts: dict[str, list[np.ndarray]] = {}
        self._blobs: list[bytes] = []
        self._outside = 0
        self._meta_lines: list[bytes] = []
        self._ids: list[str] = []
        self._tokens = [0]
        self._closed = False

    def __enter__(self) -> LogprobWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, sample: SampleLogprobs) -> None:
        sample.validate(self.top_k)
        if (
            int(sample.input_ids.max(initial=0)) >= self.vocab_size
            or int(sample.topk_ids.max(initial=0)) >= self.vocab_size
        ):
            raise StoreError(f"sample {sample.id!r}: token id beyond the vocab size {self.vocab_size}")
        k = self.top_k
        ids, lps = sort_topk(np.asarray(sample.topk_ids), np.asarray(sample.topk_logprobs, dtype=np.float32))
        codes, bad = quantize_logprobs(lps)
        decoded = dequantize_logprobs(codes)
        decoded[bad] = lps[bad]  # as the reader sees them: exceptions applied
        target_lp = np.asarray(sample.target_logprobs, dtype=np.float32)
        ranks = realized_ranks(ids, np.asarray(sample.input_ids[1:], dtype=np.int64), k)
        # The realized token's log-prob is its top-K entry's decoded value when that is within the bound of the
        # given one (always, for a backend's own output); otherwise it is coded below the row's last value.
        in_top = np.take_along_axis(decoded, np.minimum(ranks, k - 1)[:, None], 1)[:, 0]
        with np.errstate(invalid="ignore"):
            ranks = np.where(np.abs(in_top.astype(np.float64) - target_lp) <= MAX_ERROR, ranks, k)
        outside = np.flatnonzero(ranks == k)
        realized, exact = quantize_realized(decoded[outside, k - 1], target_lp[outside])
        row0 = self._tokens[-1] - len(self._ids)
        self._blobs.append(pack_payload(ranks, ids, codes, realized, k, self.id_bytes))
        self._push("input_ids", np.asarray(sample.input_ids).astype(self.id_dtype))
        self._push("offsets", np.asarray(sample.offsets).astype(np.uint32))
        self._push("mask", np.asarray(sample.mask, dtype=bool))
        self._push("exc_rows", (np.flatnonzero(bad) + row0).astype(np.uint32))
        self._push("exc_logprobs", lps[bad].astype(np.float32))
        self._push("out_rows", (outside[exact] + row0).astype(np.uint32))
        self._push("out_logprobs", target_lp[outside[exact]])
        self._outside += len(outside)
        line = {
            "id": sample.id,
            "text": sample.text,
            "spans": [[s.role, s.start, s.end] for s in sample.spans],
        }
        if sample.extra:
            line["extra"] = sample.extra
        self._meta_lines.append((json.dumps(line, ensure_ascii=False) + "\n").encode())
        self._ids.append(sample.id)
        self._tokens.append(self._tokens[-1] + sample.num_tokens)

    def _push(self, name: str, array: np.ndarray) -> None:
        self._parts.setdefault(name, []).append(array)

    def _arrays(self) -> dict[str, np.ndarray]:
        k = self.top_k
        empty = {
            "input_ids": np.zeros(0, self.id_dtype),
            "offsets": np.zeros((0, 2), np.uint32),
            "mask": np.zeros(0, bool),
            "exc_rows": np.zeros(0, np.uint32),
            "exc_logprobs": np.zeros((0, k), np.float32),
            "out_rows": np.zeros(0, np.uint32),
            "out_logprobs": np.zeros(0, np.float32),
        }
        arrays = {n: np.concatenate(self._parts[n]) if n in self._parts else e for n, e in empty.items()}
        offsets = arrays["offsets"]
        arrays["offsets"] = offsets.astype(narrowest_uint(int(offsets.max(initial=0))))
        arrays["mask"] = np.packbits(arrays["mask"])
        arrays["token_index"] = np.asarray(self._tokens, dtype=np.int64)
        lengths = [len(line) for line in self._meta_lines]
        arrays["meta_index"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        sizes = [len(blob) for blob in self._blobs]
        arrays["payload_index"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return arrays

    def close(self) -> Path:
        """Write the shard folder (atomically: it appears complete or not at all)."""
        if self._closed:
            return self.path
        arrays = self._arrays()
        with atomic_dir(self.path) as tmp:
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
            (tmp / "samples.jsonl").write_bytes(b"".join(self._meta_lines))
            (tmp / PAYLOAD_FILE).write_bytes(b"".join(self._blobs))
            files = {
                p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())
            }
            write_json_atomic(tmp / HEADER_FILE, self._header(arrays, files))
        self._closed = True
        return self.path

    def _header(self, arrays: dict[str, np.ndarray], files: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "codec": {"name": CODEC, "step": STEP, "max_error": MAX_ERROR, "compressor": "zlib"},
            "top_k": self.top_k,
            "vocab_size": self.vocab_size,
            "id_dtype": self.id_dtype.name,
            "id_bytes": self.id_bytes,
            "num_samples": len(self._ids),
            "num_tokens": int(self._tokens[-1]),
            "num_rows": int(self._tokens[-1] - len(self._ids)),
            "num_exceptions": int(len(arrays["exc_rows"])),
            "num_realized_outside": int(self._outside),
            "num_realized_exact": int(len(arrays["out_rows"])),
            "model": self.model,
            "meta": self.meta,
            "sample_ids": self._ids,
            "files": files,
        }


def write_shard(
    path: str | os.PathLike,
    samples: Sequence[SampleLogprobs],
    top_k: int,
    vocab_size: int,
    model: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write `samples` as one shard folder."""
    with LogprobWriter(path, top_k, vocab_size, model, meta) as writer:
        for sample in samples:
            writer.add(sample)
    return writer.path


# --------------------------------------------------------------------------------------------- reader


class ShardReader:
    """One shard, memory-mapped: sample by sample without loading the rest. Checked on open: the header, the
    size of every file, and (verify=True, the default) the sha256 of every file."""

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        self.path = Path(path)
        self.header = _read_header(self.path)
        _check_files(self.path, self.header, verify)
        self.top_k = int(self.header["top_k"])
        self.version = int(self.header["version"])
        self.ids: list[str] = list(self.header["sample_ids"])
        self._a = {
            n: np.load(self.path / f"{n}.npy", mmap_mode="r", allow_pickle=False)
            for n in _ARRAY_NAMES[self.version]
        }
        if self.version >= 2:
            payload = self.path / PAYLOAD_FILE
            # np.memmap refuses an empty file (a shard without samples)
            self._payload = (
                np.memmap(payload, np.uint8, "r") if payload.stat().st_size else np.zeros(0, np.uint8)
            )
        self._position = {sample_id: i for i, sample_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[SampleLogprobs]:
        for i in range(len(self)):
            yield self[i]

    def index_of(self, sample_id: str) -> int:
        try:
            return self._position[sample_id]
        except KeyError:
            raise KeyError(f"{self.path}: no sample {sample_id!r}") from None

    def __getitem__(self, i: int) -> SampleLogprobs:
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: sample {i} out of range (0..{len(self) - 1})")
        a = self._a
        t0, t1 = int(a["token_index"][i]), int(a["token_index"][i + 1])
        r0, r1 = t0 - i, t1 - i - 1
        meta = self._meta(i)
        input_ids = np.asarray(a["input_ids"][t0:t1], dtype=np.int64)
        ids, lps, target = (self._rows_v2 if self.version >= 2 else self._rows_v1)(i, r0, r1, input_ids)
        return SampleLogprobs(
            id=meta["id"],
            text=meta["text"],
            spans=[ContentSpan(role, start, end) for role, start, end in meta["spans"]],
            input_ids=input_ids,
            offsets=np.asarray(a["offsets"][t0:t1], dtype=np.int64),
            mask=_unpack_bits(a["mask"], t0, t1),
            topk_ids=ids,
            topk_logprobs=lps,
            target_logprobs=target,
            extra=meta.get("extra", {}),
        )

    def _rows_v2(self, i: int, r0: int, r1: int, input_ids: np.ndarray) -> tuple[np.ndarray, ...]:
        a, k = self._a, self.top_k
        p0, p1 = int(a["payload_index"][i]), int(a["payload_index"][i + 1])
        try:
            ranks, ids, codes, realized = unpack_payload(
                self._payload[p0:p1].tobytes(), r1 - r0, k, int(self.header["id_bytes"]), input_ids[1:]
            )
        except (zlib.error, ValueError, StoreError) as error:
            raise StoreError(f"{self.path}: sample {i}: undecodable payload ({error})") from None
        lps = dequantize_logprobs(codes)
        _apply_rows(lps, a["exc_rows"], a["exc_logprobs"], r0, r1)
        target = np.take_along_axis(lps, np.minimum(ranks, k - 1)[:, None], 1)[:, 0].copy()
        outside = ranks == k
        target[outside] = lps[outside, k - 1] - (realized * STEP).astype(np.float32)
        _apply_rows(target, a["out_rows"], a["out_logprobs"], r0, r1)
        return ids, lps, target

    def _rows_v1(self, i: int, r0: int, r1: int, input_ids: np.ndarray) -> tuple[np.ndarray, ...]:
        a = self._a
        ids = np.asarray(a["topk_ids"][r0:r1], dtype=np.int64)
        lps = decode_logprobs(np.asarray(a["lp_head"][r0:r1]), np.asarray(a["lp_gaps"][r0:r1]), self.top_k)
        _apply_rows(lps, a["exc_rows"], a["exc_logprobs"], r0, r1)
        ranks = np.asarray(a["realized_rank"][r0:r1], dtype=np.int64)
        target = np.take_along_axis(lps, np.minimum(ranks, self.top_k - 1)[:, None], 1)[:, 0].copy()
        _apply_rows(target, a["out_rows"], a["out_logprobs"], r0, r1)
        return ids, lps, target

    def get(self, sample_id: str) -> SampleLogprobs:
        return self[self.index_of(sample_id)]

    def _meta(self, i: int) -> dict[str, Any]:
        start, end = int(self._a["meta_index"][i]), int(self._a["meta_index"][i + 1])
        with open(self.path / "samples.jsonl", "rb") as handle:
            handle.seek(start)
            return json.loads(handle.read(end - start))

    def nbytes(self) -> int:
        return sum(int(f["bytes"]) for f in self.header["files"].values())

    def payload_nbytes(self) -> int:
        """Bytes of the log-prob payload alone (top-K ids and log-probs, realized log-probs), not the tokens,
        offsets, mask and text."""
        return sum(int(self.header["files"][name]["bytes"]) for name in _PAYLOAD_FILES[self.version])


_COMMON = ("input_ids", "offsets", "mask", "exc_rows", "exc_logprobs", "out_rows", "out_logprobs")
_ARRAY_NAMES = {
    1: (*_COMMON, "topk_ids", "lp_head", "lp_gaps", "realized_rank", "token_index", "meta_index"),
    2: (*_COMMON, "payload_index", "token_index", "meta_index"),
}
_EXACT = ("exc_rows.npy", "exc_logprobs.npy", "out_rows.npy", "out_logprobs.npy")
_PAYLOAD_FILES = {
    1: ("topk_ids.npy", "lp_head.npy", "lp_gaps.npy", "realized_rank.npy", *_EXACT),
    2: (PAYLOAD_FILE, "payload_index.npy", *_EXACT),
}


def _apply_rows(target: np.ndarray, rows: np.ndarray, values: np.ndarray, r0: int, r1: int) -> None:
    """Overwrite target[row - r0] with the exact values stored for rows in [r0, r1) (rows sorted ascending)."""
    lo, hi = int(np.searchsorted(rows, r0)), int(np.searchsorted(rows, r1))
    if hi > lo:
        target[np.asarray(rows[lo:hi], dtype=np.int64) - r0] = values[lo:hi]


def _unpack_bits(packed: np.ndarray, t0: int, t1: int) -> np.ndarray:
    chunk = np.unpackbits(np.asarray(packed[t0 // 8 : (t1 + 7) // 8]))
    return chunk[t0 % 8 : t0 % 8 + (t1 - t0)].astype(bool)


def _read_header(path: Path) -> dict[str, Any]:
    header_path = path / HEADER_FILE
    if not header_path.is_file():
        raise StoreError(f"{path}: not a complete log-prob shard (no {HEADER_FILE}; interrupted write?)")
    try:
        header = read_json(header_path)
    except (OSError, ValueError) as error:
        raise StoreError(f"{header_path}: unreadable header: {error}") from None
    if header.get("format") != FORMAT:
        raise StoreError(f"{header_path}: format {header.get('format')!r}, expected {FORMAT!r}")
    version, codec = header.get("version"), header.get("codec", {}).get("name")
    if READABLE.get(version) != codec:
        readable = ", ".join(f"{v} ({c})" for v, c in READABLE.items())
        raise StoreError(
            f"{header_path}: version {version} codec {codec!r}; this fuse reads versions {readable}. "
            "Read it with the fuse that wrote it, or extract again (fuse run --force --only extract.<model>)"
        )
    return header


def _check_files(path: Path, header: dict[str, Any], verify: bool) -> None:
    for name, facts in header["files"].items():
        file = path / name
        if not file.is_file():
            raise StoreError(f"{path}: file {name} listed in the header is missing")
        size = file.stat().st_size
        if size != facts["bytes"]:
            raise StoreError(
                f"{file}: {size} bytes, the header says {facts['bytes']} (truncated or overwritten)"
            )
        if verify and sha256_file(file) != facts["sha256"]:
            raise StoreError(f"{file}: checksum mismatch (corrupt shard)")


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def shard_dirs(path: str | os.PathLike) -> list[Path]:
    """The shard folders of a store, in order: from index.json when present, else every shard-* folder."""
    path = Path(path)
    if (path / HEADER_FILE).is_file() or path.name.startswith("shard-"):
        return [path]
    index = path / INDEX_FILE
    if index.is_file():
        entries = read_json(index)["shards"]
        return [path / entry["name"] for entry in entries]
    found = sorted(p for p in path.glob(SHARD_GLOB) if p.is_dir())
    if not found:
        raise StoreError(f"{path}: no log-prob shards here")
    return found


def write_index(path: str | os.PathLike, num_shards: int | None = None) -> dict[str, Any]:
    """Write <path>/index.json listing every shard and its sample count; every shard must be complete."""
    path = Path(path)
    dirs = [path / shard_name(i) for i in range(num_shards)] if num_shards else shard_dirs(path)
    entries, first = [], None
    for directory in dirs:
        header = _read_header(directory)
        first = first or header
        if (header["top_k"], header["vocab_size"]) != (first["top_k"], first["vocab_size"]):
            raise StoreError(f"{directory}: K/vocab differ from {dirs[0]}")
        entries.append(
            {"name": directory.name, "num_samples": header["num_samples"], "num_tokens": header["num_tokens"]}
        )
    index = {
        "format": FORMAT,
        "version": VERSION,
        "top_k": first["top_k"] if first else None,
        "vocab_size": first["vocab_size"] if first else None,
        "model": first["model"] if first else None,
        "num_samples": sum(e["num_samples"] for e in entries),
        "num_tokens": sum(e["num_tokens"] for e in entries),
        "shards": entries,
    }
    write_json_atomic(path / INDEX_FILE, index)
    return index


class LogprobReader:
    """A whole store (a folder of shards, or one shard folder): len, iteration, get by index or sample id.
    Shards are opened (and verified) lazily, the first time a sample in them is asked for."""

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        self.path = Path(path)
        self.verify = verify
        self.shard_paths = shard_dirs(self.path)
        self._open: dict[int, ShardReader] = {}
        self._ids = [_read_header(p)["sample_ids"] for p in self.shard_paths]
        self._starts = np.concatenate([[0], np.cumsum([len(ids) for ids in self._ids])]).tolist()
        self._position: dict[str, int] | None = None
        header = _read_header(self.shard_paths[0])
        self.top_k: int = int(header["top_k"])
        self.vocab_size: int = int(header["vocab_size"])
        self.model: dict[str, Any] = header["model"]
        self.meta: dict[str, Any] = header["meta"]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def shard(self, j: int) -> ShardReader:
        if j not in self._open:
            self._open[j] = ShardReader(self.shard_paths[j], verify=self.verify)
        return self._open[j]

    def shards(self) -> Iterator[ShardReader]:
        for j in range(len(self.shard_paths)):
            yield self.shard(j)

    def __iter__(self) -> Iterator[SampleLogprobs]:
        for shard in self.shards():
            yield from shard

    def __getitem__(self, i: int) -> SampleLogprobs:
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: sample {i} out of range (0..{len(self) - 1})")
        j = bisect.bisect_right(self._starts, i) - 1
        return self.shard(j)[i - self._starts[j]]

    @property
    def ids(self) -> list[str]:
        return [sample_id for ids in self._ids for sample_id in ids]

    def index_of(self, sample_id: str) -> int:
        if self._position is None:
            self._position = {sample_id: i for i, sample_id in enumerate(self.ids)}
        try:
            return self._position[sample_id]
        except KeyError:
            raise KeyError(f"{self.path}: no sample {sample_id!r}") from None

    def get(self, sample_id: str) -> SampleLogprobs:
        return self[self.index_of(sample_id)]

    def __contains__(self, sample_id: str) -> bool:
        try:
            self.index_of(sample_id)
        except KeyError:
            return False
        return True
