"""Logs that line up and carry the run's identity: one global-step axis for every scalar (across
stages and resumes), hyper-parameters with the seed and the data, the logger group (TensorBoard,
CSV, W&B, MLflow), and progress as one line per epoch when stderr is not a terminal."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import types
from collections import defaultdict

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO
from dsp.cli.common import config_dir
from dsp.cli.train import train
from dsp.errors import DspError
from dsp.training import loggers

# 32 training examples in batches of 16: two steps an epoch
TINY = ["experiment=mlp_synthetic", "data.num_train=32", "data.num_val=16", "data.num_test=16", "trainer.batch_size=16",
        "trainer.eval_batch_size=16", "trainer.progress=false", "trainer.log_every=1", "trainer.patience=100"]


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def read_csv(path) -> dict[str, list[tuple[int, float]]]:
    """scalars.csv as key -> [(step, value), ...] in file order."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "key", "value"]
    out = defaultdict(list)
    for step, key, value in rows[1:]:
        out[key].append((int(step), float(value)))
    return out


def test_the_csv_logger_puts_train_and_val_scalars_on_one_step_axis(tmp_path):
    run = tmp_path / "run"
    train(compose_cfg(*TINY, "logger=csv", "trainer.max_epochs=3"), run)
    assert not (run / "tb").exists()  # logger=csv replaces TensorBoard
    scalars = read_csv(run / "scalars.csv")
    assert [s for s, _ in scalars["train/loss_train"]] == [1, 2, 3, 4, 5, 6]
    # validation after each epoch, at the step the epoch ended on; the epoch as a scalar of its own
    assert [s for s, _ in scalars["val/example_f1"]] == [2, 4, 6]
    assert scalars["epoch"] == [(2, 1.0), (4, 2.0), (6, 3.0)]
    assert [s for s, _ in scalars["lr"]] == [2, 4, 6]
    record = json.loads((run / "hparams.json").read_text())
    assert record["hparams"]["seed"] == 0 and record["hparams"]["data._target_"].endswith("make_block_exclusive")
    assert record["metrics"]["test/example_f1"] == json.loads((run / "metrics.json").read_text())["test/example_f1"]


def test_stages_and_a_resume_continue_the_same_step_axis(tmp_path):
    run = tmp_path / "run"
    common = [*TINY, "trainer=staged", "model=spen_synthetic", "objective=ssvm", "inference.max_iter=3",
              "logger=[tensorboard,csv]"]
    train(compose_cfg(*common, "trainer.max_epochs=1"), run)
    first = read_csv(run / "scalars.csv")
    assert first["epoch"] == [(2, 1.0), (4, 2.0), (6, 3.0)]  # three stages of one epoch: one axis
    # rows an interrupted start wrote after its last checkpoint are dropped by the resume
    with open(run / "scalars.csv", "a", newline="") as f:
        csv.writer(f).writerow([99, "train/loss_joint", 1.0])
    train(compose_cfg(*common, "trainer.max_epochs=2", "trainer.resume=true"), run)
    scalars = read_csv(run / "scalars.csv")
    assert scalars["epoch"] == [(2, 1.0), (4, 2.0), (6, 3.0), (8, 4.0)]  # the joint stage's 2nd epoch
    assert [s for s, _ in scalars["train/loss_joint"]] == [5, 6, 7, 8]
    steps = [s for values in scalars.values() for s, _ in values]
    assert max(steps) == 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("epoch")] == [(2, 1.0), (4, 2.0), (6, 3.0), (8, 4.0)]
    assert [e.step for e in events.Scalars("val/example_f1")] == [2, 4, 6, 8]


