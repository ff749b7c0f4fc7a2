"""End to end: dsp-train and dsp-eval as a user runs them, and every preset composed and run briefly."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO, write_mulan, write_ocr
from fixtures_images import tiny_denoise_overrides, tiny_images_overrides, write_image_folder
from fixtures_text import write_conll
from test_word50 import write_word50_sources
from dsp.cli.common import config_dir
from dsp.cli.train import train
from dsp.errors import DspError
from dsp.objectives.local import LocalLoss

TINY_SYNTHETIC = ["data.num_train=64", "data.num_val=32", "data.num_test=48"]
QUICK = ["trainer.max_epochs=1", "trainer.progress=false", "inference.max_iter=5", "trainer.batch_size=16"]
# Chain CRFs decode exactly (no iteration cap); online scaling on a tiny subset keeps it quick.
QUICK_CRF = ["trainer.max_epochs=1", "trainer.progress=false", "trainer.batch_size=8"]
# MRFs: two message-passing sweeps, a small unary network.
QUICK_MRF = ["trainer.max_epochs=1", "trainer.progress=false", "trainer.batch_size=8", "inference.iterations=2",
             "trainer.probe_every=1", "trainer.probe_size=4", "objective.probe_iterations=2"]
PRESETS = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))


def run_cli(*args, cwd=None):
    """Run an entrypoint as a user would; returns the finished process."""
    module = {"dsp-train": "dsp.cli.train", "dsp-eval": "dsp.cli.evaluate"}[args[0]]
    return subprocess.run([sys.executable, "-m", module, *args[1:]], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def tiny_data_overrides(cfg_target: str, tmp_path: Path) -> list[str]:
    if cfg_target.endswith("make_block_exclusive"):
        return TINY_SYNTHETIC
    if cfg_target.endswith("load_ocr"):
        return [f"data.path={write_ocr(tmp_path / 'ocr' / 'letter.data.gz')}", *QUICK_CRF]
    if cfg_target.endswith("load_horses"):
        return tiny_images_overrides(write_image_folder(tmp_path / "horses"))
    if cfg_target.endswith("load_denoise_images"):
        return tiny_denoise_overrides(tmp_path / "denoise")
    if cfg_target.endswith("load_word50"):
        ocr, horses = write_word50_sources(tmp_path / "w50src")
        return [f"data.ocr_path={ocr}", f"data.horses_dir={horses}", f"data.cache_dir={tmp_path / 'cache'}",
                "data.num_words=4", "data.train_size=20", "data.val_size=6", "data.test_size=6",
                "model.unary_net.net.hidden=[8]", *QUICK_MRF]
    if cfg_target.endswith("load_conll2000"):
        train_txt, test_txt = write_conll(tmp_path / "conll")
        return [f"data.train={train_txt}", f"data.test={test_txt}", *QUICK_CRF, "model.unary_net.word_dim=8",
                "model.unary_net.char_hidden=8", "model.unary_net.hidden=16"]
    tr, te, xml = write_mulan(tmp_path / "mulan" / "tiny")
    return [f"data.train={tr}", f"data.test={te}", f"data.labels_xml={xml}", "data.num_labels=null"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_composes_and_trains_a_few_steps(preset, tmp_path):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        full = compose("config", overrides=[f"experiment={preset}"])
        target = full.data._target_
        tiny = tiny_data_overrides(target, tmp_path)
        if target.endswith(("load_ocr", "load_conll2000", "load_horses", "load_denoise_images", "load_word50")):
            quick = []  # the tiny-data overrides above carry their own quick settings
        elif full.inference._target_.endswith("MessagePassing"):  # the tagging MRF
            quick = QUICK_MRF
        elif "steps" in full.inference:  # unrolled inference: T steps instead of an iteration cap
            quick = [q for q in QUICK if not q.startswith("inference.")] + ["inference.steps=2"]
        else:
            quick = QUICK
        cfg = compose("config", overrides=[f"experiment={preset}", *quick, *tiny])
    metrics = train(cfg, tmp_path / "run")
    for key in (f"val/{metrics.monitor}", f"test/{metrics.monitor}", "train/time_s"):
        assert key in metrics and np.isfinite(metrics[key])
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


def test_train_then_eval_end_to_end(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("dsp-train", *QUICK, *TINY_SYNTHETIC, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    assert f"run folder: {run}" in proc.stdout and "test/example_f1" in proc.stdout
    for f in (".hydra/config.yaml", "checkpoints/last.pt", "checkpoints/best.pt", "environment.json"):
        assert (run / f).is_file(), f
    assert list((run / "tb").glob("events.out.tfevents.*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/example_f1", "test/example_f1", "test/hamming", "train/time_s"} <= set(metrics)
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=False)
    assert {"model", "optimizer", "epoch", "step", "best_metric", "config", "seed"} <= set(ckpt)

    proc = run_cli("dsp-eval", f"run_dir={run}")
    assert proc.returncode == 0, proc.stderr
    assert "test/example_f1" in proc.stdout
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())
    assert evaluated["test/example_f1"] == pytest.approx(metrics["test/example_f1"])
    arrays = np.load(run / "eval" / "predictions.npz")
    assert arrays["pred"].dtype == np.uint8 and arrays["target"].dtype == np.uint8
    assert arrays["score"].dtype == np.float32 and arrays["pred"].shape == arrays["score"].shape == (48, 16)
    assert set(np.unique(arrays["target"])) <= {0, 1}
    (computed,) = json.loads((run / "eval" / "environment.json").read_text())  # where eval ran
    assert computed["device"] == "cpu" and f"run_dir={run}" in computed["command"]

    # prediction-side changes to the stored config, written beside the default evaluation
    proc = run_cli("dsp-eval", f"run_dir={run}", "+set.inference.max_iter=1", "out=eval_one_step")
    assert proc.returncode == 0, proc.stderr
    one_step = json.loads((run / "eval_one_step" / "metrics.json").read_text())
    assert one_step["test/inference_iters"] == 1 and evaluated["test/inference_iters"] > 1
    assert json.loads((run / "eval" / "metrics.json").read_text()) == evaluated  # untouched
    proc = run_cli("dsp-eval", f"run_dir={run}", "+set.inference.max_iters=1", "out=eval_typo")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no key 'inference.max_iters'" in proc.stdout + proc.stderr and not (run / "eval_typo").exists()
    proc = run_cli("dsp-eval", f"run_dir={run}", "+set.trainer.threshold=0.9", "out=eval_threshold")
    assert proc.returncode == 2 and "only affect training" in proc.stderr and not (run / "eval_threshold").exists()
    # another evaluation into a folder that holds one is refused, and the first one is kept
    proc = run_cli("dsp-eval", f"run_dir={run}", "split=val", "ckpt=last")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "holds another evaluation (split=test ckpt=best)" in proc.stderr and "out=eval_val_last" in proc.stderr
    assert json.loads((run / "eval" / "metrics.json").read_text()) == evaluated
    assert run_cli("dsp-eval", f"run_dir={run}").returncode == 0  # the same evaluation again replaces it
    proc = run_cli("dsp-eval", f"run_dir={run}", "split=val", "overwrite=true")
    assert proc.returncode == 0 and "val/example_f1" in json.loads((run / "eval" / "metrics.json").read_text())

    import dsp  # and from Python, without Hydra
    loaded = dsp.load_run(run)
    assert loaded.threshold == ckpt["threshold"] and not loaded.model.training


def test_resume_continues_from_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    base = [*QUICK[1:], *TINY_SYNTHETIC, "trainer=default", "trainer.patience=100", f"hydra.run.dir={run}"]
    assert run_cli("dsp-train", "trainer.max_epochs=1", *base).returncode == 0
    first = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    proc = run_cli("dsp-train", "trainer.max_epochs=2", "trainer.resume=true", *base)
    assert proc.returncode == 0, proc.stderr
    second = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert (first["epoch"], second["epoch"]) == (1, 2)
    assert second["step"] == 2 * first["step"]


class NanAfterLoss(LocalLoss):
    """The local loss, until it turns NaN after `after` steps (a diverging run, made on purpose)."""

    def __init__(self, after: int):
        self.after, self.calls, self.local = after, 0, LocalLoss()

    def loss(self, model, inference, x, y):
        self.calls += 1
        loss, logs = self.local.loss(model, inference, x, y)
        return (loss * float("nan") if self.calls > self.after else loss), logs


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    from dsp.training.checkpoint import load_checkpoint

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[*QUICK[1:], *TINY_SYNTHETIC, "trainer=default", "model=mlp3", "objective=local",
                                           "trainer.max_epochs=3", "+objective.after=6",
                                           f"objective._target_={__name__}.NanAfterLoss"])
    run = tmp_path / "run"
    with pytest.raises(DspError, match=r"diverged: the loss is nan.*epoch 2.*last.pt"):
        train(cfg, run)  # 4 steps per epoch: epoch 1 is good, epoch 2 diverges
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("case", ["missing_data", "malformed_arff", "label_mismatch", "unknown_key"])
def test_bad_input_gives_one_clear_error_without_traceback(case, tmp_path):
    tr, te, xml = write_mulan(tmp_path / "mulan" / "tiny", sparse=False)
    data = [f"data.train={tr}", f"data.test={te}", f"data.labels_xml={xml}"]
    if case == "missing_data":
        args, expect = ["data=bibtex", f"paths.data_dir={tmp_path}/nowhere"], [f"{tmp_path}/nowhere/mulan/bibtex", "download"]
    elif case == "malformed_arff":
        lines = tr.read_text().splitlines()
        lines[30] = "1,2"
        tr.write_text("\n".join(lines))
        args, expect = ["data=mulan", *data], [str(tr), "line 31"]
    elif case == "label_mismatch":
        args, expect = ["data=mulan", *data, "data.num_labels=9"], ["num_labels=9", "5 labels"]
    else:
        args, expect = ["trainer.lr_typo=0.1"], ["lr_typo"]
    proc = run_cli("dsp-train", *QUICK, *args, f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    for text in expect:
        assert text in proc.stderr, proc.stderr


def test_eval_without_or_with_a_corrupted_checkpoint_says_so(tmp_path):
    proc = run_cli("dsp-eval", f"run_dir={tmp_path}")
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "checkpoints").mkdir()
    # a truncated zip, and a text file (which torch's legacy reader fails on with a KeyError)
    for junk in (b"PK\x03\x04 truncated", b"not a checkpoint\n"):
        (tmp_path / "checkpoints" / "best.pt").write_bytes(junk)
        proc = run_cli("dsp-eval", f"run_dir={tmp_path}")
        assert proc.returncode == 2 and "corrupted" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_names_what_to_pass_for_no_run_folder_or_a_sweep_folder(tmp_path):
    proc = run_cli("dsp-eval")
    assert proc.returncode == 2 and "pass run_dir=" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "multirun.yaml").write_text("{}\n")
    for job in ("0", "1"):
        (tmp_path / job / "checkpoints").mkdir(parents=True)
    proc = run_cli("dsp-eval", f"run_dir={tmp_path}")
    assert proc.returncode == 2 and "is a sweep folder" in proc.stderr
    assert f"run_dir={tmp_path / '0'}" in proc.stderr and "dsp-summary" in proc.stderr


def test_multirun_sweep_gives_each_job_a_folder_and_survives_a_failed_job(tmp_path):
    # job 0 has an impossible label count and fails; job 1 must still train
    tr, te, xml = write_mulan(tmp_path / "mulan" / "tiny")
    sweep = tmp_path / "sweep"
    proc = run_cli("dsp-train", "-m", *QUICK, "data=mulan", f"data.train={tr}", f"data.test={te}",
                   f"data.labels_xml={xml}", "data.num_labels=9,null", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1 and "1 job(s) of the sweep failed (job 0); the others finished" in proc.stderr
    assert "job 0" in proc.stderr and "num_labels=9" in proc.stderr and "Traceback" not in proc.stderr
    assert (sweep / "1" / "metrics.json").is_file() and not (sweep / "0" / "metrics.json").exists()
    assert (sweep / "1" / ".hydra" / "config.yaml").is_file()


def test_training_into_a_finished_run_folder_is_refused_and_leaves_it_intact(tmp_path):
    run = tmp_path / "run"
    args = [*QUICK, *TINY_SYNTHETIC, "trainer=default", f"hydra.run.dir={run}"]
    assert run_cli("dsp-train", *args).returncode == 0
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    record = {str(p): p.read_bytes() for p in (run / ".hydra").rglob("*") if p.is_file()}
    metrics = (run / "metrics.json").read_text()
    proc = run_cli("dsp-train", *args, "seed=5")
    assert proc.returncode == 2 and "trainer.resume=true" in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert (run / "metrics.json").read_text() == metrics
    # refused before Hydra writes the folder's record, so .hydra/ still describes the run that is there
    assert {str(p): p.read_bytes() for p in (run / ".hydra").rglob("*") if p.is_file()} == record
    # a finished run whose checkpoints were deleted to save space keeps its results too
    for p in (run / "checkpoints").iterdir():
        p.unlink()
    proc = run_cli("dsp-train", *args)
    assert proc.returncode == 2 and "metrics.json" in proc.stderr and (run / "metrics.json").read_text() == metrics
    proc = run_cli("dsp-train", *args, "trainer.resume=true")
    assert proc.returncode == 2 and "no checkpoint to resume" in proc.stderr and "Traceback" not in proc.stderr


def test_a_sweep_into_a_used_sweep_folder_is_refused_before_any_job_runs(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "0" / "checkpoints").mkdir(parents=True)
    (sweep / "0" / "checkpoints" / "best.pt").write_bytes(b"a run's checkpoint")
    (sweep / "multirun.yaml").write_text("the first sweep\n")
    proc = run_cli("dsp-train", "-m", *QUICK, *TINY_SYNTHETIC, "seed=1,2", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 2 and "hydra.sweep.dir" in proc.stderr and "Traceback" not in proc.stderr
    assert (sweep / "multirun.yaml").read_text() == "the first sweep\n" and not (sweep / "1").exists()


@pytest.mark.parametrize("override, message", [
    ("trainer.lr=fast", "trainer.lr='fast': give a number"),
    ("trainer.max_epochs=abc", "trainer.max_epochs='abc': give a whole number"),
    ("trainer.batch_size=1.5", "trainer.batch_size=1.5: give a whole number"),
    ("trainer.max_steps=-1", "trainer.max_steps=-1: give a whole number at least 1"),
    ("trainer.threshold=high", "trainer.threshold='high': give tune"),
    ("trainer.ema_decay=1", "trainer.ema_decay=1: give a number between 0 and 1"),
    ("trainer.device=gpu", "trainer.device='gpu': choose auto, cpu, cuda or cuda:N"),
    ("trainer.stages.joint.lr=x", "trainer.stages.joint.lr='x': give a number"),
    ("seed=abc", "seed='abc': give a whole number"),
    ("+trainer.max_epoch=1", "trainer.max_epoch is not a trainer setting (did you mean trainer.max_epochs?)"),
])
def test_a_trainer_setting_of_the_wrong_type_is_refused_by_name(override, message):
    from dsp.training.config_checks import check_seed, check_trainer

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["trainer=staged", override])
    with pytest.raises(DspError) as err:
        check_seed(cfg.seed)
        check_trainer(cfg.trainer)
    assert message in str(err.value)


def test_the_shipped_trainer_settings_pass_the_start_up_checks():
    from dsp.training.config_checks import check_seed, check_trainer

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for preset in PRESETS:
            cfg = compose("config", overrides=[f"experiment={preset}"])
            check_seed(cfg.seed)
            check_trainer(cfg.trainer)


def test_a_bad_setting_fails_before_training_without_a_traceback(tmp_path):
    proc = run_cli("dsp-train", *QUICK, *TINY_SYNTHETIC, "trainer.threshold=high", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "trainer.threshold='high'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any epoch was spent


def test_chain_crf_train_then_eval_writes_sequence_predictions(tmp_path):
    run = tmp_path / "run"
    data = write_ocr(tmp_path / "ocr" / "letter.data.gz")
    proc = run_cli("dsp-train", "experiment=crf_ocr_online", f"data.path={data}", *QUICK_CRF,
                   "objective=crf_nll", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/char_acc", "test/char_acc", "test/letter_acc", "test/word_acc"} <= set(metrics)
    assert "val/threshold" not in metrics  # nothing to tune for sequences
    proc = run_cli("dsp-eval", f"run_dir={run}")
    assert proc.returncode == 0, proc.stderr
    arrays = np.load(run / "eval" / "predictions.npz")
    pred, target, lengths = arrays["pred"], arrays["target"], arrays["lengths"]
    assert pred.shape == target.shape and pred.dtype == np.int64 and lengths.shape == (pred.shape[0],)
    assert ((pred >= 0) == (target >= 0)).all() and ((target >= 0).sum(1) == lengths).all()
    assert list(arrays["labels"][:3]) == ["a", "b", "c"]
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())
    assert evaluated["test/char_acc"] == pytest.approx(metrics["test/char_acc"])
    # scripts/scaling_landscape.py: L_α on a log grid around the run's α, its minimum marked
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "scaling_landscape.py"), str(run),
                           "--octaves", "1", "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip().startswith("α =")]
    alphas, losses = [float(r[2]) for r in rows], [float(r[5]) for r in rows]
    alpha = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"]["unary_scale"].item()
    assert alphas == pytest.approx([alpha / 2, alpha / 2 ** 0.5, alpha, alpha * 2 ** 0.5, alpha * 2], rel=1e-3)
    assert [r[-1] == "minimum" for r in rows] == [v == min(losses) for v in losses]



def test_oov_accuracy_splits_the_token_accuracy_into_unknown_and_known_words(tmp_path):
    run = tmp_path / "run"
    train_txt, test_txt = write_conll(tmp_path / "conll")
    proc = run_cli("dsp-train", "experiment=crf_chunking_online", f"data.train={train_txt}", f"data.test={test_txt}",
                   *QUICK_CRF, "model.unary_net.word_dim=8", "model.unary_net.hidden=16", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    assert run_cli("dsp-eval", f"run_dir={run}", "split=test", "out=eval_test").returncode == 0
    script = [sys.executable, str(REPO / "scripts" / "oov_accuracy.py"), "--split", "test"]
    proc = subprocess.run([*script, str(run)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    share, unknown, known = (float(v.strip(" %")) for v in proc.stdout.splitlines()[-1].split("|")[2:5])
    # The fixture's test split draws words training never saw; the two accuracies must average,
    # weighted by their token shares, to the plain token accuracy of the saved predictions.
    arrays = np.load(run / "eval_test" / "predictions.npz")
    real = arrays["target"] >= 0
    overall = 100 * (arrays["pred"][real] == arrays["target"][real]).mean()
    assert 0 < share < 100
    assert (share * unknown + (100 - share) * known) / 100 == pytest.approx(overall, abs=0.02)
    # a run without those predictions is named, not a traceback
    proc = subprocess.run([*script, "--eval-dir", "eval_missing", str(run)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "run dsp-eval" in proc.stderr and "Traceback" not in proc.stderr
    assert "none of the runs" in proc.stderr  # nothing was measured: not a success
    # predictions of another split are refused, not broadcast into a wrong table
    proc = subprocess.run([*script, "--split", "val", "--eval-dir", "eval_test", str(run)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "split=test, not val" in proc.stderr and "Traceback" not in proc.stderr

def test_min_delta_counts_small_gains_as_no_progress(tmp_path):
    """With min_delta larger than any possible gain, every epoch is 'bad': patience 2 stops after 2."""
    common = [*QUICK, *TINY_SYNTHETIC, "trainer=default", "trainer.max_epochs=6", "trainer.patience=2"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        strict = compose("config", overrides=[*common, "trainer.min_delta=1000"])
        lenient = compose("config", overrides=[*common, "trainer.min_delta=0", "trainer.patience=100"])
    assert train(strict, tmp_path / "strict")["train/epochs"] == 2
    assert train(lenient, tmp_path / "lenient")["train/epochs"] == 6


def test_stop_at_ends_training_once_validation_reaches_it_and_reports_the_time(tmp_path):
    """trainer.stop_at below any score stops after the first epoch, skipping later stages, and
    keeps that epoch's model even when min_delta counts its gain as no progress; resuming that run
    trains no further and keeps its time to target; one above any score never fires (the run goes
    on and records no time)."""
    common = [*QUICK, *TINY_SYNTHETIC, "trainer=staged", "trainer.max_epochs=3", "trainer.patience=100"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        low = compose("config", overrides=[*common, "trainer.stop_at=-1", "trainer.min_delta=1000"])
        high = compose("config", overrides=[*common, "trainer.stop_at=1000"])
        again = compose("config", overrides=[*common, "trainer.stop_at=-1", "trainer.min_delta=1000",
                                             "trainer.resume=true"])
    reached = train(low, tmp_path / "low")
    assert reached["train/epochs"] == 1
    assert 0 < reached["train/time_to_target_s"] <= reached["train/time_s"]
    best = torch.load(tmp_path / "low" / "checkpoints" / "best.pt", weights_only=False)
    assert best["epoch"] == 1 and best["best_metric"] == pytest.approx(reached["val/example_f1"])
    resumed = train(again, tmp_path / "low")
    assert resumed["train/epochs"] == 1 and resumed["train/time_to_target_s"] == reached["train/time_to_target_s"]
    assert resumed["val/example_f1"] == pytest.approx(reached["val/example_f1"])
    assert resumed["train/time_s"] >= reached["train/time_to_target_s"]  # the clock went on from the checkpoint
    never = train(high, tmp_path / "high")
    assert never["train/epochs"] == 9 and never["train/time_to_target_s"] is None


def test_denoising_train_then_eval_restores_learned_step_sizes_and_writes_images(tmp_path):
    run = tmp_path / "run"
    tiny = tiny_denoise_overrides(tmp_path / "denoise")
    proc = run_cli("dsp-train", "experiment=foe3", *tiny, "trainer.max_epochs=2", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    state = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    assert "inference.log_lr" in state["model"]  # the learned η_t travel with the model
    proc = run_cli("dsp-eval", f"run_dir={run}")
    assert proc.returncode == 0, proc.stderr
    arrays = np.load(run / "eval" / "predictions.npz")
    assert arrays["pred"].shape == arrays["target"].shape == arrays["noisy"].shape == (2, 8, 12)
    assert arrays["pred"].dtype == np.float32 and 0 <= arrays["pred"].min() and arrays["pred"].max() <= 1
    assert (run / "eval" / "denoising.png").is_file()
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())
    assert evaluated["test/psnr"] == pytest.approx(metrics["test/psnr"], abs=1e-4)


def test_unrolled_objective_with_a_relu_energy_is_refused_at_start_up(tmp_path):
    tr, te, xml = write_mulan(tmp_path / "mulan" / "tiny")
    proc = run_cli("dsp-train", "model=spen", "objective=unrolled", "inference=unrolled_gd", "data=mulan",
                   f"data.train={tr}", f"data.test={te}", f"data.labels_xml={xml}", "data.num_labels=null",
                   "model.global_energy.activation=relu", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "model.global_energy.activation is a ReLU" in proc.stderr and "softplus" in proc.stderr


def test_mrf_word50_streams_from_hdf5_with_the_same_result_and_evaluates(tmp_path):
    """data.stream=true reads the training batches from the HDF5 file in a second thread: the run
    must be the same as from memory. The blended objective's messages travel in last.pt."""
    ocr, horses = write_word50_sources(tmp_path / "src")
    common = ["experiment=mrf_word50_order2", f"data.ocr_path={ocr}", f"data.horses_dir={horses}",
              f"data.cache_dir={tmp_path / 'cache'}", "data.num_words=4", "data.train_size=24", "data.val_size=6",
              "data.test_size=6", "model.unary_net.net.hidden=[8]", "trainer.max_epochs=2", "trainer.progress=false",
              "trainer.batch_size=8", "inference.iterations=3", "objective.iterations=2"]
    results = {}
    for stream in ("false", "true"):
        run = tmp_path / f"run_{stream}"
        proc = run_cli("dsp-train", *common, f"data.stream={stream}", f"hydra.run.dir={run}")
        assert proc.returncode == 0, proc.stderr
        results[stream] = json.loads((run / "metrics.json").read_text())
    assert results["true"]["test/word_acc"] == results["false"]["test/word_acc"]
    assert results["true"]["test/char_acc"] == results["false"]["test/char_acc"]
    last = torch.load(tmp_path / "run_true" / "checkpoints" / "last.pt", weights_only=True)
    messages = last["objectives"]["train"]["messages"]["0"]
    assert messages.shape == (24, 7, 2, 26) and messages.abs().sum() > 0  # 7 edges of 5 letters, per example
    proc = run_cli("dsp-eval", f"run_dir={tmp_path / 'run_true'}")
    assert proc.returncode == 0, proc.stderr
    assert "test/word_acc" in proc.stdout


