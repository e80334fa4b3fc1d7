"""Merge methods on hand-checked tensors, and the streaming engine: in-memory equality, resume, shapes, stage."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fuse.merging import MergeConfig, MergeConfigError, PreflightError, run_merge
from fuse.merging.engine import report_markdown
from fuse.merging.methods import METHODS, bernoulli_mask, get_method, merge_method, resolve_params

from merge_models import load_all, make_family, merge_context, rewrite, save_tokenizer

ALL_METHODS = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "sce",
    "sce_mergekit",
    "varm",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "nuslerp",
    "model_stock",
    "karcher",
]
PARAMS = {  # per method: (shared, per-model) exercising the non-default paths
    "linear": ({}, [{"weight": 1.0}, {"weight": 0.5}]),
    "task_arithmetic": ({"lambda": 0.8}, [{"weight": 0.6}, {"weight": 0.4}]),
    "ties": ({}, [{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.3}]),
    "dare_linear": ({}, [{"weight": 0.5, "density": 0.6}, {"weight": 0.5, "density": 0.4}]),
    "dare_ties": ({"normalize": True}, [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]),
    "breadcrumbs": ({}, [{"weight": 0.5, "density": 0.8, "gamma": 0.05}, {"weight": 0.5, "density": 0.7}]),
    "sce": ({"select_topk": 0.3}, [{}, {}]),
    "sce_mergekit": ({"select_topk": 0.3}, [{}, {}]),
    "varm": ({}, [{}, {}]),
    "breadcrumbs_ties": (
        {},
        [{"weight": 0.5, "density": 0.8, "gamma": 0.05}, {"weight": 0.5, "density": 0.7}],
    ),
    "della": ({}, [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {"weight": 0.7, "density": 0.4}]),
    "della_linear": ({"rescale": "l1"}, [{"weight": 0.6, "density": 0.6}, {"weight": 0.5, "density": 0.5}]),
    "slerp": ({"t": 0.3}, [{}]),
    "nuslerp": ({"nuslerp_flatten": False}, [{"weight": 0.7}, {"weight": 0.3}]),
    "model_stock": ({"filter_wise": True}, [{}, {}]),
    "karcher": ({}, [{}, {}]),
}


def apply(method: str, base, deltas, shared=None, per_model=None, name="t"):  # noqa: ANN001, ANN201
    spec = get_method(method)
    params = resolve_params(spec, shared or {}, per_model or [{} for _ in deltas])
    return spec.fn(name, torch.tensor(base), torch.tensor(deltas), params)


# --------------------------------------------------------------------------------------------- hand-checked


def test_linear_is_weighted_mean_of_models_not_base():
    merged = apply(
        "linear", [9.0, 9.0], [[-8.0, -7.0], [-6.0, -3.0]], per_model=[{"weight": 1}, {"weight": 3}]
    )
    assert torch.allclose(merged.tensor, torch.tensor([2.5, 5.0]))  # θ = [1,2], [3,6]


def test_task_arithmetic_sums_weighted_deltas_times_lambda():
    merged = apply(
        "task_arithmetic",
        [1.0, 1.0],
        [[1.0, -2.0], [3.0, 4.0]],
        {"lambda": 2.0},
        [{"weight": 1.0}, {"weight": 0.5}],
    )
    assert torch.allclose(merged.tensor, torch.tensor([6.0, 1.0]))


def test_ties_prunes_elects_sign_and_takes_disjoint_mean():
    merged = apply(
        "ties",
        [0.0] * 4,
        [[3.0, -1.0, 0.5, -2.0], [-1.0, -2.0, 1.0, 4.0]],
        per_model=[{"density": 0.5}, {"density": 0.5}],
    )
    # pruned: [3,0,0,-2], [0,-2,0,4]; elected signs +,-,+,+; agreeing entries averaged over agreeing models
    assert torch.allclose(merged.tensor, torch.tensor([3.0, -2.0, 0.0, 4.0]))
    assert merged.kept == pytest.approx(3 / 8)


def test_dare_rescales_by_inverse_density_as_in_the_paper():
    base, deltas = torch.zeros(2000), torch.randn(2, 2000)
    shared, per = {}, [{"density": 0.3, "weight": 1.0}, {"density": 0.6, "weight": 0.5}]
    merged = apply("dare_linear", base.tolist(), deltas.tolist(), shared, per, name="layer.w")
    masks = [bernoulli_mask("layer.w", i, deltas[i].shape, p["density"], 0) for i, p in enumerate(per)]
    expected = deltas[0] * masks[0] / 0.3 + 0.5 * deltas[1] * masks[1] / 0.6
    assert torch.allclose(merged.tensor, expected, atol=1e-6)
    assert 0.25 < float(masks[0].mean()) < 0.35 and 0.55 < float(masks[1].mean()) < 0.65
    l1 = apply("dare_linear", base.tolist(), deltas[:1].tolist(), {"rescale": "l1"}, per[:1], name="layer.w")
    assert float(l1.tensor.abs().sum()) == pytest.approx(float(deltas[0].abs().sum()), rel=1e-5)


def test_dare_masks_depend_on_seed_tensor_and_model_only():
    a = bernoulli_mask("x", 0, torch.Size([500]), 0.5, seed=1)
    assert torch.equal(a, bernoulli_mask("x", 0, torch.Size([500]), 0.5, seed=1))
    assert not torch.equal(a, bernoulli_mask("x", 1, torch.Size([500]), 0.5, seed=1))
    assert not torch.equal(a, bernoulli_mask("y", 0, torch.Size([500]), 0.5, seed=1))
    assert not torch.equal(a, bernoulli_mask("x", 0, torch.Size([500]), 0.5, seed=2))


def test_breadcrumbs_drops_outliers_and_smallest():
    delta = [float(v) for v in range(1, 11)]
    merged = apply("breadcrumbs", [0.0] * 10, [delta], per_model=[{"density": 0.5, "gamma": 0.1}])
    assert merged.tensor.tolist() == [0, 0, 0, 0, 5, 6, 7, 8, 9, 0]


def test_sce_mergekit_selects_by_variance_masks_weights_by_energy_and_erases_minority_signs():
    merged = apply(
        "sce_mergekit", [0.0] * 4, [[1.0, 0.1, -2.0, 2.0], [-1.0, 0.3, 1.0, 2.0]], {"select_topk": 0.7}
    )
    # variance [1, .01, 2.25, 0]: 2 of 3 non-zero kept (0 and 2); weights ∝ [5/4, 2/4]; signs +, -: model 1 wins
    assert torch.allclose(merged.tensor, torch.tensor([1.0, 0.0, -2.0, 0.0]))
    assert merged.weights == pytest.approx([1.25 / 1.75, 0.5 / 1.75])


def test_sce_selection_sets_the_weights_only_and_every_delta_is_merged():
    merged = apply("sce", [0.0] * 4, [[1.0, 0.1, -2.0, 2.0], [-1.0, 0.3, 1.0, 2.0]], {"select_topk": 0.7})
    # same selection and weights as above, but unselected entries 1 and 3 are merged too: Σ = [0, .4, -1, 4]
    # elects +, +, -, +; entry 1 = weighted mean of .1 and .3, entry 3 = 2 (both agree)
    w = [1.25 / 1.75, 0.5 / 1.75]
    assert merged.weights == pytest.approx(w)
    assert torch.allclose(merged.tensor, torch.tensor([1.0, 0.1 * w[0] + 0.3 * w[1], -2.0, 2.0]))


def fusechat_sce(base: torch.Tensor, deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Direct transcription of FuseChat's SCE: the FuseChat-2.0 release (FuseAI, FuseChat/mergekit/mergekit/
    merge_methods/sce_merging.py: get_sce_mask, get_sce_weight, get_erase_mask, SCETask.execute)."""
    # select & calculate: the mask touches the weight computation only
    masked = list(deltas)
    if select_topk < 1:
        variance = torch.var(deltas, dim=0, unbiased=False)
        k = int(select_topk * torch.count_nonzero(variance))
        mask = torch.zeros_like(variance)
        if k > 0:
            mask.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = 1
        masked = [delta * mask for delta in deltas]
    weights = [torch.sum(delta**2).item() / delta.numel() for delta in masked]
    total = sum(weights)
    weights = [1.0 / len(weights)] * len(weights) if total == 0 else [w / total for w in weights]
    weights = torch.tensor(weights, dtype=deltas.dtype).reshape(-1, *([1] * (deltas.dim() - 1)))
    # erase: sign of the plain sum of the (unmasked) deltas
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    erased = weights * (deltas.sign() == majority)
    divisor = erased.sum(dim=0)
    divisor[divisor == 0] = 1
    return base + (deltas * erased).sum(dim=0) / divisor


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_sce_equals_a_transcription_of_fusechats_code(select_topk, scale):
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(3, 24, 16, generator=generator, dtype=torch.float64)[0]
    deltas = torch.randn(3, 24, 16, generator=generator, dtype=torch.float64) * scale
    deltas[1, :4] *= 5  # unequal energies, so the weights matter
    deltas[2, 5] = 0  # exact zeros never agree with the elected sign
    expected = fusechat_sce(base, deltas, select_topk)
    merged = apply("sce", base.tolist(), deltas.tolist(), {"select_topk": select_topk})
    assert torch.allclose(merged.tensor, expected.float(), rtol=1e-5, atol=1e-7 * scale)
    moved = (merged.tensor - base.float()).abs()
    assert float(moved.max()) > 0.5 * scale  # no select_topk erases the merge, not even 0


