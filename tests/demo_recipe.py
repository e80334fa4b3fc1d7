"""The shipped demo recipe (examples/tiny-demo.yaml), rewritten for a test: its own workdir, the session's zoo.

Used by the end-to-end tests of the real pipeline, locally (test_demo.py) and through SLURM.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "tiny-demo.yaml"
ZOO_PREFIX = "../.zoo/"  # how the shipped recipe names the zoo (relative to examples/)
SOURCES = ("llama", "gpt2", "gemma")
CONTROLS = ("self_distill", "label_smoothing", "oracle")  # distill's control arms in the demo


def table_rows(sources: tuple[str, ...] = SOURCES, controls: bool = True) -> tuple[str, ...]:
    """The models the demo's result table must show (with `sources` only; without the control arms)."""
    return (
        "pivot",
        *sources,
        *(f"distill.{s}" for s in sources),
        *(f"fpo.{s}" for s in sources),
        *(f"fpo.dpo-{s}" for s in sources if controls),
        "merge",
        "distill.sft_baseline",
        *(f"distill.{c}" for c in CONTROLS if controls),
    )


TABLE_ROWS = table_rows()


def _point_at(value: Any, zoo_root: Path) -> Any:
    """Every ../.zoo/… string, at any depth, becomes the same file under `zoo_root`."""
    if isinstance(value, dict):
        return {key: _point_at(item, zoo_root) for key, item in value.items()}
    if isinstance(value, list):
        return [_point_at(item, zoo_root) for item in value]
    if isinstance(value, str) and value.startswith(ZOO_PREFIX):
        return str(zoo_root / value.removeprefix(ZOO_PREFIX))
    return value


def _set(recipe: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = recipe
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def demo_recipe(
    zoo_root: Path, workdir: Path, path: Path, sources: tuple[str, ...] = SOURCES, **settings: Any
) -> Path:
    """Write the demo recipe to `path` with `workdir` and the zoo at `zoo_root`, with `sources` of the demo's;
    `settings` are dotted keys with "__" for "." (stages__merge__parameters__select_topk=0.7). Returns `path`."""
    recipe = _point_at(yaml.safe_load(DEMO.read_text(encoding="utf-8")), Path(zoo_root).resolve())
    recipe["sources"] = [s for s in recipe["sources"] if s["name"] in sources]
    recipe["workdir"] = str(workdir)
    recipe.pop("cache", None)  # each test computes what it checks (a test that wants a cache sets one)
    relative = [line for line in yaml.safe_dump(recipe).splitlines() if "../" in line]
    assert not relative, f"{DEMO} has paths this helper does not rewrite: {relative}"
    for key, value in settings.items():
        _set(recipe, key.replace("__", "."), value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


DOMAINS = ("garden", "harbor", "market", "weather")  # the zoo's stochastic domains


def check_metrics(metrics: dict[str, Any], rows: tuple[str, ...] = TABLE_ROWS) -> None:
    """evaluate/out/metrics.json has a row per `rows` model: accuracies in [0, 1], a positive finite CE, and per
    domain a finite CE/byte above the domain's limit (which is itself positive and finite)."""
    assert set(rows) <= set(metrics["models"]), sorted(metrics["models"])
    assert metrics["domains"] == list(DOMAINS)
    limits = metrics["limit"]["domain_ce"]
    assert set(limits) == set(DOMAINS) and all(0 < v < math.inf for v in limits.values()), limits
    for name in rows:
        row = metrics["models"][name]
        accuracies = [row["mean_accuracy"], *row["skills"].values()]
        assert set(row["skills"]) == set(metrics["skills"]) and all(0 <= a <= 1 for a in accuracies), name
        assert 0 < row["ce_per_byte"] < math.inf, name
        assert set(row["domain_ce"]) == set(DOMAINS), name
        assert all(limits[d] < row["domain_ce"][d] < math.inf for d in DOMAINS), (name, row["domain_ce"])
        assert row["mean_domain_ce"] == sum(row["domain_ce"].values()) / len(DOMAINS), name
