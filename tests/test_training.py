import math

import pytest
import torch

from dsp import interfaces as I
from hydra import compose, initialize_config_dir

from dsp.build import build_data, build_model, build_objective
from dsp.cli.common import config_dir
from dsp.errors import DspError
from dsp.tasks.multilabel import decode, tune_threshold
from dsp.training.checkpoint import load_checkpoint, save_checkpoint
from dsp.training.stages import build_stages


def test_threshold_tuning_picks_the_best_grid_point():
    soft = torch.tensor([[0.9, 0.35, 0.1], [0.31, 0.8, 0.25]])
    target = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # mean example F1: t=0.2 -> (1 + 0.8)/2 = 0.9; t=0.3 -> (1 + 1)/2 = 1; t=0.5 -> (2/3 + 2/3)/2
    assert tune_threshold(soft, target, grid=[0.2, 0.3, 0.5]) == 0.3
    assert decode(soft, 0.5).tolist() == [[1, 0, 0], [0, 1, 0]]


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=["data.num_train=32", "data.num_val=16", "data.num_test=16", *overrides])


def test_staged_training_trains_only_the_named_modules():
    cfg = compose_cfg("trainer=staged")
    build_data(cfg)
    model = build_model(cfg)
    stages = build_stages(cfg.trainer, build_objective(cfg), model)
    assert [s.name for s in stages] == ["local", "global", "joint"]
    global_params = stages[1].parameters(model)
    assert {id(p) for p in global_params} == {id(p) for p in model.global_energy.parameters()}
    assert not any(p.requires_grad for p in model.local_energy.parameters())
    assert stages[0].predict == "local" and stages[2].lr == pytest.approx(1e-4)
    stages[2].parameters(model)
    assert all(p.requires_grad for p in model.parameters())


def test_stage_errors_name_the_key():
    cfg = compose_cfg("trainer=staged", "+trainer.stages.global.lrr=1")
    build_data(cfg)
    model = build_model(cfg)
    with pytest.raises(DspError, match=r"trainer.stages.global.*lrr"):
        build_stages(cfg.trainer, build_objective(cfg), model)
    cfg = compose_cfg("trainer=staged", "trainer.stages.global.train=[decoder]")
    with pytest.raises(DspError, match=r"decoder.*feature_net"):
        build_stages(cfg.trainer, build_objective(cfg), model)
    cfg = compose_cfg("trainer=staged", "trainer.stages.global.predict=unary")
    with pytest.raises(DspError, match=r"trainer.stages.global.predict='unary': choose inference or local"):
        build_stages(cfg.trainer, build_objective(cfg), model)


