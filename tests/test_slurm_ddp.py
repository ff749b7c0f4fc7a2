"""trainer.strategy=ddp from the launcher, without torchrun: a job scheduler's tasks become the ranks
(dsp.training.distributed.scheduler_ranks; hydra/launcher=slurm_ddp). Two tasks of submitit's local
executor train over gloo like one process (metrics within 1e-6, parameters within 1e-5, as in
test_ddp); the Slurm preset asks sbatch for the nodes, tasks and GPUs; the ranks, master address
and port are read from Slurm's and submitit's variables."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import free_port
from dsp.errors import DspError
from dsp.training import distributed

TINY = ["experiment=mlp_synthetic", "data.num_train=64", "data.num_val=16", "data.num_test=16",
        "trainer.max_epochs=1", "trainer.progress=false", "trainer.batch_size=15"]  # slices 8/7, last 2/2
METRIC_TOL, PARAM_TOL = 1e-6, 1e-5
RUN_DEPENDENT = ("train/time_s", "train/peak_rss_mb", "train/peak_cuda_mb")
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in RANK_VARIABLES and not k.startswith(("SLURM_", "SUBMITIT_", "DSP_TEST_"))}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def dsp_train(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsp.cli.train", *args], capture_output=True, text=True,
                          env=env or clean_env(), timeout=300)


@pytest.fixture
def no_scheduler(monkeypatch):
    for k in list(os.environ):
        if k in RANK_VARIABLES or k.startswith(("SLURM_", "SUBMITIT_")):
            monkeypatch.delenv(k)
    return monkeypatch


def test_ranks_of_an_srun_step(no_scheduler):
    assert distributed.scheduler_ranks() is None
    for k, v in {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
                 "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "8"}.items():
        no_scheduler.setenv(k, v)
    got = distributed.scheduler_ranks()
    port = distributed.job_port("4242")
    assert got == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(port), "source": "Slurm job 4242"}
    assert 20000 <= port <= 60000 and port != distributed.job_port("4243")  # jobs on one node: other ports
    no_scheduler.setenv("MASTER_PORT", "12345")  # set by the user: kept
    assert distributed.scheduler_ranks()["MASTER_PORT"] == "12345"
    assert distributed.expand_nodelist("a[1-2,10],b07,c[08-09]-ib") == ["a1", "a2", "a10", "b07", "c08-ib", "c09-ib"]


def test_ranks_of_a_submitit_job(no_scheduler):
    pytest.importorskip("submitit")
    # submitit on Slurm: SLURM_NTASKS and the job's node list, the job id with its array task
    for k, v in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70",
                 "SLURM_ARRAY_TASK_ID": "3", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
                 "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "node[3,5]"}.items():
        no_scheduler.setenv(k, v)
    got = distributed.scheduler_ranks()
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"], got["LOCAL_WORLD_SIZE"], got["MASTER_ADDR"]) == \
        ("2", "4", "0", "2", "node3")
    assert got["MASTER_PORT"] == str(distributed.job_port("70_3"))
    # submitit's local executor: one node, the loopback interface
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        no_scheduler.delenv(k)
    for k, v in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "999", "SUBMITIT_LOCAL_NTASKS": "2",
                 "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "1",
                 "SUBMITIT_LOCAL_LOCALID": "1"}.items():
        no_scheduler.setenv(k, v)
    got = distributed.scheduler_ranks()
    assert got["RANK"] == "1" and got["WORLD_SIZE"] == "2" and got["MASTER_ADDR"] == "127.0.0.1"
    assert got["source"] == "submitit local job 999"
    # several tasks of one run without ddp would all write the same folder
    with pytest.raises(DspError, match="runs 2 tasks.*set trainer.strategy=ddp"):
        distributed.setup("single", "cpu")


def test_slurm_ddp_preset_asks_for_nodes_tasks_and_a_gpu_per_task(tmp_path):
    """hydra/launcher=slurm_ddp up to sbatch: a stand-in sbatch keeps the script and refuses the job."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    bin_dir, script = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {script}\necho "sbatch: error: no Slurm here" >&2\nexit 1\n')
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    sweep = tmp_path / "sweep"
    proc = dsp_train("-m", *TINY, "hydra/launcher=slurm_ddp", "hydra.launcher.nodes=2",
                     "hydra.launcher.tasks_per_node=4", "trainer.strategy=ddp", f"hydra.sweep.dir={sweep}",
                     env=clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"))
    assert proc.returncode != 0 and "no Slurm here" in proc.stderr, proc.stderr[-2000:]
    lines = script.read_text().splitlines()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --mem-per-gpu=32G", "#SBATCH --cpus-per-task=4", "#SBATCH --signal=USR2@120"):
        assert line in lines, line
    assert not [line for line in lines if line.startswith("#SBATCH --mem=")]  # sbatch refuses both
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in lines)


def numbers(run) -> dict:
    return {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k not in RUN_DEPENDENT}


def test_two_submitit_local_tasks_train_like_one_process(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from dsp.cli.common import config_dir
    from dsp.cli.train import train

    sweep, ref = tmp_path / "sweep", tmp_path / "ref"
    # (the port a job id draws is tested above; here one free now, so that no test run can collide)
    proc = dsp_train("-m", *TINY, "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                     "hydra.launcher.timeout_min=5", "trainer.strategy=ddp", "trainer.device=cpu",
                     f"hydra.sweep.dir={sweep}", env=clean_env(MASTER_PORT=str(free_port())))
    logs = {p.name: p.read_text() for p in (sweep / ".submitit").rglob("*_log.*")}
    assert proc.returncode == 0, proc.stderr[-2000:] + "".join(logs.values())[-3000:]
    # both tasks ran, as ranks 0 and 1 of one job; rank 0 alone reported
    outs = {name: text for name, text in logs.items() if name.endswith("_log.out")}
    assert sorted(name.split("_")[-2] for name in outs) == ["0", "1"], sorted(logs)  # <job>_<task>_log.out
    out0 = next(text for name, text in outs.items() if name.endswith("_0_log.out"))
    assert "ddp: 2 ranks from the submitit local job" in out0
    assert sum(text.count("run folder:") for text in outs.values()) == 1
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, "trainer.device=cpu"])
    train(cfg, ref)
    got, want = numbers(sweep / "0"), numbers(ref)
    assert got.keys() == want.keys()
    for k in want:
        assert abs(got[k] - want[k]) <= METRIC_TOL, (k, got[k], want[k])
    a, b = (torch.load(r / "checkpoints" / "last.pt", weights_only=True) for r in (sweep / "0", ref))
    assert len(a["rng_ranks"]) == 2 and a["step"] == b["step"]  # the world size: 2 ranks
    for key, tensor in b["model"].items():
        assert (a["model"][key].double() - tensor.double()).abs().max() <= PARAM_TOL, key
