"""Evaluation: per-skill accuracy, per-byte CE and per-domain response CE next to the limit are computed (a random
model scores ~0), and the stage writes its table for every model the DAG hands it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fuse.evaluation import (
    EvalItem,
    EvaluationError,
    ce_per_byte,
    domain_ce_per_byte,
    domain_limits,
    evaluate_models,
    load_domain_samples,
    load_items,
    load_preference_pairs,
    load_texts,
    markdown_table,
    preference_accuracy,
    preference_margins,
    skill_accuracy,
)
from fuse.zoo import Zoo


def test_load_items_reports_the_bad_line(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"skill": "a", "prompt": "p", "answer": "x"}\n\n{"skill": "a", "prompt": "q"}\n')
    with pytest.raises(EvaluationError, match=r"items.jsonl:3: .*answer"):
        load_items(path)
    path.write_text(
        "".join(
            json.dumps({"skill": s, "prompt": str(i), "answer": "1"}) + "\n" for i, s in enumerate("aaab")
        )
    )
    assert [i.skill for i in load_items(path, max_per_skill=2)] == ["a", "a", "b"]


def test_load_texts_reads_jsonl_messages_and_plain_text(tmp_path):
    (tmp_path / "t.jsonl").write_text(
        '{"text": "x\\ny"}\n{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    )
    assert load_texts(tmp_path / "t.jsonl") == ["x\ny", "a\nb"]
    (tmp_path / "t.txt").write_text("one\ntwo\n\nthree\n")
    assert load_texts(tmp_path / "t.txt") == ["one\ntwo", "three\n"]


def test_accuracy_is_exact_match_per_skill():
    items = [EvalItem("a", "p", "Ka zu"), EvalItem("a", "q", "x"), EvalItem("b", "r", "7")]
    assert skill_accuracy(items, [" Ka  zu\n", "y", "7"]) == {"a": 0.5, "b": 1.0}


def test_markdown_table_marks_the_best_per_column():
    metrics = {
        "skills": ["s"],
        "models": {
            "m1": {"skills": {"s": 1.0}, "mean_accuracy": 1.0, "ce_per_byte": 0.5},
            "m2": {"skills": {"s": 0.0}, "mean_accuracy": 0.0, "ce_per_byte": 0.25},
        },
    }
    lines = markdown_table(metrics).splitlines()
    assert lines[0] == "| model | s | mean | CE/byte |"
    assert (
        lines[2] == "| m1 | **1.00** | **1.00** | 0.500 |" and lines[3] == "| m2 | 0.00 | 0.00 | **0.250** |"
    )


def test_standard_errors_are_lm_evals_for_means_and_the_delta_methods_for_ce_per_byte():
    """A mean's standard error is lm-eval's (sample SD / √n); CE/byte's (summed NLL / summed bytes) is the delta
    method's, which a bootstrap over the same items agrees with."""
    import numpy as np
    from lm_eval.api.metrics import mean_stderr as lm_eval_mean_stderr

    from fuse.stats import mean_stderr, ratio_stderr

    rng = np.random.default_rng(0)
    correct = [float(x) for x in rng.integers(0, 2, 60)]
    assert mean_stderr(correct) == pytest.approx(lm_eval_mean_stderr(correct))
    assert mean_stderr([1.0]) is None
    size = rng.integers(20, 200, 300).astype(float)
    nll = size * rng.gamma(4.0, 0.25, 300)
    draws = rng.integers(0, 300, (4000, 300))
    bootstrap = (nll[draws].sum(1) / size[draws].sum(1)).std()
    assert ratio_stderr(list(nll), list(size)) == pytest.approx(bootstrap, rel=0.1)
    assert ratio_stderr([1.0], [2.0]) is None


