"""The sparse distillation loss against its dense reference, and the fusion functions on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fuse import losses
from fuse.losses import (
    IGNORE_INDEX,
    PAD_ID,
    dense_reference_divergence,
    distill_loss,
    fuse_sparse,
    get_fusion,
    merge_sparse,
    sparse_divergence,
)


def random_targets(n: int, vocab: int, k: int, seed: int = 0, pad_last: int = 2):
    """Distinct top-K ids per row, probabilities that leave a tail, the last `pad_last` slots padded in half the rows."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])
    probs = torch.softmax(torch.randn(n, k + 1, generator=gen) * 2, dim=-1)[:, :k]
    ids[::2, k - pad_last :] = PAD_ID
    probs[::2, k - pad_last :] = 0.0
    return ids, probs


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_matches_dense_reference_values_and_gradients(kind, temperature):
    n, vocab, k = 12, 50, 6
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(1)) * 3
    ids, probs = random_targets(n, vocab, k)
    sparse_logits = logits.clone().requires_grad_(True)
    dense_logits = logits.double().clone().requires_grad_(True)
    sparse = sparse_divergence(sparse_logits, ids, probs, temperature, kind)
    dense = dense_reference_divergence(dense_logits, ids, probs, temperature, kind)
    torch.testing.assert_close(sparse.double(), dense, rtol=1e-5, atol=1e-5)
    sparse.sum().backward()
    dense.sum().backward()
    torch.testing.assert_close(sparse_logits.grad.double(), dense_logits.grad, rtol=1e-4, atol=1e-5)


def test_full_vocabulary_targets_equal_torch_soft_cross_entropy_and_kl():
    n, vocab = 8, 20
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(n, vocab, generator=gen)
    probs = torch.softmax(torch.randn(n, vocab, generator=gen), dim=-1)
    ids = torch.arange(vocab).expand(n, vocab)
    ce = sparse_divergence(logits, ids, probs, kind="ce")
    torch.testing.assert_close(ce, F.cross_entropy(logits, probs, reduction="none"), rtol=1e-5, atol=1e-5)
    kl = sparse_divergence(logits, ids, probs, kind="kl")
    expected = F.kl_div(torch.log_softmax(logits, -1), probs, reduction="none").sum(-1)
    torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-5)


def test_tail_bucket_by_hand():
    # Student (0.5, 0.3, 0.2); teacher stores only id 0 with p = 0.6, so its tail is 0.4 and the student's is 0.5.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    ce = sparse_divergence(logits, torch.tensor([[0]]), torch.tensor([[0.6]]))
    assert ce.item() == pytest.approx(-(0.6 * math.log(0.5) + 0.4 * math.log(0.5)), abs=1e-6)
    kl = sparse_divergence(logits, torch.tensor([[0]]), torch.tensor([[0.6]]), kind="kl")
    expected_kl = 0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5)
    assert kl.item() == pytest.approx(expected_kl, abs=1e-6)


def test_kl_is_zero_when_the_student_matches_the_teacher():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    kl = sparse_divergence(logits, torch.tensor([[1, 0]]), torch.tensor([[0.3, 0.5]]), kind="kl")
    assert kl.item() == pytest.approx(0.0, abs=1e-6)


def test_min_ce_picks_the_lower_ce_per_sequence_ties_to_pivot():
    ce = torch.tensor([[1.0, 2.0], [3.0, 0.5], [1.0, 1.0]])
    assert get_fusion("min_ce").fn(ce).tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]


def test_avg_ce_is_softmax_of_negative_ce():
    # exp(0) : exp(-ln 3) = 1 : 1/3  ->  0.75 : 0.25
    weights = get_fusion("avg_ce").fn(torch.tensor([[0.0, math.log(3.0)]]))
    torch.testing.assert_close(weights, torch.tensor([[0.75, 0.25]]))


def test_source_only_puts_all_weight_on_the_source():
    assert get_fusion("source_only").fn(torch.tensor([[0.1, 5.0]])).tolist() == [[0.0, 1.0]]


def test_unknown_fusion_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown fusion function 'max_ce'.*min_ce"):
        get_fusion("max_ce")


def test_fuse_sparse_mixes_overlapping_top_k_by_hand():
    pivot = (torch.tensor([[1, 2]]), torch.log(torch.tensor([[0.5, 0.3]])))
    source = (torch.tensor([[2, 3]]), torch.log(torch.tensor([[0.6, 0.2]])))
    ids, probs = fuse_sparse([pivot, source], torch.tensor([0.5, 0.5]))
    got = {int(i): round(float(p), 6) for i, p in zip(ids[0], probs[0], strict=True) if i >= 0}
    assert got == {1: 0.25, 2: 0.45, 3: 0.1}
    assert float(1 - probs.sum()) == pytest.approx(0.2)  # the tail: 0.5 * 0.2 + 0.5 * 0.2


