"""Merge methods: a registry of small pure functions over the stacked deltas of ONE tensor.

Each method sees the base tensor and Δ_i = θ_i − θ_base for every merged model (float32, shape [n, *shape]) and
returns the merged tensor; the streaming engine (fuse.merging.engine) calls it once per tensor name.

Definitions follow mergekit 0.1.5 wherever mergekit implements the method (our parity tests hold us to it), except
sce, which follows FuseChat's own code (mergekit's variant is sce_mergekit):
  * linear           Σ w_i θ_i / Σ w_i (normalize) — the base takes no part (Wortsman et al. 2022).
  * task_arithmetic  θ_base + λ · Σ w_i Δ_i  (÷ Σ w_i with normalize) (Ilharco et al. 2023).
  * ties             per-model top-`density` magnitude pruning, sign election by the sign of Σ w_i Δ_i, disjoint
                     weighted mean of the agreeing entries (Yadav et al. 2023).
  * dare_linear/ties per-model Bernoulli(`density`) keep mask, then task arithmetic / TIES (Yu et al. 2024).
  * breadcrumbs      drop the top `gamma` largest and the smallest magnitudes so that `density` remains
                     (Davari & Belilovsky 2023), then task arithmetic.
  * sce              FuseChat-2.0 (Wan et al. 2024), as FuseChat's own code does it: Select the top `select_topk`
                     share of entries by variance of Δ across models and Calculate per-model weights = mean
                     squared Δ over the selected entries, normalised over models (selection decides the weights
                     only; no delta is masked); Erase entries whose sign disagrees with the sign of Σ Δ_i;
                     weighted mean of the rest over the agreeing models.
  * sce_mergekit     mergekit's SCE: the same, except the unselected entries of every Δ are erased before
                     the weights and the merge (default select_topk 1.0 = mergekit's = nothing erased).
  * varm             FuseChat-1.0 (Wan et al. 2024): per tensor, w_i ∝ mean(Δ_i²); θ = θ_base + Σ w_i Δ_i
                     (equal weights when no model moved). mergekit has no VaRM.
  * breadcrumbs_ties breadcrumbs' masks, then TIES sign election (mergekit's breadcrumbs_ties).
  * della/_linear    DELLA (Deep et al. 2024): MagPrune keeps each entry with a probability that grows with its
                     magnitude rank in its row, density ± epsilon, then TIES (della) or task arithmetic.
  * slerp            spherical interpolation between the base (t = 0) and exactly one model (t = 1).
  * nuslerp          mergekit's NuSLERP: slerp of exactly two task vectors, t = w_2 / (w_1 + w_2), whole tensor
                     (nuslerp_flatten) or per row/column.
  * model_stock      Model Stock (Jang et al. 2024): θ_base + t·mean(Δ_i), t = k·cos/(1 + (k − 1)·cos) from the
                     mean pairwise cosine of ≥ 2 deltas, per tensor or per row (filter_wise).
  * karcher          the Karcher (Riemannian) mean of the models' directions, scaled by their mean norm.

Where we differ on purpose (and document it):
  * DARE rescaling: the paper rescales kept entries by 1/density; mergekit (`rescale: true`) rescales each
    pruned delta to keep its L1 norm. Ours: `rescale: true` = 1/density (paper), `rescale: "l1"` = mergekit's.
  * DARE masks are drawn from a generator seeded by (seed, tensor name, model index), so a merge is
    reproducible and resumable tensor by tensor; mergekit draws them from torch's global RNG in execution order,
    so the same seed does not give the same masks in both tools (the parity test feeds both the same masks).
  * Magnitude pruning takes the top k with torch.topk; mergekit argsorts. The kept sets differ only on exact
    ties of |Δ| at the threshold.
  * The FuseAI VaRM release script gives every model the same weight (it reads one analysis file for all
    models); ours gives each model its own per-matrix weight, as the paper does.
  * Energy weights fall back to equal weights only when no model moved at all, and an entry no model agrees
    on keeps the base value (divisor 1), as FuseChat's code does; mergekit uses absolute thresholds (1e-6) for
    both, which make realistic fine-tunes (Δ RMS ~1e-4) merge with equal weights. sce_mergekit follows
    FuseChat here too, so it differs from mergekit only below those thresholds.
  * DELLA rescaling and masks as DARE's: `rescale: true` divides each kept entry by its own keep probability
    (DELLA's code), `rescale: "l1"` is mergekit's `rescale: true`; the draws come from the same per (seed, tensor,
    model) generator, so mergekit's global-RNG draws differ (the parity test hands mergekit our draws, while
    mergekit computes its own probabilities). A one-column row keeps with p = density (mergekit divides 0 by 0).
  * Model Stock's cosine takes only a zero norm as undefined (cos 0); mergekit clamps the norm product at 1e-6,
    which shrinks the cosine, and so t, of filter-wise rows of realistic fine-tunes (row Δ norms ~1e-3).
  * One target: the engine copies it (fuse.merging.engine.merge_tensor) for every method that merges any number
    of models, since pruning or re-weighting the only delta can only throw learning away. Methods defined on a
    fixed number of models (slerp: one; nuslerp: two) are applied, and model_stock refuses fewer than two.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fuse.registry import Registry

Tensor = torch.Tensor


class MergeConfigError(ValueError):
    """A merge configuration problem (unknown method, bad parameter), raised before any work."""


@dataclass(frozen=True)
class MethodParams:
    """The resolved parameters of one merge: shared ones plus one value per merged model."""

    shared: dict[str, Any]
    per_model: dict[str, list[float]]  # name -> one value per model, in model order
    seed: int = 0

    def model_values(self, name: str, like: Tensor) -> Tensor:
        """Per-model values shaped [n, 1, …, 1] to broadcast over stacked deltas `like`."""
        values = torch.tensor(self.per_model[name], dtype=like.dtype)
        return values.reshape((len(values),) + (1,) * (like.dim() - 1))


@dataclass
class Merged:
    tensor: Tensor
    kept: float | None = None  # share of delta entries that reached the result
    weights: list[float] | None = None  # per-model weights the method computed (varm, sce)


MethodFn = Callable[[str, Tensor, Tensor, MethodParams], Merged]


REQUIRED: Any = "<required>"  # a shared parameter with no default (slerp's t): the config must give it


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    reference_url: str
    paper: str
    shared: dict[str, Any] = field(default_factory=dict)  # parameter -> default (or REQUIRED)
    per_model: dict[str, float] = field(default_factory=dict)  # parameter -> default
    uses_base: bool = True
    min_models: int = 1  # merged models besides the base
    max_models: int | None = None  # None: any number, and one model is copied unchanged (the engine's rule)


METHODS: Registry[MergeMethod] = Registry("merge method", MergeConfigError, key="method")


def merge_method(
    name: str,
    *,
    reference_url: str,
    paper: str,
    shared: dict[str, Any] | None = None,
    per_model: dict[str, float] | None = None,
    uses_base: bool = True,
    models: tuple[int, int | None] = (1, None),
) -> Callable[[MethodFn], MethodFn]:
    """Register `fn(name, base, deltas, params) -> Merged` under `name`; duplicate names are errors. `models` is
    the (min, max) number of merged models besides the base; a method with a max is applied to a single model."""

    def register(fn: MethodFn) -> MethodFn:
        spec = MergeMethod(
            name, fn, reference_url, paper, dict(shared or {}), dict(per_model or {}), uses_base, *models
        )
        METHODS.add(name, spec)
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    return METHODS.lookup(name)


# --------------------------------------------------------------------------------------------- building blocks
# Methods may overwrite `deltas` (the engine hands over a buffer it no longer needs): in-place steps keep the
# peak at about (models + 2) tensors instead of a new [n, …] stack per step.


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Keep the `density` share of entries with the largest |Δ| (k as mergekit: at least one); ties at the
    threshold are kept in index order. Bool mask."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    magnitude = delta.abs().reshape(-1)
    k = max(1, int(density * magnitude.numel()))
    threshold = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values
    keep = magnitude > threshold
    short = k - int(torch.count_nonzero(keep))
    if short > 0:
        keep[(magnitude == threshold).nonzero().reshape(-1)[:short]] = True
    return keep.reshape(delta.shape)


def outlier_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs: drop the `gamma` share of largest |Δ|, then the smallest, so that `density` remains."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.sort(delta.abs().reshape(-1), descending=False).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[bottom : bottom + keep]] = True
    return mask.reshape(delta.shape)


def tensor_seed(seed: int, name: str, model: int) -> int:
    """A stable seed per (merge seed, tensor, model): masks do not depend on the order tensors are merged in."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{model}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def bernoulli_mask(name: str, model: int, shape: torch.Size, density: float, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(tensor_seed(seed, name, model))
    return torch.bernoulli(torch.full(shape, float(density)), generator=generator)