def test_any_dataset_streams_from_an_hdf5_copy_with_the_same_result(tmp_path):
    results = {}
    for stream in ("false", "true"):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose("config", overrides=[*QUICK, *TINY_SYNTHETIC, "trainer.stages.local.max_epochs=1",
                                               f"trainer.stream={stream}"])
        results[stream] = train(cfg, tmp_path / stream)
    assert (tmp_path / "true" / "data.h5").is_file() and not (tmp_path / "false" / "data.h5").exists()
    assert results["true"]["test/example_f1"] == results["false"]["test/example_f1"]


def test_max_time_s_stops_between_epochs_skips_later_stages_and_still_evaluates_best_pt(tmp_path, monkeypatch):
    """trainer.max_time_s caps the wall clock, validation included. A clock on which every
    validation takes 1000 s: a 1500 s budget allows the first epoch (baseline validation at 1000 s),
    is spent after its validation (2000 s), so the two later stages are skipped and best.pt is still
    evaluated; trainer.max_steps spent after one epoch does the same. A budget spent by the
    baseline validation trains no epoch; an ample one changes nothing; a non-positive one is
    refused by name."""
    import types

    import dsp.training.trainer as trainer_module

    clock = {"offset": 0.0}
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(
        time=lambda: time.time() + clock["offset"], perf_counter=time.perf_counter))
    validate = trainer_module.Trainer.validate

    def slow_validate(self, mode):
        clock["offset"] += 1000.0
        return validate(self, mode)

    monkeypatch.setattr(trainer_module.Trainer, "validate", slow_validate)
    common = [*QUICK, *TINY_SYNTHETIC, "trainer=staged", "trainer.max_epochs=2", "trainer.patience=100"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        budget = compose("config", overrides=[*common, "trainer.max_time_s=1500"])
        spent = compose("config", overrides=[*common, "trainer.max_time_s=500"])
        ample = compose("config", overrides=[*common, "trainer.max_time_s=1e6"])
        bad = compose("config", overrides=[*common, "trainer.max_time_s=0"])
        steps = compose("config", overrides=[*common, "trainer.max_steps=4"])  # one epoch of 64 / 16
    one = train(budget, tmp_path / "budget")
    assert one["train/epochs"] == 1 and "test/example_f1" in one
    assert 2000 <= one["train/time_s"] < 3000  # baseline + epoch 1 validations, no later-stage baselines
    by_steps = train(steps, tmp_path / "steps")  # trainer.max_steps shares the stage skipping
    assert by_steps["train/epochs"] == 1 and 2000 <= by_steps["train/time_s"] < 3000
    stopped = train(spent, tmp_path / "spent")
    assert stopped["train/epochs"] == 0 and "test/example_f1" in stopped
    assert (tmp_path / "spent" / "checkpoints" / "best.pt").is_file()
    assert train(ample, tmp_path / "ample")["train/epochs"] == 6  # 3 stages × 2 epochs
    with pytest.raises(DspError, match="trainer.max_time_s=0"):
        train(bad, tmp_path / "bad")