def test_sce_weights_of_realistic_small_deltas_are_not_uniform():
    # chat fine-tunes move weights by ~1e-4 (RMS): squared means ~1e-8, far below mergekit's 1e-6 threshold
    generator = torch.Generator().manual_seed(3)
    deltas = torch.randn(3, 4096, generator=generator, dtype=torch.float64) * torch.tensor(
        [[1e-4], [2e-4], [5e-5]]
    )
    energy = deltas.square().mean(dim=1)
    expected = (energy / energy.sum()).tolist()  # float64 reference; ≈ [0.19, 0.76, 0.05], not 1/3 each
    for method in ("sce", "sce_mergekit", "varm"):
        weights = apply(
            method, [0.0] * 4096, deltas.tolist(), {"select_topk": 1.0} if "sce" in method else {}
        ).weights
        assert weights == pytest.approx(expected, rel=1e-5), method


def test_sce_keeps_a_lone_agreeing_model_whatever_its_weight():
    # entry 1: only model 1 agrees with the elected sign, and its weight (~1e-8) is below mergekit's 1e-6 clamp
    for method in ("sce", "sce_mergekit"):
        merged = apply(method, [0.0, 0.0], [[1.0, 0.0], [0.0, 1e-4]], {"select_topk": 1.0})
        assert merged.tensor.tolist() == pytest.approx([1.0, 1e-4], rel=1e-6), method


