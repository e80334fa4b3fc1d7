"""Plots a person would rather look at than read: a training run's loss (smoothed over its faint raw points, the
learning rate on a second axis, a preference run's reward accuracy and margins beside it) and accuracy per skill.

Each plot is a figure builder (testable: which series it draws, in which colours) and a writer of the PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

REWARDS = ("rewards/accuracies", "rewards/margins")  # TRL's names, as fpo logs them
LEARNING_RATE = "learning_rate"
RAW_ALPHA = 0.25  # raw points are drawn faint under their smoothed line


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series(entries: Sequence[Mapping[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) of every log entry that has a number under `key`."""
    return [
        (e["step"], float(e[key]))
        for e in entries
        if isinstance(e.get(key), int | float) and not isinstance(e.get(key), bool)
    ]


def loss_keys(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The loss-like series of a log: the training loss, its parts (gold_ce, distill, loss_*), validation loss."""
    keys = {
        k
        for e in entries
        for k in e
        if k in ("loss", "eval_loss") or k.startswith(("loss_", "gold", "distill"))
    }
    return sorted(keys, key=lambda k: (k != "loss", k))


def smoothed(values: Sequence[float], span: int | None = None) -> list[float]:
    """Exponential moving average, bias-corrected as TensorBoard's smoothing (the first points are not pulled
    towards zero); span: the points of the average's memory, default a tenth of the series (1 to 50)."""
    if span is None:
        span = min(50, max(1, len(values) // 10))
    weight = 1 - 2 / (span + 1)  # span 1: no smoothing
    average, out = 0.0, []
    for t, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**t) if weight else value)
    return out


def _curve(axis: Any, points: list[tuple[float, float]], label: str, color: Any) -> None:
    """The smoothed line over the raw points; a short series is drawn as it is (nothing to smooth)."""
    steps, values = zip(*points, strict=True)
    if len(points) < 10:
        axis.plot(steps, values, color=color, marker=".", label=label)
        return
    axis.plot(steps, values, color=color, alpha=RAW_ALPHA, linewidth=0.8)
    axis.plot(steps, smoothed(values), color=color, linewidth=1.8, label=f"{label} (smoothed)")


def training_figure(entries: Sequence[Mapping[str, Any]], title: str = "") -> Any:
    """Left: every loss-like series against the step, smoothed over its raw points, the learning rate on a second
    axis. Right, for a preference run: rewards/accuracies and rewards/margins (train batches), smoothed too."""
    plt = _pyplot()
    rewards = [k for k in REWARDS if series(entries, k)]
    figure, axes = plt.subplots(1, 2 if rewards else 1, figsize=(13 if rewards else 7, 4), squeeze=False)
    loss = axes[0][0]
    colors = distinct_colors(len(loss_keys(entries)) or 1)
    for key, color in zip(loss_keys(entries), colors, strict=False):
        if points := series(entries, key):
            _curve(loss, points, key, color)
    loss.set_xlabel("step")
    loss.set_ylabel("loss")
    loss.set_title(title)
    loss.grid(alpha=0.3)
    handles, labels = loss.get_legend_handles_labels()
    if rate := series(entries, LEARNING_RATE):
        lr_axis = loss.twinx()
        lr_axis.plot(*zip(*rate, strict=True), color="0.45", linestyle="--", linewidth=1, label=LEARNING_RATE)
        lr_axis.set_ylabel("learning rate", color="0.45")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        more = lr_axis.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        loss.legend(handles, labels, fontsize=8)
    if rewards:
        margins = axes[0][1]
        accuracy = margins.twinx()
        for axis, key, color in ((margins, REWARDS[1], "C0"), (accuracy, REWARDS[0], "C1")):
            if points := series(entries, key):
                _curve(axis, points, key, color)
                axis.set_ylabel(key, color=color)
        accuracy.set_ylim(-0.05, 1.05)
        margins.set_xlabel("step")
        margins.set_title("train batches: reward margin and accuracy against the reference")
        margins.grid(alpha=0.3)
        (h1, l1), (h2, l2) = margins.get_legend_handles_labels(), accuracy.get_legend_handles_labels()
        margins.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    figure.tight_layout()
    return figure


def save_figure(figure: Any, target: str | Path | IO[bytes]) -> None:
    """The figure as a PNG (a path is written atomically), then closed."""
    from fuse.io import atomic_write

    try:
        if isinstance(target, str | Path):
            with atomic_write(Path(target)) as handle:
                figure.savefig(handle, format="png", dpi=100, bbox_inches="tight")
        else:
            figure.savefig(target, format="png", dpi=100, bbox_inches="tight")
    finally:
        _pyplot().close(figure)


def plot_loss_curves(entries: Sequence[Mapping[str, Any]], png: Path, title: str = "") -> None:
    save_figure(training_figure(entries, title), png)


def distinct_colors(n: int) -> list[tuple[float, ...]]:
    """n colours, no two alike: a qualitative palette (tab10 up to 10; up to 20, tab20's strong colours then its
    light ones; then tab20 + tab20b + tab20c), evenly spaced over the turbo colormap beyond 60."""
    from matplotlib import colormaps

    if n <= 10:
        palette = list(colormaps["tab10"].colors)
    elif n <= 20:
        pairs = list(colormaps["tab20"].colors)  # (strong, light) of each hue
        palette = pairs[0::2] + pairs[1::2]
    elif n <= 60:
        palette = [c for name in ("tab20", "tab20b", "tab20c") for c in colormaps[name].colors]
    else:
        turbo = colormaps["turbo"]
        return [tuple(turbo(i / (n - 1))) for i in range(n)]
    return [tuple(c) for c in palette[:n]]


def accuracy_figure(metrics: Mapping[str, Any]) -> Any | None:
    """Grouped bars, one group per skill, one bar per model in a colour of its own, with ± one standard error
    where evaluate measured it; None when no model has skill accuracies."""
    skills = list(metrics["skills"])
    names = [n for n, r in metrics["models"].items() if "skills" in r]
    if not skills or not names:
        return None
    plt = _pyplot()
    width = 0.8 / len(names)
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(skills) * max(1, len(names) / 4)), 4))
    for k, (name, color) in enumerate(zip(names, distinct_colors(len(names)), strict=True)):
        result = metrics["models"][name]
        values = [result["skills"].get(s, 0.0) for s in skills]
        errors = result.get("stderr", {}).get("skills", {})
        yerr = [errors.get(s) or 0.0 for s in skills] if errors else None
        positions = [i + k * width for i in range(len(skills))]
        axis.bar(positions, values, width, label=name, color=color, yerr=yerr, capsize=2, ecolor="0.3")
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(skills))], skills)
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1.05)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=7, ncol=min(5, len(names)), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    figure.tight_layout()
    return figure


def plot_accuracy(metrics: Mapping[str, Any], target: str | Path | IO[bytes]) -> bool:
    """accuracy_figure as a PNG; False (nothing written) when there is nothing to plot."""
    figure = accuracy_figure(metrics)
    if figure is None:
        return False
    save_figure(figure, target)
    return True
