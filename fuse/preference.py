"""InfiFPO's preference math: length-normalized sequence log-probs, probability clipping, the fusion of the sources'
scores into one reference, the DPO-style loss and its statistics; plus the reader that joins score tables on pair ids.

Notation (Gu et al. 2025, InfiFPO, arXiv:2505.13878): for a pair (x, y_w, y_l) and a model m, l_m(y) is the summed
log-prob of response y under m in m's own tokenizer and chat template, n_m(y) its token count, b(y) its byte count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fuse.data.scores import SCORE_COLUMNS, ScoreError
from fuse.registry import Registry

NORMALIZATIONS = ("tokens", "bytes", "none")


# --------------------------------------------------------------------------------------------- normalization


def default_beta(normalization: str) -> float:
    """The paper's scripts: beta 2.5 on length-normalized log-probs, 0.1 on summed ones."""
    return 0.1 if normalization == "none" else 2.5


def normalizer(tokens: np.ndarray, num_bytes: np.ndarray, normalization: str) -> np.ndarray:
    """What a summed log-prob is divided by: n_m(y) (tokens), b(y) (bytes) or 1 (none)."""
    if normalization == "tokens":
        return np.asarray(tokens, dtype=np.float64)
    if normalization == "bytes":
        return np.asarray(num_bytes, dtype=np.float64)
    if normalization == "none":
        return np.ones(len(tokens), dtype=np.float64)
    raise ValueError(f"unknown normalization {normalization!r}; known: {', '.join(NORMALIZATIONS)}")


@dataclass(frozen=True)
class PairScores:
    """One model's normalized log-probs of the chosen and rejected responses of N pairs, [N] each."""

    chosen: np.ndarray
    rejected: np.ndarray

    @property
    def margin(self) -> np.ndarray:
        return self.chosen - self.rejected


def normalized_scores(table: Mapping[str, np.ndarray], normalization: str) -> PairScores:
    """l_m(y) / n_m(y) (or / b(y), or as is) for both responses, from a table with SCORE_COLUMNS."""
    chosen = np.asarray(table["chosen_logp"], np.float64)
    rejected = np.asarray(table["rejected_logp"], np.float64)
    chosen = chosen / normalizer(table["chosen_tokens"], table["chosen_bytes"], normalization)
    rejected = rejected / normalizer(table["rejected_tokens"], table["rejected_bytes"], normalization)
    return PairScores(chosen, rejected)


# --------------------------------------------------------------------------------------------- clipping

CLIPS = ("sides", "margin", "none")


@dataclass(frozen=True)
class Clipped:
    scores: PairScores
    chosen_clipped: np.ndarray  # [..., N] bool: the source scored y_w below p and was raised to p
    rejected_clipped: np.ndarray  # [..., N] bool: the source scored y_l above p and was lowered to p


def clip_to_pivot(source: PairScores, pivot: PairScores) -> Clipped:
    """InfiFPO's probability clipping: a source may only pull toward y_w and away from y_l, never the reverse:
    l~_k(y_w) = max(l_k(y_w), l_p(y_w)), l~_k(y_l) = min(l_k(y_l), l_p(y_l)) (all normalized). `source` may hold
    [K, N] arrays (every source at once) against the pivot's [N]."""
    chosen_clipped = source.chosen < pivot.chosen
    rejected_clipped = source.rejected > pivot.rejected
    scores = PairScores(np.maximum(source.chosen, pivot.chosen), np.minimum(source.rejected, pivot.rejected))
    return Clipped(scores, chosen_clipped, rejected_clipped)


def clip_margin(source: PairScores, pivot: PairScores) -> Clipped:
    """Clipping at the margin, the only thing the loss reads of the reference: where a source's margin
    l_k(y_w) - l_k(y_l) is below the pivot's, the source's pair is replaced by the pivot's (both terms count as
    clipped); elsewhere it is kept as it is. Unlike per-side clipping, a source that finds both responses unlikely
    cannot borrow the pivot's l_p(y_w) and keep its own low l_k(y_l): its margin is never inflated."""
    below = source.margin < pivot.margin
    chosen = np.where(below, pivot.chosen, source.chosen)
    rejected = np.where(below, pivot.rejected, source.rejected)
    return Clipped(PairScores(chosen, rejected), below, below.copy())


