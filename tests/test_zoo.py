"""The model zoo: deterministic world, offline reload, tokenizer round-trips, and each model knowing its own skill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fuse.zoo import ZOO_MODELS, PretrainSettings, Zoo, ZooSettings, build_zoo, data_files, world
from fuse.zoo.__main__ import main as zoo_main


def world_texts(zoo: Zoo) -> list[str]:
    """Every string the world has: general text (newlines, digits), prompts and answers of all skills."""
    texts = [json.loads(line)["text"] for line in zoo.heldout_text.read_text().splitlines()]
    for line in zoo.eval_items.read_text().splitlines():
        row = json.loads(line)
        texts += [row["prompt"], row["answer"]]
    for line in zoo.sft.read_text().splitlines():
        texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts + ["a\n\nb  c\n", "0123456789 10 99 1999", "Line one.\nLine two: 42!"]


def test_world_is_deterministic_and_eval_is_held_out():
    first, second = world.split_world(0), world.split_world(0)
    assert first == second
    assert world.split_world(1).eval != first.eval
    heldout = world.general_documents(0, "heldout", 8)
    assert data_files(first, heldout) == data_files(second, heldout)
    for skill, items in first.eval.items():
        trained = {e.prompt for e in first.pretrain[skill]} | {e.prompt for e in first.sft[skill]}
        trained |= {e.prompt for e, _ in first.preference[skill]}
        assert items and not {e.prompt for e in items} & trained, skill
    for skill, pairs in first.preference.items():
        assert all(e.answer != wrong for e, wrong in pairs), skill


def test_models_are_heterogeneous_and_reload_offline(zoo: Zoo, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    archs, vocabs, templates = set(), set(), set()
    for name, folder in zoo.models.items():
        assert any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")), name
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        assert head_dim >= 32 and 64 <= config.hidden_size <= 128, name
        assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer), name
        archs.add(config.model_type)
        vocabs.add(json.dumps(tokenizer.get_vocab(), sort_keys=True))
        templates.add(tokenizer.chat_template)
    assert len(archs) == len(vocabs) == len(templates) == len(zoo.models) >= 4
    assert set(zoo.tokenizer_names.values()) == {"bytelevel_bpe", "metaspace_bpe", "metaspace_unigram"}


def test_every_tokenizer_round_trips_the_world(zoo: Zoo):
    from transformers import AutoTokenizer

    texts = world_texts(zoo)
    for name, folder in zoo.models.items():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == text, (name, text)
        assert (
            tokenizer.unk_token_id is None or tokenizer.unk_token_id not in tokenizer("x\n7 é")["input_ids"]
        )


def test_generation_prompt_is_a_token_prefix_of_the_conversation(zoo: Zoo):
    """What the model is asked with at eval time is exactly what it was trained on, up to the answer."""
    from transformers import AutoTokenizer

    messages = [
        {"role": "user", "content": "What is the capital of Zu?"},
        {"role": "assistant", "content": "Ka 12"},
    ]
    for name, folder in zoo.models.items():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        full = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
        prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        prefix = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert full["input_ids"][: len(prefix)] == prefix, name


@pytest.mark.slow
def test_each_model_is_best_on_its_own_skill(zoo: Zoo):
    from fuse.evaluation import evaluate_models, load_items

    items = load_items(zoo.eval_items, max_per_skill=12)
    metrics = evaluate_models(zoo.models, items, [], max_new_tokens=12)
    for skill, owner in zoo.skills.items():
        scores = {name: m["skills"][skill] for name, m in metrics["models"].items()}
        assert scores[owner] >= 0.75, (skill, scores)
        assert all(v <= 0.25 for name, v in scores.items() if name != owner), (skill, scores)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_build_is_deterministic_across_worker_counts_and_cached(tmp_path):
    settings = ZooSettings(
        n_general_docs=200, n_heldout_docs=4, pretrain=PretrainSettings(steps=4, batch_size=4)
    )
    first = build_zoo(tmp_path / "a", settings, workers=1)
    second = build_zoo(tmp_path / "b", settings, workers=2)
    files_a, files_b = tree(first.root), tree(second.root)
    files_a.pop("build.json"), files_b.pop("build.json")
    assert files_a.keys() == files_b.keys() and "models/gemma/model.safetensors" in files_a
    assert [k for k in files_a if files_a[k] != files_b[k]] == []
    marker = first.root / "zoo.json"
    stamp = marker.stat().st_mtime_ns
    again = build_zoo(tmp_path / "a", settings, workers=1)
    assert again == first and marker.stat().st_mtime_ns == stamp


def test_cli_reuses_a_built_zoo(zoo: Zoo, capsys):
    assert zoo_main(["build", str(zoo.root)]) == 0
    assert json.loads(capsys.readouterr().out)["models"]["pivot"] == str(zoo.pivot)


def test_demo_recipe_and_data_files_are_valid(zoo: Zoo):
    from fuse.recipe import load_recipe

    recipe = load_recipe(zoo.recipe)
    assert recipe.source_names == [m.name for m in ZOO_MODELS if m.name != "pivot"]
    assert Path(recipe.stages.evaluate.items) == zoo.eval_items
    sft = [json.loads(line) for line in zoo.sft.read_text().splitlines()]
    preference = [json.loads(line) for line in zoo.preference.read_text().splitlines()]
    assert {row["id"].split("-")[0] for row in sft} == set(zoo.skills)
    assert all(row["messages"][-1]["role"] == "assistant" for row in sft)
    assert all(row["chosen"] != row["rejected"] and row["prompt"][0]["role"] == "user" for row in preference)
