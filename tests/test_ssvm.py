from functools import partial

import torch

from dsp.inference.gradient import GradientInference
from dsp.models.spen import SPEN, LocalEnergy
from dsp.nn.mlp import MLP
from dsp.objectives.ssvm import SSVMLoss
from dsp.tasks.multilabel import log_delta, squared_delta


def linear_model(scale):
    model = SPEN(3, MLP(2, []), partial(LocalEnergy), None)
    with torch.no_grad():  # logits = scale * (2y* - 1) for the single input below
        model.local_energy.linear.weight.zero_()
        model.local_energy.linear.bias.copy_(scale * torch.tensor([1.0, -1.0, 1.0]))
    return model


def test_hinge_is_zero_when_the_margin_holds():
    x, y = torch.zeros(1, 2), torch.tensor([[1.0, 0.0, 1.0]])
    inf = GradientInference(max_iter=200, lr=0.5)
    # logits of 10 beat any squared-loss margin (at most 1 per label): no violation, zero loss
    loss, logs = SSVMLoss(1.0, "squared").loss(linear_model(10.0), inf, x, y)
    assert loss.item() == 0.0 and logs["violated"].item() == 0.0


def test_hinge_is_positive_and_has_gradient_when_the_margin_fails():
    x, y = torch.zeros(1, 2), torch.tensor([[1.0, 0.0, 1.0]])
    model = linear_model(0.1)
    loss, _ = SSVMLoss(1.0, "squared").loss(model, GradientInference(max_iter=200, lr=0.5), x, y)
    assert loss.item() > 0
    loss.backward()
    assert model.local_energy.linear.bias.grad.abs().sum() > 0


def test_delta_surrogates_by_hand():
    y, t = torch.tensor([[0.5, 1.0]]), torch.tensor([[1.0, 0.0]])
    assert torch.allclose(squared_delta(y, t), torch.tensor([0.25 + 1.0]))
    y2 = torch.tensor([[0.5, 0.25]])
    assert torch.allclose(log_delta(y2, t), -(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.75))))