def test_defaults_keep_the_delta_that_every_target_agrees_on():
    """With default parameters no method may erase most of a delta all targets share (a little noise apart)."""
    generator = torch.Generator().manual_seed(1)
    shared = torch.randn(2000, generator=generator)
    deltas = shared + 0.05 * torch.randn(3, 2000, generator=generator)
    base = 0.5 * torch.randn(2000, generator=generator)  # karcher and linear average the models' own weights
    for method in METHODS:
        spec = get_method(method)
        count = spec.max_models or 3
        merged = apply(
            method, base.tolist(), deltas[:count].tolist(), {"t": 1.0} if method == "slerp" else {}
        )
        merged.tensor -= base
        share = float(merged.tensor @ shared / (shared @ shared))
        assert share > 0.9, f"{method}: only {share:.2f} of the shared delta survives with the defaults"


def test_varm_weights_by_mean_squared_delta():
    merged = apply("varm", [0.0, 0.0], [[1.0, 1.0], [2.0, 0.0]])
    assert merged.weights == pytest.approx([1 / 3, 2 / 3])
    assert torch.allclose(merged.tensor, torch.tensor([5 / 3, 1 / 3]))
    still = apply("varm", [1.0, 2.0], [[0.0, 0.0], [0.0, 0.0]])
    assert still.weights == [0.5, 0.5] and still.tensor.tolist() == [1.0, 2.0]


def textbook_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Shoemake's slerp, in float64: sin((1 − t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1, cos Ω = v0·v1 / (|v0||v1|)."""
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    omega = math.acos(float(a @ b / (a.norm() * b.norm())))
    return (math.sin((1 - t) * omega) * v0.double() + math.sin(t * omega) * v1.double()) / math.sin(omega)


def test_slerp_is_shoemakes_formula_and_linear_for_parallel_tensors():
    generator = torch.Generator().manual_seed(2)
    base, other = torch.randn(2, 6, 5, generator=generator)
    for t in (0.0, 0.3, 1.0):
        merged = apply("slerp", base.tolist(), [(other - base).tolist()], {"t": t})
        assert torch.allclose(merged.tensor.double(), textbook_slerp(t, base, other), atol=1e-5)
    # parallel, antiparallel: no angle to follow, linear interpolation
    for other in (2.5 * base, -0.5 * base):
        merged = apply("slerp", base.tolist(), [(other - base).tolist()], {"t": 0.3})
        assert torch.allclose(merged.tensor, 0.7 * base + 0.3 * other, atol=1e-6)


