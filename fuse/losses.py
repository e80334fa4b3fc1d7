"""Distillation losses on sparse (top-K) teacher targets, the fusion functions that pick the teacher per sequence,
and a dense reference implementation used only by tests and benchmarks.

A sparse target at one position is `ids` [J] (pivot-vocabulary ids, -1 = padding), `probs` [J] (teacher probability
of each id, 0 at padding) and an implicit tail bucket holding the mass outside the ids: 1 - sum(probs). The student
is compared on the same J + 1 buckets, so no [B, T, V] target tensor ever exists. At temperature T both sides are
tempered on those buckets (the tail is one bucket), and the distillation term is scaled by T² (Hinton et al. 2015).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fuse.registry import Registry

IGNORE_INDEX = -100
PAD_ID = -1
# The student's (tempered) tail mass is clamped here before its log: it keeps the tail term bounded (at most
# −p_tail·log TAIL_EPS) and finite where the ids cover the vocabulary; below it the tail bucket passes no gradient.
TAIL_EPS = 1e-6
# Logit entries a chunked head computes at once (64 Mi floats, 256 MiB): its rows per chunk follow the vocabulary, so
# the head's working memory (a chunk's logits and one temporary) stays about 0.5 GB at any vocabulary. 1,024 rows at a
# 262k vocabulary took 2 GB at once and was a third of a gemma-3-270m fpo step's peak.
HEAD_CHUNK_ELEMENTS = 1 << 26
LOG_TAIL_EPS = math.log(TAIL_EPS)


# --------------------------------------------------------------------------------------------- fusion functions


@dataclass(frozen=True)
class FusionFunction:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    reference: str


FUSIONS: Registry[FusionFunction] = Registry("fusion function")


def fusion_function(name: str, reference: str) -> Callable:
    """Register `fn(ce [S, M]) -> weights [S, M]`: per sequence, how much each of M teachers counts.

    Column 0 is the pivot, the last column the source; `ce` is each teacher's cross-entropy against the gold
    response per byte (per byte so tokenizers with different granularities compare fairly).
    """

    def register(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        FUSIONS.add(name, FusionFunction(name, fn, reference))
        return fn

    return register


def get_fusion(name: str) -> FusionFunction:
    return FUSIONS.lookup(name)


@fusion_function("min_ce", "FuseLLM, Wan et al. 2024 (arXiv:2401.10491), MinCE; FuseChat (arXiv:2402.16107)")
def min_ce(ce: torch.Tensor) -> torch.Tensor:
    """All weight on the teacher with the lowest CE; ties go to the first column (the pivot)."""
    return F.one_hot(ce.argmin(dim=-1), ce.shape[-1]).to(ce.dtype)


@fusion_function("avg_ce", "FuseLLM, Wan et al. 2024 (arXiv:2401.10491), AvgCE")
def avg_ce(ce: torch.Tensor) -> torch.Tensor:
    """Weights softmax(−CE) over the teachers, CE in nats per byte: w_m ∝ exp(−CE_m), each teacher's per-byte
    likelihood of the gold text, so a teacher 1 nat/byte worse counts e times less.

    Not FuseLLM's exact AvgCE, which the paper calls only "a weighted average of the distribution matrices based on
    their CE scores". Its released code (FuseLLM/src/utils/trainer.py, `distill_weighted_as_gt`) weights
    softmax(exp(−CE_m)), CE_m the teacher's mean CE per token of the sequence in its own tokenization: a softmax of
    rewards exp(−CE) in (0, 1], so its weights differ by at most a factor e and stay close to uniform.
    """
    return torch.softmax(-ce, dim=-1)


@fusion_function("source_only", "ablation: distill from the source's aligned distribution alone")
def source_only(ce: torch.Tensor) -> torch.Tensor:
    weights = torch.zeros_like(ce)
    weights[..., -1] = 1.0
    return weights


def merge_sparse(
    ids: torch.Tensor, probs: torch.Tensor, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the probabilities of repeated ids per row ([T, J] each); rows padded with PAD_ID / 0 to `width`.

    Used to mix teachers whose top-K sets overlap: the mixture is linear, so equal ids simply add up.
    """
    sorted_ids, order = ids.sort(dim=-1, descending=True)  # padding (-1) sorts last
    sorted_probs = probs.gather(-1, order)
    new_group = torch.ones_like(sorted_ids, dtype=torch.bool)
    new_group[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    slot = new_group.long().cumsum(dim=-1) - 1
    merged_probs = torch.zeros_like(sorted_probs).scatter_add_(-1, slot, sorted_probs)
    merged_ids = torch.full_like(sorted_ids, PAD_ID).scatter_(-1, slot, sorted_ids)
    merged_probs = merged_probs.masked_fill(merged_ids < 0, 0.0)
    if width is None:
        width = int((new_group & (sorted_ids >= 0)).sum(dim=-1).max().item()) if ids.numel() else 0
    return merged_ids[:, :width], merged_probs[:, :width]


def fuse_sparse(
    candidates: list[tuple[torch.Tensor, torch.Tensor]], weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix M sparse distributions of one sequence (each (ids [T, K], logprobs [T, K])) with weights [M].

    Teachers with zero weight are left out, so `min_ce` keeps exactly K ids per position.
    """
    kept = [
        (ids, logp.exp() * w) for (ids, logp), w in zip(candidates, weights.tolist(), strict=True) if w > 0
    ]
    if len(kept) == 1:
        ids, probs = kept[0]
        return ids, probs.masked_fill(ids < 0, 0.0)
    ids = torch.cat([k[0] for k in kept], dim=-1)
    probs = torch.cat([k[1] for k in kept], dim=-1).masked_fill(ids < 0, 0.0)
    return merge_sparse(ids, probs, width=ids.shape[-1])


# --------------------------------------------------------------------------------------------- divergences


def teacher_buckets(probs: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher on J + 1 buckets (the ids and the tail), re-tempered: p_i ∝ p_i^(1/T).

    The tail is tempered as one bucket: the split of its mass is unknown, which is exact at T = 1.
    """
    probs = probs.clamp(min=0.0)
    tail = (1.0 - probs.sum(dim=-1)).clamp(min=0.0)
    if temperature != 1.0:
        probs, tail = probs.pow(1.0 / temperature), tail.pow(1.0 / temperature)
        total = probs.sum(dim=-1) + tail
        probs, tail = probs / total.unsqueeze(-1), tail / total
    return probs, tail


def student_log_tail(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ exp(z_k) over the tokens k outside `ids` (-1 = padding), per row of logits [N, V].

    A complement logsumexp, so log q_tail = this − logsumexp(z) keeps its digits where log(1 − Σq) loses them
    (1 − Σq in float32 is ~10% off at a tail of 1e-5). -inf, with a zero gradient, where the ids cover the
    vocabulary. One [N, V + 1] buffer: a masked copy of the logits (padding masks the extra column), exp'd in place.
    """
    slots = torch.where(ids >= 0, ids, logits.shape[-1])
    masked = F.pad(logits, (0, 1), value=-math.inf).scatter_(-1, slots, -math.inf)
    top = masked.detach().amax(dim=-1)
    empty = top.isneginf()
    top = top.masked_fill(empty, 0.0)
    total = masked.sub_(top.unsqueeze(-1)).exp_().sum(dim=-1)
    # log of 1, not of 0, on empty rows: log(0) would send 0·inf = NaN back through the sum
    log_total = torch.where(empty, torch.ones_like(total), total).log()
    return torch.where(empty, -math.inf, top + log_total)


def _log_buckets(
    logits: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Untempered, unclamped student log-probs at the ids ([N, J], -inf at padding) and of the tail ([N])."""
    logq = (logits.gather(-1, ids.clamp(min=0)) - lse.unsqueeze(-1)).masked_fill(ids < 0, -math.inf)
    return logq, student_log_tail(logits, ids) - lse


def temper_log_buckets(
    logq: torch.Tensor, log_tail: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q_i^(1/T) on the J + 1 buckets, renormalized, in log space: the teacher's tempering (`teacher_buckets`)
    applied to the student, so both sides temper the same buckets and the tail stays one bucket on both.

    Not softmax(z / T) over the vocabulary, which would split the student's tail but not the teacher's; the two
    agree when the ids cover the vocabulary (no tail), and at T = 1.
    """
    scaled = torch.cat([logq, log_tail.unsqueeze(-1)], dim=-1) / temperature
    scaled = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)
    return scaled[..., :-1], scaled[..., -1]


def student_buckets(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student on the teacher's J + 1 buckets, from logits [N, V]: log-probs at the ids ([N, J], -inf at
    padding) and of the tail ([N], clamped at log TAIL_EPS after tempering), tempered like the teacher."""
    logq, log_tail = _log_buckets(logits, ids, torch.logsumexp(logits, dim=-1))
    if temperature != 1.0:
        logq, log_tail = temper_log_buckets(logq, log_tail, temperature)
    return logq, log_tail.clamp(min=LOG_TAIL_EPS)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {}


def divergence(name: str) -> Callable:
    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        DIVERGENCES[name] = fn
        return fn

    return register


@divergence("ce")
def bucket_ce(
    probs: torch.Tensor, tail: torch.Tensor, logq: torch.Tensor, log_tail: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy H(p, q) over the buckets, per position: FuseChat's CE(P_fused ‖ q_θ)."""
    inside = torch.where(probs > 0, probs * logq.clamp(min=-1e30), torch.zeros_like(probs)).sum(dim=-1)
    return -(inside + tail * log_tail)


@divergence("kl")
def bucket_kl(
    probs: torch.Tensor, tail: torch.Tensor, logq: torch.Tensor, log_tail: torch.Tensor
) -> torch.Tensor:
    """KL(p ‖ q) = H(p, q) − H(p): same gradient as `ce`, but 0 when the student matches the teacher."""
    return bucket_ce(probs, tail, logq, log_tail) - teacher_entropy(probs, tail)


def sparse_divergence(
    logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, temperature: float = 1.0, kind: str = "ce"
) -> torch.Tensor:
    """Per-position divergence [N] between sparse teacher targets and the student's logits [N, V], both tempered
    on the J + 1 buckets (`temper_log_buckets`); not scaled by T² (`distill_loss` does that)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; known: {', '.join(sorted(DIVERGENCES))}")
    logq, log_tail = student_buckets(logits.float(), ids, temperature)
    p, p_tail = teacher_buckets(probs.float(), temperature)
    return DIVERGENCES[kind](p, p_tail, logq, log_tail)


# --------------------------------------------------------------------------------------------- fused gold + teacher


def _fused_forward(
    logits: torch.Tensor, gold: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """CE(gold) and the bucket CE per row of logits [N, V] (float32), and what `_fused_grad` needs besides the
    logits: their logsumexp, the student's probabilities at the ids, r = p_tail / q_tail and S (FusedSparseCE)."""
    lse = torch.logsumexp(logits, dim=-1)
    gold_ce = lse - logits.gather(-1, gold.unsqueeze(-1)).squeeze(-1)
    logq, log_tail = _log_buckets(logits, ids, lse)
    teacher_ce = bucket_ce(probs, tail, logq, log_tail.clamp(min=LOG_TAIL_EPS))
    clamped = log_tail < LOG_TAIL_EPS  # where the clamp passes no gradient
    ratio = torch.where(clamped, torch.zeros_like(tail), tail / log_tail.exp())
    mass = probs.sum(-1) + torch.where(clamped, torch.zeros_like(tail), tail)
    return gold_ce, teacher_ce, (lse, logq.exp(), ratio, mass)


def _fused_grad_(
    logits: torch.Tensor,
    saved: tuple[torch.Tensor, ...],
    gold: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    grad_gold: torch.Tensor,
    grad_teacher: torch.Tensor,
) -> torch.Tensor:
    """d(grad_gold·CE(gold) + grad_teacher·bucket CE) / d logits, written over `logits` (float32, consumed)."""
    lse, q_ids, ratio, mass = saved
    valid = ids >= 0
    grad = logits.sub_(lse.unsqueeze(-1)).exp_()  # the softmax, in the logits' own buffer
    grad.mul_((grad_gold + grad_teacher * (mass - ratio)).unsqueeze(-1))  # every token, as if in the tail
    # the ids are overwritten, not corrected (same value for a repeated id), then get their −p_i
    rows, slots = valid.nonzero(as_tuple=True)
    at_ids = q_ids * (grad_gold + grad_teacher * mass).unsqueeze(-1)
    grad[rows, ids[rows, slots]] = at_ids[rows, slots]
    grad.scatter_add_(-1, ids.clamp(min=0), -grad_teacher.unsqueeze(-1) * probs * valid)
    grad.scatter_add_(-1, gold.unsqueeze(-1), -grad_gold.unsqueeze(-1))
    return grad


class FusedSparseCE(torch.autograd.Function):
    """Per position, CE(gold) and the bucket CE against a sparse teacher, from logits [N, V] at temperature 1, with
    a hand-written backward that needs one [N, V] buffer (the softmax, turned into the gradient in place) instead
    of autograd's several (logsumexp's softmax, each gather's dense scatter, their sum). The forward's student
    tail is `student_log_tail`'s, as in `sparse_divergence`, so the two paths agree.

    With r = p_tail / q_tail and S = Σ p_J + p_tail (r = 0 and S = Σ p_J where q_tail is clamped: the tail term
    is then constant), d bucket-CE / dz_i is S·q_i − p_i for i in the teacher's ids and (S − r)·q_i for every
    other i; d CE(gold) / dz = q − onehot(gold). Written per side, so r·q_i (r up to 1e6) never cancels at the ids.
    """

    @staticmethod
    def forward(ctx, logits, gold, ids, probs, tail):
        gold_ce, teacher_ce, saved = _fused_forward(logits, gold, ids, probs, tail)
        ctx.save_for_backward(logits, gold, ids, probs, *saved)
        return gold_ce, teacher_ce

    @staticmethod
    def backward(ctx, grad_gold, grad_teacher):
        logits, gold, ids, probs, *saved = ctx.saved_tensors
        grad = _fused_grad_(logits.clone(), tuple(saved), gold, ids, probs, grad_gold, grad_teacher)
        return grad, None, None, None, None


class ChunkedFusedSparseCE(torch.autograd.Function):
    """FusedSparseCE from hidden states [N, d] and the LM head's weight [V, d], `chunk` rows at a time: the forward
    keeps per row only what the backward needs besides the logits (logsumexp, q at the ids, r, S), the backward
    recomputes each chunk's logits once and turns them into their gradient in place. No [N, V] tensor: at a 262k
    vocabulary the logits of 8 × 512 tokens alone are 4.3 GB in float32. Same values and gradients as
    FusedSparseCE on hidden @ weightᵀ."""

    @staticmethod
    def forward(ctx, hidden, weight, gold, ids, probs, tail, chunk):
        gold_ce = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        teacher_ce = torch.empty_like(gold_ce)
        saved: list[tuple[torch.Tensor, ...]] = []
        for start in range(0, hidden.shape[0], chunk):
            end = start + chunk
            logits = (hidden[start:end] @ weight.T).float()
            g, t, keep = _fused_forward(
                logits, gold[start:end], ids[start:end], probs[start:end], tail[start:end]
            )
            gold_ce[start:end], teacher_ce[start:end] = g, t
            saved.append(keep)
        parts = [torch.cat(column) for column in zip(*saved, strict=True)] if saved else []
        ctx.save_for_backward(hidden, weight, gold, ids, probs, *parts)
        ctx.chunk = chunk
        return gold_ce, teacher_ce

    @staticmethod
    def backward(ctx, grad_gold, grad_teacher):
        hidden, weight, gold, ids, probs, *saved = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = start + ctx.chunk
            h = hidden[start:end]
            grad = _fused_grad_(
                (h @ weight.T).float(),
                tuple(part[start:end] for part in saved),
                gold[start:end],
                ids[start:end],
                probs[start:end],
                grad_gold[start:end].float(),
                grad_teacher[start:end].float(),
            ).to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad.T, h)
        return grad_hidden, grad_weight, None, None, None, None, None


def teacher_entropy(probs: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    return -(torch.special.xlogy(probs, probs).sum(dim=-1) + torch.special.xlogy(tail, tail))


# --------------------------------------------------------------------------------------------- the training loss


@dataclass
class LossParts:
    loss: torch.Tensor
    gold_ce: torch.Tensor
    distill: torch.Tensor | None
    tokens: int


def distill_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    target_ids: torch.Tensor | None = None,
    target_probs: torch.Tensor | None = None,
    *,
    lambda_: float,
    temperature: float = 1.0,
    kind: str = "ce",
    fused: bool = True,
    label_smoothing: float = 0.0,
) -> LossParts:
    """L = λ·CE(gold) + (1−λ)·T²·D_T(P_fused ‖ q_θ), averaged over response tokens (labels != -100).

    `logits` [B, T, V]; `labels` [B, T] are the input ids with prompts masked (HF convention: shifted here);
    `target_ids`/`target_probs` [B, T, J] are the teacher's distribution for the token AT each position.
    `fused` uses FusedSparseCE at temperature 1 (same values and gradients as the autograd path, less memory).
    `label_smoothing` ε smooths the gold term: (1 − ε)·CE(gold) + ε·mean over the vocabulary of −log q.
    D_T is `sparse_divergence` at temperature T; T² keeps its gradient from shrinking as 1/T² (Hinton et al. 2015,
    "Distilling the Knowledge in a Neural Network"), so λ means the same at every T. `LossParts.distill` is the
    scaled term T²·D_T, as it enters the loss; at T = 1 nothing changes.
    """
    # Shift the labels and targets, not the logits (as HF's causal-LM loss does): logits stay a view, so the
    # only [B·T, V] buffers are the logits and their gradient.
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab).float()
    gold = shifted_labels(labels)
    mask = gold != IGNORE_INDEX
    tokens = int(mask.sum())

    def gold_term() -> torch.Tensor:
        summed = F.cross_entropy(
            flat, gold, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing
        )
        return summed / max(tokens, 1)

    if target_ids is None or lambda_ >= 1.0:
        gold_mean = gold_term()
        return LossParts(gold_mean, gold_mean.detach(), None, tokens)
    ids, probs = shifted_targets(target_ids, target_probs)
    # Positions without a teacher (no stored ids, or outside the response) get the gold term only.
    has_teacher = (ids >= 0).any(dim=-1) & mask
    n_teacher = max(int(has_teacher.sum()), 1)
    if fused and temperature == 1.0 and kind in DIVERGENCES and label_smoothing == 0.0:
        p, p_tail = teacher_buckets(probs.float(), 1.0)
        p, p_tail = p * has_teacher.unsqueeze(-1), p_tail * has_teacher
        gold_ce, teacher = FusedSparseCE.apply(flat, gold.clamp(min=0), ids, p, p_tail)
        if kind == "kl":
            teacher = teacher - teacher_entropy(p, p_tail)
        gold_mean = (gold_ce * mask).sum() / max(tokens, 1)
        distill_mean = (teacher * has_teacher).sum() / n_teacher
    else:
        gold_mean = gold_term()
        sel = has_teacher
        distill_mean = sparse_divergence(flat[sel], ids[sel], probs[sel], temperature, kind).sum() / n_teacher
    distill_mean = temperature**2 * distill_mean
    loss = lambda_ * gold_mean + (1.0 - lambda_) * distill_mean
    return LossParts(loss, gold_mean.detach(), distill_mean.detach(), tokens)


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """[B·T]: the token each position predicts (labels shifted left, IGNORE_INDEX at each row's last position)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)


def shifted_targets(
    target_ids: torch.Tensor, target_probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B·T, J] each: the teacher's targets for the token each position predicts, shifted like `shifted_labels`."""
    width = target_ids.shape[-1]
    ids = F.pad(target_ids[:, 1:], (0, 0, 0, 1), value=PAD_ID).reshape(-1, width)
    probs = F.pad(target_probs[:, 1:], (0, 0, 0, 1), value=0.0).reshape(-1, width)
    return ids, probs


def distill_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target_ids: torch.Tensor | None = None,
    target_probs: torch.Tensor | None = None,
    *,
    lambda_: float,
    kind: str = "ce",
    chunk: int | None = None,
) -> LossParts:
    """`distill_loss` at temperature 1 without label smoothing, from the backbone's hidden states [B, T, d] and a
    plain LM head's weight [V, d]: only the response positions go through the head, `chunk` rows at a time (default:
    `head_chunk_rows`; `ChunkedFusedSparseCE`, the gold term alone `token_logprobs`), so no [B·T, V] logits exist. Same loss and
    gradients as `distill_loss` on hidden @ weightᵀ."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; known: {', '.join(sorted(DIVERGENCES))}")
    gold = shifted_labels(labels)
    mask = gold != IGNORE_INDEX
    tokens = int(mask.sum())
    chunk = head_chunk_rows(weight.shape[0], chunk)
    rows = hidden.reshape(-1, hidden.shape[-1])[mask]
    gold = gold[mask]
    if target_ids is None or lambda_ >= 1.0:
        gold_mean = -token_logprobs(rows, weight, gold, chunk).sum() / max(tokens, 1)
        return LossParts(gold_mean, gold_mean.detach(), None, tokens)
    ids, probs = (part[mask] for part in shifted_targets(target_ids, target_probs))
    has_teacher = (ids >= 0).any(dim=-1)
    p, p_tail = teacher_buckets(probs.float(), 1.0)
    p, p_tail = p * has_teacher.unsqueeze(-1), p_tail * has_teacher
    gold_ce, teacher = ChunkedFusedSparseCE.apply(rows, weight, gold, ids, p, p_tail, chunk)
    if kind == "kl":
        teacher = teacher - teacher_entropy(p, p_tail)
    gold_mean = gold_ce.sum() / max(tokens, 1)
    distill_mean = (teacher * has_teacher).sum() / max(int(has_teacher.sum()), 1)
    loss = lambda_ * gold_mean + (1.0 - lambda_) * distill_mean
    return LossParts(loss, gold_mean.detach(), distill_mean.detach(), tokens)


def head_chunk_rows(vocab_size: int, chunk: int | None = None) -> int:
    """Rows of hidden states per chunk of a chunked LM head: `chunk` where given, else as many as keep a chunk's
    logits within HEAD_CHUNK_ELEMENTS."""
    return int(chunk) if chunk else max(1, HEAD_CHUNK_ELEMENTS // max(int(vocab_size), 1))


# --------------------------------------------------------------------------------------------- dense reference


def dense_reference_divergence(
    logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, temperature: float = 1.0, kind: str = "ce"
) -> torch.Tensor:
    """The same divergence with a dense [N, V] target and bucket mask: the reference the sparse path must match.

    float64; the student's tail is summed, not 1 − Σq; at T ≠ 1 both sides are tempered on the J + 1 buckets.
    """
    n, vocab = logits.shape
    valid = ids >= 0
    dense_p = torch.zeros(n, vocab + 1, dtype=torch.float64)
    dense_p.scatter_add_(-1, torch.where(valid, ids, vocab), probs.double().masked_fill(~valid, 0.0))
    dense_p = dense_p[:, :vocab]
    in_top = dense_p > 0
    in_top |= torch.zeros_like(in_top).scatter_(-1, torch.where(valid, ids, 0), valid)
    tail_p = (1.0 - dense_p.sum(-1)).clamp(min=0.0)
    if temperature != 1.0:
        dense_p, tail_p = dense_p.pow(1.0 / temperature), tail_p.pow(1.0 / temperature)
        total = dense_p.sum(-1) + tail_p
        dense_p, tail_p = dense_p / total[:, None], tail_p / total
    q = torch.softmax(logits.double(), dim=-1)
    q_tail = (q * ~in_top).sum(-1)
    if temperature != 1.0:
        q, q_tail = q.pow(1.0 / temperature), q_tail.pow(1.0 / temperature)  # q outside the ids: unused
        total = (q * in_top).sum(-1) + q_tail
        q, q_tail = q / total[:, None], q_tail / total
    q_tail = q_tail.clamp(min=TAIL_EPS)
    ce = -(torch.special.xlogy(dense_p, q).sum(-1) + torch.special.xlogy(tail_p, q_tail))
    if kind == "ce":
        return ce
    entropy = -(torch.special.xlogy(dense_p, dense_p).sum(-1) + torch.special.xlogy(tail_p, tail_p))
    return ce - entropy


def dense_target_loss(logits: torch.Tensor, dense_probs: torch.Tensor) -> torch.Tensor:
    """CE against a dense [N, V] target, the way most KD code does it (for the memory benchmark)."""
    return -(dense_probs * torch.log_softmax(logits.float(), dim=-1)).sum(-1)


# --------------------------------------------------------------------------------------------- token log-probs


class ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(h · Wᵀ)[label] for the given positions, the LM head applied `chunk` positions at a time: the
    forward keeps only the logsumexp per position, the backward recomputes each chunk's logits once (one [chunk, V]
    buffer, turned into the gradient in place). Four head matmuls where autograd on full logits needs three, and no
    [N, V] tensor; as fast as full logits on CPU where TRL's fused LM head, doing the same job, took 34 s instead of 25 s
    (forward + backward, 16 × 250 tokens, SmolLM2-135M, 2 cores)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk):
            logits = (hidden[start : start + chunk] @ weight.T).float()
            lse[start : start + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, labels[start : start + chunk, None]).squeeze(-1)
            out[start : start + chunk] = picked - lse[start : start + chunk]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = start + ctx.chunk
            h, g = hidden[start:end], grad_out[start:end].float()
            grad = (h @ weight.T).float().sub_(lse[start:end, None]).exp_().mul_(-g[:, None])  # −g·softmax
            grad.scatter_add_(-1, labels[start:end, None], g[:, None])  # + g at the label
            grad = grad.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad.T, h)
        return grad_hidden, grad_weight, None, None


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """log p(label) under the LM head `weight` [V, d] for hidden states [N, d] (the positions that predict each
    label), without an [N, V] tensor (`chunk` rows at a time, default `head_chunk_rows`)."""
    return ChunkedTokenLogprobs.apply(hidden, weight, labels, head_chunk_rows(weight.shape[0], chunk))