def test_every_aggregate_gets_its_standard_error_from_the_items():
    from fuse.evaluation import standard_errors
    from fuse.stats import mean_stderr, ratio_stderr

    per_item = {
        "skill": [1, 0, 1, 1, 0, 0],
        "text": {"nll": [3.0, 5.0, 4.0], "bytes": [10, 12, 9]},
        "domain": {"nll": [2.0, 2.5, 7.0, 6.0], "bytes": [5, 6, 10, 11]},
        "preference": {"margin": [0.1, -0.2, 0.3, 0.4], "group": ["x", "x", "y", "y"]},
    }
    errors = standard_errors(
        per_item, ["a", "a", "a", "b", "b", "b"], ["d", "d", "e", "e"], per_item["preference"]["group"]
    )
    assert errors["skills"] == {"a": mean_stderr([1, 0, 1]), "b": mean_stderr([1, 0, 0])}
    assert errors["mean_accuracy"] == pytest.approx(math.hypot(*errors["skills"].values()) / 2)
    assert errors["ce_per_byte"] == ratio_stderr([3.0, 5.0, 4.0], [10, 12, 9])
    assert errors["domain_ce"] == {
        "d": ratio_stderr([2.0, 2.5], [5, 6]),
        "e": ratio_stderr([7.0, 6.0], [10, 11]),
    }
    assert errors["preference"] == {"x": mean_stderr([1.0, 0.0]), "y": 0.0}
    assert errors["preference_accuracy"] == mean_stderr([1.0, 0.0, 1.0, 1.0])


def test_markdown_table_shows_each_value_with_its_standard_error():
    metrics = {
        "skills": ["s"],
        "models": {
            "m1": {
                "skills": {"s": 0.75},
                "mean_accuracy": 0.75,
                "ce_per_byte": 0.5,
                "stderr": {"skills": {"s": 0.125}, "mean_accuracy": 0.125, "ce_per_byte": 0.0123},
            },
            "m2": {"skills": {"s": 0.25}, "mean_accuracy": 0.25, "ce_per_byte": 0.25},  # kept no items
        },
    }
    lines = markdown_table(metrics).splitlines()
    assert lines[2] == "| m1 | **0.75 ± 0.12** | **0.75 ± 0.12** | 0.500 ± 0.012 |"
    assert lines[3] == "| m2 | 0.25 | 0.25 | **0.250** |"


def test_markdown_table_has_domain_columns_and_the_limit_row():
    metrics = {
        "skills": [],
        "domains": ["d"],
        "limit": {"domain_ce": {"d": 0.2}, "mean_domain_ce": 0.2},
        "models": {
            "m1": {"ce_per_byte": 0.5, "domain_ce": {"d": 0.3}, "mean_domain_ce": 0.3},
            "m2": {"ce_per_byte": 0.4, "domain_ce": {"d": 0.9}, "mean_domain_ce": 0.9},
        },
    }
    lines = markdown_table(metrics).splitlines()
    assert lines[0] == "| model | CE/byte | CE d | CE mean |"
    assert lines[2:] == [
        "| m1 | 0.500 | **0.300** | **0.300** |",
        "| m2 | **0.400** | 0.900 | 0.900 |",
        "| limit | – | 0.200 | 0.200 |",
    ]