def clipped(source: PairScores, pivot: PairScores, clip: str) -> Clipped:
    """The sources' scores under the recipe's clip (sides: the paper's per-response clip; margin; none)."""
    if clip == "sides":
        return clip_to_pivot(source, pivot)
    if clip == "margin":
        return clip_margin(source, pivot)
    if clip == "none":
        none = np.zeros(np.shape(source.chosen), dtype=bool)
        return Clipped(source, none, none.copy())
    raise ValueError(f"unknown clip {clip!r}; known: {', '.join(CLIPS)}")


# --------------------------------------------------------------------------------------------- fusion registry


@dataclass(frozen=True)
class Fused:
    """The fused reference l_fu for N pairs, and which source each pair's reference came from (-1: several/none)."""

    reference: PairScores
    picked: np.ndarray  # [N] int


# fn(own [K, N], clipped [K, N], pivot [N], weights [K]) -> Fused: `own` are the sources' unclipped normalized
# scores (who knows what), `clipped` the same after the recipe's clip (what the reference may use)
FusionFn = Callable[[PairScores, PairScores, PairScores, np.ndarray], Fused]


@dataclass(frozen=True)
class PairFusion:
    name: str
    fn: FusionFn
    reference: str
    uses_sources: bool


PAIR_FUSIONS: Registry[PairFusion] = Registry("fpo fusion")


def pair_fusion(name: str, reference: str, uses_sources: bool = True) -> Callable[[FusionFn], FusionFn]:
    """Register `fn(own [K, N], clipped [K, N], pivot, weights [K]) -> Fused`."""

    def register(fn: FusionFn) -> FusionFn:
        PAIR_FUSIONS.add(name, PairFusion(name, fn, reference, uses_sources))
        return fn

    return register


def get_pair_fusion(name: str) -> PairFusion:
    return PAIR_FUSIONS.lookup(name)


@pair_fusion("max_margin", "InfiFPO, Gu et al. 2025 (arXiv:2505.13878), max-margin fusion")
def max_margin(own: PairScores, clipped: PairScores, pivot: PairScores, weights: np.ndarray) -> Fused:
    """Per pair, the source whose *own* margin l_k(y_w) - l_k(y_l) is the largest (the one that knows the pair
    best; ties go to the first source), then that source's clipped scores. Choosing on clipped margins instead
    favours ignorant sources: one that finds both responses unlikely keeps its low l_k(y_l) and borrows the
    pivot's l_p(y_w), so its clipped margin beats the source that knows the answer."""
    picked = np.argmax(own.margin, axis=0)
    columns = np.arange(own.chosen.shape[1])
    return Fused(
        PairScores(clipped.chosen[picked, columns], clipped.rejected[picked, columns]),
        picked.astype(np.int64),
    )


