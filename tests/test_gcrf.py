"""The Gaussian CRF: CG solve and its Eq. 15 backward against dense linear algebra, the model,
online scaling and a few training steps on the tiny image fixture."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsp.errors import DspError
from dsp.inference.cg import (GCRFInference, conjugate_gradient, effective_lambda, gcrf_solve, low_rank_matvec,
                              potts_solve)
from dsp.models.gcrf import GaussianCRF, mean_abs_gram
from dsp.nn.unet import UNet
from dsp.objectives.segmentation import SegmentationCrossEntropy, UnaryCrossEntropy
from dsp.tasks.oracles import soft_iou
from dsp.training.scaling import choose_unary_scale
from fixtures_images import write_image_folder


def dense_lambda(emb, lam, margin=0.0):
    """λ_eff = λ_max(A Aᵀ)·(1 + margin) + λ from the P×P matrix: [B]."""
    return torch.linalg.eigvalsh(emb @ emb.transpose(1, 2))[:, -1] * (1 + margin) + lam


def dense_solve(u, emb, lam, margin=0.0):
    """(λ_eff I - A Aᵀ)⁻¹ U with the P×P matrix formed: [B, P]."""
    eye = torch.eye(emb.shape[1], dtype=emb.dtype)
    m = dense_lambda(emb, lam, margin)[:, None, None] * eye - emb @ emb.transpose(1, 2)  # [B, P, P]
    return torch.linalg.solve(m, u.unsqueeze(-1)).squeeze(-1)


def problem(b=3, p=12, d=4, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, p, generator=gen, dtype=dtype), torch.randn(b, p, d, generator=gen, dtype=dtype)


def test_effective_lambda_is_the_top_eigenvalue_of_the_pixel_gram_plus_lam():
    _, emb = problem()
    torch.testing.assert_close(effective_lambda(emb, 0.5, margin=0.1), dense_lambda(emb, 0.5, 0.1))
    eye = torch.eye(emb.shape[1], dtype=emb.dtype)
    m = effective_lambda(emb, 0.5)[:, None, None] * eye - emb @ emb.transpose(1, 2)
    assert torch.linalg.eigvalsh(m)[:, 0].min().item() == pytest.approx(0.5)  # smallest eigenvalue = λ


@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_cg_matches_dense_solve_and_needs_about_rank_plus_one_iterations(margin):
    u, emb = problem()
    s, iterations, converged = gcrf_solve(u, emb, lam=0.5, tol=1e-12, max_iter=200, margin=margin)
    assert converged and iterations <= emb.shape[-1] + 2  # D + 1 distinct eigenvalues
    torch.testing.assert_close(s, dense_solve(u, emb, 0.5, margin), rtol=1e-9, atol=1e-9)
    u32, emb32 = u.float(), emb.float()
    s32, _, _ = gcrf_solve(u32, emb32, lam=0.5, margin=margin)
    torch.testing.assert_close(s32, dense_solve(u32, emb32, 0.5, margin), rtol=1e-3, atol=1e-3)


def test_cg_freezes_converged_examples_and_respects_max_iter():
    u, emb = problem(b=2)
    u[0] = 0.0  # solved by s = 0 before the first iteration
    lam_eff = effective_lambda(emb, 1.0)
    matvec = lambda v: low_rank_matvec(emb, v, lam_eff)  # noqa: E731
    x, _, done = conjugate_gradient(matvec, u, tol=1e-12, max_iter=100)
    assert done.all() and (x[0] == 0).all()
    _, iterations, done = conjugate_gradient(matvec, u, tol=1e-12, max_iter=2)
    assert iterations == 2 and not done[1]


def test_potts_solve_backward_with_lambda_as_an_input():
    u, emb = problem(b=2, p=6, d=3)
    lam_eff = (dense_lambda(emb, 0.7) + torch.tensor([0.0, 0.3], dtype=emb.dtype)).detach()
    args = (u.requires_grad_(True), emb.requires_grad_(True), lam_eff.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda a, b, c: potts_solve(a, b, c, tol=1e-13, max_iter=100)[0], args)


def test_cg_backward_matches_autograd_through_the_dense_solve():
    u, emb = problem(b=2, p=6, d=3)
    u.requires_grad_(True)
    emb.requires_grad_(True)
    # the whole path: λ_eff = eigvalsh(Aᵀ A)[-1] + λ depends on A too
    assert torch.autograd.gradcheck(lambda a, b: gcrf_solve(a, b, 0.7, tol=1e-13, max_iter=100)[0], (u, emb))
    assert torch.autograd.gradcheck(lambda a, b: gcrf_solve(a, b, 0.7, tol=1e-13, max_iter=100, margin=0.3)[0],
                                    (u, emb))
    w = torch.randn(2, 6, dtype=torch.float64)  # an arbitrary upstream gradient ∂L/∂s*
    g_cg = torch.autograd.grad((gcrf_solve(u, emb, 0.7, tol=1e-13)[0] * w).sum(), (u, emb))
    g_dense = torch.autograd.grad((dense_solve(u, emb, 0.7) * w).sum(), (u, emb))
    for a, b in zip(g_cg, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_the_solve_smooths_pixels_with_identical_embeddings_towards_agreement():
    """Two pixels with the same embedding, a strong positive unary on the first only: the second
    is pulled to the same sign (the (A Aᵀ + λI)⁻¹ of the old convention pushed it negative)."""
    emb = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.5]]], dtype=torch.float64) * 2
    u = torch.tensor([[5.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    s, _, converged = gcrf_solve(u, emb, lam=1.0, tol=1e-12)
    assert converged and s[0, 1] > 0.5 and s[0, 0] > u[0, 0] / effective_lambda(emb, 1.0)[0]
    assert s[0, 2:].abs().max() < 1e-9  # orthogonal embeddings: no coupling
    torch.testing.assert_close(s, dense_solve(u, emb, 1.0))
    # also through the model path, with a small grid whose embeddings are identical everywhere:
    # a single strongly positive pixel makes the others positive, where they were 0
    model = GaussianCRF(torch.nn.Identity(), lambda x: torch.ones(1, 2, 3, 3, dtype=torch.float64), lam=1.0,
                        cg_tol=1e-12)
    x = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    x[0, 0, 1, 1] = 5.0
    s_grid = model.features(x).solve()[0]
    assert (s_grid > 0).all()


def test_solve_rejects_bad_shapes_and_lambda():
    u, emb = problem()
    with pytest.raises(ValueError, match="embeddings"):
        gcrf_solve(u, emb[:, :-1], 1.0)
    with pytest.raises(ValueError, match="lam"):
        gcrf_solve(u, emb, 0.0)
    with pytest.raises(ValueError, match="margin"):
        gcrf_solve(u, emb, 1.0, margin=-0.1)


def tiny_model(pairwise=True, seed=0):
    torch.manual_seed(seed)
    unary = UNet(3, 1, base_width=4, depth=2)
    emb = UNet(3, None, base_width=4, depth=1) if pairwise else None
    return GaussianCRF(unary, emb, lam=1.0, cg_tol=1e-6, cg_max_iter=50)


def test_model_potentials_scale_and_shapes():
    model = tiny_model().eval()
    x = torch.rand(2, 3, 8, 10)
    raw = model.unary_net(x, lengths=None)
    assert raw.unary.shape == (2, 8, 10) and raw.embeddings.shape == (2, 80, 4)
    f1, f4 = model.potentials(raw, None, scale=1.0), model.potentials(raw, None, scale=4.0)
    torch.testing.assert_close(f4.unary, 4 * f1.unary)
    s1, s4 = f1.solve()[0], f4.solve()[0]
    torch.testing.assert_close(s4, 4 * s1, rtol=1e-4, atol=1e-4)  # the system is linear in α u
    with torch.no_grad():  # without gradients one solve at α = 1 serves every α (online scaling)
        s4_cached = f4.solve()[0]
        assert raw.unit_solution is not None
        torch.testing.assert_close(model.potentials(raw, None, scale=0.5).solve()[0], s1 / 2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s4_cached, s4, rtol=1e-4, atol=1e-4)
    # mode "inference": σ(s*) in [0, 1], the solution of Eq. 12
    result = GCRFInference()(model, model.features(x))
    assert result.y.shape == (2, 8, 10) and ((result.y >= 0) & (result.y <= 1)).all()
    torch.testing.assert_close(torch.logit(result.y.double()).float(), s1, rtol=1e-3, atol=1e-3)
    diag = model.diagnostics(x, torch.zeros(2, 8, 10))
    assert diag["potentials/unary_pairwise_ratio"] > 0 and diag["potentials/unary_scale"] == 1.0
    assert diag["potentials/lam_eff"] > model.lam


def test_mean_abs_gram_matches_the_dense_matrix():
    _, emb = problem(b=5, p=7, d=3)
    dense = (emb @ emb.transpose(1, 2)).abs().mean().item()
    assert mean_abs_gram(emb, chunk=2) == pytest.approx(dense)


def test_unary_only_model_is_alpha_times_u():
    model = tiny_model(pairwise=False).eval()
    x = torch.rand(2, 3, 8, 8)
    feats = model.potentials(model.unary_net(x), None, scale=2.0)
    s, iterations, converged = feats.solve()
    assert iterations == 0 and converged
    torch.testing.assert_close(s, 2.0 * model.unary(x)[:, 0])


def fixture_batch(tmp_path, size=16):
    from dsp.data.images import load_horses

    data = load_horses(write_image_folder(tmp_path / "imgs"), size=size, train=(1, 6), val=(5, 6), test=(7, 8))
    return data.split("train").tensors


def train_steps(model, objective, x, y, steps=15):
    """Adam steps on one batch -> (the loss before each step, the last step's logs)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss, logs = objective.loss(model, None, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, logs


@pytest.mark.parametrize("objective", [SegmentationCrossEntropy(), UnaryCrossEntropy()])
def test_a_few_training_steps_reduce_the_loss(tmp_path, objective):
    x, y = fixture_batch(tmp_path)
    model = tiny_model()
    losses, logs = train_steps(model, objective, x, y)
    assert losses[-1] < 0.7 * losses[0], losses
    if isinstance(objective, UnaryCrossEntropy):
        assert all(p.grad is None for p in model.pairwise.parameters())
    else:
        assert logs["cg_iterations"] > 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.pairwise.parameters())


