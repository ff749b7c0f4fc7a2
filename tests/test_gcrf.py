"""The Gaussian CRF: CG solve and its Eq. 15 backward against dense linear algebra, the model,
online scaling and a few training steps on the tiny image fixture."""
from __future__ import annotations

import pytest
import torch

from dsp.inference.cg import GCRFInference, conjugate_gradient, gcrf_solve, low_rank_matvec
from dsp.models.gcrf import GaussianCRF, mean_abs_gram
from dsp.nn.unet import UNet
from dsp.objectives.segmentation import SegmentationCrossEntropy, UnaryCrossEntropy
from dsp.training.scaling import choose_unary_scale
from fixtures_images import write_image_folder


def dense_solve(u, emb, lam):
    """(A Aᵀ + λI)⁻¹ U with the P×P matrix formed: [B, P]."""
    m = emb @ emb.transpose(1, 2) + lam * torch.eye(emb.shape[1], dtype=emb.dtype)  # [B, P, P]
    return torch.linalg.solve(m, u.unsqueeze(-1)).squeeze(-1)


def problem(b=3, p=12, d=4, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, p, generator=gen, dtype=dtype), torch.randn(b, p, d, generator=gen, dtype=dtype)


def test_cg_matches_dense_solve_and_needs_about_rank_plus_one_iterations():
    u, emb = problem()
    s, iterations, converged = gcrf_solve(u, emb, lam=0.5, tol=1e-12, max_iter=200)
    assert converged and iterations <= emb.shape[-1] + 2  # rank(A Aᵀ) = D
    torch.testing.assert_close(s, dense_solve(u, emb, 0.5), rtol=1e-9, atol=1e-9)
    u32, emb32 = u.float(), emb.float()
    s32, _, _ = gcrf_solve(u32, emb32, lam=0.5)
    torch.testing.assert_close(s32, dense_solve(u32, emb32, 0.5), rtol=1e-3, atol=1e-3)


def test_cg_freezes_converged_examples_and_respects_max_iter():
    u, emb = problem(b=2)
    u[0] = 0.0  # solved by s = 0 before the first iteration
    matvec = lambda v: low_rank_matvec(emb, v, 1.0)  # noqa: E731
    x, _, done = conjugate_gradient(matvec, u, tol=1e-12, max_iter=100)
    assert done.all() and (x[0] == 0).all()
    _, iterations, done = conjugate_gradient(matvec, u, tol=1e-12, max_iter=2)
    assert iterations == 2 and not done[1]


def test_cg_backward_matches_autograd_through_the_dense_solve():
    u, emb = problem(b=2, p=6, d=3)
    u.requires_grad_(True)
    emb.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: gcrf_solve(a, b, 0.7, tol=1e-13, max_iter=100)[0], (u, emb))
    w = torch.randn(2, 6, dtype=torch.float64)  # an arbitrary upstream gradient ∂L/∂s*
    g_cg = torch.autograd.grad((gcrf_solve(u, emb, 0.7, tol=1e-13)[0] * w).sum(), (u, emb))
    g_dense = torch.autograd.grad((dense_solve(u, emb, 0.7) * w).sum(), (u, emb))
    for a, b in zip(g_cg, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_solve_rejects_bad_shapes_and_lambda():
    u, emb = problem()
    with pytest.raises(ValueError, match="embeddings"):
        gcrf_solve(u, emb[:, :-1], 1.0)
    with pytest.raises(ValueError, match="lam"):
        gcrf_solve(u, emb, 0.0)


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


@pytest.mark.parametrize("objective", [SegmentationCrossEntropy(), UnaryCrossEntropy()])
def test_a_few_training_steps_reduce_the_loss(tmp_path, objective):
    x, y = fixture_batch(tmp_path)
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, logs = objective.loss(model, None, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
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
