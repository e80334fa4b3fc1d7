"""The model zoo: deterministic world, exact domain entropy, offline reload, tokenizer round-trips, and each
model knowing its own skill and its own domain."""

from __future__ import annotations

import itertools
import json
import math
import random
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
    for path in (zoo.sft, zoo.heldout_domains):
        for line in path.read_text().splitlines():
            texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts + ["a\n\nb  c\n", "0123456789 10 99 1999", "Line one.\nLine two: 42!"]


def test_world_is_deterministic_and_eval_is_held_out():
    first, second = world.split_world(0), world.split_world(0)
    assert first == second
    assert world.split_world(1).eval != first.eval
    heldout = world.general_documents(0, "heldout", 8)
    files = [data_files(s, heldout, world.split_domains(0, 50, 4, 4), heldout) for s in (first, second)]
    assert files[0] == files[1]
    for skill, items in first.eval.items():
        trained = {e.prompt for e in first.pretrain[skill]} | {e.prompt for e in first.sft[skill]}
        trained |= {e.prompt for e, _ in first.preference[skill]}
        assert items and not {e.prompt for e in items} & trained, skill
    for skill, pairs in first.preference.items():
        assert all(e.answer != wrong for e, wrong in pairs), skill


def tiny_domain(sentences: int = 2) -> world.Domain:
    """Small enough to enumerate every response: 3 words, sentences of 1 to 3 words, uneven probabilities."""
    successors = {"ka": (("zu", 0.7), ("mi", 0.3)), "zu": (("ka", 0.5), ("mi", 0.5)), "mi": (("ka", 1.0),)}
    return world.Domain(
        "tiny", "pivot", ("ka", "zu", "mi"), (("ka", 0.6), ("mi", 0.4)), successors, 0.4, 1, 3, sentences
    )


def enumerate_sentences(domain: world.Domain) -> list[tuple[list[str], float]]:
    """Every sentence with its probability, by walking every path of the chain (no shared code with the DP)."""
    done, frontier = [], [([w], p) for w, p in domain.starts]
    while frontier:
        words, p = frontier.pop()
        p_end = domain.end_probability(len(words))
        if p_end > 0:
            done.append((words, p * p_end))
        if p_end < 1:
            frontier += [(words + [w], p * (1 - p_end) * q) for w, q in domain.successors[words[-1]]]
    return done


def test_domain_entropy_is_exact_against_brute_force_enumeration():
    domain = tiny_domain()
    sentences = enumerate_sentences(domain)
    responses = {}
    for parts in itertools.product(sentences, repeat=domain.sentences):
        text = " ".join(world.render_sentence(words) for words, _ in parts)
        responses[text] = responses.get(text, 0.0) + math.prod(p for _, p in parts)
    assert len(responses) == len(sentences) ** domain.sentences  # rendering is one-to-one
    assert sum(responses.values()) == pytest.approx(1.0, abs=1e-12)
    entropy = -sum(p * math.log(p) for p in responses.values())
    mean_bytes = sum(p * len(text.encode()) for text, p in responses.items())
    assert world.entropy_per_byte(domain) == pytest.approx(entropy / mean_bytes, rel=1e-12)
    for text, p in responses.items():
        assert world.response_nll(domain, text) == pytest.approx(-math.log(p), rel=1e-12), text
    assert world.response_nll(domain, "Ka ka. Mi.") == math.inf  # ka never follows ka
    assert world.response_nll(domain, "Ka zu.") == math.inf  # one sentence short


def test_sampled_responses_carry_their_exact_nll_and_tend_to_the_entropy():
    for domain in [tiny_domain(), *world.domains(0)]:
        rng = random.Random(0)
        samples = [world.sample_response(domain, rng) for _ in range(4000)]
        assert all(world.response_nll(domain, t) == pytest.approx(n, rel=1e-12) for t, n in samples[:200])
        rate = sum(n for _, n in samples) / sum(len(t.encode()) for t, _ in samples)
        assert rate == pytest.approx(world.entropy_per_byte(domain), rel=0.03), domain.name
    # several valid continuations: no real domain is nearly deterministic
    assert all(world.entropy_per_byte(d) > 0.1 for d in world.domains(0))


def test_domain_splits_are_independent_samples_and_sft_is_small():
    splits = world.split_domains(0, n_pretrain=400, n_sft=16, n_heldout=64)
    for domain in world.domains(0):
        pretrain, sft = splits.pretrain[domain.name], [r for _, r in splits.sft[domain.name]]
        heldout = splits.heldout[domain.name]
        assert len(sft) == 16 and len(pretrain) == 400 and len(heldout) == 64
        # the response is what is held out: asked in the training phrasings, never in the new one
        training_phrasings = {domain.prompt(0), domain.prompt(1)}
        assert {p for p, _, _ in heldout} == {p for p, _ in splits.sft[domain.name]} == training_phrasings
        assert [n for _, r, n in heldout] == [
            pytest.approx(world.response_nll(domain, r)) for _, r, _ in heldout
        ]
        assert sft != pretrain[:16]  # its own random stream


