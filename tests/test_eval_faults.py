"""dsp-eval on changed data: +set.data changes that alter the data's sizes are refused by name,
not a shape traceback; a checkpoint name cannot reach into another run's folder."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from dsp.cli.common import config_dir
import shutil

import torch

import dsp
from dsp.cli.evaluate import _check_out, evaluate_run
from dsp.cli.train import train
from dsp.errors import DspError


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=mlp_synthetic", "data.num_train=32", "data.num_val=16", "data.num_test=16",
            "trainer.max_epochs=1", "trainer.progress=false", "trainer.batch_size=16"])
    train(cfg, run)
    return run


@pytest.mark.parametrize("change, named", [({"num_features": 32}, "num_features=32 (the model: 64)"),
                                           ({"num_labels": 8, "block_size": 2}, "num_labels=8 (the model: 16)")])
def test_evaluating_on_data_of_other_sizes_is_refused_by_name(tiny_run, change, named):
    with pytest.raises(DspError, match=named.replace("(", r"\(").replace(")", r"\)")):
        evaluate_run(tiny_run, overrides={"data": change})


def test_evaluating_on_other_data_of_the_same_sizes_works(tiny_run):
    metrics, _ = evaluate_run(tiny_run, overrides={"data": {"seed": 5}})
    assert 0.0 <= metrics["test/example_f1"] <= 100.0


def altered_copy(run, folder, change) -> "Path":
    """A copy of the run whose best.pt has one field changed by `change(state)`."""
    shutil.copytree(run, folder)
    state = torch.load(folder / "checkpoints" / "best.pt", weights_only=True)
    change(state)
    torch.save(state, folder / "checkpoints" / "best.pt")
    return folder


@pytest.mark.parametrize("field, value, named", [
    ("threshold", "abc", "threshold='abc'"), ("model", 5, "model is not a mapping"),
    ("predict", "bogus", "predict='bogus'"), ("predict", [1], "predict=[1]")])
def test_a_checkpoint_with_malformed_fields_is_refused_by_name(tiny_run, tmp_path, field, value, named):
    run = altered_copy(tiny_run, tmp_path / "run", lambda state: state.update({field: value}))
    with pytest.raises(DspError, match=named.replace("[", r"\[").replace("]", r"\]")):
        dsp.load_run(run)


def test_a_config_nested_too_deep_is_refused(tiny_run, tmp_path):
    deep = {}
    node = deep
    for _ in range(300):
        node["x"] = {}
        node = node["x"]
    run = altered_copy(tiny_run, tmp_path / "run", lambda state: state["config"].update({"extra": deep}))
    with pytest.raises(DspError, match="nested more than 50 levels"):
        dsp.load_run(run)


def test_a_stored_size_that_does_not_fit_the_weights_is_refused_before_it_is_allocated(tiny_run, tmp_path):
    def huge(state):
        state["config"]["model"]["feature_net"]["hidden"] = [10 ** 9]  # 64e9 weights if it were allocated

    run = altered_copy(tiny_run, tmp_path / "run", huge)
    with pytest.raises(DspError, match=r"does not fit the model its config describes: .* \(1000000000, 64\)"):
        dsp.load_run(run)


def test_an_evaluation_folder_that_links_elsewhere_is_refused(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    victim = tmp_path / "victim"
    victim.mkdir()
    (run / "eval").symlink_to(victim)
    with pytest.raises(DspError, match="is a link"):
        _check_out(run, "eval", {"split": "test"}, overwrite=True)
