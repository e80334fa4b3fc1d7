"""Measurement statistics for comparing models the way a careful paper does: ratio metrics (CE/byte), paired
and seed-clustered bootstrap intervals with p-values, Holm correction, and t-intervals over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as scipy_stats

# Bootstrap index matrices are drawn this many elements at a time (32 MB of int64), so n = 100k items with
# 10k resamples stays bounded in memory instead of materialising a 10^9-entry matrix.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Difference:
    """A difference between two systems with its percentile interval; n = paired items or seed units."""

    estimate: float
    low: float
    high: float
    p_value: float
    n: int

    @property
    def significant(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    def format(self, digits: int = 3) -> str:
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass(frozen=True)
class SeedSummary:
    """Mean over seeds with a t-interval; sd/se/low/high are nan for a single seed."""

    mean: float
    sd: float
    se: float
    low: float
    high: float
    n: int

    def format(self, digits: int = 3) -> str:
        return (
            f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] "
            f"(sd {self.sd:.{digits}f}, n={self.n})"
        )


def ratio(numerators: ArrayLike, denominators: ArrayLike | None = None) -> float:
    """sum(numerators) / sum(denominators); without denominators, the mean. CE/byte is summed NLL over
    summed bytes — not the mean of per-item ratios, which would overweight short items."""
    num = np.asarray(numerators, dtype=np.float64)
    if denominators is None:
        return float(num.sum() / num.size)
    den = np.asarray(denominators, dtype=np.float64)
    if den.shape != num.shape:
        raise ValueError(f"numerators and denominators differ in shape: {num.shape} vs {den.shape}")
    return float(num.sum() / den.sum())


def _paired_items(
    a: ArrayLike, b: ArrayLike, denominators: ArrayLike | None, min_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validated float arrays (a, b, den) of one set of paired items."""
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    den = None if denominators is None else np.asarray(denominators, dtype=np.float64)
    for name, arr in (("a", a_arr), ("b", b_arr), ("denominators", den)):
        if arr is not None and arr.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if a_arr.size != b_arr.size or (den is not None and den.size != a_arr.size):
        sizes = (a_arr.size, b_arr.size, None if den is None else den.size)
        raise ValueError(f"paired inputs must have the same length, got a/b/denominators = {sizes}")
    if a_arr.size < min_items:
        raise ValueError(f"need at least {min_items} paired item(s), got {a_arr.size}")
    if not (np.isfinite(a_arr).all() and np.isfinite(b_arr).all()):
        raise ValueError("a and b must be finite")
    # A resample made only of zero-denominator items would have no defined ratio.
    if den is not None and not (np.isfinite(den).all() and (den > 0).all()):
        raise ValueError("denominators must be finite and positive")
    return a_arr, b_arr, den


