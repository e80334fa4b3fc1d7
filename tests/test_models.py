"""Model and tokenizer loading (fuse/models.py): safetensors-only refusal, trust_remote_code from the recipe only,
chat template overrides, vocabulary checks, model resolution errors, identities, and generic tokenizer folders."""

from __future__ import annotations

import json
import os
import shutil
import types
from pathlib import Path

import pytest

from fuse import models
from fuse.models import (
    ModelLoadError,
    chat_template_text,
    check_vocab,
    identity,
    load_model,
    load_tokenizer,
    load_tokenizer_dir,
    pad_id,
    resolve_model_dir,
)
from fuse.recipe import ModelSpec

TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture
def pivot_copy(zoo, tmp_path) -> Path:
    target = tmp_path / "pivot"
    shutil.copytree(zoo.pivot, target)
    return target


def test_pickle_only_folder_is_refused_with_the_model_named(pivot_copy):
    (pivot_copy / "model.safetensors").rename(pivot_copy / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"'teacher'.*no \.safetensors.*allow_pickle: true"):
        load_model(ModelSpec(name="teacher", path=str(pivot_copy)))
    # a spec without a name (e.g. a model folder given on the command line) is named by its path
    with pytest.raises(ModelLoadError, match=rf"{pivot_copy.name}.*allow_pickle"):
        load_model(ModelSpec(path=str(pivot_copy)))


def _recorder(calls: list[dict], result):
    def from_pretrained(*args, **kwargs):
        calls.append(kwargs)
        return result

    return from_pretrained


def test_trust_remote_code_is_passed_only_when_the_spec_says_so(pivot_copy, monkeypatch):
    import transformers

    config = json.loads((pivot_copy / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class")  # not a generic class: goes through AutoTokenizer
    (pivot_copy / "tokenizer_config.json").write_text(json.dumps(config))
    model_calls: list[dict] = []
    tokenizer_calls: list[dict] = []
    fake_model = types.SimpleNamespace(to=lambda device: fake_model)
    fake_tokenizer = types.SimpleNamespace(chat_template="x")
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", _recorder(model_calls, fake_model)
    )
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", _recorder(tokenizer_calls, fake_tokenizer)
    )

    for trust in (False, True):
        spec = ModelSpec(name="m", path=str(pivot_copy), trust_remote_code=trust)
        assert load_model(spec) is fake_model
        assert load_tokenizer(spec) is fake_tokenizer
    assert [c["trust_remote_code"] for c in model_calls] == [False, True]
    assert [c["trust_remote_code"] for c in tokenizer_calls] == [False, True]
    assert all(c["use_safetensors"] is True for c in model_calls)


def test_chat_template_override_inline_and_file(zoo, tmp_path):
    inline = ModelSpec(name="pivot", path=str(zoo.pivot), chat_template=TEMPLATE)
    assert chat_template_text(inline) == TEMPLATE
    assert load_tokenizer(inline).chat_template == TEMPLATE
    rendered = load_tokenizer(inline).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<<user>>hi\n"

    template_file = tmp_path / "template.jinja"
    template_file.write_text(TEMPLATE)
    from_file = ModelSpec(name="pivot", path=str(zoo.pivot), chat_template=str(template_file))
    assert load_tokenizer(from_file).chat_template == TEMPLATE
    # no override: the folder's own template
    assert load_tokenizer(ModelSpec(name="pivot", path=str(zoo.pivot))).chat_template != TEMPLATE

    missing = ModelSpec(name="pivot", path=str(zoo.pivot), chat_template=str(tmp_path / "nope.jinja"))
    with pytest.raises(ModelLoadError, match=r"'pivot'.*chat_template file .*nope\.jinja does not exist"):
        load_tokenizer(missing)


