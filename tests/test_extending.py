"""A user's own parts, from a package outside dsp (tests/user_pkg, the example of docs/EXTENDING.md):
their energy and data loader, named by `_target_` in their own YAML found through hydra.searchpath,
train with dsp-train, evaluate with dsp-eval, pass dsp-gradcheck and load with dsp.load_run; a
parameter registered directly on their model trains; a pairing that cannot work is refused by name."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

USER_PKG = Path(__file__).resolve().parent / "user_pkg"


def write_csv(folder: Path, n_train: int = 80, n_test: int = 24, seed: int = 0) -> tuple[Path, Path]:
    """Features and 4 labels that depend on them, as the user's loader reads them."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(6, 4))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.normal(size=(n, 6))
        y = (x @ w > 0.3).astype(float)
        path = folder / f"{split}.csv"
        np.savetxt(path, np.hstack([x, y]), delimiter=",", fmt="%.5f")
        paths.append(path)
    return tuple(paths)


def run(module: str, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(USER_PKG), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    train_csv, test_csv = write_csv(folder / "data")
    common = [f"hydra.searchpath=[file://{USER_PKG / 'conf'}]", "data=my_csv", "model=low_rank",
              f"data.train={train_csv}", f"data.test={test_csv}"]
    out = folder / "run"
    proc = run("dsp.cli.train", *common, "inference=mirror", "objective=ssvm", "trainer=default",
               "trainer.max_epochs=3", "trainer.progress=false", "trainer.batch_size=16", "inference.max_iter=10",
               f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    return out, common


def test_a_user_energy_and_data_loader_train_from_their_own_yaml(user_run):
    out, _ = user_run
    assert (out / "metrics.json").is_file() and (out / "checkpoints" / "best.pt").is_file()


def test_a_parameter_registered_directly_on_the_user_model_is_trained(user_run):
    out, _ = user_run
    state = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert state["model"]["log_temperature"].item() != 0.0  # it starts at 0


def test_dsp_eval_and_load_run_rebuild_the_user_model(user_run, monkeypatch):
    out, _ = user_run
    refused = run("dsp.cli.evaluate", f"run_dir={out}")  # a stored config builds the user's code only when trusted
    assert refused.returncode == 2 and "trust=" in refused.stderr and "my_dsp" in refused.stderr, refused.stderr
    proc = run("dsp.cli.evaluate", f"run_dir={out}", "trust=[my_dsp]")
    assert proc.returncode == 0, proc.stderr
    assert "test/example_f1" in proc.stdout
    monkeypatch.syspath_prepend(str(USER_PKG))
    import dsp

    loaded = dsp.load_run(out, trust=["my_dsp"])
    assert type(loaded.model).__name__ == "LowRankEnergy" and loaded.threshold is not None


def test_dsp_gradcheck_checks_the_user_model(user_run):
    _, common = user_run
    proc = run("dsp.cli.gradcheck", *common, "objective=ssvm", "trainer=default")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


def test_a_user_part_that_does_not_fit_is_refused_by_name(tmp_path):
    train_csv, test_csv = write_csv(tmp_path / "data")
    proc = run("dsp.cli.train", f"hydra.searchpath=[file://{USER_PKG / 'conf'}]", "data=my_csv", "model=low_rank",
               f"data.train={train_csv}", f"data.test={test_csv}", "objective=crf_nll", "trainer=default",
               f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "objective=crf_nll" in proc.stderr and "multilabel" in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before Hydra made the folder
