"""Parity with mergekit 0.1.5 (the reference implementation) on tiny Llama checkpoints, method by method.

Our `sce` follows FuseChat's code (selection sets the weights only) and has no mergekit counterpart; mergekit's
SCE (selection masks the deltas) is our `sce_mergekit`, compared here.

DARE draws its masks differently in the two tools (mergekit: torch's global RNG in execution order; ours: per
tensor and model), so for dare_* mergekit is handed our masks and the comparison uses mergekit's L1 rescaling
(`rescale: l1`); the paper's 1/density rescaling is checked by hand in test_merge.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from fuse.merging import MergeConfig, run_merge
from fuse.merging.methods import bernoulli_mask
from tests.merge_models import load_all, make_family

CASES = {  # method: (shared parameters, per-model parameters)
    "linear": ({}, [{"weight": 1.0}, {"weight": 0.5}]),
    "task_arithmetic": ({"lambda": 0.8}, [{"weight": 0.6}, {"weight": 0.4}]),
    "ties": ({}, [{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.3}]),
    "dare_linear": ({}, [{"weight": 0.5, "density": 0.6}, {"weight": 0.5, "density": 0.4}]),
    "dare_ties": ({"normalize": True}, [{"weight": 1.0, "density": 0.5}, {"weight": 0.8, "density": 0.7}]),
    "breadcrumbs": ({}, [{"weight": 0.5, "density": 0.8, "gamma": 0.05}, {"weight": 0.5, "density": 0.7}]),
    "sce_mergekit": ({"select_topk": 0.3}, [{}, {}]),
}
MERGEKIT_NAME = {"sce_mergekit": "sce"}  # our `sce` is FuseChat's, checked against its code in test_merge.py


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    return make_family(tmp_path_factory.mktemp("parity"), seed=3)


def run_mergekit(method: str, paths: list[Path], out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_merge
    from mergekit.options import MergeOptions

    shared, per = CASES[method]
    config = {
        "merge_method": MERGEKIT_NAME.get(method, method),
        "dtype": "float32",
        "parameters": shared,
        "models": [{"model": str(p), "parameters": per[i]} for i, p in enumerate(paths[1:])],
    }
    if method != "linear":  # mergekit's linear ignores a base; ours never includes it
        config["base_model"] = str(paths[0])
    options = MergeOptions(
        cuda=False, lazy_unpickle=False, copy_tokenizer=False, write_model_card=False, quiet=True
    )
    mergekit_merge(MergeConfiguration.model_validate(config), str(out), options)


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def our_dare_masks(method: str, paths: list[Path], seed: int) -> dict[str, torch.Tensor]:
    """Delta digest -> the mask our merge draws for that (tensor, model): what mergekit is handed."""
    base, models = load_all(paths[0]), [load_all(p) for p in paths[1:]]
    densities = [p["density"] for p in CASES[method][1]]
    return {
        _digest(m[name] - tensor): bernoulli_mask(name, i, tensor.shape, densities[i], seed)
        for name, tensor in base.items()
        for i, m in enumerate(models)
    }


@pytest.mark.parametrize("method", list(CASES))
def test_matches_mergekit(method, family, tmp_path, monkeypatch, record_property):
    import mergekit.sparsify as sparsify

    shared, per = CASES[method]
    if method.startswith("dare"):
        masks = our_dare_masks(method, family, seed=5)
        monkeypatch.setattr(
            sparsify,
            "bernoulli",
            lambda tensor, density, rescale_norm=None: sparsify.rescaled_masked_tensor(
                tensor, masks[_digest(tensor)], rescale_norm
            ),
        )
        shared = {**shared, "rescale": "l1"}
    run_mergekit(method, family, tmp_path / "mergekit")
    config = MergeConfig(
        base_model=str(family[0]),
        method=method,
        parameters=shared,
        dtype="float32",
        seed=5,
        models=[{"path": str(p), "parameters": per[i]} for i, p in enumerate(family[1:])],
    )
    run_merge(config, tmp_path / "ours")
    ours, theirs = load_all(tmp_path / "ours"), load_all(tmp_path / "mergekit")
    assert ours.keys() == theirs.keys()
    diff = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    base = load_all(family[0])
    moved = max(float((ours[k] - base[k]).abs().max()) for k in ours)
    record_property("max_abs_diff_vs_mergekit", diff)  # the parity list: pytest --junitxml
    assert moved > 1e-3  # the merge did something
    assert diff <= 1e-6, f"{method}: max |ours - mergekit| = {diff}"
