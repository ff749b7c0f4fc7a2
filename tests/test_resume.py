"""Crash safety: a run killed (SIGKILL) or preempted (SIGTERM) and resumed ends exactly where the
uninterrupted run ends; checkpoints rotate, fall back, and load with weights_only=True.

Kills land at exact optimiser steps through the DSP_TEST_SIGNAL_AFTER_STEP hook
(dsp.training.preemption): the process sends itself a real signal right after that step. The
default config is synthetic data with the staged SPEN: 64 examples in batches of 16 are 4 steps an
epoch, 2 epochs a stage, so steps 1-8 are stage `local`, 9-16 `global` and 17-24 `joint`. Input
dropout makes every step draw from the torch RNG, so a resume must restore it to match, and the
learning rates are such that every stage improves the final metrics.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from dsp.cli.common import config_dir
from dsp.cli.train import train
from dsp.errors import DspError
from dsp.training.checkpoint import load_checkpoint, load_latest, save_checkpoint
from dsp.training.preemption import Preempted, StopRequest

STAGED = ["data.num_train=64", "data.num_val=32", "data.num_test=48", "trainer.max_epochs=2",
          "trainer.progress=false", "inference.max_iter=5", "trainer.batch_size=16", "trainer.lr=0.05",
          "trainer.stages.joint.lr=0.01", "model.feature_net.input_dropout=0.2"]
RUN_DEPENDENT = ("train/time_s", "train/peak_rss_mb", "train/peak_cuda_mb")


def dsp_train(run: Path, *args, signal_after_step: str | None = None, wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DSP_TEST_SIGNAL_AFTER_STEP", None)
    if signal_after_step:
        env["DSP_TEST_SIGNAL_AFTER_STEP"] = signal_after_step
    cmd = [sys.executable, "-m", "dsp.cli.train", *STAGED, *args, f"hydra.run.dir={run}"]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def final_numbers(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k not in RUN_DEPENDENT}


def assert_same_run(run: Path, reference: Path) -> None:
    assert final_numbers(run) == final_numbers(reference)  # exactly, on CPU
    for name in ("best.pt", "last.pt"):
        got, want = (torch.load(r / "checkpoints" / name, weights_only=True) for r in (run, reference))
        assert (got["stage"], got["epoch"], got["step"]) == (want["stage"], want["epoch"], want["step"])
        for key, tensor in want["model"].items():
            assert torch.equal(got["model"][key], tensor), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = dsp_train(run)
    assert proc.returncode == 0, proc.stderr
    return run


def test_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run(uninterrupted, tmp_path):
    run = tmp_path / "run"
    # killed 3 batches into the global stage's first epoch, then 2 batches into joint epoch 2
    proc = dsp_train(run, signal_after_step="11:SIGKILL")
    assert proc.returncode == -signal.SIGKILL and not (run / "metrics.json").exists()
    proc = dsp_train(run, "trainer.resume=true", signal_after_step="22:SIGKILL")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "at stage 'global', epoch 1" in proc.stdout + proc.stderr  # the stage it was killed in
    proc = dsp_train(run, "trainer.resume=true")
    assert proc.returncode == 0, proc.stderr
    assert "at stage 'joint', epoch 2" in proc.stdout + proc.stderr
    assert_same_run(run, uninterrupted)
    # where each of the three starts ran (dsp.training.provenance), the uninterrupted run's one start
    starts = json.loads((run / "environment.json").read_text())
    assert len(starts) == 3 and all(s["torch"] == torch.__version__ for s in starts)
    assert len(json.loads((uninterrupted / "environment.json").read_text())) == 1


def test_a_run_with_a_weight_average_resumes_exactly(tmp_path):
    """trainer.ema_decay: the average, its age and the live weights are all in last.pt, so a run
    killed mid-stage and resumed ends where the uninterrupted one does."""
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert dsp_train(reference, "trainer.ema_decay=0.8").returncode == 0
    assert dsp_train(run, "trainer.ema_decay=0.8", signal_after_step="19:SIGKILL").returncode == -signal.SIGKILL
    proc = dsp_train(run, "trainer.ema_decay=0.8", "trainer.resume=true")
    assert proc.returncode == 0, proc.stderr
    assert_same_run(run, reference)
    got, want = (torch.load(r / "checkpoints" / "last.pt", weights_only=True) for r in (run, reference))
    assert got["ema_updates"] == want["ema_updates"] > 0
    for key, tensor in want["train_model"].items():
        assert torch.equal(got["train_model"][key], tensor), key


def test_sigterm_saves_mid_epoch_exits_143_and_resumes_exactly(uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = dsp_train(run, signal_after_step="13:SIGTERM")  # the first batch of global epoch 2
    assert proc.returncode == 143, proc.stderr
    assert "SIGTERM received" in proc.stderr and "trainer.resume=true" in proc.stderr
    assert "Traceback" not in proc.stderr and not (run / "metrics.json").exists()
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (last["stage"], last["epoch"], last["epoch_offset"], last["step"]) == ("global", 1, 16, 13)
    assert torch.load(run / "checkpoints" / "last.prev.pt", weights_only=True)["epoch"] == 1
    proc = dsp_train(run, "trainer.resume=true")
    assert proc.returncode == 0, proc.stderr
    assert "at stage 'global', epoch 2, example 16" in proc.stdout + proc.stderr
    assert_same_run(run, uninterrupted)


def test_sigterm_from_outside_stops_cleanly_and_resumes_exactly(uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = dsp_train(run, wait=False)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "last.pt").exists():  # training is under way
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 143, stderr
    assert "SIGTERM received" in stderr and "Traceback" not in stderr
    proc = dsp_train(run, "trainer.resume=true")
    assert proc.returncode == 0, proc.stderr
    assert_same_run(run, uninterrupted)


# ------------------------------------------------------------------ rotation and fallback
def tiny_cfg(epochs: int, resume=False):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        one_stage = [o for o in STAGED if not o.startswith("trainer.stages.")]
        return compose("config", overrides=[*one_stage, "trainer=default", f"trainer.max_epochs={epochs}",
                                            f"trainer.resume={str(resume).lower()}"])


def test_checkpoint_rotation_keeps_the_previous_last(tmp_path):
    path = tmp_path / "last.pt"
    for epoch in (1, 2):
        save_checkpoint({"model": {}, "config": {}, "epoch": epoch}, path, keep_previous=True)
    assert load_checkpoint(path)["epoch"] == 2 and load_checkpoint(tmp_path / "last.prev.pt")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]  # no temporary files
    path.unlink()  # killed between the two renames: the previous one is the state to resume from
    state, found = load_latest(tmp_path)
    assert state["epoch"] == 1 and found == tmp_path / "last.prev.pt"


def test_corrupted_last_falls_back_to_the_previous_one_with_a_warning(tmp_path, capsys):
    reference = train(tiny_cfg(3), tmp_path / "reference")
    run = tmp_path / "run"
    train(tiny_cfg(2), run)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # a torn write on a broken disk
    capsys.readouterr()
    resumed = train(tiny_cfg(3, resume=True), run)
    err = capsys.readouterr().err
    assert "warning:" in err and "last.pt is unreadable" in err and "last.prev.pt" in err
    assert "ckpt=" not in err  # dsp-eval's advice does not belong in a resume warning
    assert {k: v for k, v in resumed.items() if k not in RUN_DEPENDENT} == \
        {k: v for k, v in reference.items() if k not in RUN_DEPENDENT}


def test_sigterm_during_the_final_evaluation_stops_at_once_with_the_way_on():
    """After training nothing is left to save: SIGTERM must not wait for a safe point that will
    not come (a long evaluation would outlast a scheduler's grace period)."""
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # during training: only noted, for the next safe point
        assert stop.requested
        with pytest.raises(Preempted, match="already"):
            stop.stop_at_once("already asked")  # a request during the last validation stops here
    with StopRequest() as stop:
        stop.stop_at_once("stopped in the final evaluation")
        with pytest.raises(Preempted, match="final evaluation"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises at the next bytecode of the main thread
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is given back


def test_the_trainer_stops_at_once_on_sigterm_in_its_final_evaluation(tmp_path, monkeypatch):
    from dsp.training.trainer import Trainer

    evaluate = Trainer.final_metrics

    def final_metrics_interrupted(self):  # a scheduler's SIGTERM arrives during the test evaluation
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends; waiting for a safe point would not
        return evaluate(self)

    monkeypatch.setattr(Trainer, "final_metrics", final_metrics_interrupted)
    run = tmp_path / "run"
    with pytest.raises(Preempted, match="before the final evaluation ended"):
        train(tiny_cfg(2), run)
    assert (run / "checkpoints" / "best.pt").is_file() and not (run / "metrics.json").exists()
    monkeypatch.setattr(Trainer, "final_metrics", evaluate)
    assert train(tiny_cfg(2, resume=True), run)["train/epochs"] == 2  # resume writes metrics.json
    assert (run / "metrics.json").is_file()


def test_resume_with_both_checkpoints_unreadable_names_them(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(2), run)
    for name in ("last.pt", "last.prev.pt"):
        (run / "checkpoints" / name).write_bytes(b"garbage")
    with pytest.raises(DspError, match=r"cannot resume: neither .*last\.pt nor .*last\.prev\.pt"):
        train(tiny_cfg(3, resume=True), run)


class RunsCode:
    """A pickled object whose unpickling would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_holding_python_objects_is_refused_by_eval_and_resume(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("best.pt", "last.pt"):
        torch.save({"model": {}, "config": {}, "payload": RunsCode(marker)}, run / "checkpoints" / name)
    proc = subprocess.run([sys.executable, "-m", "dsp.cli.evaluate", f"run_dir={run}"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds Python objects" in proc.stderr and "system" in proc.stderr and "weights_only" in proc.stderr
    with pytest.raises(DspError, match=r"cannot resume.*holds Python objects"):
        train(tiny_cfg(1, resume=True), run)
    assert not marker.exists()


def test_value_training_with_a_replay_buffer_resumes_exactly(tmp_path):
    """The DVN objective's replay ring is part of the checkpoint: killed mid-run and resumed, the
    run replays the same tuples and ends where the uninterrupted one does."""
    dvn = ["model=dvn", "inference=dvn_ascent", "objective=value", "trainer=default", "data.num_train=64",
           "data.num_val=32", "data.num_test=48", "trainer.max_epochs=3", "trainer.progress=false",
           "trainer.batch_size=16", "inference.max_iter=3", "objective.replay_size=24", "objective.replay_batch=8"]

    def run_dvn(run, *extra, signal_after_step=None):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("DSP_TEST_SIGNAL_AFTER_STEP", None)
        if signal_after_step:
            env["DSP_TEST_SIGNAL_AFTER_STEP"] = signal_after_step
        cmd = [sys.executable, "-m", "dsp.cli.train", *dvn, *extra, f"hydra.run.dir={run}"]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    reference = tmp_path / "reference"
    assert run_dvn(reference).returncode == 0
    saved = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)["objectives"]["train"]["replay"]
    assert saved["x"].shape[0] == 24  # 12 steps of 16 fresh tuples filled the ring
    run = tmp_path / "run"
    assert run_dvn(run, signal_after_step="6:SIGKILL").returncode == -signal.SIGKILL  # mid epoch 2
    proc = run_dvn(run, "trainer.resume=true")
    assert proc.returncode == 0, proc.stderr
    assert_same_run(run, reference)
