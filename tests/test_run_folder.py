"""One writer per run folder, and resumes that continue only what their checkpoint was trained with:
a second dsp-train into a held folder is refused before Hydra writes its record; a lock left by a
killed process does not block; a resume (or a sweep re-run with trainer.resume=true) that changes
what is trained is refused naming the keys, with every file of the run untouched."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsp.errors import DspError
from dsp.training import run_folder

TINY = ["experiment=mlp_synthetic", "data.num_train=48", "data.num_val=16", "data.num_test=16",
        "trainer.max_epochs=1", "trainer.progress=false", "trainer.batch_size=16"]


def dsp_train(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = [a for a in args if a.startswith("-")]  # (Hydra's flags come before the overrides)
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.run([sys.executable, "-m", "dsp.cli.train", *flags, *TINY, *overrides], capture_output=True, text=True,
                          env=env, timeout=300, cwd=cwd)


def fingerprint(run: Path) -> dict[str, str]:
    """Every file of a run folder (the lock file aside) and a digest of its bytes."""
    return {str(p.relative_to(run)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != run_folder.LOCK_NAME}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("lock") / "run"
    proc = dsp_train(f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    return run


def test_a_second_run_into_a_held_folder_is_refused_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    run_folder.hold(run)  # as a first dsp-train would, from another process's point of view
    try:
        for extra in ([], ["trainer.resume=true"]):
            proc = dsp_train(f"hydra.run.dir={run}", *extra)
            assert proc.returncode == 2 and "in use by another run" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
            assert "Traceback" not in proc.stderr and not (run / ".hydra").exists()
    finally:
        run_folder.release(run)


def test_deleting_the_lock_file_does_not_let_a_second_writer_in(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dsp.training import run_folder; "
                               f"run_folder.hold({str(run)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (run / run_folder.LOCK_NAME).unlink()
        with pytest.raises(DspError, match="in use by another run"):
            run_folder.hold(run)
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dsp.training import run_folder; "
                               f"run_folder.hold({str(run)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DspError, match="in use by another run"):
        run_folder.hold(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    run_folder.hold(run)  # the kernel dropped the dead process's lock
    run_folder.release(run)


@pytest.mark.parametrize("change, key", [(["seed=1"], "seed"), (["data.num_train=40"], "data.num_train"),
                                         (["trainer.lr=0.5"], "trainer.lr")])
def test_a_resume_that_changes_what_is_trained_is_refused_naming_the_key(finished, change, key):
    before = fingerprint(finished)
    proc = dsp_train(f"hydra.run.dir={finished}", "trainer.resume=true", *change)
    assert proc.returncode == 2 and f"{key}:" in proc.stderr and "cannot resume" in proc.stderr, proc.stderr
    assert fingerprint(finished) == before  # the record, checkpoints and metrics as they were


def test_a_resume_may_change_when_it_stops(finished, tmp_path):
    run = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(finished), str(run)], check=True)
    proc = dsp_train(f"hydra.run.dir={run}", "trainer.resume=true", "trainer.max_epochs=2", "trainer.log_every=5")
    assert proc.returncode == 0, proc.stderr
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["global_epoch"] == 2


def test_a_sweep_rerun_with_resume_and_a_changed_value_is_refused_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    first = dsp_train("-m", f"hydra.sweep.dir={sweep}", "trainer.lr=0.01,0.02")
    assert first.returncode == 0, first.stderr
    before = {job: fingerprint(sweep / job) for job in ("0", "1")}
    again = dsp_train("-m", f"hydra.sweep.dir={sweep}", "trainer.lr=0.01,0.05", "trainer.resume=true")
    assert again.returncode == 2 and "job 1" in again.stderr and "trainer.lr: 0.02 -> 0.05" in again.stderr, again.stderr
    assert {job: fingerprint(sweep / job) for job in ("0", "1")} == before


def test_the_trainer_refuses_a_changed_resume_and_puts_the_record_back(finished, tmp_path):
    """A sweeper that draws its jobs late (Optuna) is checked only in the job, after Hydra rewrote
    .hydra/: the record of the run's accepted start comes back."""
    from hydra import compose, initialize_config_dir

    from dsp.cli.common import config_dir
    from dsp.cli.train import train

    run = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(finished), str(run)], check=True)
    kept = fingerprint(run)
    (run / ".hydra" / "overrides.yaml").write_text("- trainer.lr=0.5\n")  # what Hydra wrote for the new job
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, "trainer.resume=true", "trainer.lr=0.5"])
    with pytest.raises(DspError, match=r"trainer.lr: 0.001 -> 0.5"):
        train(cfg, run)
    assert fingerprint(run) == kept


def test_changed_keys_ignores_what_may_change_and_a_moved_data_file():
    old = {"seed": 0, "data": {"train": "/a/x-train.arff", "cache_dir": "/c"}, "trainer": {"max_epochs": 2, "lr": 1.0},
           "paths": {"output_dir": "outputs"}}
    new = {"seed": 0, "data": {"train": "/b/x-train.arff", "cache_dir": "/d"}, "trainer": {"max_epochs": 9, "lr": 1.0},
           "paths": {"output_dir": "elsewhere"}}
    assert run_folder.changed_keys(old, new) == []
    new["data"]["train"] = "/b/y-train.arff"
    new["model"] = {"hidden": [8]}
    assert [k for k, _, _ in run_folder.changed_keys(old, new)] == ["data.train", "model.hidden"]


def test_a_run_folder_that_is_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    proc = dsp_train(f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "is a file" in proc.stderr and "Traceback" not in proc.stderr