def test_online_scaling_picks_the_alpha_of_least_loss(tmp_path):
    x, y = fixture_batch(tmp_path)
    model, objective = tiny_model().eval(), SegmentationCrossEntropy()
    with torch.no_grad():
        losses = {}
        for t in range(-3, 4):
            model.unary_scale.fill_(2.0 ** t)
            losses[2.0 ** t] = objective.loss(model, None, x, y)[0].item()
    logs = choose_unary_scale(model, objective, x, y, min_exp=-3, max_exp=3, subset=100, batch_size=4)
    best = min(losses, key=losses.get)
    assert logs["scaling/alpha"] == best == model.unary_scale.item()
    assert logs["scaling/subset_loss"] == pytest.approx(losses[best], rel=1e-4)


def test_unit_gain_is_lambda_eff_times_the_plain_solve_and_passes_orthogonal_unaries_through():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    emb = torch.randn(2, 9, 2, dtype=torch.float64)
    plain = GaussianCRF(torch.nn.Identity(), lambda _: emb.transpose(1, 2).reshape(2, 2, 3, 3), lam=0.5,
                        cg_tol=1e-12, lam_margin=1.0)
    unit = GaussianCRF(torch.nn.Identity(), lambda _: emb.transpose(1, 2).reshape(2, 2, 3, 3), lam=0.5,
                       cg_tol=1e-12, lam_margin=1.0, unit_gain=True)
    lam_eff = effective_lambda(emb, 0.5, 1.0)[:, None, None]
    torch.testing.assert_close(unit.features(x).solve()[0], lam_eff * plain.features(x).solve()[0])
    # a unary orthogonal to every embedding column is not changed by (I - AAᵀ/λ_eff)⁻¹
    q, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))
    emb_o = q[:, :2].expand(2, 9, 2).contiguous()
    u = q[:, 5].reshape(1, 1, 3, 3).expand(2, 1, 3, 3).contiguous()
    model = GaussianCRF(torch.nn.Identity(), lambda _: emb_o.transpose(1, 2).reshape(2, 2, 3, 3), lam=0.5,
                        cg_tol=1e-12, lam_margin=1.0, unit_gain=True)
    torch.testing.assert_close(model.features(u).solve()[0], u[:, 0])


