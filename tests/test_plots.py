"""Plots (fuse.plots): a training log's every series is drawn (losses smoothed over their raw points, the learning
rate on its own axis, a preference run's reward accuracy and margins), and accuracy bars never share a colour.
What is drawn is read back from the matplotlib figure, not from pixels."""

from __future__ import annotations

import pytest
from matplotlib.colors import to_rgba
from matplotlib.container import BarContainer

from fuse import plots


def training_log(steps: int = 40, rewards: bool = False) -> list[dict]:
    """A log as fuse.training.jsonl_logger writes it: train entries with their learning rate, a validation entry."""
    entries = []
    for step in range(1, steps + 1):
        entry = {
            "step": step,
            "loss": 3.0 / step + 0.1 * (step % 3),
            "learning_rate": 1e-5 * min(1.0, step / 5),
        }
        entry |= {"gold_ce": 2.0 / step, "distill": 1.0 / step}
        if rewards:
            entry |= {"rewards/accuracies": min(1.0, step / steps), "rewards/margins": 0.05 * step}
        entries.append(entry)
    return [*entries, {"step": steps, "eval_loss": 0.5}]


def labelled(axis) -> dict[str, list[float]]:
    """label -> y data of every labelled line of an axis."""
    return {
        line.get_label(): list(line.get_ydata())
        for line in axis.get_lines()
        if not line.get_label().startswith("_")
    }


def test_every_loss_series_is_smoothed_over_its_raw_points_and_the_learning_rate_has_its_axis():
    entries = training_log()
    figure = plots.training_figure(entries, "distill.llama")
    loss, rate = figure.axes  # no reward panel without rewards/*
    lines = labelled(loss)
    assert set(lines) == {"loss (smoothed)", "gold_ce (smoothed)", "distill (smoothed)", "eval_loss"}
    raw = [line for line in loss.get_lines() if line.get_label().startswith("_")]
    assert len(raw) == 3 and all(line.get_alpha() == plots.RAW_ALPHA for line in raw)
    assert list(raw[0].get_ydata()) == [e["loss"] for e in entries if "loss" in e]
    assert lines["loss (smoothed)"] == pytest.approx(
        plots.smoothed([e["loss"] for e in entries if "loss" in e])
    )
    assert labelled(rate) == {"learning_rate": [e["learning_rate"] for e in entries if "learning_rate" in e]}
    assert rate.get_ylabel() == "learning rate" and rate.get_shared_x_axes().joined(rate, loss)
    colours = [to_rgba(line.get_color()) for line in loss.get_lines() if not line.get_label().startswith("_")]
    assert len(set(colours)) == len(colours)
    figure.clf()


def test_a_preference_run_shows_reward_accuracy_and_margins_beside_the_loss():
    figure = plots.training_figure(training_log(rewards=True))
    shown = {label for axis in figure.axes for label in labelled(axis)}
    assert {"rewards/accuracies (smoothed)", "rewards/margins (smoothed)", "learning_rate"} <= shown
    accuracy = next(a for a in figure.axes if "rewards/accuracies (smoothed)" in labelled(a))
    assert accuracy.get_ylim() == (-0.05, 1.05)
    figure.clf()


def test_smoothing_is_a_bias_corrected_moving_average():
    assert plots.smoothed([2.0] * 30) == pytest.approx([2.0] * 30)  # no pull towards zero at the start
    step = plots.smoothed([0.0] * 20 + [1.0] * 200, span=10)
    assert step[0] == 0.0 and 0 < step[21] < 0.5 and step[-1] == pytest.approx(1.0, abs=1e-6)
    assert plots.smoothed([1.0, 5.0], span=1) == [1.0, 5.0]


def test_a_short_log_is_drawn_as_it_is():
    figure = plots.training_figure([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    assert labelled(figure.axes[0]) == {"loss": [2.0, 1.5]}
    figure.clf()


@pytest.mark.parametrize("n", [3, 10, 14, 20, 33, 60, 75])
def test_colours_are_distinct(n):
    colours = plots.distinct_colors(n)
    assert len(colours) == n and len({tuple(round(c, 6) for c in colour) for colour in colours}) == n


def test_accuracy_bars_have_a_colour_per_model_and_their_standard_errors(tmp_path):
    models = {
        f"model-{i}": {
            "skills": {"capital": i / 12, "translate": 0.5},
            "stderr": {"skills": {"capital": 0.05, "translate": 0.1}},
        }
        for i in range(12)
    }
    metrics = {"skills": ["capital", "translate"], "models": models}
    figure = plots.accuracy_figure(metrics)
    axis = figure.axes[0]
    bars = [c for c in axis.containers if isinstance(c, BarContainer)]
    assert [b.get_label() for b in bars] == list(models)
    colours = [to_rgba(b.patches[0].get_facecolor()) for b in bars]
    assert len(set(colours)) == len(models)
    assert all(
        {to_rgba(p.get_facecolor()) for p in b.patches} == {c} for b, c in zip(bars, colours, strict=True)
    )
    heights = [p.get_height() for p in bars[6].patches]
    assert heights == [0.5, 0.5]
    assert all(b.errorbar is not None for b in bars)  # ± the standard error of each skill's accuracy
    figure.clf()
    assert plots.plot_accuracy(metrics, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plots.plot_accuracy({"skills": [], "models": {}}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
