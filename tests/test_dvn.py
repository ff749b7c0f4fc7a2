from functools import partial

import pytest
import torch

from dsp.errors import DspError
from dsp.inference.gradient import GradientInference
from dsp.models.dvn import DeepValueNetwork
from dsp.models.spen import GlobalEnergy, LocalEnergy
from dsp.nn.mlp import MLP
from dsp.objectives.value import ValueObjective
from dsp.tasks.oracles import soft_f1

L, D = 6, 5


def make_dvn(dtype=torch.float64, ascend="value", seed=0):
    torch.manual_seed(seed)
    model = DeepValueNetwork(
        num_labels=L,
        feature_net=MLP(D, [7], activation="softplus"),
        local_score=partial(LocalEnergy),
        global_score=partial(GlobalEnergy, measurements=4, activation="softplus"),
        ascend=ascend,
    )
    return model.to(dtype)


def ascent(max_iter=20, lr=0.5):
    """The settings of conf/inference/dvn_ascent.yaml."""
    return GradientInference(method="projected", lr=lr, momentum=0.0, max_iter=max_iter, rel_tol=0.0,
                             abs_tol=0.0, init="constant", init_value=0.0)


def batch(n=8, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=gen, dtype=dtype)
    y = (torch.rand(n, L, generator=gen) < 0.4).to(dtype)
    return x, y


# ---------------------------------------------------------------------------------- the model
def test_value_is_in_unit_interval_and_energy_is_minus_value():
    model = make_dvn()
    x, _ = batch()
    feats = model.features(x)
    for y in (torch.rand(8, L, dtype=torch.float64), torch.zeros(8, L, dtype=torch.float64), 50 * torch.rand(8, L, dtype=torch.float64)):
        v = model.value(y, feats)
        assert v.shape == (8,) and (v >= 0).all() and (v <= 1).all()
        assert torch.allclose(model.energy(y, feats), -v)
        assert torch.allclose(v, torch.sigmoid(model.score(y, feats)))
        assert torch.allclose(model(x, y), v)
    assert torch.allclose(make_dvn(ascend="score").energy(y, feats), -model.score(y, feats))
    assert model.is_structured and torch.allclose(model.local_probs(feats), torch.sigmoid(feats.logits))


def test_score_matches_the_formula_by_hand():
    model = make_dvn()
    x, _ = batch(3)
    y = torch.rand(3, L, dtype=torch.float64)
    f = model.feature_net(x)
    logits = f @ model.local_score.linear.weight.T + model.local_score.linear.bias
    g = model.global_score
    glob = torch.nn.functional.softplus(y @ g.measure.weight.T + g.measure.bias) @ g.out.weight.T
    assert torch.allclose(model.score(y, model.features(x)), (y * logits).sum(-1) + glob.squeeze(-1))


def test_value_passes_finite_difference_check_in_y_and_parameters():
    model = make_dvn()
    x, _ = batch(3)
    y = torch.rand(3, L, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in model.named_parameters()]

    def value(y, *params):
        return torch.func.functional_call(model, dict(zip(names, params)), (x, y))

    inputs = (y,) + tuple(p.detach().clone().requires_grad_(True) for _, p in model.named_parameters())
    assert torch.autograd.gradcheck(value, inputs, eps=1e-6, atol=1e-6)


def test_unknown_ascent_quantity_is_a_config_error():
    with pytest.raises(DspError, match="ascend"):
        make_dvn(ascend="energy")


def test_projected_ascent_from_zero_stays_in_box_and_increases_value():
    model = make_dvn()
    x, _ = batch(16)
    feats = model.features(x).detach()
    result = ascent()(model, feats, train=True)
    assert result.iterations == 20  # a fixed number of steps: no early stopping
    assert ((result.y >= 0) & (result.y <= 1)).all()
    v0 = model.value(torch.zeros(16, L, dtype=torch.float64), feats)
    assert (model.value(result.y, feats) >= v0 - 1e-12).all()
    assert (model.value(result.y, feats) > v0).float().mean() > 0.5


# ------------------------------------------------------------------------------ the objective
def objective(**kw):
    return ValueObjective(**{"sources": {"ground_truth": 1, "inference": 1, "adversarial": 1, "stratified": 1}, **kw})


@pytest.mark.parametrize("loss", ["ce", "l2"])
def test_adversarial_tuples_increase_the_value_loss(loss):
    model, obj = make_dvn(), objective(loss=loss, adversarial_steps=3, adversarial_lr=0.05)
    x, y = batch(16)
    feats = model.features(x).detach()
    for start in (y, torch.zeros_like(y), torch.full_like(y, 0.5)):
        adv = obj.generate_adversarial(model, None, feats, y, start=start)
        before = obj.regression(model.score(start, feats), soft_f1(start, y))  # [B]
        after = obj.regression(model.score(adv, feats), soft_f1(adv, y))  # [B]
        # Never down; an example can already sit at a local maximum of the loss at a corner.
        assert (after >= before).all() and after.sum() > before.sum()
    assert (after > before).all()  # from ȳ = 0.5 (the last start) every example climbs