def test_domain_samples_are_checked_and_the_limit_is_nll_per_byte(tmp_path):
    path = tmp_path / "domains.jsonl"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "abcd"}]
    rows = [{"domain": "a", "messages": chat, "nll": 2.0}, {"domain": "a", "messages": chat, "nll": 6.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"domain": "b", "messages": []}\n')
    with pytest.raises(EvaluationError, match=r"domains.jsonl:3: .*nll"):
        load_domain_samples(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert domain_limits(load_domain_samples(path)) == {"a": pytest.approx(8.0 / 8)}


def test_domain_ce_matches_a_position_by_position_reference(zoo: Zoo):
    """The response's tokens only (not the prompt, not the end-of-turn marker), summed over every sample of a
    domain, per byte of the responses; batched with padding = one forward per sample."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    samples = load_domain_samples(zoo.heldout_domains)
    picked = [s for d in sorted(zoo.domains) for s in [x for x in samples if x.domain == d][:3]]
    for name in ("llama", "pivot"):
        tokenizer = AutoTokenizer.from_pretrained(zoo.models[name])
        model = AutoModelForCausalLM.from_pretrained(zoo.models[name]).eval()
        expected = {}
        for sample in picked:
            prompt = tokenizer.apply_chat_template(
                list(sample.messages[:-1]), tokenize=False, add_generation_prompt=True
            )
            text = tokenizer.apply_chat_template(list(sample.messages), tokenize=False)
            response = sample.messages[-1]["content"]
            end = text.index(response, len(prompt)) + len(response)
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = encoded["input_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
            # tokens that end inside the response (a ▁/Ġ token's leading space belongs to the token)
            nll = -sum(
                float(logprobs[t - 1, ids[t]])
                for t in range(1, len(ids))
                if len(prompt) < encoded["offset_mapping"][t][1] <= end
            )
            total, size = expected.get(sample.domain, (0.0, 0))
            expected[sample.domain] = (total + nll, size + sample.response_bytes)
        got = domain_ce_per_byte(model, tokenizer, picked, batch_size=5)
        assert got == {d: pytest.approx(n / b, rel=1e-4) for d, (n, b) in expected.items()}, name


def test_preference_pairs_are_checked_and_grouped(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "Shout: cat", "chosen": "CAT", "rejected": "DOG", "skill": "shout"},
        {"prompt": [{"role": "user", "content": "Opposite of hot:"}], "chosen": "cold", "rejected": "warm"},
        {"prompt": "Shout: sun", "chosen": "SUN", "rejected": "SUN"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(EvaluationError, match=r"pairs.jsonl:3: .*two different"):
        load_preference_pairs(path)
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + '\n{"prompt": "x", "chosen": "y"}\n')
    with pytest.raises(EvaluationError, match=r"pairs.jsonl:3: .*rejected"):
        load_preference_pairs(path)
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    pairs = load_preference_pairs(path)
    assert [p.group for p in pairs] == ["shout", "all"]
    assert pairs[0].prompt == ({"role": "user", "content": "Shout: cat"},)
    assert preference_accuracy(pairs * 2, [0.5, -0.1, -0.2, 0.0]) == {"all": 0.0, "shout": 0.5}


def test_preference_margin_is_the_per_byte_log_prob_difference(zoo: Zoo):
    """Each side's response NLL (the domain CE's tokens, checked position by position above) per UTF-8 byte:
    margin = NLL(y_l)/b(y_l) - NLL(y_w)/b(y_w); the skill's owner prefers its right answers, the pivot does not
    know them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fuse.backends.hf import pair_sums
    from fuse.evaluation import DomainSample, response_nll, response_rows

    pairs = [p for p in load_preference_pairs(zoo.preference_heldout) if p.group == "shout"][:12]
    accuracy = {}
    for name in ("gpt2", "pivot"):
        tokenizer = AutoTokenizer.from_pretrained(zoo.models[name])
        model = AutoModelForCausalLM.from_pretrained(zoo.models[name]).eval()
        margins = preference_margins(model, tokenizer, pairs)
        for pair in pairs[:3]:  # the packed forward is taken (the prompt tokens are shared)
            rows = response_rows(
                tokenizer,
                [
                    DomainSample("x", (*pair.prompt, {"role": "assistant", "content": r}), 0)
                    for r in (pair.chosen, pair.rejected)
                ],
            )
            assert pair_sums(model, *rows) is not None
        for pair, margin in zip(pairs[:3], margins, strict=False):
            sides = [
                response_nll(
                    model,
                    tokenizer,
                    [DomainSample("x", (*pair.prompt, {"role": "assistant", "content": r}), 0)],
                )[0]
                / len(r.encode())
                for r in (pair.chosen, pair.rejected)
            ]
            assert margin == pytest.approx(sides[1] - sides[0], abs=1e-5)  # packed vs one forward a side
        accuracy[name] = preference_accuracy(pairs, margins)["shout"]
    assert accuracy["gpt2"] >= 0.9 and accuracy["gpt2"] > accuracy["pivot"], accuracy


def test_ce_per_byte_matches_a_position_by_position_reference(zoo: Zoo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo.models["llama"])
    model = AutoModelForCausalLM.from_pretrained(zoo.models["llama"]).eval()
    texts = ["The red fox sees 12 cats.\nAnna said: no.", "In 1999 the moon was old."]
    nll, n_bytes = 0.0, 0
    for text in texts:
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        for t in range(1, len(ids)):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1]
            nll -= float(torch.log_softmax(logits, -1)[ids[t]])
        n_bytes += len(text.encode())
    assert ce_per_byte(model, tokenizer, texts) == pytest.approx(nll / n_bytes, rel=1e-4)