def test_nuslerp_interpolates_the_two_task_vectors_at_the_weights_ratio():
    generator = torch.Generator().manual_seed(4)
    base, first, second = torch.randn(3, 8, 4, generator=generator)
    merged = apply(
        "nuslerp", base.tolist(), [first.tolist(), second.tolist()], {}, [{"weight": 1}, {"weight": 3}]
    )
    assert torch.allclose(
        merged.tensor.double(), base.double() + textbook_slerp(0.75, first, second), atol=1e-5
    )
    rows = apply(  # row_wise without flatten: one slerp per column (mergekit's naming), each at t = 0.5
        "nuslerp",
        base.tolist(),
        [first.tolist(), second.tolist()],
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    )
    for column in range(4):
        expected = textbook_slerp(0.5, first[:, column], second[:, column])
        assert torch.allclose(rows.tensor[:, column].double(), base[:, column].double() + expected, atol=1e-5)


def stock_paper(base: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Model Stock (Jang et al. 2024), eq. 4-5 with the cosine averaged over pairs: t = k·cos / (1 + (k − 1)·cos),
    θ = t · mean(θ_i) + (1 − t) · θ_0, in float64."""
    k = len(deltas)
    flat = deltas.double().reshape(k, -1)
    cos = sum(
        float(flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm()))
        for i in range(k)
        for j in range(i + 1, k)
    ) / (k * (k - 1) / 2)
    t = k * cos / (1 + (k - 1) * cos)
    return t * (base.double() + deltas.double()).mean(dim=0) + (1 - t) * base.double()


@pytest.mark.parametrize("scale", [1.0, 1e-5])
def test_model_stock_is_the_papers_interpolation(scale):
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(6, 16, generator=generator)
    shared = torch.randn(6, 16, generator=generator)
    deltas = (shared + 0.8 * torch.randn(3, 6, 16, generator=generator)) * scale  # cos ≈ 0.6 between them
    merged = apply("model_stock", base.tolist(), deltas.tolist())
    assert torch.allclose(merged.tensor.double(), stock_paper(base, deltas), atol=1e-6 * scale + 1e-7)
    rows = apply("model_stock", base.tolist(), deltas.tolist(), {"filter_wise": True})
    for row in range(6):  # filter-wise: each row its own t; tiny rows (norm ~1e-4) keep their true cosine
        expected = stock_paper(base[row], deltas[:, row])
        assert torch.allclose(rows.tensor[row].double(), expected, atol=1e-6 * scale + 1e-7)
    opposed = apply("model_stock", base.tolist(), [deltas[0].tolist(), (-deltas[0]).tolist()])
    assert torch.equal(opposed.tensor, base)  # cos = −1: the denominator vanishes, the base is kept


def della_reference(tensor: torch.Tensor, density: float, epsilon: float, generator) -> torch.Tensor:  # noqa: ANN001
    """DELLA's own code (declare-lab/della, mergekit/mergekit/sparsify.py: rank_magnitude, rescale=True),
    transcribed, with its Bernoulli draw taken from `generator`."""
    if tensor.dim() < 2:
        tensor = tensor.unsqueeze(0)
    tensor_abs = torch.abs(tensor)
    sorted_indices = torch.argsort(tensor_abs, dim=1, descending=False)
    ranking = torch.zeros_like(tensor_abs)
    for i in range(tensor_abs.size(0)):
        ranking[i][sorted_indices[i]] = torch.arange(1, tensor.size(1) + 1, dtype=ranking.dtype)
    range_vals = ranking.max(dim=1, keepdim=True).values - ranking.min(dim=1, keepdim=True).values
    norm_metrics = (ranking - ranking.min(dim=1, keepdim=True).values) / range_vals
    final_probabilities = (density - epsilon) + norm_metrics * (2 * epsilon)
    mask = torch.bernoulli(final_probabilities, generator=generator)
    return (tensor * mask / final_probabilities).squeeze(0)


def test_della_keeps_by_magnitude_rank_and_rescales_by_each_probability_as_dellas_code():
    from fuse.merging.methods import tensor_seed

    generator = torch.Generator().manual_seed(6)
    deltas = torch.randn(2, 40, 50, generator=generator)
    per = [{"density": 0.5, "epsilon": 0.2, "weight": 1.0}, {"density": 0.3, "epsilon": 0.1, "weight": 0.5}]
    merged = apply("della_linear", [[0.0] * 50] * 40, deltas.tolist(), {}, per, name="layer.w")
    expected = sum(
        p["weight"]
        * della_reference(
            deltas[i], p["density"], p["epsilon"], torch.Generator().manual_seed(tensor_seed(0, "layer.w", i))
        )
        for i, p in enumerate(per)
    )
    assert torch.allclose(merged.tensor, expected, atol=1e-5)
    kept = merged.tensor != 0  # larger entries are kept more often: p runs from density − ε to density + ε
    small = deltas[0].abs() < deltas[0].abs().median(dim=1, keepdim=True).values
    assert float(kept[~small].float().mean()) > float(kept[small].float().mean())
    with pytest.raises(
        MergeConfigError, match=r"models\[0\].parameters: della keeps entries .* density 0.1, epsilon 0.15"
    ):
        resolve_params(get_method("della"), {}, [{"density": 0.1}, {}])


def test_karcher_of_two_tensors_is_their_geodesic_midpoint_times_the_mean_norm():
    generator = torch.Generator().manual_seed(8)
    base = torch.zeros(5, 7)
    first, second = torch.randn(2, 5, 7, generator=generator)
    merged = apply("karcher", base.tolist(), [first.tolist(), second.tolist()])
    units = [first / first.norm(), second / second.norm()]
    expected = textbook_slerp(0.5, *units) * (first.norm() + second.norm()).double() / 2
    assert torch.allclose(merged.tensor.double(), expected, atol=1e-4)


def test_methods_refuse_a_wrong_number_of_models_and_a_missing_t(family):
    cases = [
        ("slerp", {"t": 0.5}, 2, "models: slerp merges exactly one model besides base_model .*; got 2"),
        ("nuslerp", {}, 1, "models: nuslerp merges exactly 2 models besides base_model; got 1"),
        ("nuslerp", {}, 3, "models: nuslerp merges exactly 2 models besides base_model; got 3"),
        ("model_stock", {}, 1, "models: model_stock merges at least 2 models besides base_model; got 1"),
        ("slerp", {}, 1, r"parameters.t: slerp needs it \(it has no default\)"),
        ("model_stock", {"filter_wise": "yes"}, 2, "parameters.filter_wise: must be true or false"),
    ]
    for method, shared, count, message in cases:
        with pytest.raises(MergeConfigError, match=message):
            resolve_params(get_method(method), shared, [{}] * count)
    with pytest.raises(ValueError, match="slerp merges exactly one model"):  # before any work, naming the key
        MergeConfig(
            base_model=str(family[0]),
            models=[{"path": str(p)} for p in family[1:]],
            method="slerp",
            parameters={"t": 0.5},
        )


def test_registry_rejects_duplicates_unknown_methods_and_parameters():
    with pytest.raises(ValueError, match="registered twice"):
        merge_method("ties", reference_url="-", paper="-")(lambda *a: None)
    with pytest.raises(MergeConfigError, match="unknown merge method 'tie'"):
        get_method("tie")
    with pytest.raises(MergeConfigError, match="parameters: sce does not take"):
        resolve_params(get_method("sce"), {"density": 0.5}, [{}])
    with pytest.raises(MergeConfigError, match=r"models\[1\].parameters.density: must be in \[0, 1\]"):
        resolve_params(get_method("ties"), {}, [{}, {"density": 2}])
    assert set(ALL_METHODS) <= set(METHODS) and all(m.reference_url and m.paper for m in METHODS.values())


# --------------------------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    paths = make_family(tmp_path_factory.mktemp("family"))
    save_tokenizer(paths[0])
    return paths


def config_for(method: str, paths: list[Path], **extra) -> MergeConfig:
    shared, per = PARAMS[method]
    return MergeConfig(
        base_model=str(paths[0]),
        models=[{"path": str(p), "parameters": per[i]} for i, p in enumerate(paths[1 : 1 + len(per)])],
        method=method,
        parameters=shared,
        **extra,
    )


def in_memory(method: str, paths: list[Path]) -> dict[str, torch.Tensor]:
    spec, (shared, per) = get_method(method), PARAMS[method]
    base, models = load_all(paths[0]), [load_all(p) for p in paths[1 : 1 + len(per)]]
    params = resolve_params(spec, shared, per)
    return {
        name: spec.fn(name, tensor, torch.stack([m[name] - tensor for m in models]), params).tensor
        for name, tensor in base.items()
    }


@pytest.mark.parametrize("method", ALL_METHODS)
def test_streamed_merge_equals_in_memory_merge(method, family, tmp_path):
    report = run_merge(config_for(method, family, max_shard_size="40KB"), tmp_path / "out")
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 3 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    streamed, expected = load_all(tmp_path / "out"), in_memory(method, family)
    assert streamed.keys() == expected.keys()
    assert all(torch.equal(streamed[k], expected[k]) for k in expected)
    assert report["summary"]["merged_tensors"] == len(expected)
    assert (method in ("sce", "sce_mergekit", "varm")) == ("mean_weights" in report["summary"])
    assert "single_target" not in report["summary"]  # slerp's one model is interpolated, not copied


def test_output_is_a_loadable_checkpoint_with_the_base_tokenizer(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_merge(config_for("ties", family, dtype="bfloat16"), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


KILL_AFTER = """
import os, sys
from fuse.merging import checkpoint
from fuse.merging.engine import run_merge
from fuse.merging.config import MergeConfig
written = []
original = checkpoint.ShardWriter.write
def write(self, name, tensor):
    original(self, name, tensor)
    written.append(name)
    if len(written) == int(sys.argv[2]):
        os._exit(137)  # as abrupt as SIGKILL: no cleanup, no finally
checkpoint.ShardWriter.write = write
run_merge(MergeConfig.model_validate_json(sys.argv[1]), sys.argv[3])
"""


def test_resume_after_kill_redoes_only_unwritten_tensors(family, tmp_path, monkeypatch):
    from fuse.merging import engine

    config = config_for("dare_ties", family, max_shard_size="40KB")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER, config.model_dump_json(), "7", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == 137, killed.stderr
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial").is_dir()
    calls = []
    original = engine.merge_tensor
    monkeypatch.setattr(
        engine, "merge_tensor", lambda inputs, plan: calls.append(plan.name) or original(inputs, plan)
    )
    report = run_merge(config, tmp_path / "out")
    total = len(load_all(family[0]))
    assert len(calls) == total - 7
    assert report["summary"]["merged_tensors"] == total  # stats of the killed run's tensors survived
    run_merge(config, tmp_path / "straight")
    resumed, straight = load_all(tmp_path / "out"), load_all(tmp_path / "straight")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert not (tmp_path / ".out.partial").exists()


def test_changed_config_discards_stale_partial_work(family, tmp_path):
    staging = tmp_path / ".out.partial"
    staging.mkdir()
    (staging / "merge-plan.json").write_text('{"key": "another merge"}')
    (staging / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    run_merge(config_for("linear", family), tmp_path / "out")
    assert not any(p.name.startswith("model-0000") for p in (tmp_path / "out").iterdir())


def test_bad_shapes_and_names_are_all_listed_before_any_work(family, tmp_path):
    def bad(state, config):
        for layer in range(2):
            state[f"model.layers.{layer}.mlp.up_proj.weight"] = torch.zeros(100, 64)
        del state["model.norm.weight"]
        state["extra.weight"] = torch.zeros(3)

    wrong = rewrite(family[2], tmp_path / "wrong", bad)
    config = MergeConfig(
        base_model=str(family[0]), models=[{"path": str(family[1])}, {"path": str(wrong)}], method="ties"
    )
    with pytest.raises(PreflightError) as error:
        run_merge(config, tmp_path / "out")
    message = str(error.value)
    for text in [
        "4 mismatch",
        "model.layers.0.mlp.up_proj.weight: wrong has shape [100, 64]",
        "model.layers.1.mlp.up_proj.weight",
        "lacks 1 tensor(s) the base has: model.norm.weight",
        "has 1 tensor(s) the base lacks: extra.weight",
    ]:
        assert text in message
    assert not (tmp_path / ".out.partial").exists() and not (tmp_path / "out").exists()


def _pad_rows(rows: int):  # noqa: ANN202
    def edit(state, config):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            extra = torch.full((rows - state[name].shape[0], state[name].shape[1]), 7.0)
            state[name] = (
                torch.cat([state[name], extra]) if rows > state[name].shape[0] else state[name][:rows]
            )
        config["vocab_size"] = rows

    return edit


def test_padded_vocab_rows_merge_common_rows_and_keep_the_base_rows(family, tmp_path):
    padded_base = rewrite(family[0], tmp_path / "base104", _pad_rows(104))
    longer = rewrite(family[2], tmp_path / "t2-112", _pad_rows(112))
    run_merge(config_for("ties", [padded_base, family[1], longer]), tmp_path / "out", tokenizer_vocab=30)
    run_merge(config_for("ties", family), tmp_path / "plain")
    out, plain = load_all(tmp_path / "out"), load_all(tmp_path / "plain")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == (104, 64)
        assert torch.equal(out[name][:96], plain[name]) and bool((out[name][96:] == 7.0).all())
    assert all(torch.equal(out[k], plain[k]) for k in plain if "embed" not in k and "lm_head" not in k)
    with pytest.raises(PreflightError, match="only 96 rows are common .* tokenizer has 100"):
        run_merge(config_for("ties", [padded_base, family[1], longer]), tmp_path / "bad", tokenizer_vocab=100)


def test_tied_embeddings_stay_tied(tmp_path):
    from transformers import AutoModelForCausalLM

    paths = make_family(tmp_path / "tied", tied=True)
    assert "lm_head.weight" not in load_all(paths[0])
    run_merge(config_for("sce", paths), tmp_path / "out")
    assert "lm_head.weight" not in load_all(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = rewrite(paths[2], tmp_path / "untied", lambda s, c: c.update(tie_word_embeddings=False))
    with pytest.raises(PreflightError, match="tie_word_embeddings: untied has False, the base True"):
        run_merge(
            MergeConfig(
                base_model=str(paths[0]),
                models=[{"path": str(paths[1])}, {"path": str(untied)}],
                method="sce",
            ),
            tmp_path / "bad",
        )


def test_sharded_inputs_are_read_through_their_index(family, tmp_path):
    run_merge(config_for("linear", [family[0], family[0]], max_shard_size="30KB"), tmp_path / "sharded")
    run_merge(config_for("varm", [family[0], tmp_path / "sharded", family[1]]), tmp_path / "out")
    expected = in_memory("varm", [family[0], family[0], family[1]])
    out = load_all(tmp_path / "out")
    assert all(torch.equal(out[k], expected[k]) for k in expected)


def test_cli_merges_from_yaml_and_reports_bad_config(family, tmp_path, capsys):
    from fuse.cli import main

    config = tmp_path / "merge.yaml"
    config.write_text(
        f"base_model: {family[0]}\nmodels:\n  - path: {family[1]}\n    parameters: {{density: 0.5}}\n"
        f"  - path: {family[2]}\nmethod: ties\noutput: out\ndtype: float32\n"
    )
    assert main(["merge", str(config)]) == 0
    assert "delta energy kept: t1 " in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["models"][0]["parameters"]["density"] == 0.5 and report["method"]["name"] == "ties"
    assert (tmp_path / "out" / "merge_report.md").read_text().startswith("# Merge report: ties")
    config.write_text(
        f"base_model: {family[0]}\nmodels: [{{path: {family[1]}}}]\nmethod: sce\n"
        "parameters: {density: 0.5}\noutput: out2\n"
    )
    assert main(["merge", str(config)]) == 2
    assert "parameters: sce does not take ['density']" in capsys.readouterr().out


def test_merge_stage_writes_model_with_pivot_tokenizer_and_report(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fuse.dag import build_dag
    from fuse.recipe import parse_recipe
    from fuse.stages import merge as stage

    (tmp_path / "sft.jsonl").write_text("{}\n")
    recipe = parse_recipe(
        {
            "name": "m",
            "workdir": str(tmp_path / "run"),
            "pivot": {"path": str(family[0])},
            "sources": [{"name": "a", "path": str(family[1])}, {"name": "b", "path": str(family[2])}],
            "data": {"sft": {"path": str(tmp_path / "sft.jsonl")}},
            "stages": {
                "fpo": {"enabled": False},
                "merge": {"method": "varm", "dtype": "float32", "model_parameters": {}},
            },
        }
    )
    parents = build_dag(recipe)["merge"].parents
    ctx = merge_context(recipe, dict(zip(parents, family[1:], strict=True)), tmp_path)
    stage.run(ctx)
    model_dir = ctx.out / "model"
    assert AutoTokenizer.from_pretrained(model_dir).chat_template
    assert (model_dir / "generation_config.json").is_file()
    AutoModelForCausalLM.from_pretrained(model_dir)
    report = json.loads((ctx.out / "merge_report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["a", "b"] and report["method"]["name"] == "varm"
    assert sum(report["summary"]["mean_weights"].values()) == pytest.approx(1.0)
    merge_md = (ctx.out / "merge_report.md").read_text()
    assert "| a · b |" in merge_md  # the diagnostics, which publish puts in the model card
    from fuse.stages.publish import model_card

    card = str(model_card(recipe, [], "0.0", merge_md=merge_md))
    assert "diagnostics" in card.lower() and "| a · b |" in card and "share of its energy surviving" in card


# --------------------------------------------------------------------------------------------- one target, diagnostics


@pytest.mark.parametrize(
    "method", sorted(m for m, s in METHODS.items() if s.min_models == 1 and s.max_models is None)
)
def test_one_target_comes_through_unchanged_whatever_the_method(method, family, tmp_path):
    # parameters that would prune or scale a delta if the method were applied to it
    pruning = {"density": 0.3, "weight": 0.5, "gamma": 0.1}
    spec = get_method(method)
    config = MergeConfig(
        base_model=str(family[0]),
        models=[
            {"path": str(family[1]), "parameters": {k: v for k, v in pruning.items() if k in spec.per_model}}
        ],
        method=method,
        parameters={"select_topk": 0.1} if "select_topk" in spec.shared else {},
        dtype="float32",
    )
    report = run_merge(config, tmp_path / "out")
    merged, target = load_all(tmp_path / "out"), load_all(family[1])
    assert all(torch.equal(merged[k], target[k]) for k in target)
    assert report["summary"]["single_target"] == "t1"
    assert report["diagnostics"]["families"]["all"]["energy_share"]["t1"] == pytest.approx(1.0)


def test_tensor_families_from_names():
    from fuse.merging.diagnostics import tensor_family

    assert tensor_family("model.layers.0.self_attn.q_proj.weight") == "attention"
    assert tensor_family("model.layers.0.post_attention_layernorm.weight") == "norms/other"
    assert tensor_family("model.layers.1.mlp.down_proj.weight") == "mlp"
    assert tensor_family("transformer.h.0.mlp.c_fc.weight") == "mlp"
    assert tensor_family("transformer.h.0.attn.c_attn.weight") == "attention"
    assert tensor_family("transformer.h.0.ln_1.weight") == "norms/other"
    assert tensor_family("model.embed_tokens.weight") == tensor_family("lm_head.weight") == "embeddings/head"
    assert tensor_family("model.norm.weight") == "norms/other"


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_diagnostics_equal_brute_force_sums_over_whole_checkpoints(method, family, tmp_path):
    from fuse.merging.diagnostics import tensor_family

    report = run_merge(config_for(method, family, dtype="float32"), tmp_path / "out")
    base, merged = load_all(family[0]), load_all(tmp_path / "out")
    deltas = [{k: v - base[k] for k, v in load_all(p).items()} for p in family[1:]]
    diagnostics = report["diagnostics"]["families"]
    for fam in ("all", "attention", "mlp", "embeddings/head", "norms/other"):
        names = [k for k in base if fam == "all" or tensor_family(k) == fam]
        flat = [torch.cat([d[k].double().reshape(-1) for k in names]) for d in deltas]
        moved = torch.cat([(merged[k] - base[k]).double().reshape(-1) for k in names])
        got = diagnostics[fam]
        assert got["cosine"]["t1~t2"] == pytest.approx(
            float(flat[0] @ flat[1] / flat[0].norm() / flat[1].norm()), rel=1e-4
        )
        for label, delta in zip(["t1", "t2"], flat, strict=True):
            assert got["delta_norm"][label] == pytest.approx(float(delta.norm()), rel=1e-5)
            assert got["energy_share"][label] == pytest.approx(
                float(moved @ delta / (delta @ delta)), rel=1e-4
            )
    markdown = report_markdown(report)
    assert "## Diagnostics" in markdown and "| t1 · t2 |" in markdown


def test_verdict_flags_far_apart_families_and_dropped_targets():
    from fuse.merging.diagnostics import summarize, tensor_record

    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])  # orthogonal MLP deltas
    merged = (a + b) / 2
    stats = {
        "layers.0.mlp.up_proj.weight": {
            "numel": 3,
            "weights": [0.5, 0.5],
            **tensor_record(
                "layers.0.mlp.up_proj.weight", torch.ones(3), [[1.0, 0.0], [0.0, 1.0]], merged, [0.5, 0.5]
            ),
        }
    }
    diagnostics = summarize(stats, ["a", "b"])
    assert diagnostics["families"]["mlp"]["cosine"]["a~b"] == 0.0
    assert diagnostics["families"]["all"]["energy_share"] == {"a": 0.5, "b": 0.5}
    assert any(line.startswith("mlp: the targets' deltas are far apart") for line in diagnostics["verdict"])
    assert diagnostics["weights"]["mlp"]["a"] == {"mean": 0.5, "min": 0.5, "max": 0.5}
