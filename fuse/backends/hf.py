"""The transformers backend: sequences batched by length within a token budget, one forward per batch under
`torch.inference_mode`, log-softmax and top-K on the model's device; only [T, K] results reach the host.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from fuse.backends import BackendError, TokenLogprobs, check_request

log = logging.getLogger(__name__)

# Rows of log-softmax done at once: bounds the float32 copy of the logits to CHUNK x vocab.
CHUNK_ROWS = 1024


def model_max_length(config: Any) -> int:
    """The longest sequence the model's positions allow (Llama-style or GPT-2-style config)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first, each group padded to its longest member within `batch_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class TransformersBackend:
    """The reference backend. `batch_tokens` bounds padded tokens per forward (the logits are that x vocab)."""

    def __init__(self, model: Any, batch_tokens: int = 16384, name: str = "model") -> None:
        self.model = model.eval()
        self.batch_tokens = int(batch_tokens)
        self.name = name
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_length = model_max_length(model.config)
        self.device = next(model.parameters()).device

    @classmethod
    def from_spec(cls, spec: Any, settings: Any) -> TransformersBackend:
        import torch

        from fuse.models import load_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(spec, dtype=settings.dtype, device=device)
        return cls(model, settings.batch_tokens, spec.name or str(spec.path))

    def logprobs(self, sequences: Sequence[np.ndarray], top_k: int) -> list[TokenLogprobs]:
        check_request(sequences, top_k, self.vocab_size, self.max_length, self.name)
        results: list[TokenLogprobs | None] = [None] * len(sequences)
        for batch in length_batches([len(s) for s in sequences], self.batch_tokens):
            for i, result in zip(batch, self._forward([sequences[i] for i in batch], top_k), strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.model = None

    def _forward(self, sequences: list[np.ndarray], top_k: int) -> list[TokenLogprobs]:
        import torch

        width = max(len(s) for s in sequences)
        ids = torch.zeros((len(sequences), width), dtype=torch.long)
        attention = torch.zeros_like(ids)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
            attention[row, : len(seq)] = 1
        ids, attention = ids.to(self.device), attention.to(self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            # Right padding: the first len-1 positions of each row are exactly the unpadded computation.
            return [
                topk_rows(logits[row, : len(seq) - 1], ids[row, 1 : len(seq)], top_k)
                for row, seq in enumerate(sequences)
            ]


def topk_rows(logits: Any, targets: Any, top_k: int) -> TokenLogprobs:
    """[N, V] logits on device -> top-K ids/log-probs and the targets' log-probs, moved to the host."""
    import torch

    ids, values, target = [], [], []
    for start in range(0, logits.shape[0], CHUNK_ROWS):
        lp = torch.log_softmax(logits[start : start + CHUNK_ROWS].float(), dim=-1)
        top = torch.topk(lp, top_k, dim=-1)
        ids.append(top.indices)
        values.append(top.values)
        target.append(lp.gather(-1, targets[start : start + CHUNK_ROWS, None])[:, 0])
    if not ids:
        raise BackendError("a sequence needs at least 2 tokens")
    return TokenLogprobs(
        torch.cat(ids).cpu().numpy().astype(np.int64),
        torch.cat(values).cpu().numpy(),
        torch.cat(target).cpu().numpy(),
    )