@pytest.mark.slow
def test_batched_generation_returns_each_prompts_own_completion_in_order(zoo: Zoo):
    """Prompts go through generate in batches of similar length (fewer pad tokens to run); each completion is the
    one its prompt gets alone, in the prompts' order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fuse.evaluation import generate_greedy

    tokenizer = AutoTokenizer.from_pretrained(zoo.models["pivot"])
    model = AutoModelForCausalLM.from_pretrained(zoo.models["pivot"]).eval()
    items = load_items(zoo.eval_items)
    prompts = [i.prompt for i in items[:2]] + ["Tell me about the garden and the weather today, please."]
    prompts += [i.prompt + " " + i.prompt for i in items[2:5]]
    chat = [True, False, True, True, False, True]
    batched = generate_greedy(model, tokenizer, prompts, 8, batch_size=2, chat=chat)
    alone = [
        generate_greedy(model, tokenizer, [p], 8, batch_size=1, chat=[c])[0]
        for p, c in zip(prompts, chat, strict=True)
    ]
    assert batched == alone and len(set(alone)) > 1


def test_a_stop_string_ends_the_completion_before_it(zoo: Zoo, tmp_path):
    """An item's `stop` (lm-evaluation-harness's `until`): the completion is the budget's completion cut before the
    first stop string, whether generation stopped there or not; items without one keep the whole budget."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fuse.evaluation import cut_at_stop, generate_greedy

    assert cut_at_stop("a b\nc\n", ["\n", " "]) == "a" and cut_at_stop("abc", ["\n"]) == "abc"
    tokenizer = AutoTokenizer.from_pretrained(zoo.models["pivot"])
    model = AutoModelForCausalLM.from_pretrained(zoo.models["pivot"]).eval()
    prompts = [i.prompt for i in load_items(zoo.eval_items)[:6]]
    whole = generate_greedy(model, tokenizer, prompts, 12, batch_size=4)
    stops = [("a", "o") if k % 2 else () for k in range(len(prompts))]
    cut = generate_greedy(model, tokenizer, prompts, 12, batch_size=4, stops=stops)
    assert cut == [cut_at_stop(w, s) for w, s in zip(whole, stops, strict=True)]
    assert any(c != w for c, w in zip(cut, whole, strict=True))

    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"skill": "s", "prompt": "p", "answer": "a", "stop": "\n"}) + "\n")
    assert load_items(path)[0].stop == ("\n",)
    path.write_text(json.dumps({"skill": "s", "prompt": "p", "answer": "a", "stop": [""]}) + "\n")
    with pytest.raises(EvaluationError, match=r"items.jsonl:1"):
        load_items(path)


def test_random_weights_score_zero_and_trained_pivot_does_not(zoo: Zoo, tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    random_dir = tmp_path / "random"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(zoo.pivot)).save_pretrained(random_dir)
    AutoTokenizer.from_pretrained(zoo.pivot).save_pretrained(random_dir)
    # every capital item: on 8, one AVX-512 CPU's float kernels gave 5/8 where this one gives 6/8
    items = [item for item in load_items(zoo.eval_items) if item.skill == "capital"]
    texts = load_texts(zoo.heldout_text)[:8]
    metrics = evaluate_models({"pivot": zoo.pivot, "random": random_dir}, items, texts, max_new_tokens=8)
    pivot, random = metrics["models"]["pivot"], metrics["models"]["random"]
    assert random["mean_accuracy"] == 0.0 and pivot["skills"]["capital"] >= 0.6
    assert random["ce_per_byte"] > 2 * pivot["ce_per_byte"]
    # a random model's CE is about that of a uniform guess over the vocabulary, per token
    assert random["ce_per_byte"] > 0.5 * math.log(len(AutoTokenizer.from_pretrained(zoo.pivot))) / 6


def stage_context(zoo: Zoo, tmp_path: Path, cache: Path | None = None, **evaluate):
    """An evaluate StageContext over the zoo recipe (with `cache` as its shared cache); every made model (distill.*,
    merge) is a link to the pivot."""
    from fuse.context import StageContext
    from fuse.dag import build_dag
    from fuse.recipe import load_recipe

    recipe = load_recipe(zoo.recipe)
    stages = recipe.stages.model_copy(
        update={
            "fpo": recipe.stages.fpo.model_copy(update={"enabled": False}),
            "evaluate": recipe.stages.evaluate.model_copy(update=evaluate),
        }
    )
    update = {"stages": stages, "workdir": str(tmp_path / "run")} | ({"cache": str(cache)} if cache else {})
    recipe = recipe.model_copy(update=update)
    instance = build_dag(recipe)["evaluate"]
    inputs = {}
    for parent in instance.parents:
        out = tmp_path / "run" / parent / "out"
        out.mkdir(parents=True)
        if parent != "prepare":
            (out / "model").symlink_to(zoo.pivot, target_is_directory=True)
        inputs[parent] = out
    directory = tmp_path / "run" / "evaluate"
    (directory / "out").mkdir(parents=True)
    return StageContext(recipe=recipe, instance=instance, dir=directory, inputs=inputs)