def test_fuse_sparse_with_one_hot_weights_keeps_one_teacher():
    pivot = (torch.tensor([[1, 2]]), torch.log(torch.tensor([[0.5, 0.3]])))
    source = (torch.tensor([[2, 3]]), torch.log(torch.tensor([[0.6, 0.2]])))
    ids, probs = fuse_sparse([pivot, source], torch.tensor([0.0, 1.0]))
    assert ids.tolist() == [[2, 3]]
    torch.testing.assert_close(probs, torch.tensor([[0.6, 0.2]]))


def test_merge_sparse_sums_duplicates_and_pads():
    ids, probs = merge_sparse(torch.tensor([[4, 2, 4, PAD_ID]]), torch.tensor([[0.1, 0.2, 0.3, 0.0]]))
    assert ids.tolist() == [[4, 2]]
    torch.testing.assert_close(probs, torch.tensor([[0.4, 0.2]]))


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    b, t, vocab, k = 2, 7, 30, 4
    logits = torch.randn(b, t, vocab, generator=gen)
    labels = torch.randint(0, vocab, (b, t), generator=gen)
    labels[:, :3] = IGNORE_INDEX  # the prompt
    ids, probs = random_targets(b * t, vocab, k, seed=seed)
    return logits, labels, ids.view(b, t, k), probs.view(b, t, k)


def test_lambda_one_is_plain_shifted_cross_entropy():
    logits, labels, ids, probs = _batch()
    parts = distill_loss(logits, labels, ids, probs, lambda_=1.0)
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, 30), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(parts.loss, expected)
    assert parts.tokens == 2 * 4  # positions 3..6 of each row are response tokens


