"""Stages train parameters registered directly on the model too (a user's `self.temperature =
nn.Parameter(...)` on the top-level module), not only those of its child modules: train: all trains
model.parameters(); a stage listing parts may name such a parameter; anything unnamed is frozen."""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from dsp.cli.common import config_dir
from dsp.errors import DspError
from dsp.models.spen import SPEN, SpenFeatures
from dsp.training.stages import Stage, build_stages, model_parts


class TemperedSPEN(SPEN):
    """A user's model: a SPEN whose local logits are scaled by a learned temperature, a parameter of
    the top-level module itself (no child module holds it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def features(self, x: torch.Tensor, *args, **kwargs) -> SpenFeatures:
        feats = super().features(x, *args, **kwargs)
        return SpenFeatures(feats.features, feats.logits * self.log_temperature.exp())


class Scaled(nn.Module):
    """y = scale · body(x): one child module and one parameter of its own."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 1), nn.Dropout(0.5))
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.scale * self.body(x)


def stage(train) -> Stage:
    return Stage(name="s", objective=None, train=train, predict="inference", optimizer="sgd", lr=0.1, momentum=0.0,
                 weight_decay=0.0, max_epochs=1, patience=1, batch_size=4, lr_factor=0.5, lr_patience=1)


def train_a_few_steps(model: nn.Module, s: Stage, steps: int = 3) -> None:
    params = s.parameters(model)
    optimizer = s.make_optimizer(params)
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_train_all_trains_a_parameter_registered_on_the_model_itself():
    model = Scaled()
    params = stage("all").parameters(model)
    assert {id(p) for p in params} == {id(p) for p in model.parameters()} and len(params) == 3
    before = snapshot(model)
    train_a_few_steps(model, stage("all"))
    assert not torch.equal(model.scale, before["scale"])
    assert not torch.equal(model.body[0].weight, before["body.0.weight"])


def test_a_stage_naming_the_parameter_trains_it_and_one_that_does_not_leaves_it_alone():
    model = Scaled()
    assert model_parts(model) == ["body", "scale"]
    before = snapshot(model)
    train_a_few_steps(model, stage(["scale"]))  # the parameter alone: the child module is frozen
    assert not torch.equal(model.scale, before["scale"])
    assert model.scale.requires_grad and not any(p.requires_grad for p in model.body.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items() if k.startswith("body."))
    assert stage(["scale"]).frozen_children(model) == [model.body]  # run in eval mode by the trainer

    after_first = snapshot(model)
    train_a_few_steps(model, stage(["body"]))  # the child alone: the parameter is frozen
    assert torch.equal(model.scale, after_first["scale"]) and not model.scale.requires_grad
    assert not torch.equal(model.body[0].weight, after_first["body.0.weight"])
    assert stage(["body"]).frozen_children(model) == []

    params = stage("all").parameters(model)  # and a later `all` stage unfreezes everything
    assert len(params) == 3 and all(p.requires_grad for p in model.parameters())


def trainer_cfg(**stages):
    return OmegaConf.create({
        "stages": {name: {"train": train} for name, train in stages.items()}, "stage_epochs": 1, "max_epochs": None,
        "optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "patience": 1, "batch_size": 4,
        "lr_factor": 0.5, "lr_patience": 1, "lr_schedule": "plateau"})


def test_build_stages_accepts_direct_parameters_and_lists_them_among_the_parts():
    model = Scaled()
    stages = build_stages(trainer_cfg(first=["scale"], second=["body", "scale"], third="all"), None, model)
    assert [s.train for s in stages] == [["scale"], ["body", "scale"], "all"]
    with pytest.raises(DspError, match=r"train names \['temperature'\].*parts .* are \['body', 'scale'\]"):
        build_stages(trainer_cfg(first=["temperature"]), None, model)


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=[
            "model=mlp", "objective=local", "trainer=default", f"model._target_={__name__}.TemperedSPEN",
            "data.num_train=32", "data.num_val=16", "data.num_test=16", "model.feature_net.hidden=[8]",
            "trainer.progress=false", "trainer.batch_size=8", "trainer.lr=0.05", *overrides])


def test_the_trainer_trains_a_users_direct_parameter(tmp_path):
    """Through dsp-train's own path (dsp.cli.train.train): the temperature moves with the rest."""
    from dsp.cli.train import train

    train(compose_cfg("trainer.max_epochs=1", "trainer.max_steps=3"), tmp_path / "run")
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == 3
    assert last["model"]["log_temperature"].item() != 0.0  # it was 0 at the start
    buffers = {"unary_scale"}  # SPEN's α, the one buffer
    assert len(last["optimizer"]["state"]) == len(set(last["model"]) - buffers)  # every parameter


def test_a_stage_that_does_not_name_the_parameter_leaves_it_unchanged(tmp_path):
    """Two stages through the real Trainer: the first trains only the child modules (the
    temperature stays exactly 1), the second names the temperature alone (only it moves)."""
    from dsp.cli.train import train

    cfg = compose_cfg("trainer.max_epochs=1", "trainer.patience=100",
                      "trainer.stages.train.train=[feature_net,local_energy]",
                      "+trainer.stages.temperature={train: [log_temperature], lr: 0.5}")
    train(cfg, tmp_path / "run")
    run = tmp_path / "run" / "checkpoints"
    prev, last = (torch.load(run / name, weights_only=True) for name in ("last.prev.pt", "last.pt"))
    # last.prev.pt: the temperature stage's start (the first stage's best weights); last.pt: its end
    assert (prev["stage"], prev["epoch"], last["stage"], last["epoch"]) == ("temperature", 0, "temperature", 1)
    assert prev["model"]["log_temperature"].item() == 0.0
    assert last["model"]["log_temperature"].item() != 0.0
    for k, v in prev["model"].items():
        if k != "log_temperature":
            assert torch.equal(last["model"][k], v), k
