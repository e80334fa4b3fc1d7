"""`fuse validate` renders one conversation per model and checks that the contents come back (a template that
drops them would make extract write nothing usable and distill run without a teacher, silently)."""

from __future__ import annotations

import pytest

from fuse.recipe import RecipeError, parse_recipe
from fuse.validate import validate

from recipes import SFT_ROWS, write_jsonl

DROPS_CONTENTS = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n<|im_end|>\n{% endfor %}"
RAISES = "{{ raise_exception('System role not supported') }}"


def recipe(tmp_path, zoo, **source_overrides):
    sft = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    return parse_recipe(
        {
            "name": "t",
            "workdir": str(tmp_path / "run"),
            "pivot": {"path": str(zoo.pivot)},
            "sources": [{"name": "gemma", "path": str(zoo.sources["gemma"]), **source_overrides}],
            "data": {"sft": {"path": str(sft)}},
            "stages": {"score": {"enabled": False}, "fpo": {"enabled": False}},
        }
    )


def test_zoo_templates_pass(tmp_path, zoo):
    validate(recipe(tmp_path, zoo))


def test_a_template_that_drops_contents_is_refused_naming_the_model(tmp_path, zoo):
    with pytest.raises(RecipeError, match=r"sources\[0\]: model 'gemma': the chat template does not write"):
        validate(recipe(tmp_path, zoo, chat_template=DROPS_CONTENTS))


def test_a_template_that_raises_is_refused_naming_the_model(tmp_path, zoo):
    with pytest.raises(RecipeError, match=r"sources\[0\]: .*fails on a plain user/assistant.*System role"):
        validate(recipe(tmp_path, zoo, chat_template=RAISES))
