"""Teacher log-prob backends: given token-id sequences, the top-K next-token log-probs and the log-prob of the
realized next token at every position. `transformers` (the reference, the CPU default) and `vllm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


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


def make_backend(kind: str, spec: Any, settings: Any, scratch: str | None = None) -> Backend:
    """The backend named by the recipe (`stages.extract.backend` / `stages.score.backend`) for a model spec."""
    if kind == "transformers":
        from fuse.backends.hf import TransformersBackend

        return TransformersBackend.from_spec(spec, settings)
    if kind == "vllm":
        from fuse.backends.vllm_engine import VllmBackend

        return VllmBackend.from_spec(spec, settings, scratch)
    raise BackendError(f"unknown backend {kind!r} (transformers | vllm)")
