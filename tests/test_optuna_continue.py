"""A continued Optuna study draws new points: the presets' sampler (dsp.cli.optuna_sampler) offsets its
seed by the number of trials the stored study already holds, so continuing a study from its SQLite
storage does not re-draw the parameters of its first trials, and stays reproducible."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from dsp.cli.common import config_dir

optuna = pytest.importorskip("optuna", reason='optuna is not installed: pip install -e ".[test]" (or ".[sweep]")')
pytestmark = pytest.mark.filterwarnings("ignore:Deprecated API features detected")  # optuna 2.x on SQLAlchemy 1.4

from dsp.cli.optuna_sampler import ContinuedTPESampler  # noqa: E402 -- needs optuna


def objective(trial) -> float:
    x = trial.suggest_float("x", -10, 10)
    return (x - 2) ** 2 + trial.suggest_categorical("c", [0.0, 1.0, 2.0])


def run(storage: str, n_trials: int, sampler=None) -> list[dict]:
    """n_trials more trials of the study `s` in `storage` (created on first use) with a fresh sampler,
    as a new dsp-train run builds one; returns their parameters."""
    study = optuna.create_study(study_name="s", storage=storage, load_if_exists=True,
                                sampler=sampler or ContinuedTPESampler(seed=0, n_startup_trials=2))
    before = len(study.trials)
    for _ in range(n_trials):  # ask and tell, as hydra-optuna-sweeper drives the study
        trial = study.ask()
        study.tell(trial, objective(trial))
    return [t.params for t in study.trials[before:]]


def test_a_continued_study_draws_new_points(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = run(storage, 3)
    second = run(storage, 3)  # past the 2 random start-up trials: TPE's own draws are offset too
    assert second[0] != first[0] and not any(p in first for p in second), (first, second)
    # what a fixed seed did before: the continued study re-drew its first trial
    from optuna.samplers import TPESampler

    again = run(f"sqlite:///{tmp_path / 'fixed.db'}", 1, TPESampler(seed=0, n_startup_trials=2))
    assert run(f"sqlite:///{tmp_path / 'fixed.db'}", 1, TPESampler(seed=0, n_startup_trials=2)) == again


def test_the_same_stored_study_gives_the_same_draws(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run(f"sqlite:///{tmp_path / 'a.db'}", 3)
    shutil.copy(tmp_path / "a.db", tmp_path / "b.db")
    assert run(f"sqlite:///{tmp_path / 'a.db'}", 3) == run(f"sqlite:///{tmp_path / 'b.db'}", 3)


def test_a_new_study_draws_what_the_seeded_tpe_sampler_draws(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from optuna.samplers import TPESampler

    ours = ContinuedTPESampler(seed=0, n_startup_trials=2)
    assert run(f"sqlite:///{tmp_path / 'a.db'}", 4, ours) == run(
        f"sqlite:///{tmp_path / 'b.db'}", 4, TPESampler(seed=0, n_startup_trials=2))
    assert ours.offset == 0
    unseeded = ContinuedTPESampler(seed=None)  # stays unseeded; a bad TPE setting fails when it is built
    run(f"sqlite:///{tmp_path / 'a.db'}", 1, unseeded)
    assert unseeded.offset == 4
    with pytest.raises(TypeError):
        ContinuedTPESampler(seed=0, n_startup=3)


@pytest.mark.parametrize("preset", ["optuna", "spen_optuna", "dvn_optuna", "crf_optuna"])
def test_the_presets_build_the_continuing_sampler(preset):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[f"hparams_search={preset}"], return_hydra_config=True)
    sampler = instantiate(cfg.hydra.sweeper.sampler)  # what the sweeper gets (Hydra builds nested targets)
    assert isinstance(sampler, ContinuedTPESampler) and sampler.seed == 0
    assert sampler.settings["n_startup_trials"] == 10 and sampler.settings["multivariate"] is False


def test_a_study_continued_through_dsp_train_draws_new_points(tmp_path):
    """hparams_search=optuna through Hydra's Optuna sweeper: one trial, then one more from the same storage."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    storage = f"sqlite:///{tmp_path / 'first' / 'optuna.db'}"
    for sweep in ("first", "second"):
        proc = subprocess.run(
            [sys.executable, "-m", "dsp.cli.train", "hparams_search=optuna", "experiment=mlp_synthetic",
             "trainer.lr=tag(log, interval(1e-4, 1e-2))", "trainer.batch_size=choice(8, 16, 32)",
             "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / sweep}", f"hydra.sweeper.storage={storage}",
             "data.num_train=32", "data.num_val=16", "data.num_test=16", "trainer.max_epochs=1",
             "trainer.progress=false"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert "continuing a study of 1 trials: TPE seed 0 + 1" in proc.stdout + proc.stderr
    trials = optuna.load_study(study_name="optuna", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert trials[1].params != trials[0].params
    assert trials[1].params["trainer.lr"] != trials[0].params["trainer.lr"]