def test_a_model_without_a_local_term_cannot_predict_locally():
    """The segmentation value network's local term would be σ(0) = 0.5 everywhere: a stage (and
    dsp-eval, which shares the check) refuses predict=local for it."""
    from dsp.models.dvn_seg import SegmentationValueNetwork
    from dsp.training.stages import check_predict_mode

    dvn = SegmentationValueNetwork(size=8, unary={"base_width": 2, "depth": 1}, hidden=(4,))
    check_predict_mode(dvn, "inference", "predict")
    with pytest.raises(DspError, match="predict=local: SegmentationValueNetwork has no local term"):
        check_predict_mode(dvn, "local", "predict")
    check_predict_mode(I.Model(), "local", "predict")  # models have one unless they say otherwise


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {}, "config": {}, "epoch": 1}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint({"model": {}, "config": {}, "epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 1  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # and no temporary file is left


def logged_rates(run) -> dict[int, float]:
    """The learning rate the trainer logged after each epoch (TensorBoard tag "lr"), by epoch: both
    are logged at the global step the epoch ended on, the epoch as the scalar "epoch"."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    epoch_at = {s.step: int(s.value) for s in events.Scalars("epoch")}
    return {epoch_at[s.step]: s.value for s in events.Scalars("lr")}


def test_cosine_schedule_anneals_the_rate_to_zero_over_the_stage(tmp_path):
    """trainer.lr_schedule=cosine: after epoch e of E the rate is lr·(1 + cos(πe/E))/2, whatever
    validation does, and every stage (the default config has three) starts its own cosine."""
    from dsp.cli.train import train

    cfg = compose_cfg("trainer.lr_schedule=cosine", "trainer.stage_epochs=4", "trainer.patience=100",
                      "trainer.progress=false", "inference.max_iter=3", "trainer.batch_size=16", "trainer.lr=1e-3")
    train(cfg, tmp_path / "run")
    logged = [rate for _, rate in sorted(logged_rates(tmp_path / "run").items())]
    rates = [s.lr for s in build_stages(cfg.trainer, None, build_model(cfg))]
    assert len(rates) == 3
    cosine = [lr * (1 + math.cos(math.pi * e / 4)) / 2 for lr in rates for e in (1, 2, 3, 4)]
    assert logged == pytest.approx(cosine, rel=1e-6, abs=1e-12)  # (TensorBoard stores float32)


def test_lr_schedule_is_per_stage_and_a_typo_names_the_key():
    cfg = compose_cfg("trainer=staged", "trainer.lr_schedule=cosine", "trainer.stages.joint.lr_schedule=plateau")
    build_data(cfg)
    model = build_model(cfg)
    stages = build_stages(cfg.trainer, build_objective(cfg), model)
    assert [s.lr_schedule for s in stages] == ["cosine", "cosine", "plateau"]
    optimizer = stages[0].make_optimizer(stages[0].parameters(model))
    assert isinstance(stages[0].make_scheduler(optimizer), torch.optim.lr_scheduler.LambdaLR)
    with pytest.raises(DspError, match=r"trainer.stages.global.lr_schedule='cosin'.*plateau, cosine"):
        build_stages(compose_cfg("trainer=staged", "trainer.stages.global.lr_schedule=cosin").trainer,
                     build_objective(cfg), model)
    with pytest.raises(DspError, match=r"^trainer.lr_schedule='step'"):
        build_stages(compose_cfg("trainer.lr_schedule=step").trainer, build_objective(cfg), model)


def test_a_cosine_run_resumed_with_more_epochs_follows_the_longer_curve(tmp_path):
    """Resuming a finished 2-epoch cosine stage with stage_epochs=4 continues on the 4-epoch curve
    (CosineAnnealingLR would restore its 2-epoch period and climb back to lr); resuming it under the
    plateau schedule is refused naming the key (a resume continues what its checkpoint was trained with)."""
    from dsp.cli.train import train

    common = ["trainer=default", "trainer.lr_schedule=cosine", "trainer.patience=100", "trainer.progress=false",
              "inference.max_iter=3", "trainer.batch_size=16", "trainer.lr=1e-3"]
    run = tmp_path / "run"
    train(compose_cfg(*common, "trainer.stage_epochs=2"), run)
    train(compose_cfg(*common, "trainer.stage_epochs=4", "trainer.resume=true"), run)
    logged = logged_rates(run)
    curve = lambda e, n: 1e-3 * (1 + math.cos(math.pi * e / n)) / 2  # noqa: E731
    assert [logged[e] for e in (1, 2, 3, 4)] == pytest.approx([curve(1, 2), curve(2, 2), curve(3, 4), curve(4, 4)],
                                                              rel=1e-6, abs=1e-12)
    with pytest.raises(DspError, match=r"trainer.lr_schedule: 'cosine' -> 'plateau'"):
        train(compose_cfg(*[c for c in common if "lr_schedule" not in c], "trainer.stage_epochs=6",
                          "trainer.resume=true"), run)


def test_weight_average_follows_the_warmed_up_decay_and_copies_chosen_buffers():
    """Parameters and BN statistics are averaged with d = min(decay, (1 + n)/(10 + n)); any other
    buffer (a CRF's α) is copied; a decay outside (0, 1) names the key."""
    from dsp.training.ema import WeightAverage

    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    model.register_buffer("unary_scale", torch.tensor(1.0))
    with torch.no_grad():
        model[0].weight.fill_(0.0)
    ema = WeightAverage(model, decay=0.2)
    expected = 0.0
    for n, w in enumerate([1.0, 2.0, 4.0]):
        with torch.no_grad():
            model[0].weight.fill_(w)
            model[1].running_mean.fill_(w)
            model.unary_scale.fill_(2.0 ** (n + 1))
        ema.update(model)
        d = min(0.2, (1 + n) / (10 + n))  # 0.1, 0.1818... (warm-up), then the cap 0.2 (not 0.25)
        expected = d * expected + (1 - d) * w
    assert ema.module[0].weight.item() == pytest.approx(expected)
    assert ema.module[1].running_mean.item() == pytest.approx(expected)
    assert ema.module.unary_scale.item() == 8.0
    assert ema.module[1].num_batches_tracked.item() == model[1].num_batches_tracked.item()
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(DspError, match=r"trainer.ema_decay=1.0"):
        WeightAverage(model, decay=1.0)


def test_with_ema_best_pt_holds_the_average_and_the_final_metrics_are_its(tmp_path):
    """trainer.ema_decay: validation, best.pt["model"] and metrics.json are the average's; the
    live weights travel in best.pt["train_model"] and differ from it. (The best validation score
    recorded during training is the one best.pt["model"] gets: validation used the average.)"""
    from dsp.cli.evaluate import evaluate_run
    from dsp.cli.train import train

    cfg = compose_cfg("trainer=default", "trainer.ema_decay=0.9", "trainer.stage_epochs=3", "trainer.patience=100",
                      "trainer.progress=false", "inference.max_iter=3", "trainer.batch_size=8", "trainer.lr=0.05")
    metrics = train(cfg, tmp_path / "run")
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["ema_updates"] > 0
    assert any(not torch.equal(best["model"][k], v) for k, v in best["train_model"].items())
    evaluated, _ = evaluate_run(tmp_path / "run")
    assert evaluated["test/example_f1"] == pytest.approx(metrics["test/example_f1"])
    on_val, _ = evaluate_run(tmp_path / "run", split="val")
    assert on_val["val/example_f1"] == pytest.approx(best["best_metric"])


def test_the_probe_scores_the_same_examples_every_time_even_when_batches_augment():
    """trainer.probe_every compares the objective over training time, so its examples must not be
    re-augmented at each probe (task.batch draws fresh warps or noise on every call)."""
    from types import SimpleNamespace

    from dsp.training.trainer import Trainer

    seen = []
    trainer = Trainer.__new__(Trainer)  # only what _probe reads
    trainer.cfg = {"probe_every": 1, "probe_size": 3}
    trainer.step, trainer.main, trainer.train_seconds, trainer._probe_batch = 1, True, 0.0, None
    trainer.model = None
    trainer.splits = {"train": (torch.zeros(5, 2), torch.zeros(5))}
    trainer.task = SimpleNamespace(batch=lambda x, y: (x + torch.randn_like(x), y), takes_rows=False)  # augments on every call
    probe = lambda model, x, y: seen.append(x.clone()) or {"nll_converged": x.sum().item()}
    stage = SimpleNamespace(objective=SimpleNamespace(probe=probe))
    writer = SimpleNamespace(scalar=lambda *a: None)
    trainer._probe(stage, writer)
    trainer._probe(stage, writer)
    assert seen[0].shape == (3, 2) and seen[0].abs().sum() > 0
    assert torch.equal(seen[0], seen[1])
