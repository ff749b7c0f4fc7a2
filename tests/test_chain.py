"""Linear-chain CRF inference against brute-force enumeration of all K^T labellings."""
import itertools
import math

import pytest
import torch

from dsp.inference.chain import (hamming_augment, log_partition, marginals, mask_from_lengths, nll,
                                 pairwise_marginals, sequence_score, ssvm_loss, viterbi)
from dsp.inference.mean_field import mean_field_marginals

SEEDS = (0, 1, 2)
CASES = [(K, T, per_edge) for K in (2, 3) for T in (1, 2, 3, 4) for per_edge in (False, True)]


def problem(seed, K, T, per_edge, B=4, dtype=torch.float64, pad=math.nan, scale=1.0):
    """Random potentials; lengths include 1 and T and mix in one batch; padding holds garbage."""
    g = torch.Generator().manual_seed(seed)
    unary = torch.randn(B, T, K, generator=g, dtype=dtype)
    shape = (B, T - 1, K, K) if per_edge else (K, K)
    pairwise = scale * torch.randn(*shape, generator=g, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[-1] = 1, T
    mask = mask_from_lengths(lengths, T)
    unary = unary.masked_fill(~mask[..., None], pad)  # must be ignored
    if per_edge:
        pairwise = pairwise.masked_fill(~mask[:, 1:, None, None], pad)
    return unary, pairwise, lengths


def labels_for(seed, K, lengths, T):
    g = torch.Generator().manual_seed(seed + 100)
    y = torch.randint(0, K, (len(lengths), T), generator=g)
    return y.masked_fill(~mask_from_lengths(lengths, T), -1)


def brute(unary, pairwise, lengths, labels=None):
    """Per example: log Z, unary/pairwise marginals, best labelling and its score, and
    (given labels) max_y [s(y) + Δ(y, y*)] by enumeration."""
    B, T, K = unary.shape
    out = []
    for b in range(B):
        L = int(lengths[b])
        W = [pairwise if pairwise.dim() == 2 else pairwise[b, j] for j in range(T - 1)]
        ys = list(itertools.product(range(K), repeat=L))
        s = torch.stack([sum(unary[b, j, y[j]] for j in range(L)) + sum((W[j][y[j], y[j + 1]] for j in range(L - 1)),
                                                                       unary.new_zeros(())) for y in ys])
        logz = torch.logsumexp(s, 0)
        p = torch.exp(s - logz)
        um, pm = unary.new_zeros(T, K), unary.new_zeros(max(T - 1, 0), K, K)
        for y, py in zip(ys, p):
            for j in range(L):
                um[j, y[j]] += py
            for j in range(L - 1):
                pm[j, y[j], y[j + 1]] += py
        best = int(s.argmax())
        aug = None
        if labels is not None:
            aug = max(float(sv) + sum(y[j] != int(labels[b, j]) for j in range(L)) / L for y, sv in zip(ys, s))
        out.append(dict(logz=logz, um=um, pm=pm, y=list(ys[best]) + [-1] * (T - L), s=s[best], aug=aug))
    return out


@pytest.mark.parametrize("K,T,per_edge", CASES)
def test_exact_inference_matches_brute_force(K, T, per_edge):
    for seed in SEEDS:
        unary, pairwise, lengths = problem(seed, K, T, per_edge)
        ref = brute(unary.nan_to_num(), pairwise.nan_to_num(), lengths)
        torch.testing.assert_close(log_partition(unary, pairwise, lengths), torch.stack([r["logz"] for r in ref]))
        torch.testing.assert_close(marginals(unary, pairwise, lengths), torch.stack([r["um"] for r in ref]))
        torch.testing.assert_close(pairwise_marginals(unary, pairwise, lengths), torch.stack([r["pm"] for r in ref]))
        y, score = viterbi(unary, pairwise, lengths)
        assert y.dtype == torch.int64 and y.tolist() == [r["y"] for r in ref]
        torch.testing.assert_close(score, torch.stack([r["s"] for r in ref]))
        torch.testing.assert_close(sequence_score(y, unary, pairwise, lengths), score)


@pytest.mark.parametrize("per_edge", [False, True])
@pytest.mark.parametrize("scale", [5.0, 60.0])
def test_both_forward_passes_match_brute_force(per_edge, scale):
    """Pairwise tables spanning less than MATMUL_RANGE take the matrix-product forward pass, wider
    ones the logsumexp recursion (scale 60 spans ~250): both are exact, with their gradients."""
    from dsp.inference import chain

    for seed in SEEDS:
        unary, pairwise, lengths = problem(seed, 3, 4, per_edge, scale=scale)
        span = float(pairwise.nan_to_num().amax() - pairwise.nan_to_num().amin())
        assert (span < chain.MATMUL_RANGE) == (scale == 5.0)
        ref = brute(unary.nan_to_num(), pairwise.nan_to_num(), lengths)
        torch.testing.assert_close(log_partition(unary, pairwise, lengths), torch.stack([r["logz"] for r in ref]))
        torch.testing.assert_close(marginals(unary, pairwise, lengths), torch.stack([r["um"] for r in ref]))
        torch.testing.assert_close(pairwise_marginals(unary, pairwise, lengths), torch.stack([r["pm"] for r in ref]))


def test_matrix_product_forward_is_accurate_in_float32_near_its_range_limit(monkeypatch):
    """A table spanning just under MATMUL_RANGE with unaries far apart: float32 matrix products
    agree with the float64 logsumexp recursion (the reference), values and marginals."""
    from dsp.inference import chain

    g = torch.Generator().manual_seed(0)
    unary = 30.0 * torch.randn(64, 14, 26, generator=g, dtype=torch.float64)
    pairwise = torch.rand(26, 26, generator=g, dtype=torch.float64) * (chain.MATMUL_RANGE - 1)
    lengths = torch.randint(1, 15, (64,), generator=g)
    fast_z = log_partition(unary.float(), pairwise.float(), lengths)
    fast_m = marginals(unary.float(), pairwise.float(), lengths)
    monkeypatch.setattr(chain, "MATMUL_RANGE", 0.0)  # force the logsumexp recursion
    ref_z, ref_m = log_partition(unary, pairwise, lengths), marginals(unary, pairwise, lengths)
    torch.testing.assert_close(fast_z.double(), ref_z, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(fast_m.double(), ref_m, rtol=0, atol=1e-4)


@pytest.mark.parametrize("per_edge", [False, True])
def test_marginals_are_distributions_and_zero_on_padding(per_edge):
    unary, pairwise, lengths = problem(3, K=3, T=6, per_edge=per_edge, B=5)
    mask = mask_from_lengths(lengths, 6)
    with torch.no_grad():  # call sites often run inference without grad
        m, pm = marginals(unary, pairwise, lengths), pairwise_marginals(unary, pairwise, lengths)
    assert not m.requires_grad
    torch.testing.assert_close(m.sum(-1), mask.double())
    torch.testing.assert_close(pm.sum((-1, -2)), mask[:, 1:].double())
    # edge marginals are consistent with the unary ones on both sides
    torch.testing.assert_close(pm.sum(-1), m[:, :-1] * mask[:, 1:, None])
    torch.testing.assert_close(pm.sum(-2), m[:, 1:])


@pytest.mark.parametrize("per_edge", [False, True])
def test_nll_is_nonnegative_and_gradient_matches_finite_differences(per_edge):
    for seed in SEEDS:
        unary, pairwise, lengths = problem(seed, K=3, T=4, per_edge=per_edge, pad=7.0)
        labels = labels_for(seed, 3, lengths, 4)
        assert (nll(labels, unary, pairwise, lengths) >= 0).all()
        unary.requires_grad_(), pairwise.requires_grad_()
        assert torch.autograd.gradcheck(lambda u, w: nll(labels, u, w, lengths), (unary, pairwise))


def test_cross_entropy_on_marginals_is_differentiable():
    unary, pairwise, lengths = problem(0, K=3, T=4, per_edge=False, pad=7.0)
    labels = labels_for(0, 3, lengths, 4)
    unary.requires_grad_(), pairwise.requires_grad_()
    # backprop through the marginals (double backward of the forward algorithm), both inputs
    assert torch.autograd.gradcheck(lambda u, w: marginals(u, w, lengths), (unary, pairwise))
    assert torch.autograd.gradcheck(lambda u, w: pairwise_marginals(u, w, lengths), (unary, pairwise))
    # and only one input requiring grad is enough
    m = marginals(unary.detach(), pairwise, lengths)
    mask = labels >= 0
    ce = -(m.gather(2, labels.clamp_min(0)[..., None]).squeeze(-1).clamp_min(1e-12).log() * mask).sum()
    ce.backward()
    assert unary.grad is None and pairwise.grad.abs().sum() > 0
    # single-position chains have no edges
    u1, w1 = torch.randn(2, 1, 3, requires_grad=True), torch.randn(3, 3, requires_grad=True)
    one = torch.ones(2, dtype=torch.int64)
    assert pairwise_marginals(u1, w1, one).shape == (2, 0, 3, 3)
    marginals(u1, w1, one).sum().backward()


@pytest.mark.parametrize("K,T,per_edge", [(2, 4, False), (3, 3, True), (3, 4, False)])
def test_ssvm_loss_matches_brute_force(K, T, per_edge):
    for seed in SEEDS:
        unary, pairwise, lengths = problem(seed, K, T, per_edge, scale=0.3)
        labels = labels_for(seed, K, lengths, T)
        loss = ssvm_loss(labels, unary, pairwise, lengths)
        ref = brute(unary.nan_to_num(), pairwise.nan_to_num(), lengths, labels)
        expected = torch.tensor([r["aug"] for r in ref], dtype=loss.dtype) - sequence_score(
            labels, unary, pairwise, lengths)
        assert (loss >= 0).all()
        torch.testing.assert_close(loss, expected)


def test_hamming_augment_adds_normalised_margin_to_wrong_labels():
    unary = torch.zeros(2, 3, 2)
    labels = torch.tensor([[0, 1, -1], [1, 1, 1]])
    lengths = torch.tensor([2, 3])
    aug = hamming_augment(unary, labels, lengths, weight=2.0)
    expected = torch.tensor([[[0, 1], [1, 0], [0, 0]], [[2 / 3, 0], [2 / 3, 0], [2 / 3, 0]]])
    torch.testing.assert_close(aug, expected)
    torch.testing.assert_close(hamming_augment(unary, labels, lengths, normalise=False)[1, 0], torch.tensor([1.0, 0]))


def test_ssvm_loss_is_zero_when_true_labelling_wins_by_the_margin_and_has_gradient_otherwise():
    labels = torch.tensor([[0, 1, 2, -1], [2, 2, 0, 1]])
    lengths = torch.tensor([3, 4])
    unary = 3.0 * torch.nn.functional.one_hot(labels.clamp_min(0), 3).double()  # true label +3 per position
    pairwise = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    unary.requires_grad_()
    loss = ssvm_loss(labels, unary, pairwise, lengths)
    assert loss.tolist() == [0.0, 0.0]
    # A wrong labelling that wins: positive loss, and the subgradient reaches unary and pairwise.
    flipped = (-unary.detach()).requires_grad_()
    loss = ssvm_loss(labels, flipped, pairwise, lengths)
    assert (loss > 0).all()
    loss.sum().backward()
    assert flipped.grad.abs().sum() > 0 and pairwise.grad.abs().sum() > 0


@pytest.mark.parametrize("per_edge", [False, True])
def test_mean_field(per_edge):
    unary, pairwise, lengths = problem(1, K=3, T=6, per_edge=per_edge, B=5)
    mask = mask_from_lengths(lengths, 6)
    clean = unary.nan_to_num()
    # pairwise = 0: independent positions, q = softmax(U)
    q0 = mean_field_marginals(unary, torch.zeros_like(pairwise), lengths)
    torch.testing.assert_close(q0, torch.softmax(clean, -1) * mask[..., None])
    # weak coupling: close to the exact marginals (error is second order in W)
    weak = 0.05 * pairwise
    q = mean_field_marginals(unary, weak, lengths, sweeps=10)
    torch.testing.assert_close(q, marginals(unary, weak, lengths), atol=2e-3, rtol=0)
    # differentiable through the sweeps (a smaller problem keeps the finite differences cheap)
    u, w, lengths = problem(2, K=2, T=4, per_edge=per_edge, B=2, pad=7.0)
    u.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(lambda u, w: mean_field_marginals(u, w, lengths, sweeps=2), (u, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA"))])
def test_dtypes_and_devices(dtype, device):
    unary, pairwise, lengths = problem(0, K=3, T=5, per_edge=True, B=3, pad=0.0)
    unary, pairwise, lengths = unary.to(device, dtype), pairwise.to(device, dtype), lengths.to(device)
    ref_z = log_partition(unary.cpu().double(), pairwise.cpu().double(), lengths.cpu())
    z = log_partition(unary, pairwise, lengths)
    assert z.dtype == dtype and z.device.type == device
    torch.testing.assert_close(z.cpu().double(), ref_z, atol=1e-5, rtol=1e-5)
    y, _ = viterbi(unary, pairwise, lengths)
    assert marginals(unary, pairwise, lengths).dtype == dtype and y.device.type == device
    assert mean_field_marginals(unary, pairwise, lengths).dtype == dtype
    assert (ssvm_loss(y, unary, pairwise, lengths) >= 0).all()
    assert (nll(y, unary, pairwise, lengths) >= 0).all()


@pytest.mark.parametrize("unary_shape,pairwise_shape,lengths,name", [
    ((2, 3), (3, 3), [1, 1], "unary"),  # wrong ndim
    ((2, 3, 4), (3, 3), [1, 1], "pairwise"),  # K mismatch
    ((2, 3, 4), (2, 3, 4, 4), [1, 1], "pairwise"),  # per-edge needs T-1 edges
    ((2, 3, 4), (4, 4, 4), [1, 1], "pairwise"),  # wrong ndim
    ((2, 3, 4), (4, 4), [1, 4], "lengths"),  # > T
    ((2, 3, 4), (4, 4), [0, 2], "lengths"),  # < 1
    ((2, 3, 4), (4, 4), [1, 2, 3], "lengths"),  # wrong batch
])
def test_bad_shapes_raise_value_error_naming_the_argument(unary_shape, pairwise_shape, lengths, name):
    unary, pairwise, lengths = torch.zeros(unary_shape), torch.zeros(pairwise_shape), torch.tensor(lengths)
    for fn in (log_partition, marginals, pairwise_marginals, viterbi, mean_field_marginals):
        with pytest.raises(ValueError, match=name):
            fn(unary, pairwise, lengths)


def test_bad_labels_raise_value_error():
    unary, lengths = torch.zeros(2, 3, 4), torch.tensor([3, 2])
    with pytest.raises(ValueError, match="labels"):
        nll(torch.zeros(2, 4, dtype=torch.int64), unary, torch.zeros(4, 4), lengths)
    with pytest.raises(ValueError, match="lengths"):
        hamming_augment(unary, torch.zeros(2, 3, dtype=torch.int64), torch.tensor([3, 4]))