def prune_(delta: Tensor, mask: Tensor, density: float, rescale: bool | str) -> Tensor:
    """Apply a keep mask in place; rescale by 1/density (DARE paper), to the old L1 norm ("l1", mergekit), or not."""
    before = delta.abs().sum() if rescale == "l1" else None
    delta.mul_(mask)
    if rescale == "l1":
        after = delta.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            delta.mul_(before / after)
    elif rescale and density > 0:
        delta.div_(density)
    return delta


def sign_agreement(weighted: Tensor) -> Tensor:
    """TIES sign election (bool [n, …]): entries whose sign equals that of the summed delta (a zero sum counts
    as +; zero entries never agree)."""
    positive = weighted.sum(dim=0) >= 0
    return torch.where(positive, weighted > 0, weighted < 0)


def weighted_sum(stack: Tensor, weights: list[float] | Tensor) -> Tensor:
    """Σ_i w_i · stack[i] accumulated model by model (no [n, …] temporary)."""
    total = torch.zeros(stack.shape[1:], dtype=stack.dtype if stack.is_floating_point() else torch.float32)
    for row, weight in zip(stack, weights, strict=True):
        total.add_(row if row.is_floating_point() else row.to(total.dtype), alpha=float(weight))
    return total


def combine(base: Tensor, deltas: Tensor, params: MethodParams, consensus: bool) -> Merged:
    """Weighted sum of (pruned) deltas, optionally TIES-masked and normalised: mergekit's task-arithmetic core."""
    weights = params.per_model["weight"]
    deltas.mul_(params.model_values("weight", deltas))
    if consensus:
        agree = sign_agreement(deltas)
        deltas.mul_(agree)
        divisor = weighted_sum(agree, weights)
        divisor[divisor == 0] = 1
        kept = float(torch.count_nonzero(agree)) / max(deltas.numel(), 1)
    else:
        total = torch.tensor(weights, dtype=deltas.dtype).sum()
        divisor = total if total.abs() >= 1e-8 else torch.ones(())
        kept = float(torch.count_nonzero(deltas)) / max(deltas.numel(), 1)
    mixed = deltas.sum(dim=0)
    if params.shared["normalize"]:
        mixed /= divisor
    if params.shared["lambda"] != 1:
        mixed *= params.shared["lambda"]
    return Merged(mixed.add_(base), kept=kept)