@pytest.mark.slow
def test_evaluate_stage_writes_metrics_for_every_model(zoo: Zoo, tmp_path):
    from fuse.stages import evaluate

    ctx = stage_context(zoo, tmp_path, max_items_per_skill=4, max_new_tokens=8)
    evaluate.run(ctx)
    metrics = json.loads((ctx.out / "metrics.json").read_text())
    assert metrics["domains"] == sorted(zoo.domains) and set(metrics["limit"]["domain_ce"]) == set(
        zoo.domains
    )
    assert metrics["models"]["merge"]["domain_ce"] == metrics["models"]["pivot"]["domain_ce"]
    expected = {"pivot", "llama", "gpt2", "gemma", "distill.llama", "distill.gpt2", "distill.gemma", "merge"}
    assert set(metrics["models"]) == expected
    assert metrics["models"]["merge"]["skills"] == metrics["models"]["pivot"]["skills"]
    # every made model here is a link to the pivot's folder: evaluated once, the others reuse its results
    made = ("distill.llama", "distill.gpt2", "distill.gemma", "merge")
    assert all(metrics["models"][m]["same_as"] == "pivot" for m in made)
    assert "same_as" not in metrics["models"]["llama"]
    assert (
        metrics["models"]["llama"]["skills"]["translate"] > metrics["models"]["pivot"]["skills"]["translate"]
    )
    table = (ctx.out / "metrics.md").read_text()
    assert "| distill.llama |" in table and "CE/byte" in table and "| limit |" in table
    # every aggregate with its standard error from the items it was computed from
    pivot = metrics["models"]["pivot"]
    assert set(pivot["stderr"]["skills"]) == set(pivot["skills"]) and pivot["stderr"]["ce_per_byte"] > 0
    assert set(pivot["stderr"]["domain_ce"]) == set(zoo.domains) and pivot["stderr"]["mean_domain_ce"] > 0
    row = next(line for line in table.splitlines() if line.startswith("| llama |"))
    assert row.count(" ± ") == len(row.split("|")) - 3, row  # every cell: value ± standard error
    assert (ctx.out / "accuracy.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_models_results_come_back_from_the_cache_on_the_same_data_and_settings(
    zoo: Zoo, tmp_path, monkeypatch
):
    """A rerun (or a variant in its own run store) evaluates only what changed: each model's results are kept in
    the recipe's cache under its weights, tokenizer, configs, the data and the settings; gc keeps those a run
    store names."""
    import dataclasses

    from fuse import evaluation
    from fuse.cache import ArtifactCache, evaluations_named
    from fuse.stages import evaluate

    evaluated = []
    real = evaluation.evaluate_model
    monkeypatch.setattr(
        evaluation, "evaluate_model", lambda spec, *a, **k: evaluated.append(spec.path) or real(spec, *a, **k)
    )

    def run(name: str, **settings):  # noqa: ANN202
        ctx = stage_context(zoo, tmp_path / name, tmp_path / "cache", max_items_per_skill=2, **settings)
        evaluated.clear()
        evaluate.run(ctx)
        return json.loads((ctx.out / "metrics.json").read_text()), list(evaluated)

    first, done = run("first", max_new_tokens=4)
    assert len(done) == 4  # the pivot (every made model links to it) and the three sources
    second, done = run("second", max_new_tokens=4)
    assert done == []
    for name, row in first["models"].items():
        again = second["models"][name]
        assert again["skills"] == row["skills"] and again["ce_per_byte"] == row["ce_per_byte"], name
        assert again["domain_ce"] == row["domain_ce"] and again["stderr"] == row["stderr"], name
        assert again["evaluation_key"] == row["evaluation_key"]
    assert second["models"]["pivot"]["cached"] and "cached" not in first["models"]["pivot"]
    # scores per item too: the paired comparisons of the second run are the first's
    assert (tmp_path / "second/run/evaluate/out/metrics.md").read_text() == (
        tmp_path / "first/run/evaluate/out/metrics.md"
    ).read_text()
    # another setting, another text, one item changed: another key (evaluated again)
    settings = stage_context(zoo, tmp_path / "keys").settings
    items = evaluation.load_items(settings.items, 2)
    asked = evaluate.asked_digest(settings, items, ["a text"], [], [])
    longer = settings.model_copy(update={"max_new_tokens": settings.max_new_tokens + 1})
    changed = [dataclasses.replace(items[0], answer="?"), *items[1:]]
    assert asked == evaluate.asked_digest(settings, list(items), ["a text"], [], [])
    assert len({asked, evaluate.asked_digest(longer, items, ["a text"], [], [])}) == 2
    assert len({asked, evaluate.asked_digest(settings, items, ["b text"], [], [])}) == 2
    assert len({asked, evaluate.asked_digest(settings, changed, ["a text"], [], [])}) == 2

    cache = ArtifactCache(tmp_path / "cache")
    kept = evaluations_named(tmp_path / "first" / "run")
    assert len(kept) == 4 and {p.name for p in cache.entries()} == kept
    other = cache.root / "extract" / ("0" * 64)  # another stage's entry, named by no recipe here
    other.mkdir(parents=True)
    (other / "entry.json").write_text("{}")
    cache.gc(kept)
    assert {p.name for p in cache.entries()} == kept


