"""Hyperparameter sweeps as a user runs them: the Optuna presets (a stored study that a second run
continues, a failed trial), the joblib, submitit (local; the Slurm preset up to sbatch) and Ray
launchers, and a failed job that does not stop the others. Each plugin is an extra: without it
its tests skip."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import free_port
from dsp.cli.common import config_dir

TINY_SYNTHETIC = ["data.num_train=64", "data.num_val=32", "data.num_test=48"]
QUICK = ["trainer.max_epochs=1", "trainer.progress=false", "trainer.batch_size=16", "inference.max_iter=5"]


def dsp_train(*args: str) -> subprocess.CompletedProcess:
    """dsp-train as a user runs it; returns the finished process."""
    return subprocess.run([sys.executable, "-m", "dsp.cli.train", *args], capture_output=True, text=True, timeout=300)


def need(module: str, extra: str) -> None:
    """Skip when a sweep plugin (an optional extra of dsp) is not installed, saying how to get it."""
    if extra == "ray":  # ray is about 400 MB, so the test extra leaves it out
        why = f'{module} is not installed (the ray extra is not part of the test extra): pip install -e ".[ray]"'
    else:
        why = f'{module} is not installed: pip install -e ".[test]" (or ".[{extra}]")'
    pytest.importorskip(module, reason=why)


def assert_run_folder(folder: Path) -> dict:
    """A finished job folder: the same contract as a single run's folder."""
    for f in (".hydra/config.yaml", ".hydra/overrides.yaml", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (folder / f).is_file(), folder / f
    metrics = json.loads((folder / "metrics.json").read_text())
    assert math.isfinite(metrics["val/example_f1"]) and "test/example_f1" in metrics
    return metrics


@pytest.mark.parametrize("preset, experiment", [
    ("spen_optuna", None), ("spen_optuna", "spen_bibtex"), ("spen_optuna", "spen_delicious"),
    ("dvn_optuna", "dvn_bibtex"), ("crf_optuna", "crf_ocr_joint"), ("crf_optuna", "crf_ocr_stage"),
])
def test_optuna_presets_search_keys_the_experiment_has(preset, experiment):
    need("hydra_plugins.hydra_optuna_sweeper", "sweep")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[f"hparams_search={preset}"]
                      + ([f"experiment={experiment}"] if experiment else []), return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.study_name == preset and sweeper.max_failure_rate == 1.0
    assert OmegaConf.to_container(sweeper, resolve=False)["storage"] == "sqlite:///${hydra.sweep.dir}/optuna.db"
    params = sweeper.params
    assert len(params) >= 4
    for override in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]):
        key = override.get_key_element()
        assert override.is_sweep_override(), key
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", f"{preset} searches {key}"


