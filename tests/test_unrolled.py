"""Unrolled gradient inference (End-to-end SPENs): gradients against finite differences, the three
backward modes agreeing, feasibility of the parameterisations, learned step sizes, Eq. 9's weights,
early stopping under the fixed-T contract, and the start-up checks."""
from __future__ import annotations

import pytest
import torch

from dsp.build import attach_inference
from dsp.compat import check_built
from dsp.errors import DspError
from dsp.inference.gradient import GradientInference
from dsp.inference.unrolled import UnrolledGradientDescent
from dsp.models.spen import SPEN, GlobalEnergy, LocalEnergy
from dsp.nn.mlp import MLP
from dsp.objectives.unrolled import UnrolledLoss, iterate_weights


def tiny_spen(activation="softplus", labels=4, features=3, seed=0):
    torch.manual_seed(seed)
    model = SPEN(
        num_labels=labels,
        feature_net=MLP(features, [5], activation="tanh"),
        local_energy=LocalEnergy,
        global_energy=lambda **kw: GlobalEnergy(measurements=3, activation=activation, **kw),
    )
    return model.double()


def batch(n=3, features=3, labels=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g, dtype=torch.float64)
    y = (torch.rand(n, labels, generator=g, dtype=torch.float64) > 0.5).double()
    return x, y


@pytest.mark.parametrize("parameterisation", ["logit", "mirror", "projected", "unconstrained"])
def test_unrolled_loss_gradient_matches_finite_differences(parameterisation):
    model = tiny_spen()
    inference = UnrolledGradientDescent(steps=4, lr=0.3, momentum=0.5, learn_lr=True, learn_momentum=True,
                                        parameterisation=parameterisation, entropy_temperature=0.1).double()
    attach_inference(model, inference)
    x, y = batch()
    loss_fn = UnrolledLoss(loss="squared")
    params = [model.global_energy.measure.weight, model.feature_net.net[0].weight, inference.log_lr,
              inference.momentum_logit]

    def loss_of(*values):
        saved = [p.data.clone() for p in params]
        for p, v in zip(params, values):
            p.data = v
        try:
            return loss_fn.loss(model, inference, x, y)[0]
        finally:
            for p, v in zip(params, saved):
                p.data = v

    loss = loss_fn.loss(model, inference, x, y)[0]
    grads = torch.autograd.grad(loss, params)
    for i, (p, g) in enumerate(zip(params, grads)):
        direction = torch.randn_like(p)
        h = 1e-6
        base = [q.detach().clone() for q in params]
        plus, minus = list(base), list(base)
        plus[i], minus[i] = base[i] + h * direction, base[i] - h * direction
        numeric = (loss_of(*plus) - loss_of(*minus)) / (2 * h)
        assert torch.allclose((g * direction).sum(), numeric, rtol=1e-4, atol=1e-8), (i, parameterisation)


