"""What a user gets with nothing but the data paths: a model brings the objective and trainer it
trains with, small training sets get small batches, dense features are standardised, and the
baseline model=linear trains end to end and predicts from its checkpoint alone."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import dsp
from conftest import write_mulan
from dsp.cli.common import config_dir
from dsp.training.stages import auto_batch_size


def composed(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_auto_batch_size_gives_a_small_training_set_about_16_steps_an_epoch():
    # N // 16 rounded down to a power of two, between 8 and 64; unknown size (a stream): 64
    assert [auto_batch_size(n) for n in (None, 1, 100, 255, 256, 600, 1023, 1024, 50_000)] == \
        [64, 8, 8, 8, 16, 32, 32, 64, 64]


@pytest.mark.parametrize("model, objective, inference, stages", [
    ("linear", "dsp.objectives.local.LocalLoss", None, ["train"]),
    ("mlp", "dsp.objectives.local.LocalLoss", None, ["train"]),
    ("dvn", "dsp.objectives.value.ValueObjective", 20, ["train"]),
    ("spen", "dsp.objectives.ssvm.SSVMLoss", 100, ["local", "global", "joint"]),
])
def test_a_model_brings_its_objective_and_trainer_and_the_command_line_still_wins(model, objective, inference, stages):
    cfg = composed(f"model={model}")
    assert cfg.objective._target_ == objective
    assert [k for k, v in cfg.trainer.stages.items() if v is not None] == stages
    if inference is not None:
        assert cfg.inference.max_iter == inference  # dvn: 20 plain ascent steps (dvn_ascent); spen: mirror
    assert composed(f"model={model}", "objective=ssvm").objective._target_ == "dsp.objectives.ssvm.SSVMLoss"
    assert composed(f"model={model}", "trainer=staged").trainer.stages.joint is not None
    if model == "linear":
        assert list(cfg.model.feature_net.hidden) == [] and cfg.model.global_energy is None


def test_linear_baseline_trains_standardises_and_predicts_from_its_checkpoint(tmp_path):
    """Dense features on very different scales: standardised with training statistics (auto), the
    statistics stored in the checkpoint; 48 training examples give batches of 8."""
    from dsp.cli.train import train

    tr, te, xml = write_mulan(tmp_path / "d", n_train=60, n_test=20, sparse=False)
    for path in (tr, te):  # feature f0 scaled by 1000: not 0/1, so standardised
        lines = path.read_text().splitlines()
        start = lines.index("@data") + 1
        lines[start:] = [",".join([str(float(v) * 1000) if k == 0 else v for k, v in enumerate(row.split(","))])
                         for row in lines[start:]]
        path.write_text("\n".join(lines) + "\n")
    cfg = composed("model=linear", "data=mulan", f"data.train={tr}", f"data.test={te}", f"data.labels_xml={xml}",
                   "data.cache_dir=''", "trainer.max_epochs=2", "trainer.progress=false", "logger=none")
    train(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"test/example_f1", "test/hamming", "test/empty_predictions"} <= set(metrics)
    run = dsp.load_run(tmp_path / "run")
    assert run.checkpoint["input_transform"]["scale"][0] > 100  # f0's training std, about 460
    assert float(run.checkpoint["input_transform"]["scale"][1]) == 1.0  # a 0/1 feature stays as it is
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert last["step"] == 2 * 6  # 48 training examples in batches of 8 (auto), 2 epochs
    out = run.predict(np.zeros((3, 12), np.float32))
    assert out["labels"].shape == (3, 5) and out["scores"].shape == (3, 5)
