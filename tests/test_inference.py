from functools import partial

import pytest
import torch

from dsp.errors import DspError
from dsp.inference.gradient import GradientInference
from dsp.models.spen import SPEN, GlobalEnergy, LocalEnergy
from dsp.nn.mlp import MLP


def quadratic(target):
    """E(ȳ) = ||ȳ - t||² per example; its minimiser over [0,1]^L is clip(t, 0, 1)."""
    return lambda y: ((y - target) ** 2).sum(-1)


@pytest.mark.parametrize("method", ["mirror", "projected"])
def test_reaches_the_box_constrained_minimiser(method):
    target = torch.tensor([[0.3, 0.8, 1.7, -0.4], [0.5, 0.1, 0.9, 0.6]])
    inf = GradientInference(method=method, lr=0.1, momentum=0.5, max_iter=2000, rel_tol=0, abs_tol=1e-7)
    res = inf.minimise(quadratic(target), torch.full_like(target, 0.5))
    expected = target.clamp(0, 1)
    tol = 2e-2 if method == "mirror" else 1e-4  # mirror descent approaches the boundary only asymptotically
    assert torch.allclose(res.y, expected, atol=tol)
    assert res.converged.all()


def test_mirror_descent_stays_strictly_inside_the_box():
    torch.manual_seed(0)
    # A steep linear energy pushes every coordinate to the boundary; the iterates must not reach it.
    slope = torch.randn(8, 10) * 50
    inf = GradientInference(method="mirror", lr=1.0, momentum=0.95, max_iter=200, rel_tol=0, abs_tol=0)
    traj = []
    res = inf.minimise(lambda y: traj.append(y.detach().clone()) or (slope * y).sum(-1), torch.full((8, 10), 0.5))
    ys = torch.stack(traj)
    assert ((ys > 0) & (ys < 1)).all() and ((res.y > 0) & (res.y < 1)).all()
    assert ((res.y > 0.5) == (slope < 0)).all()  # and it still moved the right way


def test_converged_examples_are_frozen_and_batch_stops_at_fraction():
    # Example 0 starts at its minimum (converges at once); example 1 needs many steps.
    target = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    inf = GradientInference(method="projected", lr=0.001, momentum=0.0, max_iter=500, rel_tol=0,
                            abs_tol=1e-5, stop_fraction=0.5)
    res = inf.minimise(quadratic(target), torch.full_like(target, 0.5))
    assert res.iterations == 2  # the first check that can see a change, then half the batch is done
    assert res.converged.tolist() == [True, False]
    assert torch.equal(res.y[0], torch.tensor([0.5, 0.5]))


def test_entropy_smoothing_with_local_energy_recovers_sigmoid():
    # min_ȳ -Σ ȳ_i s_i - τ H(ȳ) has the closed form ȳ = σ(s/τ): the smoothing of SPEN §A.4.
    torch.manual_seed(0)
    model = SPEN(5, MLP(3, []), partial(LocalEnergy), None)
    feats = model.features(torch.randn(4, 3))
    inf = GradientInference(lr=0.5, momentum=0.5, max_iter=3000, rel_tol=0, abs_tol=1e-9,
                            entropy_temperature=2.0, init="constant")
    res = inf(model, feats)
    assert torch.allclose(res.y, torch.sigmoid(feats.logits / 2.0), atol=1e-4)
    # inside learning (train=True) there is no smoothing: the solution is pushed to the corners
    hard = inf(model, feats, train=True).y
    assert ((hard > 0.99) | (hard < 0.01)).all()


def test_inference_computes_no_parameter_gradients():
    torch.manual_seed(0)
    model = SPEN(4, MLP(3, [5]), partial(LocalEnergy), partial(GlobalEnergy, measurements=2))
    feats = model.features(torch.randn(2, 3))
    GradientInference(max_iter=5)(model, feats)
    assert all(p.grad is None for p in model.parameters())


def test_rejects_unknown_method():
    from dsp.errors import DspError

    with pytest.raises(DspError, match="inference.method"):
        GradientInference(method="newton")


def two_wells(center):
    """E(ȳ) = -Σ (ȳ - c)²: minima at the corners, the deeper one farther from c."""
    return lambda y: -((y - center) ** 2).sum(-1)


@pytest.mark.parametrize("extra", [dict(restarts=8), dict(anneal_temperature=1.0, anneal_iters=100)])
def test_restarts_and_annealing_escape_the_shallow_well(extra):
    center = torch.tensor([[0.4], [0.35], [0.6]])  # deep wells at 1, 1, 0
    start = torch.tensor([[0.3], [0.2], [0.7]])  # each start lies in the shallow well's basin
    base = dict(method="mirror", lr=0.2, momentum=0.5, max_iter=400, rel_tol=0, abs_tol=1e-6)
    plain = GradientInference(**base).minimise(two_wells(center), start)
    assert (plain.y.round() == torch.tensor([[0.0], [0.0], [1.0]])).all()  # stuck in the shallow well
    better = GradientInference(**base, **extra).minimise(two_wells(center), start)
    assert (better.y.round() == torch.tensor([[1.0], [1.0], [0.0]])).all()
    assert (better.objective < plain.objective).all()


