"""InfiFPO math on hand-computed numbers: length normalization, probability clipping, the max_margin / mean / none
fusions, the loss with beta and label smoothing, reward accuracy, and the score-table reader's errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fuse.data.scores import ScoreError, read_scores
from fuse.preference import (
    PAIR_FUSIONS,
    PairScores,
    clip_to_pivot,
    default_beta,
    fused_reference,
    get_pair_fusion,
    infifpo_loss,
    join_scores,
    normalized_scores,
    pair_fusion,
    picked_histogram,
    reward_accuracy,
)


def table(chosen_logp, chosen_tokens, chosen_bytes, rejected_logp, rejected_tokens, rejected_bytes, ids=None):
    n = len(chosen_logp)
    return {
        "id": np.array(ids or [f"r{i}" for i in range(n)], dtype=object),
        "chosen_logp": np.array(chosen_logp, float),
        "chosen_tokens": np.array(chosen_tokens),
        "chosen_bytes": np.array(chosen_bytes),
        "rejected_logp": np.array(rejected_logp, float),
        "rejected_tokens": np.array(rejected_tokens),
        "rejected_bytes": np.array(rejected_bytes),
        "chosen_truncated": np.zeros(n, bool),
        "rejected_truncated": np.zeros(n, bool),
    }


def test_length_normalization_per_token_per_byte_or_none():
    t = table([-6.0, -3.0], [3, 2], [12, 6], [-8.0, -1.0], [4, 1], [10, 5])
    tokens = normalized_scores(t, "tokens")
    np.testing.assert_allclose(tokens.chosen, [-2.0, -1.5])
    np.testing.assert_allclose(tokens.rejected, [-2.0, -1.0])
    per_byte = normalized_scores(t, "bytes")
    np.testing.assert_allclose(per_byte.chosen, [-0.5, -0.5])
    np.testing.assert_allclose(per_byte.rejected, [-0.8, -0.2])
    np.testing.assert_allclose(normalized_scores(t, "none").margin, [2.0, -2.0])
    with pytest.raises(ValueError, match="unknown normalization 'words'"):
        normalized_scores(t, "words")
    assert default_beta("tokens") == 2.5 and default_beta("bytes") == 2.5 and default_beta("none") == 0.1


def test_clipping_only_pulls_toward_chosen_and_away_from_rejected():
    pivot = PairScores(np.array([-1.0, -1.0, -2.0]), np.array([-2.0, -2.0, -1.0]))
    source = PairScores(np.array([-0.5, -1.5, -2.0]), np.array([-2.5, -1.5, -0.5]))
    clipped = clip_to_pivot(source, pivot)
    # pair 0: the source is more confident both ways (kept); pair 1: both terms would pull the wrong way (clipped
    # to p); pair 2: chosen tie (kept, not counted), rejected above p (clipped)
    np.testing.assert_allclose(clipped.scores.chosen, [-0.5, -1.0, -2.0])
    np.testing.assert_allclose(clipped.scores.rejected, [-2.5, -2.0, -1.0])
    assert clipped.chosen_clipped.tolist() == [False, True, False]
    assert clipped.rejected_clipped.tolist() == [False, True, True]


PIVOT = PairScores(np.array([-1.0, -1.0]), np.array([-1.0, -1.0]))
SOURCES = {
    "a": PairScores(np.array([-0.5, -0.9]), np.array([-1.5, -1.2])),  # margins 1.0, 0.3
    "b": PairScores(np.array([-0.2, -0.4]), np.array([-1.0, -2.0])),  # margins 0.8, 1.6
    "c": PairScores(
        np.array([-2.0, -0.1]), np.array([-0.5, -0.3])
    ),  # clipped: chosen->-1.0, rejected->-1.0 / 0.9
}


def test_max_margin_picks_the_source_with_the_largest_own_margin_then_clips_it():
    ref = fused_reference(PIVOT, SOURCES, "max_margin", clip="sides")
    # own margins: a (1.0, 0.3), b (0.8, 1.6), c (-1.5, 0.2): a then b; their clipped scores are their own here
    assert ref.picked.tolist() == [0, 1] and ref.sources == ("a", "b", "c")
    np.testing.assert_allclose(ref.scores.chosen, [-0.5, -0.4])
    np.testing.assert_allclose(ref.scores.rejected, [-1.5, -2.0])
    # clipped terms: c chosen (pair 0), c rejected (pairs 0 and 1) = 3 of 2 pairs x 2 x 3 sources
    assert ref.clipped_terms.tolist() == [2, 1] and ref.terms_per_pair == 6
    assert picked_histogram(ref.picked, ref.sources) == {"a": 1, "b": 1, "c": 0}


def test_max_margin_without_clipping_and_ties_go_to_the_first_source():
    ref = fused_reference(PIVOT, SOURCES, "max_margin", clip="none")
    # unclipped c: pair 0 margin -1.5, pair 1 margin 0.2
    assert ref.picked.tolist() == [0, 1] and ref.clipped_terms.tolist() == [0, 0]
    twins = {"x": SOURCES["a"], "y": SOURCES["a"]}
    assert fused_reference(PIVOT, twins, "max_margin").picked.tolist() == [0, 0]


def test_max_margin_follows_who_knows_not_who_is_clipped_highest():
    pivot = PairScores(np.array([-1.0]), np.array([-1.2]))
    knower = PairScores(np.array([-0.2]), np.array([-3.0]))  # own margin 2.8, kept as it is by clipping
    ignorant = PairScores(
        np.array([-6.0]), np.array([-8.0])
    )  # own margin 2.0; clipped (-1.0, -8.0): margin 7.0
    ref = fused_reference(pivot, {"ignorant": ignorant, "knower": knower}, "max_margin", clip="sides")
    assert ref.picked.tolist() == [1]
    np.testing.assert_allclose([ref.scores.chosen[0], ref.scores.rejected[0]], [-0.2, -3.0])
    # what the per-side clip does to the ignorant source when it is the only one: the margin grows from 2.0 to 7.0
    alone = fused_reference(pivot, {"ignorant": ignorant}, "max_margin", clip="sides")
    np.testing.assert_allclose(alone.scores.margin, [7.0])
    # clipping at the margin keeps its own pair (2.0 > the pivot's 0.2) and never inflates it
    np.testing.assert_allclose(
        fused_reference(pivot, {"ignorant": ignorant}, "max_margin", clip="margin").scores.margin, [2.0]
    )


def test_margin_clip_replaces_a_pair_whose_margin_is_below_the_pivots():
    pivot = PairScores(np.array([-1.0, -1.0]), np.array([-2.0, -2.0]))  # margins 1.0
    source = PairScores(np.array([-3.0, -0.5]), np.array([-3.5, -2.5]))  # margins 0.5 (below), 2.0 (kept)
    ref = fused_reference(pivot, {"s": source}, "mean", clip="margin")
    np.testing.assert_allclose(ref.scores.chosen, [-1.0, -0.5])
    np.testing.assert_allclose(ref.scores.rejected, [-2.0, -2.5])
    assert ref.clipped_terms.tolist() == [2, 0]
    with pytest.raises(ValueError, match="unknown clip 'both'"):
        fused_reference(pivot, {"s": source}, "mean", clip="both")


def test_weighted_mean_of_clipped_scores():
    ref = fused_reference(PIVOT, SOURCES, "mean", clip="sides", weights={"a": 2.0, "b": 1.0, "c": 1.0})
    # clipped chosen: a (-0.5, -0.9), b (-0.2, -0.4), c (-1.0, -0.1); weights 0.5, 0.25, 0.25
    np.testing.assert_allclose(ref.scores.chosen, [-0.55, -0.575])
    # clipped rejected: a (-1.5, -1.2), b (-1.0, -2.0), c (-1.0, -1.0)
    np.testing.assert_allclose(ref.scores.rejected, [-1.25, -1.35])
    assert ref.picked.tolist() == [-1, -1]
    uniform = fused_reference(PIVOT, SOURCES, "mean", clip="none")
    np.testing.assert_allclose(uniform.scores.chosen, [(-0.5 - 0.2 - 2.0) / 3, (-0.9 - 0.4 - 0.1) / 3])


def test_none_is_the_pivot_and_ignores_sources():
    ref = fused_reference(PIVOT, SOURCES, "none")
    np.testing.assert_array_equal(ref.scores.chosen, PIVOT.chosen)
    np.testing.assert_array_equal(ref.scores.rejected, PIVOT.rejected)
    assert ref.sources == () and ref.terms_per_pair == 0
    assert fused_reference(PIVOT, {}, "none").scores.chosen.tolist() == [-1.0, -1.0]
    with pytest.raises(ValueError, match="needs at least one source"):
        fused_reference(PIVOT, {}, "max_margin")


def test_registry_records_papers_and_rejects_duplicates_and_unknown_names():
    assert set(PAIR_FUSIONS) >= {"max_margin", "mean", "none"}
    assert "2505.13878" in get_pair_fusion("max_margin").reference
    assert "2305.18290" in get_pair_fusion("none").reference
    with pytest.raises(ValueError, match="registered twice"):
        pair_fusion("mean", "x")(lambda *a: None)
    with pytest.raises(ValueError, match="unknown fpo fusion 'median'"):
        get_pair_fusion("median")


def test_loss_on_hand_computed_numbers():
    policy_c, policy_r = torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -1.0])
    ref_c, ref_r = torch.tensor([-1.5, -1.0]), torch.tensor([-1.5, -1.0])
    losses, margins = infifpo_loss(policy_c, policy_r, ref_c, ref_r, beta=2.0)
    # pair 0: 2 * ((-1 + 1.5) - (-2 + 1.5)) = 2; pair 1: 0
    torch.testing.assert_close(margins, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(losses, torch.tensor([math.log1p(math.exp(-2.0)), math.log(2.0)]))
    smoothed, _ = infifpo_loss(policy_c, policy_r, ref_c, ref_r, beta=2.0, label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-2.0)) + 0.1 * math.log1p(math.exp(2.0))
    assert smoothed[0].item() == pytest.approx(expected, rel=1e-6)
    assert smoothed[1].item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_loss_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-1.0], requires_grad=True)
    rejected = torch.tensor([-1.0], requires_grad=True)
    losses, _ = infifpo_loss(chosen, rejected, torch.tensor([-1.2]), torch.tensor([-0.8]), beta=2.5)
    losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


def test_reward_accuracy_counts_strictly_positive_margins():
    assert reward_accuracy(np.array([0.5, 0.0, -1.0, 2.0])) == 0.5
    assert reward_accuracy(torch.tensor([0.0, 0.0])) == 0.0
    assert math.isnan(reward_accuracy(np.array([])))


def test_score_reader_joins_on_id_and_names_missing_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = table(
        [-6.0, -3.0, -2.0], [3, 2, 1], [12, 6, 4], [-8.0, -1.0, -2.0], [4, 1, 2], [10, 5, 5], ["x", "y", "z"]
    )
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({k: v[:2] for k, v in t.items()}), tmp_path / "shards" / "00000.parquet")
    pq.write_table(pa.table({k: v[2:] for k, v in t.items()}), tmp_path / "shards" / "00001.parquet")
    scores = read_scores(tmp_path, "llama")
    joined = join_scores(scores, ["z", "x"], "llama")
    assert joined["chosen_logp"].tolist() == [-2.0, -6.0] and joined["rejected_tokens"].tolist() == [2, 4]
    with pytest.raises(ScoreError, match=r"score\.llama: 2 of 3 heldout preference pairs have no scores"):
        join_scores(scores, ["x", "q1", "q2"], "llama", "heldout")
    with pytest.raises(ScoreError, match=r"score\.gemma: no parquet files"):
        read_scores(tmp_path / "empty", "gemma")


def test_score_reader_rejects_bad_values_and_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = table([-6.0, float("nan")], [3, 2], [12, 6], [-8.0, -1.0], [4, 0], [10, 5], ["x", "y"])
    with pytest.raises(ScoreError, match=r"score\.gpt2: 1 pairs have unusable chosen scores \(e\.g\. id y"):
        join_scores(t, ["x", "y"], "gpt2")
    pq.write_table(pa.table({"id": ["x"], "chosen_logp": [-1.0]}), tmp_path / "s.parquet")
    with pytest.raises(ScoreError, match="has no column"):
        read_scores(tmp_path, "gpt2")
