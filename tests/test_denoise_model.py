"""Denoising energies (End-to-end SPENs §6.1): gradient checks in y and in the parameters (twice
differentiable, as unrolled learning needs), SoftAbs, the ICNN's convexity, the trainable σ², the
feed-forward baseline, and learning through unrolled descent on a tiny image."""
from __future__ import annotations

import math

import pytest
import torch

from dsp.build import attach_inference
from dsp.compat import check_built
from dsp.errors import DspError
from dsp.inference.unrolled import UnrolledGradientDescent
from dsp.models.denoise import (DeepPrior, DenoisingEnergy, FeedForwardDenoiser, FieldOfExperts,
                                GaussianLikelihood, NoisyImage)
from dsp.nn.smooth import softabs
from dsp.objectives.unrolled import UnrolledLoss


def images(n=2, h=6, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(n, h, w, generator=g, dtype=torch.float64)
    return clean + 0.1 * torch.randn(n, h, w, generator=g, dtype=torch.float64), clean


PRIORS = {
    "foe": lambda: FieldOfExperts(filters=3, kernel=3, beta=5.0, init_scale=0.5),
    "deep": lambda: DeepPrior(channels=2, kernel=3),
    "icnn": lambda: DeepPrior(channels=2, kernel=3, convex=True),
}


def energy(prior: str, seed=0) -> DenoisingEnergy:
    torch.manual_seed(seed)
    return DenoisingEnergy(PRIORS[prior](), GaussianLikelihood(sigma=0.3)).double()


def test_softabs_is_eq_14_and_smooth_at_zero():
    x = torch.tensor([-2.0, 0.0, 0.5], dtype=torch.float64, requires_grad=True)
    beta = 4.0
    expected = [0.5 * (math.log1p(math.exp(beta * v)) + math.log1p(math.exp(-beta * v))) / beta for v in (-2.0, 0.0, 0.5)]
    assert softabs(x, beta).tolist() == pytest.approx(expected)
    (g,) = torch.autograd.grad(softabs(x, beta).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert g[1].item() == pytest.approx(0.0) and h[1].item() == pytest.approx(beta / 4)
    assert torch.autograd.gradgradcheck(lambda t: softabs(t, beta), (x,))


@pytest.mark.parametrize("prior", sorted(PRIORS))
def test_energy_gradients_and_second_derivatives_match_finite_differences(prior):
    model = energy(prior)
    noisy, _ = images()
    y = noisy.clone().requires_grad_(True)
    feats = NoisyImage(noisy)
    assert torch.autograd.gradcheck(lambda t: model.energy(t, feats), (y,))
    assert torch.autograd.gradgradcheck(lambda t: model.energy(t, feats), (y,))
    # In the parameters too: ∂E/∂θ and ∂(∇_y E)/∂θ, which unrolled learning needs.
    for name, p in model.named_parameters():
        def of_param(value, name=name):
            original = dict(model.named_parameters())[name].data
            dict(model.named_parameters())[name].data = value
            try:
                return model.energy(y, feats)
            finally:
                dict(model.named_parameters())[name].data = original
        direction = torch.randn_like(p)
        (g,) = torch.autograd.grad(model.energy(y, feats).sum(), p)
        h = 1e-6
        numeric = (of_param(p.data + h * direction).sum() - of_param(p.data - h * direction).sum()) / (2 * h)
        assert (g * direction).sum().item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-8), name


def test_the_input_convex_prior_is_convex_and_the_plain_one_need_not_be():
    torch.manual_seed(1)
    prior = DeepPrior(channels=4, kernel=3, convex=True).double()
    with torch.no_grad():
        prior.conv2.weight.normal_()  # negative entries are used as 0
        prior.out.weight.normal_()
    a, b = torch.rand(2, 20, 5, 6, dtype=torch.float64)
    mid = prior((a + b) / 2)
    assert (mid <= (prior(a) + prior(b)) / 2 + 1e-12).all()


def test_sigma_is_trainable_and_weighs_the_prior():
    model = energy("foe")
    noisy, clean = images()
    feats = NoisyImage(noisy)
    e1 = model.energy(clean, feats)
    with torch.no_grad():
        model.likelihood.log_sigma2 += math.log(2.0)
    e2 = model.energy(clean, feats)
    data = ((clean - noisy) ** 2).flatten(1).sum(-1)
    assert torch.allclose(e2 - data, 2 * (e1 - data))  # the prior term doubled with σ²
    inference = UnrolledGradientDescent(steps=3, lr=0.2, momentum=0.25, learn_lr=True,
                                        parameterisation="unconstrained", entropy_temperature=0.0).double()
    attach_inference(model, inference)
    loss, _ = UnrolledLoss(loss="mse").loss(model, inference, noisy, clean)
    loss.backward()
    assert model.likelihood.log_sigma2.grad is not None and model.likelihood.log_sigma2.grad != 0
    assert inference.log_lr.grad is not None and (inference.log_lr.grad != 0).all()


def test_without_a_prior_descent_stays_at_the_noisy_image():
    model = energy("foe")
    with torch.no_grad():
        model.prior.filters.zero_()
    noisy, _ = images()
    out = UnrolledGradientDescent(steps=5, lr=0.3, parameterisation="unconstrained",
                                  entropy_temperature=0.0).double()(model, model.features(noisy))
    assert torch.allclose(out.y, noisy)


def test_learning_through_unrolled_descent_improves_a_tiny_denoiser():
    torch.manual_seed(0)
    model = DenoisingEnergy(FieldOfExperts(filters=4, kernel=3), GaussianLikelihood(sigma=0.1))
    inference = UnrolledGradientDescent(steps=3, lr=0.3, momentum=0.25, learn_lr=True,
                                        parameterisation="unconstrained", entropy_temperature=0.0)
    attach_inference(model, inference)
    # Piecewise-constant clean images: a smoothness prior helps.
    clean = torch.zeros(8, 12, 12)
    clean[:, :, 6:] = 1.0
    clean[::2] = clean[::2].transpose(1, 2)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))
    objective = UnrolledLoss(loss="mse", weights="inverse")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def final_mse():
        with torch.no_grad():
            return torch.mean((inference(model, model.features(noisy)).y - clean) ** 2).item()

    before = final_mse()
    for _ in range(60):
        loss, _ = objective.loss(model, inference, noisy, clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert final_mse() < 0.7 * before


def test_feed_forward_baseline_is_residual_and_shape_preserving():
    torch.manual_seed(0)
    model = FeedForwardDenoiser(channels=3, kernel=3)
    x = torch.rand(2, 9, 11)
    assert torch.equal(model.local_probs(model.features(x)), x)  # starts as the identity
    with torch.no_grad():
        model.net[-1].weight.normal_()
    assert model.features(x).shape == x.shape and not torch.allclose(model.features(x), x)


def test_relu_deep_prior_is_refused_for_unrolled_learning():
    model = DenoisingEnergy(DeepPrior(channels=2, kernel=3, activation="relu"))
    with pytest.raises(DspError, match="model.prior.act1 is a ReLU"):
        check_built(None, model, UnrolledGradientDescent(parameterisation="unconstrained"), UnrolledLoss(loss="mse"))
