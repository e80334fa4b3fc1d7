"""The transformers backend: sequences batched by length within a token budget, the model body run once per batch
under `torch.inference_mode`, then the output head over chunks of positions with log-softmax, top-K and the
realized token's log-prob per chunk, so that a batch's full-vocabulary logits never exist; only [T, K] reach
the host. The same chunked head serves score (through this backend) and evaluate's per-byte CE.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fuse.backends import TokenLogprobs, check_request

log = logging.getLogger(__name__)

# Positions whose logits exist at once: bounds the head's working memory to about 3 x this x vocab x 4 bytes
# (262,144 entries: 0.8 GB) whatever the batch and the vocabulary.
HEAD_CHUNK_TOKENS = 256


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


# --------------------------------------------------------------------------------------------- the output head


@dataclass(frozen=True)
class OutputHead:
    """How a causal LM turns its final hidden states into logits, reproduced so that it can run on a few
    positions at a time: `lm_head`, then what the architecture applies after it, in the model's dtype as the
    model does (Cohere's `logit_scale`, Granite's `logits_scaling`, Gemma-2/3's `final_logit_softcapping`)."""

    body: Any
    lm_head: Any
    scale: float | None = None
    softcap: float | None = None

    def logits(self, hidden: Any) -> Any:
        import torch

        logits = self.lm_head(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def output_head(model: Any) -> OutputHead | None:
    """The model's output head, or None when its logits cannot be reproduced from the body's hidden states (an
    unknown post-processing, a body without `last_hidden_state`): then the full forward is used. Checked once
    per model on a short probe against the model's own forward."""
    if model not in _HEADS:
        _HEADS[model] = _probe_head(model)
    return _HEADS[model]


def _head_of(model: Any) -> OutputHead:
    config = model.config
    scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    if getattr(config, "logits_scaling", None):  # Granite: logits / logits_scaling
        scale = 1.0 / float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return OutputHead(
        body=model.base_model,
        lm_head=model.get_output_embeddings(),
        scale=float(scale) if scale is not None else None,
        softcap=float(softcap) if softcap else None,
    )


def _probe_head(model: Any) -> OutputHead | None:
    import torch

    head = _head_of(model)
    vocab = int(head.lm_head.weight.shape[0]) if head.lm_head is not None else 0
    device = next(model.parameters()).device
    ids = (torch.arange(16, device=device)[None] * 7919 + 3) % max(vocab, 1)
    try:
        with torch.inference_mode():
            full = model(input_ids=ids, use_cache=False).logits.float()
            chunked = head.logits(_hidden(head.body, ids, torch.ones_like(ids))).float()
    except Exception as error:  # noqa: BLE001 - any failure means: do not trust the reproduction
        log.warning(
            "%s: output head not reproducible (%s); using the full forward", type(model).__name__, error
        )
        return None
    # Same operations in the same order: only matmul blocking may differ (more so in half precision).
    tolerance = (1e-4 if model.dtype == torch.float32 else 2e-2) * (1.0 + float(full.abs().max()))
    difference = float((full - chunked).abs().max()) if full.shape == chunked.shape else float("inf")
    if not difference <= tolerance:
        log.warning(
            "%s: the output head reproduced from its config differs from the model's logits by %.3g (unknown "
            "post-processing after lm_head); using the full forward, whose logits are batch x length x vocab",
            type(model).__name__,
            difference,
        )
        return None
    return head


def _hidden(body: Any, ids: Any, attention: Any) -> Any:
    return body(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state


@dataclass
class RowLogprobs:
    """Flat results for the scored positions of a batch, row after row: top-K (absent when K = 0) and the
    realized next token's log-prob; `counts[b]` positions belong to batch row b."""

    topk_ids: Any
    topk_logprobs: Any
    target_logprobs: Any
    counts: list[int]


def chunked_logprobs(
    to_logits: Callable[[Any], Any], rows: Any, targets: Any, top_k: int, chunk: int
) -> tuple[Any, Any, Any]:
    """[N, ...] rows (hidden states, or indices of logits rows) -> top-K ids/log-probs [N, K] (None when K = 0)
    and the targets' log-probs [N], with `chunk` rows of float32 logits at a time."""
    import torch

    ids, values, target = [], [], []
    for start in range(0, rows.shape[0], chunk):
        logits = to_logits(rows[start : start + chunk]).float()
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        target.append((logits.gather(-1, targets[start : start + chunk, None]) - lse)[:, 0])
        if top_k:
            top = torch.topk(logits, top_k, dim=-1)
            ids.append(top.indices)
            values.append(top.values - lse)
        del logits
    return (torch.cat(ids) if ids else None), (torch.cat(values) if values else None), torch.cat(target)


def batch_logprobs(
    model: Any, ids: Any, lengths: Sequence[int], top_k: int, chunk: int = HEAD_CHUNK_TOKENS
) -> RowLogprobs:
    """A right-padded batch [B, W] of sequences of `lengths` -> per position t < len-1 of each row: top-K next-token
    log-probs (K = 0: none) and the log-prob of token t+1. Positions before a row's end never see its padding,
    so each row equals its unpadded computation."""
    import torch

    width = ids.shape[1]
    lengths_t = torch.as_tensor(list(lengths), device=ids.device)
    positions = torch.arange(width, device=ids.device)[None]
    attention = (positions < lengths_t[:, None]).long()
    scored = positions < (lengths_t[:, None] - 1)
    following = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)[scored]
    counts = [max(int(n) - 1, 0) for n in lengths]
    head = output_head(model)
    with torch.inference_mode():
        if head is not None:
            rows, to_logits = _hidden(head.body, ids, attention)[scored], head.logits
        else:  # the model's own [B, W, V] logits, taken a chunk of scored positions at a time
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits.flatten(0, 1)
            rows, to_logits = torch.nonzero(scored.flatten())[:, 0], logits.__getitem__
        return RowLogprobs(*chunked_logprobs(to_logits, rows, following, top_k, chunk), counts)


def pad_right(sequences: Sequence[Sequence[int]], pad: int = 0) -> Any:
    """[B, max len] int64 tensor of the sequences, right-padded with `pad`."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
    return ids


def continuation_logprobs(
    model: Any, prefix: Sequence[int], continuations: Sequence[Sequence[int]]
) -> np.ndarray:
    """The summed log-prob of each continuation after `prefix` (float64 [C]): the prefix runs once and its KV
    cache is shared by every continuation (candidate scoring asks about ~20 continuations of one context)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.as_tensor(np.asarray([prefix], np.int64), device=device), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].double(), dim=-1)
        total = first[[int(c[0]) for c in continuations]].clone()
        rest = [np.asarray(c, np.int64) for c in continuations]
        width = max(len(c) for c in rest) - 1
        if width > 0:  # each continuation's later tokens, predicted from its own earlier ones
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(rest))
            ids = pad_right([c[:-1] if len(c) > 1 else c[:1] for c in rest]).to(device)[:, :width]
            real = torch.tensor([[t < len(c) - 1 for t in range(width)] for c in rest], device=device)
            mask = torch.cat(
                [torch.ones(len(rest), len(prefix), dtype=torch.long, device=device), real.long()], 1
            )
            logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
            logp = torch.log_softmax(logits.double(), dim=-1)
            nxt = pad_right([c[1:] if len(c) > 1 else c[:1] for c in rest]).to(device)[:, :width]
            total += (logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1) * real).sum(dim=1)
    return total.cpu().numpy()


