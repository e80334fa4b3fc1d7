"""Shared pytest fixtures: the tiny heterogeneous model zoo, built once and cached across sessions.

The zoo lives in $FUSE_ZOO_DIR (default <repo>/.zoo, gitignored); a session that finds it up to date reuses it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]


def zoo_dir() -> Path:
    return Path(os.environ.get("FUSE_ZOO_DIR", REPO / ".zoo"))


def zoo_seed() -> int:
    """$FUSE_ZOO_SEED: run the suite in another world (its own chains, skills and models) to show that no test
    holds only in the default one (with FUSE_ZOO_DIR pointing at that world's folder)."""
    return int(os.environ.get("FUSE_ZOO_SEED", "0"))


@pytest.fixture(scope="session")
def zoo():
    """A fuse.zoo.Zoo: .models / .pivot / .sources (name -> HF folder), .skills (skill -> owner), .sft,
    .preference, .eval_items, .heldout_text (JSONL paths), .recipe (demo recipe), .tokenizer_names."""
    from fuse.zoo import ZooSettings, build_zoo

    return build_zoo(zoo_dir(), ZooSettings(seed=zoo_seed()))


@pytest.fixture(scope="session")
def real_families():
    """name -> HF folder of each tiny real-family model (tests/real_family.py: real tokenizers, templates and
    vocabulary geometry), built once and cached in $FUSE_REAL_FAMILY_DIR (default <repo>/.cache/real-family)."""
    from real_family import build_real_families

    return build_real_families()


@pytest.fixture
def toy_stage_modules(monkeypatch, request):
    """Run the toy stages (tests/toy_stages.py) in place of the real ones; a test module may name its own
    `STAGE_MODULES` ("stage=module:attr,…") instead."""
    from fuse.plan import stage_module

    from toy_stages import OVERRIDES

    monkeypatch.setenv("FUSE_STAGE_MODULES", getattr(request.module, "STAGE_MODULES", OVERRIDES))
    stage_module.cache_clear()
    yield
    stage_module.cache_clear()