def test_soft_iou_term_adds_one_minus_the_soft_iou_per_image():
    # Two 1×2 images. Logits 0 and ln 3 give σ = 1/2 and 3/4.
    # Image 1, mask [1, 0]: ∩ = min(1/2,1) + min(3/4,0) = 1/2, ∪ = 1 + 3/4 → IoU = 2/7.
    # Image 2, mask [1, 1]: ∩ = 1/2 + 3/4 = 5/4, ∪ = 2 → IoU = 5/8.
    logits = torch.tensor([[[0.0, math.log(3.0)]], [[0.0, math.log(3.0)]]])
    y = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])
    ce = F.binary_cross_entropy_with_logits(logits, y)
    plain = SegmentationCrossEntropy().logit_loss(logits, y)
    weighted = SegmentationCrossEntropy(iou_weight=2.0).logit_loss(logits, y)
    assert plain.item() == pytest.approx(ce.item())
    expected = ce.item() + 2.0 * ((1 - 2 / 7) + (1 - 5 / 8)) / 2
    assert weighted.item() == pytest.approx(expected, rel=1e-6)


def test_training_with_the_soft_iou_term_raises_the_soft_iou(tmp_path):
    x, y = fixture_batch(tmp_path)
    model = tiny_model()

    def batch_iou():
        with torch.no_grad():
            return soft_iou(torch.sigmoid(model.features(x).solve()[0]), y).mean().item()

    before = batch_iou()
    train_steps(model, SegmentationCrossEntropy(iou_weight=1.0), x, y)
    assert batch_iou() > before + 0.1, (before, batch_iou())


@pytest.mark.parametrize("weight", [-1, "abc", None])
def test_soft_iou_weight_must_be_a_non_negative_number(weight):
    with pytest.raises(DspError, match="objective.iou_weight"):
        SegmentationCrossEntropy(iou_weight=weight)