def test_every_tuple_source_gives_outputs_of_the_right_shape_and_range():
    model, obj = make_dvn(), objective(stratified_max_flips=3)
    x, y = batch(10)
    feats = model.features(x).detach()
    for p in model.parameters():
        p.grad = None
    outs = {name: getattr(obj, f"generate_{name}")(model, ascent(), feats, y)
            for name in ("ground_truth", "inference", "adversarial", "stratified")}
    for name, out in outs.items():
        assert out.shape == y.shape and not out.requires_grad, name
        assert ((out >= 0) & (out <= 1)).all(), name
    assert all(p.grad is None for p in model.parameters())  # generating tuples trains nothing
    assert torch.equal(outs["ground_truth"], y)
    assert torch.allclose(outs["inference"], ascent()(model, feats, train=True).y)
    flips = (outs["stratified"] != y).sum(-1)
    assert set(outs["stratified"].unique().tolist()) <= {0.0, 1.0} and ((flips >= 1) & (flips <= 3)).all()


def test_random_trajectory_returns_a_point_of_the_inference_path():
    model, obj = make_dvn(), objective(trajectory="random")
    x, y = batch(4)
    feats = model.features(x).detach()
    torch.manual_seed(0)
    out = obj.generate_inference(model, ascent(max_iter=30, lr=0.05), feats, y)
    path = [ascent(max_iter=k, lr=0.05)(model, feats, train=True).y for k in range(1, 31)]
    hits = [k for k, p in enumerate(path, 1) if torch.allclose(out, p)]
    assert hits and hits[0] < 30


def test_loss_regresses_the_oracle_and_only_trains_parameters():
    model = make_dvn()
    x, y = batch(8)
    obj = ValueObjective(sources={"ground_truth": 1})
    loss, logs = obj.loss(model, None, x, y)
    assert logs["v_star"].item() == 1.0 and logs["v_star/ground_truth"].item() == 1.0
    v = model(x, y)
    assert torch.allclose(loss, -torch.log(v).mean())  # Eq. 11 with v* = 1
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    l2 = ValueObjective(sources={"ground_truth": 1}, loss="l2").loss(model, None, x, y)[0]
    assert torch.allclose(l2, ((v - 1) ** 2).mean())


def test_source_mix_logs_each_source():
    model, obj = make_dvn(), objective()
    x, y = batch(64)
    torch.manual_seed(0)
    loss, logs = obj.loss(model, ascent(), x, y)
    assert torch.isfinite(loss)
    assert {f"v_star/{n}" for n in ("ground_truth", "inference", "adversarial", "stratified")} <= set(logs)
    assert 0 <= logs["value"] <= 1 and 0 <= logs["v_star"] <= 1


@pytest.mark.parametrize("kwargs,match", [
    ({"sources": {"ground_truth": 1, "dreams": 1}}, "unknown source"),
    ({"sources": {"ground_truth": 0}}, "at least one"),
    ({"loss": "hinge"}, "loss"),
    ({"oracle": "accuracy"}, "oracle"),
    ({"trajectory": "middle"}, "trajectory"),
])
def test_bad_objective_settings_are_config_errors(kwargs, match):
    with pytest.raises(DspError, match=match):
        ValueObjective(**kwargs)


def test_a_few_training_steps_reduce_the_value_loss():
    torch.manual_seed(0)
    model = make_dvn(dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(D, L, generator=gen)
    x = torch.randn(48, D, generator=gen)
    y = (x @ w > 0.5).float()  # labels that depend on x
    obj, inference = objective(), ascent(max_iter=10)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def value_loss():
        torch.manual_seed(123)  # the same source draws and random starts before and after
        with torch.no_grad():
            return obj.loss(model, inference, x, y)[0].item()

    before = value_loss()
    for _ in range(40):
        loss, _ = obj.loss(model, inference, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert value_loss() < 0.8 * before


def test_dvn_bibtex_preset_follows_the_paper_protocol():
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from dsp.build import build_inference, build_model, build_objective
    from dsp.cli.common import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=dvn_bibtex"])
    with open_dict(cfg):
        cfg.dims = {"num_features": D, "num_labels": L}
    assert cfg.trainer.threshold == 0.5 and cfg.trainer.optimizer == "adam"
    model, inference = build_model(cfg), build_inference(cfg)
    assert isinstance(model, DeepValueNetwork) and isinstance(build_objective(cfg), ValueObjective)
    assert (inference.method, inference.init, inference.init_value) == ("projected", "constant", 0.0)
    assert inference.rel_tol == 0 and inference.abs_tol == 0 and inference.momentum == 0
    x, _ = batch(4, dtype=torch.float32)
    assert inference(model, model.features(x)).iterations == inference.max_iter