# --------------------------------------------------------------------------------------------- the backend


class TransformersBackend:
    """The reference backend. `batch_tokens` bounds padded tokens per body forward (hidden states are that x
    hidden size); `head_chunk_tokens` bounds the logits (that x vocab)."""

    def __init__(
        self,
        model: Any,
        batch_tokens: int = 16384,
        name: str = "model",
        head_chunk_tokens: int = HEAD_CHUNK_TOKENS,
    ) -> None:
        self.model = model.eval()
        self.batch_tokens = int(batch_tokens)
        self.head_chunk_tokens = int(head_chunk_tokens)
        self.name = name
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_length = model_max_length(model.config)
        self.device = next(model.parameters()).device
        self.dtype = str(model.dtype).removeprefix("torch.")  # what `auto` resolved to
        self.on_batch: Callable[[int, int], None] | None = None  # (sequences, tokens) after each batch

    @classmethod
    def from_spec(cls, spec: Any, settings: Any) -> TransformersBackend:
        import torch

        from fuse.models import load_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(spec, dtype=settings.dtype, device=device)
        return cls(model, settings.batch_tokens, spec.name or str(spec.path), settings.head_chunk_tokens)

    def logprobs(self, sequences: Sequence[np.ndarray], top_k: int) -> list[TokenLogprobs]:
        check_request(sequences, top_k, self.vocab_size, self.max_length, self.name)
        results: list[TokenLogprobs | None] = [None] * len(sequences)
        for batch in length_batches([len(s) for s in sequences], self.batch_tokens):
            for i, result in zip(batch, self._forward([sequences[i] for i in batch], top_k), strict=True):
                results[i] = result
            if self.on_batch is not None:
                self.on_batch(len(batch), sum(len(sequences[i]) for i in batch))
        return results  # type: ignore[return-value]

    def continuation_logprobs(
        self, prefix: Sequence[int], continuations: Sequence[Sequence[int]]
    ) -> np.ndarray:
        """Summed log-prob of each continuation after one shared prefix (candidate scoring)."""
        return continuation_logprobs(self.model, prefix, continuations)

    def close(self) -> None:
        self.model = None

    def _forward(self, sequences: list[np.ndarray], top_k: int) -> list[TokenLogprobs]:
        ids = pad_right(sequences).to(self.device)
        rows = batch_logprobs(self.model, ids, [len(s) for s in sequences], top_k, self.head_chunk_tokens)
        top_ids = rows.topk_ids.cpu().numpy().astype(np.int64)
        top_lp = rows.topk_logprobs.cpu().numpy()
        target = rows.target_logprobs.cpu().numpy()
        bounds = np.concatenate([[0], np.cumsum(rows.counts)])
        return [
            TokenLogprobs(top_ids[a:b], top_lp[a:b], target[a:b])
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]


def summed_nll(model: Any, sequences: Sequence[Sequence[int]], chunk: int = HEAD_CHUNK_TOKENS) -> float:
    """Summed next-token NLL (nats) of right-padded sequences through the chunked head (evaluate's CE)."""
    ids = pad_right(sequences).to(next(model.parameters()).device)
    rows = batch_logprobs(model, ids, [len(s) for s in sequences], 0, chunk)
    return -float(rows.target_logprobs.double().sum())