# --------------------------------------------------------------------------------------------- methods

_TA_SHARED = {"normalize": False, "lambda": 1.0}

# Defaults keep every target's learning: density 1 for ties/dare/breadcrumbs (mergekit's default). The papers'
# settings (TIES keeps the top 20%, DARE drops up to 90%) erase most of each delta; they are tuned per task and
# on the demo TIES at density 0.3 loses most of what the targets learned (bench/results/merge_ablation.md),
# so they are the user's explicit choice, never a silent default.


@merge_method(
    "linear",
    reference_url="https://arxiv.org/abs/2203.05482",
    paper="Wortsman et al. 2022, Model soups",
    shared={"normalize": True},
    per_model={"weight": 1.0},
    uses_base=False,
)
def linear(name: str, base: Tensor, deltas: Tensor, params: MethodParams) -> Merged:
    weights = params.per_model["weight"]
    result = torch.zeros_like(base)
    for delta, weight in zip(deltas, weights, strict=True):
        result.addcmul_(
            delta.add_(base), torch.tensor(weight, dtype=base.dtype)
        )  # θ_i; the base takes no part
    if params.shared["normalize"]:
        result.div_(sum(weights))
    return Merged(result)


@merge_method(
    "task_arithmetic",
    reference_url="https://arxiv.org/abs/2212.04089",
    paper="Ilharco et al. 2023, Editing models with task arithmetic",
    shared=_TA_SHARED,
    per_model={"weight": 1.0},
)
def task_arithmetic(name: str, base: Tensor, deltas: Tensor, params: MethodParams) -> Merged:
    return combine(base, deltas, params, consensus=False)