@pytest.mark.filterwarnings("ignore:Deprecated API features detected")  # optuna 2.x on SQLAlchemy 1.4
def test_optuna_sweep_stores_the_study_and_a_second_run_continues_it(tmp_path):
    """spen_optuna on the synthetic default: 2 trials at once on the joblib launcher, then 1 more
    (failing on purpose) into the same study."""
    need("hydra_plugins.hydra_optuna_sweeper", "sweep")
    need("hydra_plugins.hydra_joblib_launcher", "sweep")
    import optuna

    proc = dsp_train("hparams_search=spen_optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                   "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *QUICK, *TINY_SYNTHETIC)
    assert proc.returncode == 0, proc.stderr
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout and "is launching 2 jobs" in proc.stdout
    [sweep] = (tmp_path / "outputs" / "multirun").glob("*/*")  # the default, dated sweep folder
    values = {int(job): assert_run_folder(sweep / job)["val/example_f1"] for job in ("0", "1")}
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # inference.max_iter is fixed on the command line, so Optuna does not search it
    assert set(results["best_params"]) == {"trainer.lr", "trainer.stages.joint.lr", "trainer.weight_decay",
                                           "inference.lr", "model.global_energy.measurements",
                                           "model.feature_net.hidden"}
    assert results["best_value"] == pytest.approx(max(values.values()))  # the objective: val/<monitor>
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    trials = optuna.load_study(study_name="spen_optuna", storage=storage).trials
    assert [t.value for t in trials] == pytest.approx([values[0], values[1]])

    # continue the study; this trial fails, is reported with its folder and recorded, and the sweep exits 1
    second = tmp_path / "second"
    proc = dsp_train("hparams_search=spen_optuna", "hydra.sweeper.n_trials=1", f"hydra.sweeper.storage={storage}",
                   f"hydra.sweep.dir={second}", "trainer.optimizer=bogus", *QUICK, *TINY_SYNTHETIC)
    assert proc.returncode == 1 and "1 job(s) of the sweep failed" in proc.stderr, proc.stderr
    assert f"job 0 ({second / '0'}) failed" in proc.stderr and "optimizer='bogus'" in proc.stderr
    assert "Traceback" not in proc.stderr
    trials = optuna.load_study(study_name="spen_optuna", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL"]
    results = yaml.safe_load((second / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(values.values()))  # the best of the whole study


def test_submitit_local_runs_each_job_as_a_process_and_a_failed_job_does_not_stop_the_sweep(tmp_path):
    need("hydra_plugins.hydra_submitit_launcher", "slurm")
    sweep = tmp_path / "sweep"
    proc = dsp_train("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "trainer=default",
                   "trainer.optimizer=adam,bogus", *QUICK, *TINY_SYNTHETIC, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    assert_run_folder(sweep / "0")
    assert (sweep / "1" / ".hydra" / "overrides.yaml").is_file() and not (sweep / "1" / "metrics.json").exists()
    # each job ran as its own submitit job; the failed one says so, with its folder, in its log
    logs = {p.parent.name: p.read_text() for p in (sweep / ".submitit").glob("*/*_log.err")}
    assert len(logs) == 2 and len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2
    assert [t for t in logs.values() if f"job 1 ({sweep / '1'}) failed" in t and "optimizer='bogus'" in t]


def test_slurm_preset_submits_a_job_array_with_its_resources(tmp_path, monkeypatch):
    """hydra/launcher=slurm up to sbatch: a stand-in sbatch keeps the script and refuses the job."""
    need("hydra_plugins.hydra_submitit_launcher", "slurm")
    bin_dir, script = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {script}\necho "sbatch: error: no Slurm here" >&2\nexit 1\n')
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sweep = tmp_path / "sweep"
    proc = dsp_train("-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer.lr=1e-3,3e-3",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode != 0 and "no Slurm here" in proc.stderr
    lines = script.read_text().splitlines()
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1", "#SBATCH --time=240",
                 "#SBATCH --mem=32GB", "#SBATCH --cpus-per-task=4", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --signal=USR2@120", f"#SBATCH --output={sweep}/.submitit/%A_%a/%A_%a_0_log.out"):
        assert line in lines, line
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in lines)


@pytest.fixture
def local_ray(monkeypatch):
    """A one-node Ray cluster on the loopback interface only, stopped (with all it started) afterwards."""
    need("hydra_plugins.hydra_ray_launcher", "ray")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # node address 127.0.0.1, not the host's IP
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    temp = Path(tempfile.mkdtemp(prefix="dspray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = free_port()
    ports = [f"--{name}={free_port()}" for name in ("ray-client-server-port", "dashboard-port",
                                                     "dashboard-agent-listen-port", "dashboard-agent-grpc-port")]
    log = (temp / "head.log").open("w")
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", *ports, "--num-cpus=2", "--num-gpus=0",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in (temp / "head.log").read_text():
            assert head.poll() is None and time.monotonic() < deadline, (temp / "head.log").read_text()
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", temp
    finally:
        head.terminate()  # `ray start --block` stops the processes it started when it is stopped
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_launcher_runs_the_jobs_on_a_running_cluster(local_ray, tmp_path):
    address, ray_temp = local_ray
    sweep = tmp_path / "sweep"
    proc = dsp_train("-m", "hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address={address}",
                     "hydra.launcher.ray.remote.num_cpus=1", "hydra.launcher.ray.remote.num_gpus=0", "trainer=default",
                     "trainer.optimizer=adam,bogus", *QUICK, *TINY_SYNTHETIC, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    assert "Connecting to existing Ray cluster" in proc.stderr
    assert_run_folder(sweep / "0")
    assert (sweep / "1" / ".hydra" / "overrides.yaml").is_file() and not (sweep / "1" / "metrics.json").exists()
    # the failed job says so, with its folder, in its Ray worker's log (Ray also forwards it to the driver)
    worker_logs = "".join(p.read_text() for p in ray_temp.glob("session_*/logs/worker-*.err"))
    assert f"job 1 ({sweep / '1'}) failed" in worker_logs and "optimizer='bogus'" in worker_logs