def test_same_model_key_ignores_the_folder_around_the_weights(zoo: Zoo, tmp_path):
    import shutil

    from fuse.recipe import ModelSpec
    from fuse.stages.evaluate import same_model_key

    copy = tmp_path / "copy"
    shutil.copytree(zoo.pivot, copy)
    (copy / "README.md").write_text("a model card")
    config = json.loads((copy / "config.json").read_text())
    # a trained model's config is saved with the KV cache off by the Trainer's gradient checkpointing
    (copy / "config.json").write_text(json.dumps(config | {"_name_or_path": "elsewhere", "use_cache": False}))
    key = same_model_key(ModelSpec(name="pivot", path=str(zoo.pivot)))
    assert key is not None and same_model_key(ModelSpec(name="copy", path=str(copy))) == key
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert same_model_key(ModelSpec(name="copy", path=str(copy))) != key
    assert same_model_key(ModelSpec(name="hub", path="org/model")) is None


def test_evaluate_stage_fails_early_on_a_missing_items_file(zoo: Zoo, tmp_path):
    from fuse.stages import evaluate

    ctx = stage_context(zoo, tmp_path, items=str(tmp_path / "nope.jsonl"), include=["pivot"])
    with pytest.raises(FileNotFoundError, match="stages.evaluate.items"):
        evaluate.run(ctx)
    assert not (ctx.out / "metrics.json").exists()


def test_validate_reads_the_domain_samples_before_any_work(zoo: Zoo, tmp_path):
    """A bad or missing stages.evaluate.domains file is a problem `fuse validate` names, not an evaluate failure."""
    from fuse.recipe import load_recipe
    from fuse.validate import check_contents, check_files

    recipe = load_recipe(zoo.recipe)
    assert Path(recipe.stages.evaluate.domains) == zoo.heldout_domains
    assert check_contents(recipe) == []
    bad = tmp_path / "domains.jsonl"
    bad.write_text('{"domain": "a", "messages": [{"role": "user", "content": "q"}]}\n')
    evaluate = recipe.stages.evaluate
    broken = recipe.model_copy(
        update={
            "stages": recipe.stages.model_copy(
                update={"evaluate": evaluate.model_copy(update={"domains": str(bad)})}
            )
        }
    )
    assert any("domains.jsonl:1" in p for p in check_contents(broken)), check_contents(broken)
    missing = broken.model_copy(
        update={
            "stages": broken.stages.model_copy(
                update={"evaluate": evaluate.model_copy(update={"domains": str(tmp_path / "nope.jsonl")})}
            )
        }
    )
    assert any(p.startswith("stages.evaluate.domains:") for p in check_files(missing)), check_files(missing)