@pytest.mark.parametrize("lambda_", [1.0, 0.6])
def test_label_smoothing_matches_torch_on_the_gold_term(lambda_):
    """The label_smoothing control's gold term is torch's smoothed CE; with a teacher the mix still holds."""
    logits, labels, ids, probs = _batch()
    parts = distill_loss(logits, labels, ids, probs, lambda_=lambda_, label_smoothing=0.1)
    mask = labels[:, 1:] != IGNORE_INDEX
    selected = logits[:, :-1][mask]
    gold = F.cross_entropy(selected, labels[:, 1:][mask], label_smoothing=0.1)
    # by hand: (1 − ε)·CE + ε·mean over the vocabulary of −log q
    logq = torch.log_softmax(selected, dim=-1)
    by_hand = (0.9 * -logq.gather(-1, labels[:, 1:][mask][:, None])[:, 0] - 0.1 * logq.mean(-1)).mean()
    torch.testing.assert_close(gold, by_hand)
    teacher = dense_reference_divergence(selected, ids[:, 1:][mask], probs[:, 1:][mask]).mean()
    expected = lambda_ * gold.double() + (1 - lambda_) * teacher if lambda_ < 1 else gold.double()
    torch.testing.assert_close(parts.loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(distill_loss(logits, labels, ids, probs, lambda_=lambda_).loss, parts.loss)


def test_distill_loss_mixes_gold_and_teacher_terms():
    logits, labels, ids, probs = _batch()
    parts = distill_loss(logits, labels, ids, probs, lambda_=0.9)
    mask = labels[:, 1:] != IGNORE_INDEX
    selected = logits[:, :-1][mask]
    teacher = dense_reference_divergence(selected, ids[:, 1:][mask], probs[:, 1:][mask]).mean()
    gold = F.cross_entropy(selected, labels[:, 1:][mask])
    torch.testing.assert_close(parts.loss.double(), 0.9 * gold.double() + 0.1 * teacher, rtol=1e-5, atol=1e-6)


def test_positions_without_teacher_get_the_gold_term_only_and_finite_gradients():
    logits, labels, ids, probs = _batch()
    ids[0, 4:] = PAD_ID
    probs[0, 4:] = 0.0
    logits.requires_grad_(True)
    parts = distill_loss(logits, labels, ids, probs, lambda_=0.5)
    parts.loss.backward()
    assert torch.isfinite(logits.grad).all()
    mask = labels[:, 1:] != IGNORE_INDEX
    with_teacher = mask.clone()
    with_teacher[0, 3:] = False  # target positions 4.. (shifted: 3..) of row 0 have no teacher
    expected = dense_reference_divergence(
        logits[:, :-1][with_teacher].detach(), ids[:, 1:][with_teacher], probs[:, 1:][with_teacher]
    ).mean()
    torch.testing.assert_close(parts.distill.double(), expected, rtol=1e-5, atol=1e-6)


def test_registries_record_a_reference():
    assert set(losses.FUSIONS) >= {"min_ce", "avg_ce", "source_only"}
    assert all(f.reference for f in losses.FUSIONS.values())
    assert set(losses.DIVERGENCES) == {"ce", "kl"}


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_fused_backward_matches_autograd(kind):
    logits, labels, ids, probs = _batch(seed=5)
    logits = logits * 3
    ids[1, 5:] = PAD_ID  # positions without a teacher
    probs[1, 5:] = 0.0
    logits[0, 4, ids[0, 5, :2]] = 40.0  # the student's tail at that position underflows: the clamped branch
    results = []
    for fused in (True, False):
        x = logits.clone().requires_grad_(True)
        parts = distill_loss(x, labels, ids, probs, lambda_=0.3, kind=kind, fused=fused)
        parts.loss.backward()
        results.append((parts.loss.detach(), parts.distill, x.grad))
    (loss_f, distill_f, grad_f), (loss_a, distill_a, grad_a) = results
    torch.testing.assert_close(loss_f, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(distill_f, distill_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_f, grad_a, rtol=1e-4, atol=1e-7)


def test_fused_gradient_passes_gradcheck():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(5, 12, generator=gen, dtype=torch.float64).requires_grad_(True)
    gold = torch.randint(0, 12, (5,), generator=gen)
    ids, probs = random_targets(5, 12, 4, seed=9)
    p, tail = losses.teacher_buckets(probs.double(), 1.0)
    assert torch.autograd.gradcheck(lambda z: losses.FusedSparseCE.apply(z, gold, ids, p, tail), (logits,))


# ------------------------------------------------------------------- tiny student tails, bucket tempering, T²


def _tiny_tail_logits(n: int = 6, vocab: int = 1000, k: int = 4, tail: float = 1e-5, offset: float = 50.0):
    """Logits whose mass outside `ids` is ≈ `tail`: the ids sit `gap` above a flat rest, all shifted by `offset`
    (real logits are far from 0, which is what makes 1 − Σq lose digits in float32)."""
    gen = torch.Generator().manual_seed(11)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])
    logits = torch.randn(n, vocab, generator=gen) * 0.1
    gap = math.log((vocab - k) * (1 - tail) / (k * tail))
    logits.scatter_add_(-1, ids, torch.full((n, k), gap))
    return logits + offset, ids


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("gap", [40.0, 60.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_peaked_student_has_finite_values_and_gradients(kind, gap, temperature):
    """The student's tail underflows in float32 (Σq rounds to 1): value and gradient must stay finite."""
    n, vocab, k = 6, 40, 4
    gen = torch.Generator().manual_seed(1)
    ids, probs = random_targets(n, vocab, k, seed=1)
    logits = torch.randn(n, vocab, generator=gen)
    logits.scatter_add_(-1, ids.clamp(min=0), (ids >= 0) * gap)
    logits.requires_grad_(True)
    value = sparse_divergence(logits, ids, probs, temperature, kind)
    assert torch.isfinite(value).all()
    value.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_student_tail_of_1e_5_matches_the_float64_dense_reference():
    """A teacher with all its mass in the tail (probs 0 at its ids) makes the CE −log q_tail exactly."""
    logits, ids = _tiny_tail_logits()
    probs = torch.zeros(ids.shape)
    dense_tail = torch.exp(-dense_reference_divergence(logits, ids, probs))
    assert ((dense_tail - 1e-5).abs() < 2e-6).all()  # the case is what it claims to be
    # the old formula, log(1 − Σq) in float32, is off by more than 5% here
    logq = logits.gather(-1, ids) - torch.logsumexp(logits, -1, keepdim=True)
    old_tail = -torch.expm1(torch.logsumexp(logq, -1)).double()
    assert ((old_tail - dense_tail).abs() / dense_tail).max() > 0.05
    sparse_tail = torch.exp(-sparse_divergence(logits, ids, probs).double())
    torch.testing.assert_close(sparse_tail, dense_tail, rtol=1e-3, atol=0.0)


def _tiny_tail_batch():
    """A batch whose student tails are ≈ 1e-5 at every position, against teachers with tails of 5–50%."""
    b, t, vocab, k = 2, 5, 1000, 4
    logits, ids = _tiny_tail_logits(n=b * t, vocab=vocab, k=k)
    gen = torch.Generator().manual_seed(12)
    probs = torch.softmax(torch.randn(b * t, k + 1, generator=gen), dim=-1)[:, :k]
    labels = torch.randint(0, vocab, (b, t), generator=gen)
    labels[:, :1] = IGNORE_INDEX
    # the target AT position s + 1 is compared with the logits at s: shift the ids to match
    return logits.view(b, t, vocab), labels, ids.view(b, t, k).roll(1, dims=1), probs.view(b, t, k)


@pytest.mark.parametrize("fused", [True, False])
def test_distill_loss_matches_the_dense_reference_at_a_1e_5_student_tail(fused):
    """Values and gradients of both paths against float64 autograd of the dense reference."""
    logits, labels, ids, probs = _tiny_tail_batch()
    x = logits.clone().requires_grad_(True)
    parts = distill_loss(x, labels, ids, probs, lambda_=0.0, fused=fused)
    parts.loss.backward()
    mask = labels[:, 1:] != IGNORE_INDEX
    ref_logits = logits.double().requires_grad_(True)
    expected = dense_reference_divergence(
        ref_logits[:, :-1][mask], ids[:, 1:][mask], probs[:, 1:][mask]
    ).mean()
    expected.backward()
    torch.testing.assert_close(parts.distill.double(), expected.detach(), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(x.grad.double(), ref_logits.grad, rtol=1e-4, atol=1e-6)


def test_fused_matches_autograd_at_a_1e_5_student_tail():
    logits, labels, ids, probs = _tiny_tail_batch()
    results = []
    for fused in (True, False):
        x = logits.clone().requires_grad_(True)
        parts = distill_loss(x, labels, ids, probs, lambda_=0.3, fused=fused)
        parts.loss.backward()
        results.append((parts.loss.detach(), x.grad))
    (loss_f, grad_f), (loss_a, grad_a) = results
    torch.testing.assert_close(loss_f, loss_a, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(grad_f, grad_a, rtol=1e-4, atol=1e-7)


def test_student_is_tempered_on_the_teachers_buckets_by_hand():
    # Student (0.5, 0.3, 0.2), teacher stores id 0 (p = 0.6): buckets (0.5 | 0.5) and (0.6 | 0.4). At T = 2 the
    # student's buckets stay (0.5, 0.5) — its tail is one bucket, √0.5 : √0.5 — so CE = log 2 whatever the teacher.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    ce = sparse_divergence(logits, torch.tensor([[0]]), torch.tensor([[0.6]]), temperature=2.0)
    assert ce.item() == pytest.approx(math.log(2.0), abs=1e-6)


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_tempered_full_vocabulary_targets_equal_the_textbook_soft_target_loss(kind):
    """With J = V (no tail) bucket tempering is Hinton's: softmax(log p / T) against softmax(z / T)."""
    n, vocab, temperature = 8, 20, 2.0
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(n, vocab, generator=gen) * 3
    # multiples of 1/256 that sum to exactly 1 in float32: no rounding-noise tail for tempering to amplify
    draws = torch.multinomial(
        torch.rand(n, vocab, generator=gen), 256 - vocab, replacement=True, generator=gen
    )
    probs = (1 + F.one_hot(draws, vocab).sum(1)).float() / 256
    ids = torch.arange(vocab).expand(n, vocab)
    soft_p = torch.softmax(probs.double().log() / temperature, dim=-1)
    logq = torch.log_softmax(logits.double() / temperature, dim=-1)
    expected = -(soft_p * logq).sum(-1)
    if kind == "kl":
        expected = expected + (soft_p * soft_p.log()).sum(-1)
    got = sparse_divergence(logits, ids, probs, temperature, kind)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    dense = dense_reference_divergence(logits, ids, probs, temperature, kind)
    torch.testing.assert_close(dense, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_distill_term_is_scaled_by_temperature_squared(kind):
    """Hinton et al.: T²·D keeps the soft term's gradient from shrinking as 1/T²."""
    logits, labels, ids, probs = _batch()
    parts = distill_loss(logits, labels, ids, probs, lambda_=0.5, temperature=2.0, kind=kind)
    mask = labels[:, 1:] != IGNORE_INDEX
    selected = logits[:, :-1][mask]
    divergence = dense_reference_divergence(selected, ids[:, 1:][mask], probs[:, 1:][mask], 2.0, kind).mean()
    torch.testing.assert_close(parts.distill.double(), 4.0 * divergence, rtol=1e-5, atol=1e-6)
    gold = F.cross_entropy(selected, labels[:, 1:][mask])
    torch.testing.assert_close(
        parts.loss.double(), 0.5 * gold.double() + 0.5 * 4.0 * divergence, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_targets_give_finite_gradients_on_both_paths(temperature):
    """No tail at all (J = V): the student's tail is log 0, which must pass a zero gradient, not NaN."""
    b, t, vocab = 2, 4, 12
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(b, t, vocab, generator=gen)
    labels = torch.randint(0, vocab, (b, t), generator=gen)
    ids = torch.arange(vocab).expand(b, t, vocab).contiguous()
    probs = torch.softmax(torch.randn(b, t, vocab, generator=gen), dim=-1)
    grads = []
    for fused in (True, False):
        x = logits.clone().requires_grad_(True)
        distill_loss(x, labels, ids, probs, lambda_=0.5, temperature=temperature, fused=fused).loss.backward()
        assert torch.isfinite(x.grad).all()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_chunked_token_logprobs_match_the_dense_log_softmax_and_its_gradients():
    from fuse.losses import token_logprobs

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    upstream = torch.randn(37)
    dense = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels[:, None]).squeeze(-1)
    (dense * upstream).sum().backward()
    want = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked = token_logprobs(hidden, weight, labels, chunk=8)  # 37 = four full chunks and a partial one
    (chunked * upstream).sum().backward()
    assert torch.allclose(chunked, dense, atol=1e-5)
    assert torch.allclose(hidden.grad, want[0], atol=1e-4) and torch.allclose(weight.grad, want[1], atol=1e-4)


def test_the_head_chunk_bounds_the_logits_whatever_the_vocabulary(monkeypatch):
    """A chunk's rows follow the vocabulary (at 262k: 256 rows, 256 MiB of float32 logits), an explicit chunk is
    kept, and the default chunking gives the same log-probs as one chunk."""
    import fuse.losses as losses

    assert losses.head_chunk_rows(262_144) * 262_144 <= losses.HEAD_CHUNK_ELEMENTS
    assert losses.head_chunk_rows(262_144) == 256 and losses.head_chunk_rows(32_000) == 2097
    assert losses.head_chunk_rows(262_144, chunk=7) == 7 and losses.head_chunk_rows(1 << 40) == 1
    monkeypatch.setattr(losses, "HEAD_CHUNK_ELEMENTS", 50 * 6)  # 6 rows a chunk at a 50-token vocabulary
    torch.manual_seed(0)
    hidden, weight, labels = torch.randn(37, 16), torch.randn(50, 16), torch.randint(0, 50, (37,))
    dense = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels[:, None]).squeeze(-1)
    assert torch.allclose(losses.token_logprobs(hidden, weight, labels), dense, atol=1e-5)


@pytest.mark.parametrize(("lambda_", "kind"), [(0.5, "ce"), (0.3, "kl"), (1.0, "ce")])
def test_the_loss_from_hidden_states_equals_the_loss_on_full_logits(lambda_, kind):
    """distill_loss_from_hidden (the head applied in chunks to the response rows only) against distill_loss on
    hidden @ weightᵀ: the same loss, parts and gradients for the hidden states and the head, with prompt rows,
    rows without a teacher, repeated and padded ids, a partial chunk."""
    from fuse.losses import distill_loss_from_hidden

    torch.manual_seed(1)
    batch, length, width, vocab, j = 3, 11, 8, 40, 5
    hidden = torch.randn(batch, length, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length))
    labels[:, :3] = IGNORE_INDEX  # a prompt
    labels[2, 8:] = IGNORE_INDEX  # a padded row
    ids = torch.randint(0, vocab, (batch, length, j))
    ids[0, 5, 1] = ids[0, 5, 0]  # a repeated id
    ids[..., -1] = PAD_ID
    ids[1, 6] = PAD_ID  # a position without a teacher
    probs = torch.softmax(torch.randn(batch, length, j), -1) * 0.9
    probs = probs.masked_fill(ids < 0, 0.0)

    want = distill_loss(hidden @ weight.T, labels, ids, probs, lambda_=lambda_, kind=kind)
    want.loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = distill_loss_from_hidden(hidden, weight, labels, ids, probs, lambda_=lambda_, kind=kind, chunk=7)
    got.loss.backward()

    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.gold_ce, want.gold_ce, rtol=1e-5, atol=1e-6)
    assert got.tokens == want.tokens
    if want.distill is None:
        assert got.distill is None
    else:
        torch.testing.assert_close(got.distill, want.distill, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad, grads[1], rtol=1e-4, atol=1e-6)