@pytest.mark.parametrize("hessian,checkpoint", [("autograd", True), ("finite_difference", False)])
def test_checkpointed_and_finite_difference_backward_agree_with_double_backward(hessian, checkpoint):
    x, y = batch()
    grads = {}
    for mode in ("reference", "other"):
        model = tiny_spen()
        kwargs = dict(hessian=hessian, checkpoint=checkpoint, fd_eps=1e-5) if mode == "other" else {}
        inference = UnrolledGradientDescent(steps=5, lr=0.2, momentum=0.3, learn_lr=True, **kwargs).double()
        attach_inference(model, inference)
        loss = UnrolledLoss(loss="bce").loss(model, inference, x, y)[0]
        loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["reference"].keys() == grads["other"].keys()
    for name, ref in grads["reference"].items():
        assert torch.allclose(grads["other"][name], ref, rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("parameterisation,output", [("logit", "sigmoid"), ("mirror", "sigmoid"),
                                                     ("projected", "sigmoid"), ("logit", "softmax"),
                                                     ("mirror", "softmax")])
def test_iterates_stay_feasible(parameterisation, output):
    model = tiny_spen()
    inference = UnrolledGradientDescent(steps=6, lr=5.0, momentum=0.9, parameterisation=parameterisation,
                                        output=output).double()
    x, _ = batch()
    result = inference(model, model.features(x), differentiable=True)
    for y_t in result.trajectory:
        assert torch.isfinite(y_t).all()
        assert (y_t >= 0).all() and (y_t <= 1).all()
        if output == "softmax":
            assert torch.allclose(y_t.sum(-1), torch.ones(y_t.shape[0], dtype=y_t.dtype))


def test_learned_step_sizes_receive_gradients_and_fixed_ones_are_buffers():
    model = tiny_spen()
    learned = UnrolledGradientDescent(steps=3, lr=[0.1, 0.2, 0.3], learn_lr=True).double()
    attach_inference(model, learned)
    x, y = batch()
    UnrolledLoss().loss(model, learned, x, y)[0].backward()
    assert learned.log_lr.grad is not None and (learned.log_lr.grad != 0).all()
    assert torch.allclose(learned.lr, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    fixed = UnrolledGradientDescent(steps=3, lr=0.1)
    assert list(fixed.parameters()) == [] and "log_lr" in dict(fixed.named_buffers())
    other = tiny_spen()
    attach_inference(other, fixed)  # nothing to learn: stays outside the model
    assert "inference" not in dict(other.named_children())


def test_iterate_weights_of_eq_9():
    assert iterate_weights(3, "inverse") == pytest.approx([1 / 9, 1 / 6, 1 / 3])
    assert iterate_weights(3, "final") == [0.0, 0.0, 1.0]
    assert iterate_weights(4, "uniform") == [0.25] * 4
    with pytest.raises(DspError, match="objective.weights"):
        iterate_weights(3, "last")


def test_early_convergence_keeps_the_fixed_t_loss():
    model = tiny_spen()
    x, y = batch()
    full = UnrolledGradientDescent(steps=40, lr=0.5, entropy_temperature=1.0, parameterisation="mirror").double()
    early = UnrolledGradientDescent(steps=40, lr=0.5, entropy_temperature=1.0, parameterisation="mirror", converge_tol=1e-5).double()
    res_full = full(model, model.features(x), differentiable=True)
    res_early = early(model, model.features(x), differentiable=True)
    assert res_early.iterations < 40 and len(res_early.trajectory) == 40
    loss_full = UnrolledLoss(loss="squared").loss(model, full, x, y)[0]
    loss_early = UnrolledLoss(loss="squared").loss(model, early, x, y)[0]
    assert loss_early.item() == pytest.approx(loss_full.item(), abs=1e-3)
    assert torch.allclose(res_early.y, res_full.y, atol=1e-3)


def test_prediction_builds_no_graph_and_matches_the_training_path():
    model = tiny_spen()
    inference = UnrolledGradientDescent(steps=5, lr=0.3, momentum=0.5).double()
    x, _ = batch()
    feats = model.features(x)
    train = inference(model, feats, differentiable=True).y
    with torch.no_grad():
        predict = inference(model, model.features(x)).y
    assert not predict.requires_grad
    assert torch.allclose(train.detach(), predict)


def test_unrolled_objective_refuses_relu_energy_and_other_inference():
    objective = UnrolledLoss()
    with pytest.raises(DspError, match="model.global_energy.activation is a ReLU.*softplus"):
        check_built(None, tiny_spen(activation="relu"), UnrolledGradientDescent(), objective)
    with pytest.raises(DspError, match="needs an inference routine that keeps the graph.*inference choices that fit.*unrolled_gd"):
        check_built(None, tiny_spen(), GradientInference(), objective)
    check_built(None, tiny_spen(activation="softplus:25"), UnrolledGradientDescent(), objective)


def test_bad_settings_are_refused_with_the_key_named():
    with pytest.raises(DspError, match="inference.lr"):
        UnrolledGradientDescent(steps=3, lr=[0.1, 0.2])
    with pytest.raises(DspError, match="inference.parameterisation"):
        UnrolledGradientDescent(parameterisation="newton")
    with pytest.raises(DspError, match="objective.loss"):
        UnrolledLoss(loss="hinge")