def test_hparams_carry_the_seed_and_the_data(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "run"
    train(compose_cfg(*TINY, "trainer.max_epochs=1", "seed=7"), run)
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["seed"].number_value == 7
    assert hparams["data._target_"].string_value == "dsp.data.synthetic.make_block_exclusive"
    assert hparams["data.num_train"].number_value == 32 and hparams["examples.train"].number_value == 32
    assert hparams["dims.num_labels"].number_value == 16 and hparams["trainer.precision"].string_value == "fp32"
    assert hparams["model.feature_net.hidden"].string_value == "[64, 16]"  # lists as their text
    # the final metrics of metrics.json beside them
    metric_tags = set(events.Tags()["scalars"])
    assert {"hparam/test/example_f1", "hparam/val/example_f1"} <= metric_tags


def test_without_a_terminal_progress_is_one_line_per_epoch(tmp_path, capfd):
    proc = subprocess.run([sys.executable, "-m", "dsp.cli.train", *TINY[:-3], "trainer=default", "trainer.max_epochs=3",
                           "trainer.progress=true", f"hydra.run.dir={tmp_path / 'run'}"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr  # no bar refreshes (stderr is a pipe, as in a Slurm log)
    lines = proc.stderr.splitlines()
    assert len(lines) == 3, proc.stderr
    assert lines[0].startswith("stage train epoch 1/3 (step 2): loss ") and " val example_f1 " in lines[0]
    assert lines[2].startswith("stage train epoch 3/3 (step 6): ")
    capfd.readouterr()
    train(compose_cfg(*TINY, "trainer=default", "trainer.max_epochs=3", "trainer.progress=false"), tmp_path / "quiet")
    assert capfd.readouterr().err == ""  # progress=false: silent, as before


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_wandb_and_mlflow_are_refused_in_one_line_when_not_installed(name, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, name, None)  # importing it fails whether or not it is installed
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda pkg, *a: None if pkg == name else object())
    message = (f"logger={name}: the {name} package is not installed; pip install 'dsp[{name}]' (or pip install "
               f"{name}), or choose another logger")
    with pytest.raises(DspError) as err:
        train(compose_cfg(*TINY, f"logger={name}", "trainer.max_epochs=1"), tmp_path / "run")
    assert str(err.value) == message
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training


def test_a_logger_name_or_setting_that_does_not_exist_is_refused_by_key():
    with pytest.raises(DspError, match=r"^logger.neptune is not a logger: choose among tensorboard, csv, wandb, mlflow$"):
        loggers.check_logger({"neptune": {}})
    with pytest.raises(DspError, match=r"^logger.csv.path is not a setting of the csv logger; its settings: file$"):
        loggers.check_logger({"csv": {"path": "x.csv"}})
    assert loggers.check_logger({}) == {} and loggers.check_logger(None) == {}


def fake_wandb(calls):
    run = types.SimpleNamespace(
        log=lambda data, step: calls.append(("log", step, sorted(data))),
        config=types.SimpleNamespace(update=lambda params, allow_val_change: calls.append(("config", params))),
        summary=types.SimpleNamespace(update=lambda metrics: calls.append(("summary", metrics))),
        finish=lambda: calls.append(("finish",)))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return run

    return types.SimpleNamespace(init=init, Image=lambda array: array,
                                 util=types.SimpleNamespace(generate_id=lambda: "abc123"))


def test_the_wandb_logger_logs_on_the_step_axis_and_resumes_its_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda pkg, *a: object())
    run = tmp_path / "run"
    train(compose_cfg(*TINY, "trainer=default", "logger=wandb", "logger.wandb.project=p", "trainer.max_epochs=1"), run)
    init = calls[0][1]
    assert init["project"] == "p" and init["id"] == "abc123" and init["resume"] == "allow"
    assert init["config"]["seed"] == 0 and "data._target_" in init["config"]
    logged = [(step, keys) for kind, *rest in calls if kind == "log" for step, keys in [rest]]
    assert (1, ["train/loss_train"]) in logged and (2, ["val/example_f1"]) in logged and (2, ["epoch"]) in logged
    assert calls[-1] == ("finish",) and calls[-2][0] == "summary"
    assert (run / ".wandb_run_id").read_text().strip() == "abc123"  # a resume continues this W&B run


def test_the_mlflow_logger_logs_metrics_by_step(tmp_path, monkeypatch):
    calls = []
    info = types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))
    fake = types.SimpleNamespace(
        set_tracking_uri=lambda uri: calls.append(("uri", uri)), set_experiment=lambda name: None,
        start_run=lambda run_id, run_name: calls.append(("start", run_id, run_name)) or info,
        log_params=lambda params: calls.append(("params", params)),
        log_metric=lambda key, value, step: calls.append(("metric", key, step)),
        log_metrics=lambda metrics: calls.append(("final", metrics)), end_run=lambda: calls.append(("end",)))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda pkg, *a: object())
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    train(compose_cfg(*TINY, "trainer=default", "logger=mlflow", "trainer.max_epochs=1"), run)
    assert calls[0] == ("uri", (run / "mlruns").resolve().as_uri()) and calls[1] == ("start", None, "run")
    params = {k: v for kind, *rest in calls if kind == "params" for k, v in rest[0].items()}
    assert params["seed"] == "0" and params["data.num_train"] == "32"
    assert ("metric", "train/loss_train", 1) in calls and ("metric", "val/example_f1", 2) in calls
    assert calls[-1] == ("end",) and "final/test/example_f1" in calls[-2][1]
    assert (run / ".mlflow_run_id").read_text().strip() == "r1"
