"""dsp-eval on changed data: +set.data changes that alter the data's sizes are refused by name,
not a shape traceback; a checkpoint name cannot reach into another run's folder."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from dsp.cli.common import config_dir
from dsp.cli.evaluate import evaluate_run
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
