"""The one progress display of every stage: which instance, how far, how fast, how long still, and for training the
latest loss. A rewritten status line on a terminal; plain timestamped lines every `interval` seconds elsewhere (SLURM
logs), so a job's output shows it is alive. Only rank 0 of a multi-process training reports.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, TextIO

# Non-TTY lines at most this often (seconds); FUSE_PROGRESS_INTERVAL overrides it (e.g. 60 for long SLURM jobs).
DEFAULT_INTERVAL = 10.0


def clock(seconds: float) -> str:
    """hh:mm:ss, or '?' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}:{secs:02d}"


def _number(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def progress_line(
    prefix: str, done: int, total: int | None, unit: str, elapsed: float, metrics: dict[str, Any]
) -> str:
    """`distill.llama step 40/100 (40%) 2.10 step/s ETA 00:00:28 loss=1.234 [00:00:19]`."""
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [prefix, unit]
    if total:
        parts.append(f"{done}/{total} ({100.0 * done / total:.0f}%)")
    else:
        parts.append(str(done))
    if done and elapsed > 0:
        parts.append(f"{rate:.3g} {unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{unit}")
        if total:
            parts.append(f"ETA {clock((total - done) / rate)}")
    parts += [f"{key}={_number(value)}" for key, value in metrics.items() if value is not None]
    return " ".join(parts) + f"  [{clock(elapsed)}]"


class Progress:
    """One instance at a time: start(prefix), update(done, total, unit, **metrics), end(message)."""

    def __init__(self, stream: TextIO | None = None, interval: float | None = None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        env = os.environ.get("FUSE_PROGRESS_INTERVAL")
        self.interval = interval if interval is not None else float(env) if env else DEFAULT_INTERVAL
        self.prefix = ""
        self.started = time.monotonic()
        self._last = float("-inf")  # the first update always gets its line
        self._pending = ""  # a throttled line, written at the end so the final count is always shown

    def start(self, prefix: str) -> None:
        self.prefix, self.started, self._last, self._pending = prefix, time.monotonic(), float("-inf"), ""
        self._write(f"{prefix} started  [{clock(0)}]", final=True)

    def update(self, done: int, total: int | None = None, unit: str = "step", **metrics: Any) -> None:
        now = time.monotonic()
        line = progress_line(self.prefix, done, total, unit, now - self.started, metrics)
        finished = bool(total) and done >= total
        if not finished and now - self._last < (0.2 if self.tty else self.interval):
            self._pending = line
            return
        self._last, self._pending = now, ""
        self._write(line)

    def end(self, message: str) -> None:
        if self._pending and not self.tty:
            self._write(self._pending)
        self._pending = ""
        self._write(f"{self.prefix} {message}  [{clock(time.monotonic() - self.started)}]", final=True)

    def _write(self, line: str, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(time.strftime("%H:%M:%S ") + line + "\n")
        self.stream.flush()


def training_callback(report: Any) -> Any:
    """A TrainerCallback calling `report(step, max_steps, "step", loss=..., lr=...)` after every optimizer step, on
    the world's rank 0 only; the loss is the latest logged one (every `logging_steps`)."""
    from transformers import TrainerCallback

    class TrainingProgress(TrainerCallback):
        def __init__(self) -> None:
            self.metrics: dict[str, Any] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.metrics = {"loss": logs["loss"], "lr": logs.get("learning_rate")}

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                report(state.global_step, state.max_steps, "step", **self.metrics)

    return TrainingProgress()
