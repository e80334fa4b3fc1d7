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
# (262,144 entries: 0.8 GB) whatever the batch.
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
    """The summed log-prob of each continuation after `prefix` (float64 [C])."""
    return shared_prefix_logprobs(model, prefix, [(len(prefix), continuations)])[0]


# Continuation tokens packed into one forward of candidate scoring (beside the prefix): bounds the [n, n] mask and
# each layer's attention scores.
PACKED_TOKENS = 1024


def _packed_mask(visible: np.ndarray, group: np.ndarray) -> np.ndarray:
    """allowed[q, k] for a prefix of P tokens followed by packed continuation tokens: a prefix token sees the
    prefix up to itself; a packed token sees the prefix before its boundary (`visible`) and its own continuation's
    tokens up to itself (`group`: -1 on the prefix)."""
    n = len(group)
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    prefix = group < 0
    allowed = np.where(prefix[:, None], prefix[None, :] & (k <= q), k < visible[:, None])
    allowed |= (group[:, None] == group[None, :]) & ~prefix[:, None] & (k <= q)
    return allowed


def shared_prefix_logprobs(
    model: Any,
    sequence: Sequence[int],
    asks: Sequence[tuple[int, Sequence[Sequence[int]]]],
    packed_tokens: int = PACKED_TOKENS,
) -> list[np.ndarray]:
    """For each (boundary, continuations) in `asks`, the summed log-prob of each continuation after
    sequence[:boundary] (float64 [C] per ask), without a forward per boundary. The continuations' tokens but their
    last are packed after the longest prefix asked about, each at its own position (boundary + offset), under a
    mask that lets it see only the prefix before its boundary and its own continuation's earlier tokens (and a
    sliding-window layer's window): one forward gives every boundary's next-token distribution and every later
    token's, the head applied at those positions only. Candidate scoring asks about every response position of a
    sample; a forward per position was quadratic in the sample's length (26 s a sample for gemma-3-270m on 2
    cores). Equal to one forward per prefix and continuation (tests/test_extract.py)."""
    import torch

    if not asks:
        return []
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    longest = max(b for b, _ in asks)
    prefix = np.asarray(sequence[:longest], np.int64)
    config = model.config.get_text_config(decoder=True)
    types = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None) if "sliding_attention" in types else None
    # packed rows: (ask, continuation, offset) for every token of a continuation but its last
    work = [
        (a, c, t)
        for a, (_, conts) in enumerate(asks)
        for c, cont in enumerate(conts)
        for t in range(len(cont) - 1)
    ]
    head = output_head(model)
    totals = [np.zeros(len(conts)) for _, conts in asks]
    first = sorted({b - 1 for b, _ in asks})  # the positions that predict each continuation's first token
    start = 0
    while True:
        stop = min(start + packed_tokens, len(work))
        while 0 < stop < len(work) and work[stop][2] > 0:  # a continuation's tokens go in one forward
            stop -= 1
        if stop <= start < len(work):
            raise ValueError(f"a continuation longer than packed_tokens ({packed_tokens})")
        part = work[start:stop]
        ids = np.concatenate([prefix, [asks[a][1][c][t] for a, c, t in part]]).astype(np.int64)
        positions = np.concatenate([np.arange(longest), [asks[a][0] + t for a, _, t in part]]).astype(
            np.int64
        )
        visible = np.concatenate([np.zeros(longest), [asks[a][0] for a, _, _ in part]]).astype(np.int64)
        # one group per continuation (its tokens are consecutive in `part`: a new one starts at offset 0)
        group = np.concatenate([np.full(longest, -1), np.cumsum([t == 0 for _, _, t in part]) - 1]).astype(
            np.int64
        )
        allowed = _packed_mask(visible, group)
        masks: Any = _additive(allowed, dtype, device)
        if window is not None:
            within = (positions[:, None] - positions[None, :]) < window
            masks = {"full_attention": masks, "sliding_attention": _additive(allowed & within, dtype, device)}
        rows = first if start == 0 else []
        keep = torch.tensor(rows + list(range(longest, longest + len(part))), device=device)
        # (kept row, token) pairs: each ask's first tokens at its boundary's row, then each packed token's next
        at = {r: i for i, r in enumerate(rows)}
        pairs = [(at[b - 1], int(c[0])) for b, conts in asks for c in conts] if rows else []
        pairs += [(len(rows) + i, int(asks[a][1][c][t + 1])) for i, (a, c, t) in enumerate(part)]
        inputs = {
            "input_ids": torch.from_numpy(ids)[None].to(device),
            "attention_mask": masks,
            "position_ids": torch.from_numpy(positions)[None].to(device),
            "use_cache": False,
        }
        with torch.inference_mode():
            if head is not None:  # the head at the kept positions only, a chunk of them at a time
                kept, to_logits = head.body(**inputs).last_hidden_state[0, keep], head.logits
            else:
                logits = model(**inputs, logits_to_keep=keep).logits[0]
                kept, to_logits = torch.arange(len(keep)), logits.__getitem__
            values = iter(pair_logprobs(to_logits, kept, pairs))
        if rows:
            for a, (_, conts) in enumerate(asks):
                totals[a] += [next(values) for _ in conts]
        for a, c, _ in part:
            totals[a][c] += next(values)
        start = stop
        if start >= len(work):
            return totals


