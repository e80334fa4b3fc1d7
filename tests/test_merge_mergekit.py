"""Parity with mergekit 0.1.5 (the reference implementation) on tiny Llama checkpoints, method by method.

Our `sce` follows FuseChat's code (selection sets the weights only) and has no mergekit counterpart; mergekit's
SCE (selection masks the deltas) is our `sce_mergekit`, compared here.

DARE draws its masks differently in the two tools (mergekit: torch's global RNG in execution order; ours: per
tensor and model), so for dare_* mergekit is handed our masks and the comparison uses mergekit's L1 rescaling
(`rescale: l1`); the paper's 1/density rescaling is checked by hand in test_merge.py. DELLA likewise: mergekit
computes its own keep probabilities (ranks, density ± epsilon), and only its Bernoulli draw is ours: the same
generator, on mergekit's probabilities. A probability that differed from ours would draw a different mask.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from fuse.merging import MergeConfig, run_merge
from fuse.merging.methods import bernoulli_mask, tensor_seed

from merge_models import load_all, make_family

CASES = {  # case: (method, shared parameters, per-model parameters: one entry per merged model)
    "linear": ("linear", {}, [{"weight": 1.0}, {"weight": 0.5}]),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.8}, [{"weight": 0.6}, {"weight": 0.4}]),
    "ties": ("ties", {}, [{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.3}]),
    "dare_linear": ("dare_linear", {}, [{"weight": 0.5, "density": 0.6}, {"weight": 0.5, "density": 0.4}]),
    "dare_ties": (
        "dare_ties",
        {"normalize": True},
        [{"weight": 1.0, "density": 0.5}, {"weight": 0.8, "density": 0.7}],
    ),
    "breadcrumbs": (
        "breadcrumbs",
        {},
        [{"weight": 0.5, "density": 0.8, "gamma": 0.05}, {"weight": 0.5, "density": 0.7}],
    ),
    "breadcrumbs_ties": (
        "breadcrumbs_ties",
        {"normalize": True},
        [{"weight": 1.0, "density": 0.8, "gamma": 0.05}, {"weight": 0.6, "density": 0.6}],
    ),
    "sce_mergekit": ("sce_mergekit", {"select_topk": 0.3}, [{}, {}]),
    "della": (
        "della",
        {"lambda": 1.1},
        [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {"weight": 0.7, "density": 0.4, "epsilon": 0.2}],
    ),
    "della_linear": (
        "della_linear",
        {},
        [{"weight": 0.6, "density": 0.6}, {"weight": 0.5, "density": 0.5, "epsilon": 0.3}, {"weight": 0.4}],
    ),
    "slerp": ("slerp", {"t": 0.3}, [{}]),
    "nuslerp": ("nuslerp", {}, [{"weight": 0.7}, {"weight": 0.3}]),
    "nuslerp_row_wise": (
        "nuslerp",
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        [{"weight": 0.2}, {"weight": 0.6}],
    ),
    "model_stock": ("model_stock", {}, [{}, {}, {}]),
    "model_stock_filter_wise": ("model_stock", {"filter_wise": True}, [{}, {}]),
    "karcher": ("karcher", {}, [{}, {}, {}]),
}
MERGEKIT_NAME = {"sce_mergekit": "sce"}  # our `sce` is FuseChat's, checked against its code in test_merge.py
NO_BASE = {"linear", "karcher"}  # mergekit adds a named base to their inputs; ours never includes it
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    return make_family(tmp_path_factory.mktemp("parity"), n=3, seed=3)


def run_mergekit(config: dict, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(
        cuda=False, lazy_unpickle=False, copy_tokenizer=False, write_model_card=False, quiet=True
    )
    mergekit_merge(MergeConfiguration.model_validate(config), str(out), options)


def mergekit_config(case: str, paths: list[Path]) -> dict:
    method, shared, per = CASES[case]
    config = {
        "merge_method": MERGEKIT_NAME.get(method, method),
        "dtype": "float32",
        "parameters": shared,
        "models": [{"model": str(p), "parameters": per[i]} for i, p in enumerate(paths[1 : 1 + len(per)])],
    }
    if method not in NO_BASE:
        config["base_model"] = str(paths[0])
    return config


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def delta_keys(paths: list[Path], n: int) -> dict[str, tuple[str, int]]:
    """Delta digest -> (tensor name, model index): which of our draws mergekit is handed for that delta."""
    base, models = load_all(paths[0]), [load_all(p) for p in paths[1 : 1 + n]]
    return {
        _digest(m[name] - tensor): (name, i) for name, tensor in base.items() for i, m in enumerate(models)
    }


class _TorchDrawingOurMasks:
    """torch as mergekit.sparsify sees it, except that Bernoulli draws come from `draw`."""

    def __init__(self, draw):  # noqa: ANN001
        self.draw = draw

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(torch, name)

    def bernoulli(self, probs: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        return self.draw(probs)


def hand_mergekit_our_draws(case: str, paths: list[Path], seed: int, monkeypatch) -> None:  # noqa: ANN001
    import mergekit.sparsify as sparsify

    method, _, per = CASES[case]
    keys = delta_keys(paths, len(per))
    if method.startswith("dare"):  # the whole mask is ours (DARE's probability is the density)
        monkeypatch.setattr(
            sparsify,
            "bernoulli",
            lambda tensor, density, rescale_norm=None: sparsify.rescaled_masked_tensor(
                tensor, bernoulli_mask(*keys[_digest(tensor)], tensor.shape, density, seed), rescale_norm
            ),
        )
        return
    current = {}
    della_magprune = sparsify.della_magprune

    def recording(tensor, density, epsilon, rescale_norm=None):  # noqa: ANN001, ANN202
        current["key"] = keys[_digest(tensor)]
        return della_magprune(tensor, density, epsilon, rescale_norm)

    def our_draw(probs: torch.Tensor) -> torch.Tensor:  # mergekit's probabilities, our generator
        return torch.bernoulli(
            probs, generator=torch.Generator().manual_seed(tensor_seed(seed, *current["key"]))
        )

    monkeypatch.setattr(sparsify, "della_magprune", recording)
    monkeypatch.setattr(sparsify, "torch", _TorchDrawingOurMasks(our_draw))


@pytest.mark.parametrize("case", list(CASES))
def test_matches_mergekit(case, family, tmp_path, monkeypatch, record_property):
    method, shared, per = CASES[case]
    if method in RANDOM:
        hand_mergekit_our_draws(case, family, 5, monkeypatch)
        shared = {**shared, "rescale": "l1"}  # mergekit's `rescale: true`
    run_mergekit(mergekit_config(case, family), tmp_path / "mergekit")
    config = MergeConfig(
        base_model=str(family[0]),
        method=method,
        parameters=shared,
        dtype="float32",
        seed=5,
        models=[{"path": str(p), "parameters": per[i]} for i, p in enumerate(family[1 : 1 + len(per)])],
    )
    run_merge(config, tmp_path / "ours")
    ours, theirs = load_all(tmp_path / "ours"), load_all(tmp_path / "mergekit")
    assert ours.keys() == theirs.keys()
    diff = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    base = load_all(family[0])
    moved = max(float((ours[k] - base[k]).abs().max()) for k in ours)
    record_property("max_abs_diff_vs_mergekit", diff)  # the parity list: pytest --junitxml
    assert moved > 1e-3  # the merge did something
    assert diff <= 1e-6, f"{case}: max |ours - mergekit| = {diff}"