def test_restarts_are_deterministic():
    center = torch.rand(5, 3)
    inf = GradientInference(max_iter=50, restarts=3, restart_seed=7)
    a = inf.minimise(two_wells(center), torch.full((5, 3), 0.5))
    b = inf.minimise(two_wells(center), torch.full((5, 3), 0.5))
    assert torch.equal(a.y, b.y)


def test_predict_overrides_apply_when_predicting_only():
    torch.manual_seed(0)
    model = SPEN(6, MLP(4, [5]), partial(LocalEnergy), partial(GlobalEnergy, measurements=3))
    feats = model.features(torch.randn(2, 4))
    inf = GradientInference(max_iter=3, rel_tol=0, abs_tol=0, predict={"max_iter": 7})
    assert inf(model, feats, train=True).iterations == 3  # learning keeps the base settings
    assert inf(model, feats).iterations == 7  # prediction uses the overrides
    assert inf.predictor.max_iter == 7 and inf.predictor.lr == inf.lr  # the rest is inherited


def test_predict_override_with_unknown_key_names_it():
    with pytest.raises(DspError, match="inference.predict.*'max_iters'"):
        GradientInference(predict={"max_iters": 7})


@pytest.mark.parametrize("restarts", [0, 2])
def test_outputs_of_any_shape_are_optimised_per_example(restarts):
    """Masks [B, H, W] give the same result as the same problem flattened to [B, H·W]."""
    target = torch.rand(3, 4, 5)
    inf = GradientInference(max_iter=30, restarts=restarts, rel_tol=0, abs_tol=0)
    masks = inf.minimise(lambda y: ((y - target) ** 2).sum((1, 2)), torch.full_like(target, 0.5))
    flat = inf.minimise(lambda y: ((y - target.flatten(1)) ** 2).sum(-1), torch.full((3, 20), 0.5))
    assert masks.y.shape == (3, 4, 5)
    assert torch.allclose(masks.y.flatten(1), flat.y) and torch.allclose(masks.objective, flat.objective)


@pytest.mark.parametrize("settings", [
    dict(method="mirror"), dict(method="projected", restarts=2),
    dict(method="mirror", entropy_temperature=0.3), dict(method="projected", anneal_temperature=0.5, anneal_iters=5),
])
def test_hand_written_gradient_path_matches_the_autograd_path(settings):
    """inference.gradient=analytic runs the same iterations as autograd, to rounding (float64)."""
    torch.manual_seed(0)
    model = SPEN(6, MLP(4, [5]), partial(LocalEnergy), partial(GlobalEnergy, measurements=3, hidden=[4])).double()
    feats = model.features(torch.randn(5, 4, dtype=torch.float64))
    base = dict(max_iter=25, lr=0.1, momentum=0.9, rel_tol=1e-6, abs_tol=0, **settings)
    fast = GradientInference(gradient="analytic", **base)(model, feats)
    slow = GradientInference(gradient="autograd", **base)(model, feats)
    assert fast.iterations == slow.iterations
    assert torch.allclose(fast.y, slow.y, atol=1e-10) and torch.equal(fast.converged, slow.converged)
    assert torch.allclose(fast.objective, slow.objective, atol=1e-10)


def test_hand_written_gradient_with_an_augmentation_term():
    """Loss-augmented inference (SSVM): analytic ∂E/∂ȳ plus autograd on the augmentation only."""
    torch.manual_seed(0)
    model = SPEN(6, MLP(4, [5]), partial(LocalEnergy), partial(GlobalEnergy, measurements=3)).double()
    feats = model.features(torch.randn(3, 4, dtype=torch.float64))
    target = torch.rand(3, 6, dtype=torch.float64)
    augment = lambda y: ((y - target) ** 2).sum(-1)  # noqa: E731
    base = dict(max_iter=15, rel_tol=0, abs_tol=0)
    fast = GradientInference(gradient="analytic", **base)(model, feats, augment=augment, train=True)
    slow = GradientInference(gradient="autograd", **base)(model, feats, augment=augment, train=True)
    assert torch.allclose(fast.y, slow.y, atol=1e-10)


def test_analytic_gradient_refused_for_a_model_without_one():
    from dsp.models.dvn import DeepValueNetwork

    assert not DeepValueNetwork.has_analytic_gradient(None)  # the interface's default: no closed form
    with pytest.raises(DspError, match="inference.gradient"):
        GradientInference(gradient="newton")
    model = SPEN(6, MLP(4, [5]), partial(LocalEnergy), partial(GlobalEnergy, measurements=3))
    model.global_energy.deeper = MLP(3, [2], dropout=0.5)  # active dropout: no closed form
    with pytest.raises(DspError, match="inference.gradient=analytic"):
        GradientInference(gradient="analytic")(model.train(), model.features(torch.randn(2, 4)))