def _resampled_ratios(
    diff: np.ndarray, den: np.ndarray | None, count: int, rng: np.random.Generator
) -> np.ndarray:
    """`count` bootstrap replicates of sum(diff)/sum(den): items drawn jointly (one index for both)."""
    n = diff.size
    out = np.empty(count, dtype=np.float64)
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, count, rows):
        stop = min(count, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        total = den[idx].sum(axis=1) if den is not None else n
        out[start:stop] = diff[idx].sum(axis=1) / total
    return out


def _check_settings(resamples: int, level: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")


def _difference(estimate: float, replicates: np.ndarray, level: float, n: int) -> Difference:
    """Percentile interval and two-sided bootstrap p-value of replicates of a difference."""
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    # The +1 counts the observed data as one replicate, so p is never 0 from a finite bootstrap.
    draws = replicates.size + 1
    below = (np.count_nonzero(replicates <= 0) + 1) / draws
    above = (np.count_nonzero(replicates >= 0) + 1) / draws
    p_value = min(1.0, 2 * min(below, above))
    return Difference(float(estimate), float(low), float(high), float(p_value), n)


def paired_bootstrap(
    a: ArrayLike,
    b: ArrayLike,
    denominators: ArrayLike | None = None,
    *,
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> Difference:
    """ratio(a, den) − ratio(b, den) on the same items, with a paired percentile bootstrap interval."""
    _check_settings(resamples, level)
    a_arr, b_arr, den = _paired_items(a, b, denominators, min_items=2)
    estimate = ratio(a_arr, den) - ratio(b_arr, den)
    # Resampling the per-item difference keeps the pairing: a, b and den share every drawn index.
    replicates = _resampled_ratios(a_arr - b_arr, den, resamples, np.random.default_rng(seed))
    return _difference(estimate, replicates, level, a_arr.size)


def clustered_bootstrap(
    units: Sequence[tuple[ArrayLike, ArrayLike, ArrayLike | None]],
    *,
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> Difference:
    """Mean over units (seeds) of each unit's ratio difference, with a two-level bootstrap: units drawn with
    replacement, then items within each drawn unit, so seed-to-seed variation widens the interval."""
    _check_settings(resamples, level)
    if len(units) < 2:
        raise ValueError(f"need at least 2 units (seeds), got {len(units)}")
    items = [_paired_items(a, b, den, min_items=1) for a, b, den in units]
    k = len(items)
    estimate = float(np.mean([ratio(a, den) - ratio(b, den) for a, b, den in items]))
    rng = np.random.default_rng(seed)
    # counts[r, u]: how often replicate r draws unit u; each draw gets its own item-level resample, so a unit
    # drawn twice contributes two independent replicates, as in the nested bootstrap.
    counts = rng.multinomial(k, np.full(k, 1 / k), size=resamples)
    totals = np.zeros(resamples)
    for u, (a, b, den) in enumerate(items):
        owners = np.repeat(np.arange(resamples), counts[:, u])
        draws = _resampled_ratios(a - b, den, owners.size, rng)
        totals += np.bincount(owners, weights=draws, minlength=resamples)
    return _difference(estimate, totals / k, level, k)


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1), keyed like the input."""
    for name, p in p_values.items():
        if not 0 <= p <= 1:
            raise ValueError(f"p-value of {name!r} must lie in [0, 1], got {p}")
    ordered = sorted(p_values, key=lambda name: p_values[name])
    m = len(ordered)
    adjusted: dict[str, float] = {}
    running = 0.0
    for rank, name in enumerate(ordered):
        # The running max keeps a larger raw p from getting a smaller adjusted p than one before it.
        running = max(running, min(1.0, (m - rank) * p_values[name]))
        adjusted[name] = running
    return {name: adjusted[name] for name in p_values}


def seed_summary(values: ArrayLike, level: float = 0.95) -> SeedSummary:
    """Mean over seed units with a Student-t interval on n − 1 degrees of freedom (sd with ddof=1)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"values must be a non-empty one-dimensional sequence, got shape {arr.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
    n, mean = arr.size, float(arr.mean())
    if n == 1:
        return SeedSummary(mean, math.nan, math.nan, math.nan, math.nan, 1)
    sd = float(arr.std(ddof=1))
    se = sd / math.sqrt(n)
    half = float(scipy_stats.t.ppf((1 + level) / 2, df=n - 1)) * se
    return SeedSummary(mean, sd, se, mean - half, mean + half, n)


# --------------------------------------------------------------------------------------------- standard errors


def mean_stderr(values: Sequence[float]) -> float | None:
    """The standard error of a mean over items: their sample SD (n − 1) / √n, as lm-eval computes it for its
    per-sample means (acc, exact_match); None under two items."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def ratio_stderr(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    """The standard error of sum(x)/sum(b) over items (CE/byte: summed NLL over summed bytes), by the delta
    method: √(Σ(x_i − R·b_i)² / (n(n − 1))) / mean(b); None under two items."""
    n = len(numerators)
    total = sum(denominators)
    if n < 2 or total <= 0:
        return None
    ratio = sum(numerators) / total
    spread = sum((x - ratio * b) ** 2 for x, b in zip(numerators, denominators, strict=True))
    return math.sqrt(spread / (n * (n - 1))) / (total / n)


def mean_of_independent_stderr(errors: Sequence[float | None]) -> float | None:
    """The standard error of the plain mean of independent estimates (skills on disjoint items): √Σse² / k."""
    if not errors or any(e is None for e in errors):
        return None
    return math.sqrt(sum(e * e for e in errors)) / len(errors)  # type: ignore[operator]