@pair_fusion("mean", "InfiFPO, Gu et al. 2025 (arXiv:2505.13878), average fusion (weighted)")
def weighted_mean(own: PairScores, clipped: PairScores, pivot: PairScores, weights: np.ndarray) -> Fused:
    """The weighted mean of the clipped normalized log-probs, weights normalized to sum to one."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    picked = np.full(own.chosen.shape[1], -1, dtype=np.int64)
    return Fused(PairScores(w @ clipped.chosen, w @ clipped.rejected), picked)


@pair_fusion("none", "DPO, Rafailov et al. 2023 (arXiv:2305.18290), reference = the initial policy", False)
def pivot_only(own: PairScores, clipped: PairScores, pivot: PairScores, weights: np.ndarray) -> Fused:
    """Plain (length-normalized) DPO: l_fu = l_p, the policy at its initial weights."""
    return Fused(
        PairScores(pivot.chosen.copy(), pivot.rejected.copy()), np.full(len(pivot.chosen), -1, np.int64)
    )


@dataclass(frozen=True)
class Reference:
    """The fused reference of N pairs with what the step statistics need."""

    scores: PairScores
    picked: np.ndarray  # [N] index into `sources` (max_margin), else -1
    clipped_terms: np.ndarray  # [N] how many of the 2K source terms clipping changed
    sources: tuple[str, ...]

    @property
    def terms_per_pair(self) -> int:
        return 2 * len(self.sources)


def fused_reference(
    pivot: PairScores,
    sources: Mapping[str, PairScores],
    fusion: str,
    clip: str = "margin",
    weights: Mapping[str, float] | None = None,
) -> Reference:
    """l_fu for every pair: the registered `fusion` over the sources' own scores and their clipped scores
    (`clip`: sides, margin or none)."""
    spec = get_pair_fusion(fusion)
    names = tuple(sources) if spec.uses_sources else ()
    if spec.uses_sources and not names:
        raise ValueError(f"fpo fusion {fusion!r} needs at least one source's scores")
    n = len(pivot.chosen)
    own = PairScores(
        np.array([sources[k].chosen for k in names], np.float64).reshape(len(names), n),
        np.array([sources[k].rejected for k in names], np.float64).reshape(len(names), n),
    )
    cut = clipped(own, pivot, clip)
    clipped_terms = (cut.chosen_clipped.astype(np.int64) + cut.rejected_clipped.astype(np.int64)).sum(axis=0)
    w = np.array([(weights or {}).get(name, 1.0) for name in names], dtype=np.float64)
    fused = spec.fn(own, cut.scores, pivot, w)
    return Reference(fused.reference, fused.picked, clipped_terms, names)


# --------------------------------------------------------------------------------------------- loss


def implicit_rewards(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """beta * (l_theta(y) - l_fu(y)) for y_w and y_l, all normalized the same way."""
    return beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)


def infifpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair loss -log sigmoid(beta * [(l_theta(y_w) - l_fu(y_w)) - (l_theta(y_l) - l_fu(y_l))]) and the margin
    inside it. With label smoothing eps (conservative DPO, Mitchell 2023): (1 - eps) * that + eps * the flipped one."""
    chosen_reward, rejected_reward = implicit_rewards(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta
    )
    margin = chosen_reward - rejected_reward
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, margin


def reward_accuracy(margins: np.ndarray | torch.Tensor, tie: float = 0.0) -> float:
    """The share of pairs whose implicit reward margin beta*[(l_theta(y_w) - l_fu(y_w)) - (l_theta(y_l) - l_fu(y_l))]
    is above `tie`; a tie (e.g. the policy equal to its reference) counts as not preferring y_w. `tie` absorbs
    float round-off where the policy and its reference are the same model scored by two code paths."""
    values = np.asarray(margins.detach().cpu() if isinstance(margins, torch.Tensor) else margins, np.float64)
    return float(np.mean(values > tie)) if values.size else float("nan")


def picked_histogram(picked: np.ndarray, sources: Sequence[str]) -> dict[str, int]:
    """How many pairs took their reference from each source (max_margin)."""
    counts = (
        np.bincount(picked[picked >= 0], minlength=len(sources)) if len(sources) else np.zeros(0, np.int64)
    )
    return {name: int(counts[k]) for k, name in enumerate(sources)}


# --------------------------------------------------------------------------------------------- score tables


def join_scores(
    table: Mapping[str, np.ndarray], ids: Sequence[str], model: str, split: str = "train"
) -> dict:
    """The rows of `table` for `ids`, in that order; one error naming the model and how many rows lack scores."""
    position = {str(i): k for k, i in enumerate(table["id"])}
    missing = [i for i in ids if i not in position]
    if missing:
        raise ScoreError(
            f"score.{model}: {len(missing)} of {len(ids)} {split} preference pairs have no scores "
            f"(e.g. id {missing[0]}); rerun the score stage for {model}"
        )
    rows = np.fromiter((position[i] for i in ids), dtype=np.int64, count=len(ids))
    joined = {c: np.asarray(table[c])[rows] for c in SCORE_COLUMNS}
    check_scores(joined, [str(i) for i in ids], model)
    return joined


def check_scores(joined: Mapping[str, np.ndarray], ids: Sequence[str], model: str) -> None:
    """Scores a reference can use: finite log-probs <= 0 and at least one token and byte per response."""
    for side in ("chosen", "rejected"):
        logp, tokens, nbytes = joined[f"{side}_logp"], joined[f"{side}_tokens"], joined[f"{side}_bytes"]
        bad = ~np.isfinite(logp) | (logp > 1e-4) | (tokens < 1) | (nbytes < 1)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ScoreError(
                f"score.{model}: {int(bad.sum())} pairs have unusable {side} scores (e.g. id {ids[k]}: "
                f"logp={logp[k]}, tokens={tokens[k]}, bytes={nbytes[k]})"
            )