def test_the_new_phrasing_file_asks_the_same_responses_in_an_unseen_prompt(zoo: Zoo):
    from fuse.evaluation import load_domain_samples

    seen, new = (load_domain_samples(p) for p in (zoo.heldout_domains, zoo.heldout_domains_new_phrasing))
    assert [(s.domain, s.messages[-1], s.nll) for s in seen] == [
        (s.domain, s.messages[-1], s.nll) for s in new
    ]
    assert {s.messages[0]["content"] for s in new} == {world.DOMAIN_PROMPTS[2].format(d) for d in zoo.domains}


def test_heldout_preference_pairs_ask_the_training_pairs_in_the_unseen_phrasing(zoo: Zoo, tmp_path):
    import shutil

    from fuse.zoo import PREFERENCE_HELDOUT, write_heldout_preference

    train = [json.loads(line) for line in zoo.preference.read_text().splitlines()]
    held = [json.loads(line) for line in zoo.preference_heldout.read_text().splitlines()]
    assert [(r["id"], r["chosen"], r["rejected"]) for r in train] == [
        (r["id"], r["chosen"], r["rejected"]) for r in held
    ]
    eval_phrasing = {s.name: s.eval_phrasing for s in world.skills(0)}
    for row in held:
        skill = row["id"].rsplit("-", 1)[0]
        assert row["skill"] == skill
        prefix = eval_phrasing[skill].split("{}")[0]
        assert row["prompt"][0]["content"].startswith(prefix)
    assert not {r["prompt"][0]["content"] for r in held} & {r["prompt"][0]["content"] for r in train}
    # a zoo built before the file existed gets the same file, written from its seed alone
    copy = tmp_path / "zoo"
    shutil.copytree(zoo.root / "data", copy / "data")
    shutil.copy(zoo.root / "zoo.json", copy / "zoo.json")
    (copy / PREFERENCE_HELDOUT).unlink()
    assert write_heldout_preference(copy).read_text() == zoo.preference_heldout.read_text()


def test_lexicon_documents_show_every_domain_word_without_its_transitions():
    docs = world.lexicon_documents(0, per_domain=200)
    for i, domain in enumerate(world.domains(0)):
        words = [w.lower() for d in docs[i :: len(world.DOMAIN_TOPICS)] for w in d.replace(".", "").split()]
        assert set(words) == set(domain.words)
        # uniform draws: the most frequent word is no more than ~2x the rarest (the chain's own text is skewed)
        counts = [words.count(w) for w in domain.words]
        assert max(counts) < 2 * min(counts), counts
    every_word = {w for d in world.domains(0) for w in d.words}
    assert all(w.lower() in every_word for d in docs for w in d.replace(".", "").split())


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
def test_each_model_is_best_on_its_own_skill_and_domain(zoo: Zoo):
    from fuse.evaluation import evaluate_models, load_domain_samples, load_items

    items = load_items(zoo.eval_items)
    samples = load_domain_samples(zoo.heldout_domains)
    metrics = evaluate_models(zoo.models, items, [], max_new_tokens=12, domains=samples)
    for skill, owner in zoo.skills.items():
        scores = {name: m["skills"][skill] for name, m in metrics["models"].items()}
        # every item, and a floor well below what CPUs give (the pivot's capital: 0.83 on one, 0.79 on an AVX-512
        # machine, whose float kernels differ): a world contract, not one CPU's rounding
        assert scores[owner] >= 0.6, (skill, scores)
        assert all(v <= 0.25 for name, v in scores.items() if name != owner), (skill, scores)
    for domain, owner in zoo.domains.items():
        ces = {name: m["domain_ce"][domain] for name, m in metrics["models"].items()}
        limit = metrics["limit"]["domain_ce"][domain]
        # the owner is within a few tenths of a nat per byte of the limit; every other model knows the domain's
        # words (the shared lexicon) but not its transitions, so it is clearly behind
        assert limit < ces[owner] < limit + 0.3, (domain, limit, ces)
        assert all(ce > ces[owner] + 0.15 for name, ce in ces.items() if name != owner), (domain, ces)


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
    assert {row["id"].split("-")[0] for row in sft} == set(zoo.skills) | set(zoo.domains) | {"general"}
    assert Path(recipe.stages.evaluate.domains) == zoo.heldout_domains
    assert all(row["messages"][-1]["role"] == "assistant" for row in sft)
    assert all(row["chosen"] != row["rejected"] and row["prompt"][0]["role"] == "user" for row in preference)