def pair_sums(
    model: Any, first: tuple[Sequence[int], Any], second: tuple[Sequence[int], Any]
) -> list[float] | None:
    """The summed log-probs of two sequences' masked tokens (each (ids, mask), the mask True on consecutive tokens:
    a response), in one packed forward: what comes before the first masked token and the two sequences' shared
    masked tokens once, then each one's own tail (shared_prefix_logprobs), the head only where a masked token is
    predicted. A preference pair shares its prompt and, when minimal, about half its response. None where the two
    differ before their masked tokens start (a template that renders the turn before the response differently) or
    a mask is empty: then score them apart."""
    ids_a, ids_b = list(first[0]), list(second[0])
    masks = [np.flatnonzero(np.asarray(first[1], bool)), np.flatnonzero(np.asarray(second[1], bool))]
    if any(m.size == 0 or m[-1] - m[0] + 1 != m.size for m in masks):
        return None
    start, end_a, end_b = int(masks[0][0]), int(masks[0][-1]) + 1, int(masks[1][-1]) + 1
    if start == 0 or int(masks[1][0]) != start or ids_a[:start] != ids_b[:start]:
        return None
    common = start  # the first token where the two differ; each keeps a token of its own after it
    while common < min(end_a, end_b) - 1 and ids_a[common] == ids_b[common]:
        common += 1
    asks = [(common, [ids_a[common:end_a], ids_b[common:end_b]])]
    if common > start:
        asks.insert(0, (start, [ids_a[start:common]]))
    sums = shared_prefix_logprobs(model, ids_a, asks)
    shared = float(sums[0][0]) if common > start else 0.0
    return [shared + float(sums[-1][0]), shared + float(sums[-1][1])]


def pair_logprobs(
    to_logits: Callable[[Any], Any],
    rows: Any,
    pairs: Sequence[tuple[int, int]],
    chunk: int = HEAD_CHUNK_TOKENS,
) -> np.ndarray:
    """log p(token | row) for each (row index, token) pair (float64 [P], in the pairs' order), with `chunk` rows
    of float32 logits at a time: a row asked about many tokens runs through the head once."""
    import torch

    out = np.zeros(len(pairs))
    index = np.asarray([r for r, _ in pairs], np.int64)
    tokens = np.asarray([t for _, t in pairs], np.int64)
    for start in range(0, rows.shape[0], chunk):
        logits = to_logits(rows[start : start + chunk]).float()
        lse = torch.logsumexp(logits, dim=-1)
        here = np.flatnonzero((index >= start) & (index < start + len(logits)))
        if here.size:
            local = torch.as_tensor(index[here] - start, device=logits.device)
            picked = logits[local, torch.as_tensor(tokens[here], device=logits.device)] - lse[local]
            out[here] = picked.double().cpu().numpy()
        del logits
    return out


def _additive(allowed: np.ndarray, dtype: Any, device: Any) -> Any:
    """A [1, 1, n, n] additive attention mask: 0 where allowed, the dtype's minimum elsewhere."""
    import torch

    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(
        torch.from_numpy(~allowed), torch.finfo(dtype).min
    )
    return mask[None, None].to(device)


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

    def shared_prefix_logprobs(
        self, sequence: Sequence[int], asks: Sequence[tuple[int, Sequence[Sequence[int]]]]
    ) -> list[np.ndarray]:
        """Summed log-prob of each continuation after each boundary of one sequence (candidate scoring)."""
        return shared_prefix_logprobs(self.model, sequence, asks)

    def pair_sums(
        self, first: tuple[Sequence[int], Any], second: tuple[Sequence[int], Any]
    ) -> list[float] | None:
        """Summed log-probs of two sequences' masked tokens in one packed forward (the score stage's pairs)."""
        return pair_sums(self.model, first, second)

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
