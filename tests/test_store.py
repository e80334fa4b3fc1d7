"""The log-prob store: round trip, the 0.01 error bound and its exceptions, bytes/token, corrupt shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fuse.data.logprobs import (
    MAX_ERROR,
    ContentSpan,
    LogprobReader,
    SampleLogprobs,
    StoreError,
    decode_logprobs,
    encode_logprobs,
    narrowest_uint,
    shard_name,
    write_index,
    write_shard,
)

K, VOCAB = 10, 32000


def fake_sample(rng: np.random.Generator, i: int, length: int, sharpness: float = 3.0) -> SampleLogprobs:
    """Top-K of a real log-softmax over a random [T-1, V] logit matrix; the realized token often outside."""
    logits = rng.normal(size=(length - 1, VOCAB)).astype(np.float64) * sharpness
    logits[:, 7] += rng.choice([0.0, 25.0], size=length - 1)  # some confident rows: large rank-1 -> 2 gaps
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :K]
    input_ids = rng.integers(0, VOCAB, length)
    input_ids[1::3] = ids[::3, 0]  # every third realized token is the top-1
    text = "".join(chr(97 + int(x) % 26) for x in input_ids) + "é"
    return SampleLogprobs(
        id=f"s{i}",
        text=text,
        spans=[ContentSpan("user", 0, 2), ContentSpan("assistant", 2, length)],
        input_ids=input_ids,
        offsets=np.stack([np.arange(length), np.arange(length) + 1], axis=1),
        mask=rng.random(length) > 0.5,
        topk_ids=ids,
        topk_logprobs=np.take_along_axis(lp, ids, 1).astype(np.float32),
        target_logprobs=lp[np.arange(length - 1), input_ids[1:]].astype(np.float32),
        extra={"truncated": True} if i == 0 else {},
    )


@pytest.fixture(scope="module")
def samples() -> list[SampleLogprobs]:
    rng = np.random.default_rng(0)
    return [fake_sample(rng, i, int(rng.integers(2, 60))) for i in range(30)]


def assert_same(expected: SampleLogprobs, got: SampleLogprobs) -> float:
    assert (got.id, got.text, got.spans, got.extra) == (
        expected.id,
        expected.text,
        expected.spans,
        expected.extra,
    )
    for name in ("input_ids", "offsets", "mask", "topk_ids"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=name)
    return float(
        max(
            np.abs(got.topk_logprobs - expected.topk_logprobs).max(),
            np.abs(got.target_logprobs - expected.target_logprobs).max(),
        )
    )


def test_round_trip_within_bound_across_shards(tmp_path, samples):
    write_shard(tmp_path / shard_name(0), samples[:20], K, VOCAB, model={"name": "m"})
    write_shard(tmp_path / shard_name(1), samples[20:], K, VOCAB, model={"name": "m"})
    index = write_index(tmp_path, 2)
    assert index["num_samples"] == 30 and index["num_tokens"] == sum(s.num_tokens for s in samples)
    reader = LogprobReader(tmp_path)
    assert len(reader) == 30 and reader.top_k == K and reader.model == {"name": "m"}
    errors = [assert_same(s, g) for s, g in zip(samples, reader, strict=True)]
    assert max(errors) <= MAX_ERROR
    assert max(errors) > 1e-4  # the codec really is lossy: the bound is what is promised, not exactness
    assert_same(samples[25], reader.get("s25"))
    assert_same(samples[3], reader[3])
    assert "s29" in reader and "nope" not in reader
    assert reader.shard(0).header["id_dtype"] == "uint16"


def test_codec_edge_cases_are_exact_or_within_bound():
    lp = np.array(
        [
            [
                -0.001,
                -9.0,
                -9.5,
                -30.0,
                -31.0,
            ],  # big gaps (confident row): gap 1 in 12 bits, gap 3 too big -> exact
            [-2.3, -2.3, -2.3, -2.31, -2.32],  # ties
            [-1.0, -2.0, -np.inf, -np.inf, -np.inf],  # empty slots (projected distributions)
            [-20.0, -21.0, -22.0, -23.0, -24.0],  # top-1 below -16 -> exact
            [0.0, -0.0199 * 254, -0.0199 * 508, -60.0, -np.inf],
        ],
        dtype=np.float32,
    )
    head, gaps, exceptions = encode_logprobs(lp)
    assert exceptions.tolist() == [True, False, False, True, True]
    decoded = decode_logprobs(head, gaps, lp.shape[1])
    ok = ~exceptions
    assert np.array_equal(np.isneginf(decoded[ok]), np.isneginf(lp[ok]))
    finite = np.isfinite(lp[ok])
    assert np.abs(decoded[ok][finite] - lp[ok][finite]).max() <= MAX_ERROR


def test_exceptions_and_unknown_targets_round_trip_exactly(tmp_path, samples):
    sample = samples[5]
    sample = SampleLogprobs(**{**sample.__dict__})
    sample.topk_logprobs = sample.topk_logprobs.copy()
    sample.topk_logprobs[0, 3:] = -np.inf
    sample.topk_logprobs[1, 1:] -= 2000.0  # a gap no code holds (65534 steps of 0.0199 cover 1304 nats)
    sample.target_logprobs = sample.target_logprobs.copy()
    sample.target_logprobs[0] = np.nan  # e.g. an aligned position whose realized token has no projection
    write_shard(tmp_path / "one", [sample], K, VOCAB)
    got = LogprobReader(tmp_path / "one")[0]
    np.testing.assert_array_equal(got.topk_logprobs[1], sample.topk_logprobs[1])
    assert np.isneginf(got.topk_logprobs[0, 3:]).all() and np.isnan(got.target_logprobs[0])


def test_bytes_per_token_at_k10(tmp_path, samples):
    write_shard(tmp_path / "s", samples, K, VOCAB)
    shard = LogprobReader(tmp_path / "s").shard(0)
    rows = shard.header["num_rows"]
    # ids 2*10 + codes 12 = 32 B/row, plus exceptions (confident rows with a gap > 5 nats after rank 2) and the
    # exact log-prob of realized tokens outside the top-K (most rows here: random tokens)
    assert shard.payload_nbytes() / rows < 44
    assert narrowest_uint(VOCAB - 1) == np.uint16 and narrowest_uint(70000) == np.uint32


def test_corrupt_partial_and_missing_shards_are_detected(tmp_path, samples):
    path = write_shard(tmp_path / shard_name(0), samples[:4], K, VOCAB)
    LogprobReader(path)[0]  # fine as written
    gaps = path / "payload.bin"  # the log-prob codes (format version 2)
    data = bytearray(gaps.read_bytes())
    data[-1] ^= 0xFF
    gaps.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum"):
        LogprobReader(path)[0]
    gaps.write_bytes(bytes(data[:-5]))
    with pytest.raises(StoreError, match="bytes, the header says"):
        LogprobReader(path)[0]
    (path / "header.json").unlink()
    with pytest.raises(StoreError, match="not a complete log-prob shard"):
        LogprobReader(path)
    other = write_shard(tmp_path / "v", samples[:1], K, VOCAB)
    header = json.loads((other / "header.json").read_text())
    (other / "header.json").write_text(json.dumps({**header, "version": 99}))
    with pytest.raises(StoreError, match="version 99"):
        LogprobReader(other)
    with pytest.raises(StoreError, match="no log-prob shards"):
        LogprobReader(tmp_path / "empty")


def test_writer_refuses_bad_samples(tmp_path, samples):
    bad = SampleLogprobs(**{**samples[1].__dict__})
    bad.topk_ids = bad.topk_ids[:, :5]
    with pytest.raises(StoreError, match="topk_ids has shape"):
        write_shard(tmp_path / "x", [bad], K, VOCAB)
    with pytest.raises(StoreError, match="beyond the vocab"):
        write_shard(tmp_path / "y", [samples[1]], K, 100)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
