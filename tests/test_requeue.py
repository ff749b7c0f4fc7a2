"""Preemption under a job scheduler: SIGUSR2 (submitit's and Slurm's warning before the time limit)
saves last.pt at the step under way and marks the run preempted; submitit requeues the job and the
requeued attempt, the same command, continues by itself and ends with the metrics of an
uninterrupted run. A job Slurm requeued (SLURM_RESTART_COUNT) continues by itself too."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from dsp.training.run_folder import requeued
from dsp.training.preemption import StopRequest, preemption_signals

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

TINY = ["experiment=mlp_synthetic", "data.num_train=64", "data.num_val=16", "data.num_test=16",
        "trainer.max_epochs=3", "trainer.progress=false", "trainer.batch_size=16",
        "model.feature_net.input_dropout=0.2"]  # every step draws from the RNG: a resume must restore it
RUN_DEPENDENT = ("train/time_s", "train/peak_rss_mb", "train/peak_cuda_mb")


def dsp_train(*args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("SLURM_RESTART_COUNT", None) if "SLURM_RESTART_COUNT" not in (env_extra or {}) else None
    flags = [a for a in args if a.startswith("-")]
    return subprocess.run([sys.executable, "-m", "dsp.cli.train", *flags, *TINY,
                           *[a for a in args if not a.startswith("-")]], capture_output=True, text=True, env=env,
                          timeout=600)


def numbers(run):
    return {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k not in RUN_DEPENDENT}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = dsp_train(f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    return run


def test_sigusr2_under_submitit_saves_requeues_and_ends_as_the_uninterrupted_run(uninterrupted, tmp_path):
    sweep = tmp_path / "sweep"
    proc = dsp_train("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}",
                     env_extra={"DSP_TEST_SIGNAL_AFTER_STEP": "6:SIGUSR2"})  # mid-epoch 2 (4 steps an epoch)
    assert proc.returncode == 0, proc.stderr
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "SIGUSR2 received: saved" in logs and "Requeued job" in logs, logs[-3000:]
    assert "resuming" in logs and "example 32" in logs  # continued mid-epoch, from the saved step
    assert numbers(sweep / "0") == numbers(uninterrupted)


def test_a_job_slurm_requeued_resumes_by_itself(uninterrupted, tmp_path):
    run = tmp_path / "run"
    first = dsp_train(f"hydra.run.dir={run}", env_extra={"DSP_TEST_SIGNAL_AFTER_STEP": "6:SIGUSR2"})
    assert first.returncode == 143 and "SIGUSR2 received" in first.stderr, first.stderr
    (run / "checkpoints" / "preempted.json").unlink()  # as after a SIGKILL: only Slurm's count says "requeued"
    refused = dsp_train(f"hydra.run.dir={run}")
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    again = dsp_train(f"hydra.run.dir={run}", env_extra={"SLURM_RESTART_COUNT": "1"})  # the same command
    assert again.returncode == 0, again.stderr
    assert numbers(run) == numbers(uninterrupted)


def test_a_preempted_run_continues_when_its_command_runs_again_and_then_is_finished(uninterrupted, tmp_path):
    run = tmp_path / "run"
    first = dsp_train(f"hydra.run.dir={run}", env_extra={"DSP_TEST_SIGNAL_AFTER_STEP": "6:SIGTERM"})
    assert first.returncode == 143 and (run / "checkpoints" / "preempted.json").is_file()
    changed = dsp_train(f"hydra.run.dir={run}", "trainer.lr=0.5")  # not the same job: refused as a resume is
    assert changed.returncode == 2 and "trainer.lr" in changed.stderr
    again = dsp_train(f"hydra.run.dir={run}")
    assert again.returncode == 0, again.stderr
    assert numbers(run) == numbers(uninterrupted) and not (run / "checkpoints" / "preempted.json").exists()
    assert dsp_train(f"hydra.run.dir={run}").returncode == 2  # finished: a new start is refused again
    kept = (run / "metrics.json").read_bytes()
    resumed = dsp_train(f"hydra.run.dir={run}", "trainer.resume=true")  # nothing left to train: files kept
    assert resumed.returncode == 0 and "is finished" in resumed.stdout + resumed.stderr
    assert (run / "metrics.json").read_bytes() == kept


def test_the_preemption_signals_and_the_restart_count(monkeypatch):
    assert preemption_signals() == (signal.SIGTERM, signal.SIGUSR2)
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert preemption_signals() == (signal.SIGTERM, signal.SIGUSR1)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signal_name == "SIGUSR1"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert not requeued()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert requeued()