def test_require_chat_template_names_the_model_and_the_key(pivot_copy):
    (pivot_copy / "chat_template.jinja").unlink()
    config = json.loads((pivot_copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (pivot_copy / "tokenizer_config.json").write_text(json.dumps(config))
    spec = ModelSpec(name="bare", path=str(pivot_copy))
    assert not load_tokenizer(spec).chat_template  # fine unless required
    with pytest.raises(ModelLoadError, match=r"model 'bare'.*no chat template.*chat_template:"):
        load_tokenizer(spec, require_chat_template=True)
    fixed = spec.model_copy(update={"chat_template": TEMPLATE})
    assert load_tokenizer(fixed, require_chat_template=True).chat_template == TEMPLATE


def test_check_vocab_padded_is_fine_and_an_oversized_tokenizer_is_an_error(zoo):
    from transformers import AutoConfig

    spec = ModelSpec(name="pivot", path=str(zoo.pivot))
    tokenizer = load_tokenizer(spec)
    config = AutoConfig.from_pretrained(zoo.pivot)
    model = load_model(spec)
    report = check_vocab(spec, config, tokenizer, model)
    assert (report.config_vocab, report.tokenizer_vocab, report.embedding_rows) == (832, 800, 832)
    assert report.padded

    with pytest.raises(ModelLoadError, match=r"'pivot'.*tokenizer has 800 tokens.*700"):
        check_vocab(spec, types.SimpleNamespace(vocab_size=700), tokenizer)
    # the embedding decides when the model is given, even if the config claims more
    model.resize_token_embeddings(512)
    with pytest.raises(ModelLoadError, match=r"tokenizer has 800 tokens but the model outputs 512"):
        check_vocab(spec, types.SimpleNamespace(vocab_size=832), tokenizer, model)


def test_resolve_model_dir_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match=r"'gone'.*folder .*missing does not exist"):
        resolve_model_dir(ModelSpec(name="gone", path=str(tmp_path / "missing")))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"'file'.*model\.safetensors is a file, not a model folder"):
        resolve_model_dir(ModelSpec(name="file", path=str(tmp_path / "model.safetensors")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(
        ModelLoadError, match=r"'hubby'.*'no-such-org/no-such-model'.*HF_HUB_OFFLINE=1.*cache"
    ):
        resolve_model_dir(ModelSpec(name="hubby", path="no-such-org/no-such-model"))
    assert models.offline()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"HF_HUB_OFFLINE": "1"}, True),
        ({"HF_HUB_OFFLINE": "yes"}, True),
        ({"HF_HUB_OFFLINE": "ON"}, True),
        ({"HF_HUB_OFFLINE": "0"}, False),
        ({"HF_HUB_OFFLINE": "FALSE"}, False),
        ({"HF_HUB_OFFLINE": "off"}, False),
        ({"TRANSFORMERS_OFFLINE": "1"}, True),
    ],
)
def test_offline_reads_the_environment_as_huggingface_hub_does(monkeypatch, env, expected):
    from huggingface_hub.constants import _is_true

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert models.offline() is expected
    hub = _is_true(env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE"))  # the hub client's own rule
    assert hub is expected


def test_identity_changes_with_weights_only(pivot_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSE_CACHE_DIR", str(tmp_path / "cache"))
    spec = ModelSpec(name="pivot", path=str(pivot_copy))
    before = identity(spec)
    (pivot_copy / "README.md").write_text("a card does not change the weights\n")
    (pivot_copy / "model.safetensors").touch()  # new mtime, same bytes
    assert identity(spec) == before

    weights = pivot_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte of a tensor differs
    weights.write_bytes(bytes(data))
    # digests are cached by (size, mtime_ns): move the mtime past any coarse-clock tie with the touch above
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed = identity(spec)
    assert changed != before
    assert changed["files"]["model.safetensors"] != before["files"]["model.safetensors"]
    assert {k: v for k, v in changed["files"].items() if k != "model.safetensors"} == {
        k: v for k, v in before["files"].items() if k != "model.safetensors"
    }
    hub = identity(ModelSpec(name="h", path="org/model", revision="abc"))
    assert hub == {"hub_id": "org/model", "revision": "abc"}


def test_generic_tokenizer_class_keeps_the_metaspace_pre_tokenizer(zoo):
    from tokenizers import Tokenizer

    folder = zoo.models["llama"]
    declared = json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert declared in models.GENERIC_TOKENIZER_CLASSES
    tokenizer = load_tokenizer_dir(folder)
    pre = json.loads(tokenizer.backend_tokenizer.pre_tokenizer.__getstate__())
    assert "Metaspace" in json.dumps(pre)
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "the cat sat\non  the mat, twice"
    assert (
        tokenizer(text, add_special_tokens=False)["input_ids"]
        == reference.encode(text, add_special_tokens=False).ids
    )


def test_sharded_loading_with_a_device_map_gives_the_same_logits(zoo, tmp_path):
    """A model too big for one device: a `device_map` puts some layers elsewhere (here on disk, the CPU stand-in
    for a second GPU; "auto" does the same over the GPUs a node has) and the forward pass is unchanged."""
    import torch

    spec = ModelSpec(name="pivot", path=str(zoo.pivot))
    whole = load_model(spec, dtype="float32")
    layers = len(whole.model.layers)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
        "model.rotary_emb": "cpu",
    }
    device_map.update({f"model.layers.{i}": "cpu" if i < layers // 2 else "disk" for i in range(layers)})
    sharded = load_model(spec, dtype="float32", device_map=device_map, offload_folder=tmp_path / "offload")
    placed = set(sharded.hf_device_map.values())
    assert "disk" in placed and len(placed) > 1, sharded.hf_device_map  # really split
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(sharded(input_ids=ids).logits, whole(input_ids=ids).logits)


def test_attn_implementation_reaches_the_model(zoo):
    spec = ModelSpec(name="pivot", path=str(zoo.pivot))
    assert load_model(spec, attn_implementation="eager").config._attn_implementation == "eager"
    assert load_model(spec, attn_implementation="sdpa").config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("pad", "eos", "expected"), [(3, 7, 3), (0, 7, 0), (None, 7, 7), (None, 0, 0), (None, None, 0)]
)
def test_pad_id_is_pad_then_eos_then_zero_and_id_zero_counts_as_set(pad, eos, expected):
    tokenizer = types.SimpleNamespace(pad_token_id=pad, eos_token_id=eos)
    assert pad_id(tokenizer) == expected


def test_pad_id_of_a_zoo_tokenizer_is_its_pad_token(zoo):
    tokenizer = load_tokenizer(ModelSpec(path=str(zoo.pivot)))
    assert tokenizer.pad_token_id is not None and pad_id(tokenizer) == tokenizer.pad_token_id
