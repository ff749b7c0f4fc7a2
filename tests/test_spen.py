from functools import partial

import pytest
import torch

from dsp.models.spen import SPEN, GlobalEnergy, LocalEnergy
from dsp.nn.mlp import MLP


def make_spen(activation="softplus", conditional=False, hidden=(), dtype=torch.float64):
    torch.manual_seed(0)
    model = SPEN(
        num_labels=6,
        feature_net=MLP(5, [7, 4], activation="relu"),
        local_energy=partial(LocalEnergy),
        global_energy=partial(GlobalEnergy, measurements=3, hidden=list(hidden), activation=activation,
                              conditional=conditional),
    )
    return model.to(dtype)


@pytest.mark.parametrize("activation,conditional,hidden", [
    ("softplus", False, ()), ("softplus", True, ()), ("softplus", False, (4,)), ("tanh", True, (3,)),
])
def test_energy_passes_finite_difference_check_in_y_and_parameters(activation, conditional, hidden):
    model = make_spen(activation, conditional, hidden)
    x = torch.randn(3, 5, dtype=torch.float64)
    y = torch.rand(3, 6, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in model.named_parameters()]

    def energy(y, *params):  # E(x, ȳ) as a pure function of ȳ and every parameter tensor
        return torch.func.functional_call(model, dict(zip(names, params)), (x, y))

    inputs = (y,) + tuple(p.detach().clone().requires_grad_(True) for _, p in model.named_parameters())
    assert torch.autograd.gradcheck(energy, inputs, eps=1e-6, atol=1e-5)


def test_energy_matches_the_formula_by_hand():
    model = make_spen()
    x, y = torch.randn(2, 5, dtype=torch.float64), torch.rand(2, 6, dtype=torch.float64)
    f = model.feature_net(x)
    logits = f @ model.local_energy.linear.weight.T + model.local_energy.linear.bias
    g = model.global_energy
    glob = torch.nn.functional.softplus(y @ g.measure.weight.T + g.measure.bias) @ g.out.weight.T
    expected = -(y * logits).sum(-1) + glob.squeeze(-1)
    assert torch.allclose(model.energy(y, model.features(x)), expected)


def test_mlp_baseline_has_no_global_energy_and_reads_probs_off_logits():
    model = SPEN(4, MLP(3, [5]), partial(LocalEnergy), None)
    feats = model.features(torch.randn(2, 3))
    assert not model.is_structured
    assert torch.allclose(model.local_probs(feats), torch.sigmoid(feats.logits))


@pytest.mark.parametrize("activation,conditional,hidden", [
    ("softplus", False, ()), ("softplus:25", True, ()), ("relu", False, (4,)), ("tanh", True, (3,)),
    ("sigmoid", False, ()), ("softabs:5", False, (2,)), ("hardtanh", False, ()), ("identity", True, ()),
    ("leaky_relu", True, (3,)),
])
def test_hand_written_gradient_equals_autograd(activation, conditional, hidden):
    model = make_spen(activation, conditional, hidden).eval()
    feats = model.features(torch.randn(4, 5, dtype=torch.float64)).detach()
    y = torch.rand(4, 6, dtype=torch.float64, requires_grad=True)
    assert model.has_analytic_gradient()
    e, grad = model.energy_and_grad(y.detach(), feats)
    expected = model.energy(y, feats)
    (expected_grad,) = torch.autograd.grad(expected.sum(), y)
    assert torch.allclose(e, expected.detach(), atol=1e-12)
    assert torch.allclose(grad, expected_grad, atol=1e-12)


def test_no_hand_written_gradient_with_active_dropout():
    model = SPEN(6, MLP(5, [4]), partial(LocalEnergy), partial(GlobalEnergy, measurements=3))
    model.global_energy.deeper = MLP(3, [2], dropout=0.5)
    assert not model.train().has_analytic_gradient()
    assert model.eval().has_analytic_gradient()


def test_online_scaling_of_the_local_energy_picks_the_alpha_the_objective_prefers_and_checkpoints_keep_it():
    """A SPEN's local energy has a scale α (model.unary_scale): online scaling scores the objective's
    own loss at every α of the grid (here the SSVM, inference included), keeps the best, and old
    checkpoints without α load with α = 1."""
    from dsp.inference.gradient import GradientInference
    from dsp.objectives.ssvm import SSVMLoss
    from dsp.training.scaling import choose_unary_scale, subset_losses

    torch.manual_seed(0)
    model = make_spen(dtype=torch.float32)
    x, y = torch.randn(12, 5), (torch.rand(12, 6) < 0.4).float()
    objective, inference = SSVMLoss(), GradientInference(max_iter=10)
    grid = [0.25, 1.0, 4.0]
    losses = subset_losses(model, objective, x, y, grid, inference=inference)
    expected = []
    for alpha in grid:
        model.unary_scale.fill_(alpha)
        with torch.no_grad():
            expected.append(objective.loss(model, inference, x, y)[0].item())
    model.unary_scale.fill_(1.0)
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    logs = choose_unary_scale(model, objective, x, y, min_exp=-2, max_exp=2, inference=inference)
    best = min(range(len(grid)), key=expected.__getitem__)
    assert model.unary_scale.item() == logs["scaling/alpha"]
    assert logs["scaling/subset_loss"] <= expected[best] + 1e-5  # the 5-point grid includes these 3
    state = {k: v for k, v in model.state_dict().items() if k != "unary_scale"}  # a checkpoint from before α
    fresh = make_spen(dtype=torch.float32)
    fresh.load_state_dict(state)
    assert fresh.unary_scale.item() == 1.0
