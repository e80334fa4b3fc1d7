"""Code items: the program a completion makes (its code block, or the given prefix continued), run with its tests in
a sandboxed, time-limited subprocess; pass/fail is the item's score."""

from __future__ import annotations

import json

import pytest

from fuse.code_exec import Limits, completion_program, extract_code, run_sandboxed, with_tests
from fuse.evaluation import EvalItem, EvaluationError, item_correct, load_items, skill_accuracy

PREFIX = 'def add(a, b):\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def code_item(**row) -> EvalItem:
    return EvalItem.from_row(
        {
            "skill": "code",
            "prompt": "Complete:\n" + PREFIX,
            "test": TEST,
            "entry_point": "add",
            "prefix": PREFIX,
        }
        | row
    )


def test_extract_code_takes_the_first_fence_or_everything():
    assert extract_code("Here:\n```python\nx = 1\n```\nmore\n```python\ny = 2\n```") == "x = 1\n"
    assert extract_code("```py\nx = 1\n") == "x = 1\n"  # an unclosed fence runs to the end
    assert extract_code("    return a + b\n") == "    return a + b\n"


def test_a_whole_function_stands_alone_a_body_continues_the_prefix():
    whole = "Sure!\n```python\ndef add(a, b):\n    return a + b\n```"
    assert completion_program(PREFIX, whole, "add") == "def add(a, b):\n    return a + b\n"
    assert completion_program(PREFIX, "    return a + b\n", "add") == PREFIX + "    return a + b\n"
    # a helper named like a prefix of the entry point does not count as the function
    assert completion_program(PREFIX, "def adder(a):\n    pass\n", "add").startswith(PREFIX)


def test_sandbox_passes_right_code_and_fails_wrong_code_with_its_reason():
    right = with_tests(PREFIX + "    return a + b\n", TEST, "add")
    wrong = with_tests(PREFIX + "    return a - b\n", TEST, "add")
    assert run_sandboxed(right) == (True, "")
    passed, why = run_sandboxed(wrong)
    assert not passed and why.startswith("AssertionError")
    assert run_sandboxed("def broken(:\n")[1].startswith("SyntaxError")


def test_sandbox_stops_endless_loops_runaway_memory_and_sees_no_environment(monkeypatch):
    assert run_sandboxed("while True:\n    pass\n", Limits(timeout_s=1.5)) == (False, "timeout")
    passed, why = run_sandboxed("x = bytearray(4 * 2**30)\n", Limits(memory_mb=512))
    assert not passed and "MemoryError" in why
    monkeypatch.setenv("FUSE_SECRET_TOKEN", "hf_secret")
    probe = "import os, sys\nsys.exit(1 if 'FUSE_SECRET_TOKEN' in os.environ or os.listdir('.') else 0)\n"
    assert run_sandboxed(probe) == (True, "")  # no inherited token, an empty working directory


def test_code_items_score_by_their_tests():
    item = code_item()
    assert item_correct(item, "```python\ndef add(a, b):\n    return b + a\n```") == 1
    assert item_correct(item, "    return a + b") == 1
    assert item_correct(item, "    return a * b") == 0
    exact = EvalItem("math", "2+2?", "4")
    assert skill_accuracy([item, item, exact], ["    return a + b", "    return 0", " 4 "]) == {
        "code": 0.5,
        "math": 1.0,
    }


def test_a_code_item_without_its_entry_point_is_a_clear_error(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps({"skill": "code", "prompt": "p", "test": TEST}) + "\n")
    with pytest.raises(EvaluationError, match=r"code.jsonl:1: .*entry_point"):
        load_items(path)
    path.write_text(json.dumps({"skill": "code", "prompt": "p", "test": TEST, "entry_point": "add"}) + "\n")
    assert load_items(path)[0].answer == ""


def test_a_continuation_ends_where_the_function_ends():
    body = "    return a + b\n\nprint(add(1, 2))\nassert False\n"
    assert completion_program(PREFIX, body, "add") == PREFIX + "    return a + b\n\n"
    assert item_correct(code_item(chat=False), body) == 1


def test_plain_prompts_are_continued_after_the_document_start(real_families):
    from transformers import AutoTokenizer

    from fuse.evaluation import prompt_ids, text_start_id

    tokenizer = AutoTokenizer.from_pretrained(real_families["llama31"])
    ids = prompt_ids(tokenizer, PREFIX, chat=False)
    assert ids[0] == text_start_id(tokenizer)
    assert tokenizer.decode(ids[1:]) == PREFIX
