"""fuse.stats against hand computations: the exact bootstrap distribution of 3 items, Holm by hand, t-table
intervals, coverage on simulated data, and the two-level bootstrap's extra width when seeds differ."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from fuse import stats
from fuse.stats import (
    Difference,
    SeedSummary,
    clustered_bootstrap,
    holm,
    paired_bootstrap,
    ratio,
    seed_summary,
)

# Per-item differences -1, 0.5, 2 (all dyadic, so every bootstrap sum is exact in floating point).
A3 = [0.0, 1.5, 2.5]
B3 = [1.0, 1.0, 0.5]


def exact_bootstrap(diff: list[float], den: list[float]) -> dict[float, float]:
    """value -> probability of the bootstrap replicate sum(diff*)/sum(den*) over all n^n index tuples."""
    n = len(diff)
    counts: Counter[float] = Counter()
    for idx in itertools.product(range(n), repeat=n):
        counts[round(sum(diff[i] for i in idx) / sum(den[i] for i in idx), 12)] += 1
    return {value: count / n**n for value, count in sorted(counts.items())}


def exact_quantile(dist: dict[float, float], q: float) -> float:
    """Smallest support value whose CDF reaches q; asserts q is far from a CDF jump, so a Monte-Carlo
    quantile must land on this very atom."""
    cdf = 0.0
    for value, prob in dist.items():
        assert abs(cdf - q) > 0.01 and abs(cdf + prob - q) > 0.01, "test data puts q on an atom's edge"
        cdf += prob
        if cdf >= q:
            return value
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    "den, p_exact",
    [(None, 20 / 27), ([1.0, 2.0, 4.0], 20 / 27)],
    ids=["mean", "ratio"],
)
@pytest.mark.parametrize("level", [0.95, 0.8])
def test_paired_bootstrap_matches_exact_enumeration(den, p_exact, level):
    diff = [x - y for x, y in zip(A3, B3, strict=True)]
    dist = exact_bootstrap(diff, den or [1.0] * 3)
    # Hand count: replicates <= 0 have probability 10/27 in both cases, >= 0 has 23/27, so p = 2 * 10/27.
    below = sum(p for v, p in dist.items() if v <= 0)
    above = sum(p for v, p in dist.items() if v >= 0)
    assert below == pytest.approx(10 / 27) and above == pytest.approx(23 / 27)
    assert 2 * min(below, above) == pytest.approx(p_exact)

    result = paired_bootstrap(A3, B3, den, resamples=100_000, level=level, seed=1)
    low = exact_quantile(dist, (1 - level) / 2)
    high = exact_quantile(dist, (1 + level) / 2)
    assert min(abs(v - result.low) for v in dist) < 1e-12 and min(abs(v - result.high) for v in dist) < 1e-12
    assert result.low == pytest.approx(low, abs=1e-12)
    assert result.high == pytest.approx(high, abs=1e-12)
    assert abs(result.p_value - p_exact) < 0.02
    assert result.n == 3


def test_exact_quantiles_by_hand():
    # The level-0.8 interval is interior, not just min/max: the 10% and 90% atoms of the enumeration.
    assert paired_bootstrap(A3, B3, resamples=100_000, level=0.8).format() == "0.500 [-0.500, 1.500]"
    ratio_case = paired_bootstrap(A3, B3, [1.0, 2.0, 4.0], resamples=100_000, level=0.8)
    assert (ratio_case.low, ratio_case.high) == pytest.approx((-0.375, 0.45))


def test_ratio_estimate_with_unequal_denominators():
    a, b, den = [2.0, 3.0, 5.0], [1.0, 1.0, 1.0], [1.0, 2.0, 5.0]
    # 10/8 - 3/8: summed numerators over summed bytes, not the mean of per-item ratios (which is 1.2).
    assert ratio(a, den) == pytest.approx(1.25)
    assert ratio(a) == pytest.approx(10 / 3)
    result = paired_bootstrap(a, b, den, resamples=2_000)
    assert result.estimate == pytest.approx(0.875)
    assert result.low > 0 and result.significant


def test_identical_systems_give_zero_and_p_one():
    a = np.random.default_rng(0).normal(size=40)
    result = paired_bootstrap(a, a.copy(), resamples=1_000)
    assert (result.estimate, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert not result.significant


@pytest.mark.parametrize("den", [None, "random"])
def test_constant_shift_gives_zero_width_interval(den):
    rng = np.random.default_rng(1)
    b = rng.normal(size=30)
    den = rng.uniform(1, 3, size=30) if den else None
    # Shifting every item's numerator by c * den shifts the ratio by exactly c in every resample.
    shift = 0.25 * (den if den is not None else np.ones(30))
    result = paired_bootstrap(b + shift, b, den, resamples=1_000)
    assert result.estimate == pytest.approx(0.25, abs=1e-12)
    assert result.low == pytest.approx(0.25, abs=1e-12) and result.high == pytest.approx(0.25, abs=1e-12)
    assert result.high - result.low < 1e-12
    assert result.p_value == pytest.approx(2 / 1_001)


def test_coverage_on_simulated_data():
    rng = np.random.default_rng(2024)
    truth, covered, datasets = 0.3, 0, 200
    for i in range(datasets):
        base = rng.normal(size=50)
        a = base + truth + rng.normal(scale=1.0, size=50)
        b = base + rng.normal(scale=0.5, size=50)
        result = paired_bootstrap(a, b, resamples=1_000, seed=i)
        covered += result.low <= truth <= result.high
    assert 0.88 <= covered / datasets <= 0.99


def test_deterministic_and_chunking_invariant(monkeypatch):
    rng = np.random.default_rng(3)
    a, b, den = rng.normal(size=257), rng.normal(size=257), rng.uniform(1, 2, size=257)
    first = paired_bootstrap(a, b, den, resamples=3_000, seed=7)
    assert paired_bootstrap(a, b, den, resamples=3_000, seed=7) == first
    assert paired_bootstrap(a, b, den, resamples=3_000, seed=8) != first
    # Drawing indices in many small chunks must not change which indices are drawn.
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 1_000)
    assert paired_bootstrap(a, b, den, resamples=3_000, seed=7) == first


def test_paired_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2"):
        paired_bootstrap([1.0], [2.0])
    with pytest.raises(ValueError, match="positive"):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap([1.0, math.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0], level=95)


def test_difference_format_and_significance():
    diff = Difference(-0.0123, -0.0181, -0.0062, 0.001, 10)
    assert diff.format() == "-0.012 [-0.018, -0.006]"
    assert diff.format(digits=2) == "-0.01 [-0.02, -0.01]"
    assert diff.significant
    assert not Difference(0.01, -0.002, 0.02, 0.2, 10).significant


def test_holm_by_hand():
    # Sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04 -> the running max lifts b to 0.06.
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert list(adjusted) == ["a", "b", "c"]
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})


def test_holm_is_monotone_and_capped():
    raw = {"w": 0.5, "x": 0.001, "y": 0.02, "z": 0.021}
    adjusted = holm(raw)
    # 4 * 0.001, 3 * 0.02, max(0.06, 2 * 0.021), max(0.06, 1 * 0.5)
    assert adjusted == pytest.approx({"x": 0.004, "y": 0.06, "z": 0.06, "w": 0.5})
    by_raw = sorted(raw, key=raw.get)
    assert all(adjusted[p] <= adjusted[q] for p, q in itertools.pairwise(by_raw))
    assert all(adjusted[k] >= raw[k] for k in raw)
    assert holm({"a": 0.5, "b": 0.6}) == {"a": 1.0, "b": 1.0}
    assert holm({}) == {}
    with pytest.raises(ValueError, match="'bad'"):
        holm({"bad": 1.5})


def test_seed_summary_by_hand():
    summary = seed_summary([1.0, 2.0, 4.0])
    # mean 7/3; squared deviations (16 + 1 + 25)/9 over 2 df -> sd = sqrt(7/3); t_{0.975, 2} = 4.302653.
    sd = math.sqrt(7 / 3)
    se = sd / math.sqrt(3)
    assert summary.n == 3
    assert summary.mean == pytest.approx(7 / 3)
    assert summary.sd == pytest.approx(sd) and summary.se == pytest.approx(se)
    assert summary.low == pytest.approx(7 / 3 - 4.302653 * se, rel=1e-6)
    assert summary.high == pytest.approx(7 / 3 + 4.302653 * se, rel=1e-6)
    # t_{0.95, 2} = 2.919986 for a 90% interval.
    assert seed_summary([1.0, 2.0, 4.0], level=0.9).high == pytest.approx(7 / 3 + 2.919986 * se, rel=1e-6)
    assert summary.format(2) == f"2.33 [{summary.low:.2f}, {summary.high:.2f}] (sd 1.53, n=3)"


def test_seed_summary_single_seed_and_errors():
    single = seed_summary([0.5])
    assert single.mean == 0.5 and single.n == 1
    assert all(math.isnan(x) for x in (single.sd, single.se, single.low, single.high))
    assert isinstance(single, SeedSummary)
    with pytest.raises(ValueError, match="non-empty"):
        seed_summary([])


def test_clustered_with_one_item_per_unit_is_bootstrap_of_unit_means():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.2, 1.0, size=12), rng.normal(0.0, 1.0, size=12)
    units = [([x], [y], None) for x, y in zip(a, b, strict=True)]
    clustered = clustered_bootstrap(units, resamples=20_000, seed=3)
    assert clustered.estimate == pytest.approx(float(np.mean(a - b)))
    assert clustered.n == 12
    # Same bootstrap distribution as resampling the 12 unit differences; only the random stream differs.
    flat = paired_bootstrap(a, b, resamples=20_000, seed=4)
    width = flat.high - flat.low
    assert clustered.low == pytest.approx(flat.low, abs=0.03 * width)
    assert clustered.high == pytest.approx(flat.high, abs=0.03 * width)
    assert clustered.p_value == pytest.approx(flat.p_value, abs=0.02)


def test_clustered_estimate_averages_unit_ratios():
    units = [
        ([2.0, 3.0], [1.0, 1.0], [1.0, 3.0]),  # 5/4 - 2/4 = 0.75
        ([1.0, 1.0, 4.0], [1.0, 2.0, 1.0], [2.0, 2.0, 4.0]),  # 6/8 - 4/8 = 0.25
    ]
    result = clustered_bootstrap(units, resamples=500)
    assert result.estimate == pytest.approx(0.5)
    assert result.n == 2


def test_clustered_is_wider_when_seeds_differ():
    rng = np.random.default_rng(6)
    offsets = [-0.2, 0.0, 0.1, 0.3, 0.5]
    units = []
    for offset in offsets:
        b = rng.normal(size=60)
        units.append((b + offset + rng.normal(scale=0.1, size=60), b, None))
    pooled = paired_bootstrap(
        np.concatenate([u[0] for u in units]), np.concatenate([u[1] for u in units]), resamples=2_000
    )
    clustered = clustered_bootstrap(units, resamples=2_000)
    assert clustered.estimate == pytest.approx(pooled.estimate)
    # Item noise (sd 0.1 over 300 items) is tiny next to the seed-to-seed spread of the offsets.
    assert clustered.high - clustered.low > 3 * (pooled.high - pooled.low)
    assert pooled.significant and not clustered.significant


def test_clustered_is_deterministic():
    rng = np.random.default_rng(7)
    units = [(rng.normal(size=n), rng.normal(size=n), rng.uniform(1, 2, size=n)) for n in (5, 9, 14)]
    first = clustered_bootstrap(units, resamples=1_000, seed=11)
    assert clustered_bootstrap(units, resamples=1_000, seed=11) == first
    assert clustered_bootstrap(units, resamples=1_000, seed=12) != first


def test_clustered_rejects_bad_input():
    good = ([1.0, 2.0], [0.0, 1.0], None)
    with pytest.raises(ValueError, match="at least 2 units"):
        clustered_bootstrap([good])
    with pytest.raises(ValueError, match="same length"):
        clustered_bootstrap([good, ([1.0, 2.0], [1.0], None)])
    with pytest.raises(ValueError, match="at least 1"):
        clustered_bootstrap([good, ([], [], None)])
    with pytest.raises(ValueError, match="positive"):
        clustered_bootstrap([good, ([1.0], [1.0], [-1.0])])
    with pytest.raises(ValueError, match="resamples"):
        clustered_bootstrap([good, good], resamples=0)


def test_clustered_resamples_items_within_units():
    rng = np.random.default_rng(8)
    a, b = rng.normal(0.1, 1.0, size=80), rng.normal(size=80)
    # Identical units: resampling units alone would give a zero-width interval; the item level must add the
    # within-unit noise, averaged over 3 independent draws (width / sqrt(3)).
    clustered = clustered_bootstrap([(a, b, None)] * 3, resamples=4_000)
    single = paired_bootstrap(a, b, resamples=4_000)
    assert clustered.estimate == pytest.approx(single.estimate)
    ratio_of_widths = (clustered.high - clustered.low) / (single.high - single.low)
    assert ratio_of_widths == pytest.approx(1 / math.sqrt(3), rel=0.15)
