"""Seeds as an axis of a run: the recipe once per training seed, each in its own run store under the recipe's
workdir, the seed-independent instances (prepare, extract, align, score…) shared through the artifact cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fuse.recipe import Recipe, RecipeError, load_recipe

REPORT = "seeds.md"


def seed_workdir(workdir: str | Path, seed: int) -> Path:
    return Path(workdir) / f"seed-{seed}"


def parse_seeds(text: str) -> list[int]:
    """`--seeds 1,2,3` (or `1-5`)."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            first, _, last = part.partition("-")
            seeds += list(range(int(first), int(last) + 1)) if last else [int(first)]
    except ValueError:
        raise RecipeError(
            f"--seeds {text!r}: a comma-separated list of integers (or ranges like 1-3)"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise RecipeError(f"--seeds {text!r}: give distinct seeds")
    return seeds


def seed_recipes(path: str | Path, overrides: Sequence[str], base: Recipe) -> list[tuple[int, Recipe]]:
    """The recipe at `path` under each of `base.seeds`: its own workdir, the training stages' seed, and the
    recipe's cache (else one beside the seed run stores) so that what does not depend on the seed runs once."""
    cache = base.cache or str(Path(base.workdir) / "cache")
    recipes = []
    for seed in base.seeds:
        changes = [
            f"workdir={seed_workdir(base.workdir, seed)}",
            f"cache={cache}",
            f"stages.distill.seed={seed}",
            f"stages.fpo.seed={seed}",
            "seeds=[]",
        ]
        recipes.append((seed, load_recipe(path, [*overrides, *changes])))
    return recipes


def seed_report(base: Recipe, models: Sequence[str] | None = None) -> str:
    """The seeds' evaluations pooled (fuse.compare.compare_seeds), written to <workdir>/seeds.md."""
    from fuse.compare import compare_seeds
    from fuse.io import write_text_atomic

    runs = [seed_workdir(base.workdir, seed) for seed in base.seeds]
    text = f"# {base.name} over seeds {', '.join(map(str, base.seeds))}\n\n" + compare_seeds(
        runs, models, None
    )
    write_text_atomic(Path(base.workdir) / REPORT, text)
    return text