@merge_method(
    "ties",
    reference_url="https://arxiv.org/abs/2306.01708",
    paper="Yadav et al. 2023, TIES-Merging",
    shared={"normalize": True, "lambda": 1.0},
    per_model={"weight": 1.0, "density": 1.0},
)
def ties(name: str, base: Tensor, deltas: Tensor, params: MethodParams) -> Merged:
    for delta, density in zip(deltas, params.per_model["density"], strict=True):
        delta.mul_(magnitude_mask(delta, density))
    return combine(base, deltas, params, consensus=True)


def _dare(name: str, base: Tensor, deltas: Tensor, params: MethodParams, consensus: bool) -> Merged:
    rescale = params.shared["rescale"]
    for i, (delta, density) in enumerate(zip(deltas, params.per_model["density"], strict=True)):
        if density < 1:
            prune_(delta, bernoulli_mask(name, i, delta.shape, density, params.seed), density, rescale)
    return combine(base, deltas, params, consensus=consensus)


@merge_method(
    "dare_linear",
    reference_url="https://arxiv.org/abs/2311.03099",
    paper="Yu et al. 2024, Language models are Super Mario (DARE)",
    shared={**_TA_SHARED, "rescale": True},
    per_model={"weight": 1.0, "density": 1.0},
)
def dare_linear(name: str, base: Tensor, deltas: Tensor, params: MethodParams) -> Merged:
    return _dare(name, base, deltas, params, consensus=False)


@merge_method(
    "dare_ties",
    reference_url="https://arxiv.org/abs/2311.03099",
    paper="Yu et al. 2024, Language models are Super Mario (DARE) + TIES sign election",
    shared={**_TA_SHARED, "rescale": True},
    per_model={"weight": 1.0, "density": 1.0},
)
def dare_ties(name: str, base: Tensor, deltas: Tensor, params: MethodParams) -> Merged:
    return _dare(name, base, deltas, params, consensus=True)


@merge_method(
    "breadcrumbs",
    reference_url="https://arxiv.org/abs/2312.06795",
    paper="Davari & Belilovsky 2023, Model Breadcrumbs",
    shared=_TA_SHARED,
    per_model={"weight": 1.0, "density": 1.0, "gamma": 0.01},
)
def breadcrumbs(name: str, base: Tensor, deltas: Tensor, params: MethodParams) -> Merged:
    return _breadcrumbs(deltas, base, params, consensus=False)


def _breadcrumbs(deltas: Tensor, base: Tensor, params: MethodParams, consensus: bool) -> Merged:
    """Each delta without its largest (gamma) and smallest entries (keeping `density`), then combined."""
    for delta, density, gamma in zip(
        deltas, params.per_model["density"], params.per_model["gamma"], strict=True
    ):
        delta.mul_(outlier_mask(delta, density, gamma))
    return combine(base, deltas, params, consensus=consensus)


def variance_mask(deltas: Tensor, topk: float) -> Tensor | None:
    """SCE select (bool): the `topk` share of the entries with non-zero variance across models, largest first;
    None when everything is selected. Both FuseChat and mergekit take k = int(topk · #non-zero variances)."""
    if topk >= 1:
        return None
    variance = torch.var(deltas, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(variance)) * topk) if topk > 0 else 0
    mask = torch.zeros(variance.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(variance.reshape(-1), k, sorted=False).indices] = True
    return mask.reshape(variance.shape)


