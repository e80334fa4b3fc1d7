"""The real prepare stage on local JSONL: normalization, drops with reasons, deterministic split, bad input."""

from __future__ import annotations

import json

import pytest

from fuse.data.prepared import Dropped, is_heldout, load_split, preference_row, sft_messages
from fuse.executor import run
from fuse.recipe import RecipeError, parse_recipe

from recipes import PREF_ROWS, SFT_ROWS, toy_recipe, write_jsonl

BAD_SFT = [
    {"messages": []},
    {"messages": [{"role": "user", "content": "hi"}]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "   "}]},
    {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    SFT_ROWS[0],  # a duplicate
]


def _prepare(tmp_path, sft_rows=None, **data):
    recipe = toy_recipe(tmp_path)
    if sft_rows is not None:
        write_jsonl(tmp_path / "data" / "sft.jsonl", sft_rows)
    recipe["data"].update(data)
    recipe["stages"] = {
        "extract": {"enabled": False},
        "align": {"enabled": False},
        "distill": {"enabled": False},
        "fpo": {"enabled": False},
        "merge": {"enabled": False},
        "publish": {"enabled": False},
        "evaluate": {"enabled": False},
        "score": {"enabled": False},
    }
    parsed = parse_recipe(recipe)
    run(parsed, echo=lambda _: None)
    out = tmp_path / "run" / "prepare" / "out"
    return out, json.loads((out / "report.json").read_text())


def test_prepare_normalizes_splits_and_reports(tmp_path):
    out, report = _prepare(tmp_path, SFT_ROWS + BAD_SFT, heldout_fraction=0.25)
    sft = report["sft"]
    assert sft["rows_read"] == 25 and sft["rows_kept"] == 20
    assert sft["dropped"] == {
        "messages is empty or not a list": 1,
        "the conversation does not end with an assistant message": 1,
        "empty assistant response": 1,
        "unknown role 'robot'": 1,
        "duplicate row": 1,
    }
    train, heldout = load_split(out, "sft", "train"), load_split(out, "sft", "heldout")
    assert len(train) + len(heldout) == 20 and len(heldout) > 0
    assert set(train["id"]).isdisjoint(heldout["id"])
    assert train[0]["messages"][-1]["role"] == "assistant"
    prefs = load_split(out, "preference", "train")
    assert set(prefs.column_names) == {"id", "prompt", "chosen", "rejected"}
    assert prefs[0]["prompt"][0]["role"] == "user"
    assert report["preference"]["rows_kept"] == len(PREF_ROWS)


def test_split_is_stable_when_rows_are_added():
    ids = [f"row{i}" for i in range(200)]
    first = {i for i in ids if is_heldout(i, 0.1, 0)}
    assert 5 < len(first) < 40
    assert first == {i for i in ids + ["new1", "new2"] if is_heldout(i, 0.1, 0)} - {"new1", "new2"}
    assert first != {i for i in ids if is_heldout(i, 0.1, 1)}  # the seed matters


def test_column_mapping_and_sharegpt(tmp_path):
    rows = [
        {"conv": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(5)
    ]
    write_jsonl(tmp_path / "share.jsonl", rows)
    _out, report = _prepare(
        tmp_path,
        sft={
            "path": str(tmp_path / "share.jsonl"),
            "format": "sharegpt",
            "columns": {"conversations": "conv"},
        },
    )
    assert report["sft"]["rows_kept"] == 5


def test_missing_column_names_key_file_and_row(tmp_path):
    write_jsonl(tmp_path / "odd.jsonl", [{"conversation": []}])
    with pytest.raises(Exception) as info:
        _prepare(tmp_path, sft={"path": str(tmp_path / "odd.jsonl")})
    message = str(info.value)
    assert "data.sft" in message and "odd.jsonl" in message and "row 0" in message and "messages" in message


def test_all_rows_bad_is_an_error(tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", BAD_SFT[:4])
    with pytest.raises(Exception, match="no usable rows"):
        _prepare(tmp_path, sft={"path": str(tmp_path / "bad.jsonl")})


def test_normalizers():
    assert (
        sft_messages({"prompt": "p", "response": "r", "system": "s"}, "prompt_response", {})[0]["role"]
        == "system"
    )
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}]
    row = preference_row({"chosen": conversation, "rejected": "bad"}, {})
    assert row == {"prompt": [{"role": "user", "content": "q"}], "chosen": "good", "rejected": "bad"}
    with pytest.raises(Dropped, match="identical"):
        preference_row({"prompt": "q", "chosen": "same", "rejected": "same"}, {})
    with pytest.raises(Dropped, match="empty"):
        preference_row({"prompt": "q", "chosen": "", "rejected": "x"}, {})
    with pytest.raises(RecipeError):
        raise RecipeError("x")
