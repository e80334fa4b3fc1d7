"""Helpers that write small recipes (and the placeholder model folders they name) for the core tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def fake_model(directory: Path, seed: int = 0) -> Path:
    """A folder that passes the recipe's file checks (config + safetensors) without being a real model."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(
        json.dumps({"model_type": "llama", "vocab_size": 32, "seed": seed})
    )
    (directory / "model.safetensors").write_bytes(bytes([seed]) * 64)
    return directory


SFT_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {i} plus 1?"},
            {"role": "assistant", "content": str(i + 1)},
        ]
    }
    for i in range(20)
]
PREF_ROWS = [{"prompt": f"Say {i}", "chosen": str(i), "rejected": str(i + 7)} for i in range(10)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def toy_recipe(tmp: Path, sources=("a", "b"), **overrides: Any) -> dict[str, Any]:
    models = tmp / "models"
    recipe: dict[str, Any] = {
        "name": "toy",
        "workdir": str(tmp / "run"),
        "pivot": {"path": str(fake_model(models / "pivot"))},
        "sources": [{"name": s, "path": str(fake_model(models / s, i + 1))} for i, s in enumerate(sources)],
        "data": {
            "sft": {"path": str(write_jsonl(tmp / "data" / "sft.jsonl", SFT_ROWS))},
            "preference": {
                "path": str(write_jsonl(tmp / "data" / "pref.jsonl", PREF_ROWS)),
                "format": "preference",
            },
        },
        "stages": {"extract": {"num_shards": 2}},
    }
    for key, value in overrides.items():
        recipe[key] = value
    return recipe


def write_recipe(tmp: Path, recipe: dict[str, Any], name: str = "recipe.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path