def energy_weights(deltas: Tensor, selected: Tensor | None = None) -> Tensor:
    """Per-model mean squared delta (over the `selected` entries, the others counting as zero), normalised over
    models; equal weights only when nothing moved at all (FuseChat's `sum_weights == 0`).

    The sums run in float64: fine-tunes move weights by ~1e-4, so squared means are ~1e-8 and an absolute
    threshold such as mergekit's 1e-6 would silently turn every realistic merge into a uniform one.
    """
    energy = torch.stack(
        [
            (delta.square() if selected is None else delta.square().mul_(selected)).sum(dtype=torch.float64)
            / max(delta.numel(), 1)
            for delta in deltas
        ]
    )
    total = float(energy.sum())
    weights = torch.full_like(energy, 1 / len(energy)) if total == 0 else energy / total
    return weights.to(deltas.dtype)


def erase_and_mix(deltas: Tensor, weights: Tensor) -> tuple[Tensor, float]:
    """SCE erase: keep the entries whose sign agrees with the sign of Σ Δ_i, weighted mean over the agreeing
    models. An entry no model agrees on stays at the base (divisor 1, as FuseChat: only an exact zero is
    replaced — a clamp like mergekit's 1e-6 would shrink the update of a model whose weight is below it)."""
    agree = sign_agreement(deltas)
    deltas.mul_(agree)
    divisor = weighted_sum(agree, weights)
    divisor[divisor == 0] = 1
    kept = float(torch.count_nonzero(agree)) / max(deltas.numel(), 1)
    return weighted_sum(deltas, weights).div_(divisor), kept


# select_topk 0.1 is FuseChat-2.0's published setting. In FuseChat's SCE it only picks the entries the weights
# are measured on; every delta is still merged, so no share of any model's learning is erased by it.
@merge_method(
    "sce",
    reference_url="https://arxiv.org/abs/2408.07990",
    paper="Wan et al. 2024, FuseChat: knowledge fusion of chat models (FuseChat-2.0, SCE)",
    shared={"select_topk": 0.1},
)
def sce(name: str, base: Tensor, deltas: Tensor, params: MethodParams) -> Merged:
    weights = energy_weights(deltas, variance_mask(deltas, params.shared["select_topk"]))
    mixed, kept = erase_and_mix(deltas, weights)
    return Merged(mixed.add_(base), kept=kept, weights=weights.tolist())


# mergekit's reading of SCE erases the unselected deltas too: at select_topk 0.1, 90% of every delta is thrown
# away. Its default (1.0, mergekit's) therefore selects everything; lower it only knowingly.
@merge_method(
    "sce_mergekit",
    reference_url="https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/sce.py",
    paper="Wan et al. 2024 (SCE) as mergekit implements it: unselected deltas are erased",
    shared={"select_topk": 1.0},
)
def sce_mergekit(name: str, base: Tensor, deltas: Tensor, params: MethodParams) -> Merged:
    selected = variance_mask(deltas, params.shared["select_topk"])
    if selected is not None:
        deltas.mul_(selected)
    weights = energy_weights(deltas)
    mixed, kept = erase_and_mix(deltas, weights)
    return Merged(mixed.add_(base), kept=kept, weights=weights.tolist())


@merge_method(
    "varm",
    reference_url="https://arxiv.org/abs/2402.16107",
    paper="Wan et al. 2024, FuseChat: knowledge fusion of chat models (FuseChat-1.0, VaRM)",
)
def varm(name: str, base: Tensor, deltas: Tensor, params: MethodParams) -> Merged:
    weights = energy_weights(deltas)
    return Merged(weighted_sum(deltas, weights).add_(base), kept=1.0, weights=weights.tolist())


@merge_method(
    "breadcrumbs_ties",
    reference_url="https://arxiv.org/abs/2312.06795",
    paper="Davari & Belilovsky 2023, Model Breadcrumbs + TIES sign election",
    shared=_TA_SHARED,
    per_model={"weight": 1.0, "density": 1.0, "gamma": 0.01},
)
def breadcrumbs_ties(name: str, base: Tensor, deltas: Tensor, params: MethodParams) -> Merged:
    return _breadcrumbs(deltas, base, params, consensus=True)


