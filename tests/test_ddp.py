"""trainer.strategy=ddp: two CPU processes (gloo) under torchrun train the same run as one process
with the same seed and global batch size.

Batches of 15 out of 64 examples split 8/7 and, for the last batch of 4, 2/2 between the ranks, so
the slice-size weighting of the losses is exercised. The two runs differ only in floating-point
summation order, hence the tolerances: final metrics within 1e-6 (absolute, in points) and every
model parameter and stored MRF message within 1e-5 (absolute; observed: <= 1.2e-7).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import free_port, write_mulan
from dsp.cli.common import config_dir
from dsp.cli.train import train
from dsp.errors import DspError

SYNTHETIC = ["data.num_train=64", "data.num_val=32", "data.num_test=48", "trainer.max_epochs=1",
             "trainer.progress=false", "inference.max_iter=5", "trainer.batch_size=15"]
METRIC_TOL, PARAM_TOL = 1e-6, 1e-5
RUN_DEPENDENT = ("train/time_s", "train/peak_rss_mb", "train/peak_cuda_mb")


def torchrun(run: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in
             ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DSP_TEST_SIGNAL_AFTER_STEP")}
    env = {**clean, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dsp.cli.train", *args, "trainer.strategy=ddp", "trainer.device=cpu", f"hydra.run.dir={run}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


def one_process(run: Path, *args) -> None:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[*args, "trainer.device=cpu"])
    train(cfg, run)


def numbers(run: Path) -> dict:
    return {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k not in RUN_DEPENDENT}


def assert_same_training(run: Path, ref: Path) -> dict:
    got, want = numbers(run), numbers(ref)
    assert got.keys() == want.keys()
    for k in want:
        assert abs(got[k] - want[k]) <= METRIC_TOL, (k, got[k], want[k])
    for name in ("best.pt", "last.pt"):
        a, b = (torch.load(r / "checkpoints" / name, weights_only=True) for r in (run, ref))
        assert (a["stage"], a["epoch"], a["step"]) == (b["stage"], b["epoch"], b["step"])
        for key, tensor in b["model"].items():
            assert (a["model"][key].double() - tensor.double()).abs().max() <= PARAM_TOL, key
        assert len(a["rng_ranks"]) == 2
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def files(run: Path) -> list[str]:
    """What training wrote (Hydra's .hydra/ and job log aside: the reference runs without Hydra)."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.parent.name != "tb"
                  and ".hydra" not in p.parts and p.suffix != ".log")


def test_two_ranks_train_like_one_process_and_only_rank_0_writes(tmp_path):
    ddp, ref = tmp_path / "ddp", tmp_path / "ref"
    proc = torchrun(ddp, *SYNTHETIC)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_process(ref, *SYNTHETIC)
    assert_same_training(ddp, ref)
    # rank 0 alone wrote: the same files as one process, TensorBoard from one process, one report
    assert files(ddp) == files(ref)
    events = sorted((ddp / "tb").glob("events.out.tfevents.*"))
    assert len(events) == len(list((ref / "tb").glob("events.out.tfevents.*")))
    assert len({e.name.split(".")[4] for e in events}) == 1  # events.out.tfevents.<time>.<host>.<pid>.<n>
    assert proc.stdout.count("run folder:") == 1 and proc.stdout.count("final metrics") == 1


def test_blended_mrf_messages_match_one_process(tmp_path):
    tr, te, xml = write_mulan(tmp_path / "mulan" / "tiny")
    mrf = ["experiment=mrf_tagging_blended", f"data.train={tr}", f"data.test={te}", f"data.labels_xml={xml}",
           "data.num_labels=null", "trainer.max_epochs=2", "trainer.progress=false", "trainer.batch_size=7",
           "inference.iterations=2", "objective.checkpoint_messages=true", "trainer.probe_every=0"]
    ddp, ref = tmp_path / "ddp", tmp_path / "ref"
    proc = torchrun(ddp, *mrf)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_process(ref, *mrf)
    state = assert_same_training(ddp, ref)
    want = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)["objectives"]
    # 2 epochs: every example's messages were updated by both ranks at some point; rank 0 holds them all
    assert want and state["objectives"].keys() == want.keys()
    for stage, msgs in want.items():
        assert msgs["messages"], stage
        for i, m in msgs["messages"].items():
            got = state["objectives"][stage]["messages"][i]
            assert got.shape == m.shape and m.abs().max() > 0
            assert (got - m).abs().max() <= PARAM_TOL, (stage, i)


def test_value_replay_rings_resume_per_rank(tmp_path):
    """DVN with experience replay: each rank's ring holds its own tuples, so the checkpoint keeps
    every rank's and a run preempted mid-epoch 2 and resumed ends where the uninterrupted one does
    (rank 1 resuming from rank 0's ring would replay other tuples and train other weights)."""
    tr, te, xml = write_mulan(tmp_path / "mulan" / "tiny")
    dvn = ["experiment=dvn_bibtex", f"data.train={tr}", f"data.test={te}", f"data.labels_xml={xml}",
           "data.num_labels=null", "trainer.max_epochs=2", "trainer.progress=false", "trainer.batch_size=8",
           "objective.replay_size=12", "objective.replay_batch=4", "inference.max_iter=3",
           "objective.adversarial_steps=1"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    proc = torchrun(ref, *dvn)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rings = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)
    (stage, rank0), = rings["objectives"].items()
    rank1 = rings["objectives_ranks"][stage][0]["replay"]
    assert rank0["replay"]["x"].shape == rank1["x"].shape and not torch.equal(rank0["replay"]["x"], rank1["x"])
    steps = rings["step"]
    proc = torchrun(run, *dvn, env={"DSP_TEST_SIGNAL_AFTER_STEP": f"{steps // 2 + 1}:SIGTERM"})
    assert proc.returncode != 0 and not (run / "metrics.json").exists(), proc.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch_offset"] > 0
    proc = torchrun(run, *dvn, "trainer.resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(r / "checkpoints" / "last.pt", weights_only=True) for r in (run, ref))
    assert a["step"] == b["step"] and numbers(run) == numbers(ref)
    for key, tensor in b["model"].items():
        assert torch.equal(a["model"][key], tensor), key


def test_ddp_without_torchrun_says_how_to_launch(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(DspError, match="torchrun"):
        one_process(tmp_path / "run", *SYNTHETIC, "trainer.strategy=ddp")


CLOSE_RELEASES_THE_GROUP = """
import gc, sys
import torch
from dsp.training.distributed import Distributed
dist = Distributed("cpu")  # world size 1, gloo
pg = torch.distributed.distributed_c10d._get_default_group()
torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo, as training does
dist.barrier()
dist.close()
gc.collect()
print(sys.getrefcount(pg) - 1)  # references left besides `pg`
"""


def test_close_leaves_no_reference_to_the_process_group(tmp_path):
    """Regression: torch._dynamo imported after init_process_group kept the group (and gloo's
    threads) alive past destroy_process_group into interpreter exit, where rank 1 sometimes aborted
    with SIGABRT. A fresh interpreter, since this one has imported torch._dynamo long ago."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
           "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", CLOSE_RELEASES_THE_GROUP], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "1", proc.stdout
