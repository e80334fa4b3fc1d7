"""The log-prob store's version-2 codec: the 0.01 bound, ids exact, the realized token coded outside the top-K,
exceptions exact, corrupt payloads caught, version-1 shards still read, unknown versions refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fuse.data.logprobs import (
    CODE_INF,
    MAX_ERROR,
    ContentSpan,
    LogprobReader,
    SampleLogprobs,
    StoreError,
    dequantize_logprobs,
    encode_logprobs,
    quantize_logprobs,
    quantize_realized,
    realized_ranks,
    sort_topk,
    write_shard,
)
from fuse.io import sha256_file, write_json_atomic

K = 10


def peaked_sample(rng: np.random.Generator, i: int, length: int, vocab: int) -> SampleLogprobs:
    """Top-K of a real log-softmax over peaked logits; realized tokens half from the top-K, half anywhere."""
    logits = rng.standard_normal((length - 1, vocab)) * 2.5
    logits[np.arange(length - 1), rng.integers(0, vocab, length - 1)] += rng.uniform(0, 12, length - 1)
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :K]
    input_ids = rng.integers(0, vocab, length)
    from_top = rng.random(length - 1) < 0.5
    input_ids[1:][from_top] = ids[from_top, rng.integers(0, K, int(from_top.sum()))]
    return SampleLogprobs(
        id=f"s{i}",
        text="x" * length,
        spans=[ContentSpan("assistant", 0, length)],
        input_ids=input_ids,
        offsets=np.stack([np.arange(length), np.arange(length) + 1], axis=1),
        mask=np.ones(length, dtype=bool),
        topk_ids=ids,
        topk_logprobs=np.take_along_axis(lp, ids, 1).astype(np.float32),
        target_logprobs=lp[np.arange(length - 1), input_ids[1:]].astype(np.float32),
    )


@pytest.fixture(scope="module")
def samples() -> list[SampleLogprobs]:
    rng = np.random.default_rng(0)
    return [peaked_sample(rng, i, int(rng.integers(2, 80)), 70000) for i in range(12)]


def max_error(expected: list[SampleLogprobs], got: list[SampleLogprobs]) -> float:
    errors = []
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(g.topk_ids, e.topk_ids)
        np.testing.assert_array_equal(g.input_ids, e.input_ids)
        errors.append(np.abs(g.topk_logprobs - e.topk_logprobs).max())
        errors.append(np.abs(g.target_logprobs - e.target_logprobs).max())
    return float(max(errors))


def test_round_trip_with_a_vocabulary_beyond_65536(tmp_path, samples):
    shard = LogprobReader(write_shard(tmp_path / "s", samples, K, 70000)).shard(0)
    assert shard.header["version"] == 2 and shard.header["id_bytes"] == 3
    assert 1e-4 < max_error(samples, list(shard)) <= MAX_ERROR  # lossy, within the promised bound
    outside = sum(int((realized_ranks(s.topk_ids, s.input_ids[1:], K) == K).sum()) for s in samples)
    assert shard.header["num_realized_outside"] == outside > 0
    assert shard.header["num_realized_exact"] == 0 and shard.header["num_exceptions"] == 0
    # ids 3 bytes, codes 2 bytes before zlib: 50+ bytes/row raw; the store must do better than v1 (40+12+1+8*out)
    assert shard.payload_nbytes() / shard.header["num_rows"] < 44


def test_codec_bound_edges_and_exceptions():
    lp = np.array(
        [
            [-0.001, -9.0, -9.5, -30.0, -31.0],  # big gaps are held now (v1 needed exceptions)
            [-2.3, -2.3, -2.3, -2.31, -2.32],  # ties
            [-1.0, -2.0, -np.inf, -np.inf, -np.inf],  # empty slots (projected distributions)
            [-20.0, -21.0, -22.0, -23.0, -24.0],  # top-1 below -16 (v1: exception)
            [0.0, -1500.0, -1501.0, -1502.0, -np.inf],  # a gap beyond 65534 steps: kept exactly
            [-np.inf] * 5,  # nothing at all
        ],
        dtype=np.float32,
    )
    codes, bad = quantize_logprobs(lp)
    assert bad.tolist() == [False, False, False, False, True, False]
    decoded = dequantize_logprobs(codes)
    ok = ~bad
    assert np.array_equal(np.isneginf(decoded[ok]), np.isneginf(lp[ok]))
    finite = np.isfinite(lp[ok])
    assert np.abs(decoded[ok][finite] - lp[ok][finite]).max() <= MAX_ERROR
    assert codes[2, 2] == CODE_INF and codes[5, 0] == CODE_INF
    last = np.array([-3.0, -3.0, -3.0, -3.0, -np.inf], dtype=np.float32)
    realized, exact = quantize_realized(last, np.array([-3.5, -40.0, np.nan, -2.0, -5.0]))
    assert exact.tolist() == [
        False,
        False,
        True,
        True,
        True,
    ]  # NaN, above its row's last value, no last value
    assert abs(float(last[1] - realized[1] * np.float32(0.0199)) + 40.0) <= MAX_ERROR


def test_targets_outside_the_bound_and_unknown_round_trip_exactly(tmp_path, samples):
    sample = SampleLogprobs(**{**samples[3].__dict__})
    sample.topk_logprobs = sample.topk_logprobs.copy()
    sample.topk_logprobs[0, 3:] = -np.inf
    sample.topk_logprobs[1, 1:] -= 2000.0  # a gap no code holds
    sample.target_logprobs = sample.target_logprobs.copy()
    sample.target_logprobs[0] = np.nan  # e.g. an aligned position whose realized token has no projection
    sample.target_logprobs[2] = sample.topk_logprobs[2, 0] + 0.5  # above the top-1 (an aligned distribution)
    got = LogprobReader(write_shard(tmp_path / "one", [sample], K, 70000))[0]
    np.testing.assert_array_equal(got.topk_logprobs[1], sample.topk_logprobs[1])
    assert np.isneginf(got.topk_logprobs[0, 3:]).all() and np.isnan(got.target_logprobs[0])
    assert got.target_logprobs[2] == sample.target_logprobs[2]


def test_the_realized_token_is_not_stored_twice(tmp_path, samples):
    """Rows whose realized token is in the top-K: its id comes from input_ids, its log-prob from its rank."""
    hit = SampleLogprobs(**{**samples[0].__dict__})
    hit.input_ids = hit.input_ids.copy()
    hit.input_ids[1:] = hit.topk_ids[:, 0]
    hit.target_logprobs = hit.topk_logprobs[:, 0].copy()
    miss = SampleLogprobs(**{**hit.__dict__})
    miss.input_ids = hit.input_ids.copy()
    miss.input_ids[1:] = 69999  # never in these top-K
    miss.target_logprobs = hit.topk_logprobs[:, -1] - 3.0
    sizes = {}
    for name, sample in (("hit", hit), ("miss", miss)):
        shard = LogprobReader(write_shard(tmp_path / name, [sample], K, 70000)).shard(0)
        assert max_error([sample], [shard[0]]) <= MAX_ERROR
        sizes[name] = shard.header["files"]["payload.bin"]["bytes"]
    assert sizes["hit"] < sizes["miss"]


def test_corrupt_payload_is_detected(tmp_path, samples):
    path = write_shard(tmp_path / "c", samples[:3], K, 70000)
    payload = path / "payload.bin"
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0xFF
    payload.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum"):
        LogprobReader(path)[0]
    with pytest.raises(StoreError, match="undecodable payload"):  # unverified: zlib's own check catches it
        list(LogprobReader(path, verify=False))
    payload.write_bytes(bytes(data[:-3]))
    with pytest.raises(StoreError, match="bytes, the header says"):
        LogprobReader(path)[0]


def test_unknown_version_is_refused_by_name(tmp_path, samples):
    path = write_shard(tmp_path / "v", samples[:1], K, 70000)
    header = json.loads((path / "header.json").read_text())
    (path / "header.json").write_text(json.dumps({**header, "version": 3}))
    with pytest.raises(
        StoreError, match=r"version 3 codec 'dpcm-zlib'; this fuse reads versions 1 \(dpcm8\), 2"
    ):
        LogprobReader(path)


def write_v1_shard(path, samples, vocab):
    """A version-1 shard as the version-1 writer laid it out (fixed-width dpcm8 codes, exact realized values)."""
    from fuse.data.logprobs import narrowest_uint

    parts: dict[str, list] = {}
    tokens, lines = [0], []
    for sample in samples:
        ids, lps = sort_topk(sample.topk_ids, sample.topk_logprobs)
        head, gaps, bad = encode_logprobs(lps)
        ranks = realized_ranks(ids, sample.input_ids[1:], K)
        outside = ranks == K  # (v1 also moved in-top values beyond the bound here; not needed for this data)
        row0 = tokens[-1] - len(lines)
        for name, value in {
            "input_ids": sample.input_ids.astype(narrowest_uint(vocab - 1)),
            "offsets": sample.offsets.astype(np.uint32),
            "mask": sample.mask,
            "topk_ids": ids.astype(narrowest_uint(vocab - 1)),
            "lp_head": head,
            "lp_gaps": gaps,
            "realized_rank": ranks.astype(np.uint8),
            "exc_rows": (np.flatnonzero(bad) + row0).astype(np.uint32),
            "exc_logprobs": lps[bad],
            "out_rows": (np.flatnonzero(outside) + row0).astype(np.uint32),
            "out_logprobs": sample.target_logprobs[outside],
        }.items():
            parts.setdefault(name, []).append(value)
        lines.append((json.dumps({"id": sample.id, "text": sample.text, "spans": []}) + "\n").encode())
        tokens.append(tokens[-1] + sample.num_tokens)
    path.mkdir()
    arrays = {name: np.concatenate(values) for name, values in parts.items()}
    arrays["mask"] = np.packbits(arrays["mask"])
    arrays["token_index"] = np.asarray(tokens, dtype=np.int64)
    arrays["meta_index"] = np.concatenate([[0], np.cumsum([len(x) for x in lines])]).astype(np.int64)
    for name, array in arrays.items():
        np.save(path / f"{name}.npy", array)
    (path / "samples.jsonl").write_bytes(b"".join(lines))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(path.iterdir())}
    header = {"format": "fuse-logprobs", "version": 1, "codec": {"name": "dpcm8"}, "top_k": K}
    header |= {"vocab_size": vocab, "model": {}, "meta": {}, "sample_ids": [s.id for s in samples]}
    header |= {"num_samples": len(samples), "num_tokens": tokens[-1], "files": files}
    write_json_atomic(path / "header.json", header)
    return path


def test_version_1_shards_still_read(tmp_path, samples):
    old = LogprobReader(write_v1_shard(tmp_path / "v1", samples, 70000))
    assert old.shard(0).version == 1
    assert max_error(samples, list(old)) <= MAX_ERROR
    assert (
        old.shard(0).payload_nbytes()
        > LogprobReader(write_shard(tmp_path / "v2", samples, K, 70000)).shard(0).payload_nbytes()
    )