def magprune_probs(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune keep probabilities, shaped [rows, cols] (a 1-D tensor is one row): within a row, the entry
    of rank r by |Δ| (1 = smallest) keeps with p = density − ε + 2ε·(r − 1)/(cols − 1), as DELLA's code
    (rank_magnitude) and mergekit (della_magprune) compute it, in the same operations. A one-column row, where
    both divide 0 by 0, keeps with p = density."""
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    if rows.shape[1] < 2:
        return torch.full_like(rows, density)
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(rows.dtype) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def magprune_(
    delta: Tensor, density: float, epsilon: float, rescale: bool | str, generator: torch.Generator
) -> Tensor:
    """DELLA's drop step in place: keep each entry with its MagPrune probability; rescale each kept entry by
    1/its probability (True, DELLA's code), to the old L1 norm ("l1", mergekit's `rescale: true`), or not."""
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    probs = magprune_probs(delta, density, epsilon)
    mask = torch.bernoulli(probs, generator=generator).reshape(delta.shape)
    if rescale is True:
        return delta.mul_(mask).div_(probs.reshape(delta.shape))
    return prune_(delta, mask, density, rescale)


def _della(name: str, base: Tensor, deltas: Tensor, params: MethodParams, consensus: bool) -> Merged:
    """MagPrune every delta, then merge as TIES (consensus) or task arithmetic. The draws come from a generator
    seeded by (seed, tensor, model), as DARE's: reproducible and resumable, but not mergekit's draws (torch's
    global RNG in execution order), so equal seeds give different masks in the two tools; everything else (keep
    probabilities, rescaling, merge) is mergekit's, which the parity test checks by handing mergekit our draws."""
    per = params.per_model
    for i, (delta, density, epsilon) in enumerate(zip(deltas, per["density"], per["epsilon"], strict=True)):
        generator = torch.Generator().manual_seed(tensor_seed(params.seed, name, i))
        magprune_(delta, density, epsilon, params.shared["rescale"], generator)
    return combine(base, deltas, params, consensus=consensus)


# DELLA's own settings prune (its paper keeps density ~0.3-0.7); as for DARE and TIES, density defaults to 1 here.
@merge_method(
    "della",
    reference_url="https://arxiv.org/abs/2406.11617",
    paper="Deep et al. 2024, DELLA-Merging: magnitude-based sampling (MagPrune) + TIES sign election",
    shared={"normalize": True, "lambda": 1.0, "rescale": True},
    per_model={"weight": 1.0, "density": 1.0, "epsilon": 0.15},
)
def della(name: str, base: Tensor, deltas: Tensor, params: MethodParams) -> Merged:
    return _della(name, base, deltas, params, consensus=True)


@merge_method(
    "della_linear",
    reference_url="https://arxiv.org/abs/2406.11617",
    paper="Deep et al. 2024, DELLA-Merging: magnitude-based sampling (MagPrune), task arithmetic",
    shared={**_TA_SHARED, "rescale": True},
    per_model={"weight": 1.0, "density": 1.0, "epsilon": 0.15},
)
def della_linear(name: str, base: Tensor, deltas: Tensor, params: MethodParams) -> Merged:
    return _della(name, base, deltas, params, consensus=False)


def slerp_pair(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation from v0 (t = 0) to v1 (t = 1), as mergekit: the angle between the flattened,
    normalised tensors, applied to the tensors themselves; a norm ≤ eps counts as 1, and nearly parallel or
    antiparallel pairs (|cos| > dot_threshold) are interpolated linearly."""
    norm0, norm1 = torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)
    norm0 = torch.where(norm0 > eps, norm0, 1)
    norm1 = torch.where(norm1 > eps, norm1, 1)
    dot = torch.dot(v0.reshape(-1) / norm0, v1.reshape(-1) / norm1).clamp(-1, 1)
    if float(dot.abs()) > dot_threshold:
        return v0 * (1 - t) + v1 * t
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return v0 * (torch.sin((1 - t) * theta) / sin_theta) + v1 * (torch.sin(t * theta) / sin_theta)


@merge_method(
    "slerp",
    reference_url="https://en.wikipedia.org/wiki/Slerp",
    paper="Shoemake 1985, spherical linear interpolation, between the base (t = 0) and one model (t = 1)",
    shared={"t": REQUIRED},
    models=(1, 1),
)
def slerp(name: str, base: Tensor, deltas: Tensor, params: MethodParams) -> Merged:
    return Merged(slerp_pair(params.shared["t"], base, deltas[0].add_(base)))


def nuslerp_pair(t: float, v0: Tensor, v1: Tensor, dim: int, flatten: bool, eps: float = 1e-8) -> Tensor:
    """mergekit's NuSLERP of two tensors: over the whole flattened tensor, or along `dim` (one slerp per slice);
    exactly (anti)parallel vectors are interpolated linearly."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    unit0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    unit1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(unit0 * unit1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


@merge_method(
    "nuslerp",
    reference_url="https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/nuslerp.py",
    paper="mergekit's NuSLERP: spherical interpolation of two task vectors, t = w_2 / (w_1 + w_2)",
    shared={"nuslerp_row_wise": False, "nuslerp_flatten": True},
    per_model={"weight": 1.0},
    models=(2, 2),
)
def nuslerp(name: str, base: Tensor, deltas: Tensor, params: MethodParams) -> Merged:
    first, second = params.per_model["weight"]
    t = 0.5 if abs(first + second) < 1e-6 else second / (first + second)
    dim = 0 if params.shared["nuslerp_row_wise"] else -1
    return Merged(base + nuslerp_pair(t, deltas[0], deltas[1], dim, params.shared["nuslerp_flatten"]))


def stock_ratio(cos: Tensor, k: int) -> Tensor:
    """Model Stock's interpolation ratio t = k·cos / (1 + (k − 1)·cos) (Jang et al. 2024, eq. 4); 0 (the base)
    where the denominator vanishes, as mergekit."""
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0, k * cos / torch.where(singular, 1, denominator))


@merge_method(
    "model_stock",
    reference_url="https://arxiv.org/abs/2403.19522",
    paper="Jang et al. 2024, Model Stock: all we need is just a few fine-tuned models",
    shared={"filter_wise": False},
    models=(2, None),
)
def model_stock(name: str, base: Tensor, deltas: Tensor, params: MethodParams) -> Merged:
    filter_wise = params.shared["filter_wise"]
    # filter-wise: one cosine, and one t, per row of the last dimension; else one for the whole tensor
    vectors = deltas if filter_wise else deltas.reshape(len(deltas), -1)
    norms = torch.linalg.vector_norm(vectors, dim=-1)
    cosines = []
    for i in range(len(vectors)):
        for j in range(i + 1, len(vectors)):
            product = norms[i] * norms[j]
            dot = (vectors[i] * vectors[j]).sum(dim=-1)
            cosine = torch.where(product > 0, dot / torch.where(product > 0, product, 1), 0)
            cosines.append(cosine.clamp(-1, 1))
    t = stock_ratio(torch.stack(cosines).mean(dim=0), len(vectors))
    mean = deltas.sum(dim=0).div_(len(deltas))
    return Merged(mean.mul_(t.unsqueeze(-1) if filter_wise else t).add_(base))


def karcher_mean(tensors: Tensor, max_iter: int, tol: float) -> Tensor:
    """mergekit's Karcher mean: the equal-weight Riemannian mean of the flattened tensors' directions on the unit
    sphere (fixed-point iterations until the tangent step is below `tol`), scaled by the mean norm. Tensors with a
    norm ≤ tol take no part in the direction."""
    alpha = 1 / len(tensors)
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    valid = [i for i, norm in enumerate(norms) if float(norm) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    units = [tensors[i] / norms[i] for i in valid]
    share = 1 / len(valid)
    mean = torch.zeros_like(units[0])
    for unit in units:
        mean += share * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for unit in units:
            dot = torch.clamp(torch.dot(mean.reshape(-1), unit.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += share * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if float(tangent_norm) < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    return sum(alpha * norm for norm in norms) * mean


@merge_method(
    "karcher",
    reference_url="https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/karcher.py",
    paper="Karcher mean of the models' weights on the unit sphere (Riemannian centre of mass), as mergekit",
    shared={"max_iter": 10, "tol": 1e-5},
    uses_base=False,
)
def karcher(name: str, base: Tensor, deltas: Tensor, params: MethodParams) -> Merged:
    models = deltas.add_(base)  # θ_i; the base takes no part (mergekit-format configs list it as a model)
    return Merged(karcher_mean(models, params.shared["max_iter"], params.shared["tol"]))


# --------------------------------------------------------------------------------------------- parameters


def _count_problem(method: MergeMethod, count: int) -> str | None:
    low, high = method.min_models, method.max_models
    if low <= count and (high is None or count <= high):
        return None
    if high == 1:
        wanted = "exactly one model besides base_model (it interpolates between the two)"
    elif low == high:
        wanted = f"exactly {low} models besides base_model"
    else:
        wanted = f"at least {low} models besides base_model"
    return f"models: {method.name} merges {wanted}; got {count}"


def _check_shared_type(key: str, default: Any, value: Any) -> None:
    if key == "rescale":
        if value not in (True, False, "l1", "inverse_density"):
            raise MergeConfigError(
                "parameters.rescale: true/'inverse_density' (paper), 'l1' (mergekit) or false"
            )
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise MergeConfigError(f"parameters.{key}: must be true or false, got {value!r}")
    elif isinstance(default, int) and not isinstance(default, bool):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MergeConfigError(f"parameters.{key}: must be a whole number ≥ 1, got {value!r}")
    elif not isinstance(value, int | float) or isinstance(value, bool):  # numbers, and required ones (t)
        raise MergeConfigError(f"parameters.{key}: must be a number, got {value!r}")


def resolve_params(
    method: MergeMethod, shared: dict[str, Any], per_model: list[dict[str, Any]], seed: int = 0
) -> MethodParams:
    """Fill defaults and reject unknown or ill-typed parameters and a wrong number of models, naming the YAML key."""
    unknown = sorted(set(shared) - set(method.shared))
    if unknown:
        raise MergeConfigError(
            f"parameters: {method.name} does not take {unknown}; it takes {sorted(method.shared)}"
        )
    missing = sorted(
        key for key, default in method.shared.items() if default is REQUIRED and key not in shared
    )
    if missing:
        raise MergeConfigError(f"parameters.{missing[0]}: {method.name} needs it (it has no default)")
    problem = _count_problem(method, len(per_model))
    if problem:
        raise MergeConfigError(problem)
    values = {**method.shared, **shared}
    for key, value in values.items():
        _check_shared_type(key, method.shared[key], value)
    if values.get("rescale") == "inverse_density":
        values["rescale"] = True
    columns: dict[str, list[float]] = {key: [] for key in method.per_model}
    for index, model_params in enumerate(per_model):
        bad = sorted(set(model_params) - set(method.per_model))
        if bad:
            raise MergeConfigError(
                f"models[{index}].parameters: {method.name} does not take {bad} per model; "
                f"it takes {sorted(method.per_model)}"
            )
        for key, default in method.per_model.items():
            value = model_params.get(key, default)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise MergeConfigError(f"models[{index}].parameters.{key}: must be a number, got {value!r}")
            if key in ("density", "gamma", "epsilon") and not 0 <= value <= 1:
                raise MergeConfigError(f"models[{index}].parameters.{key}: must be in [0, 1], got {value}")
            columns[key].append(float(value))
        if "epsilon" in columns:  # DELLA: every keep probability density ± epsilon must lie in (0, 1)
            density, epsilon = columns["density"][-1], columns["epsilon"][-1]
            if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
                raise MergeConfigError(
                    f"models[{index}].parameters: {method.name} keeps entries with probabilities density ± "
                    f"epsilon, which must lie in (0, 1); got density {density}, epsilon {epsilon}"
                )
    return MethodParams(values, columns, seed)
