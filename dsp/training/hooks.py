"""Trainer hooks: what a run does around the training loop without being the loop.

Trainer._fit_stage is the loop alone (epochs of optimiser steps, a validation after each epoch,
checkpoints); everything that watches or adjusts it is a Hook, called at fixed points of a stage:

    on_stage_start   the stage begins: fresh (resume is None; the baseline validation follows)
                     or continued from a checkpoint (resume is its state)
    should_stop      before every epoch (except when a resumed half epoch is finished first)
    on_step_end      after every optimiser step
    on_epoch_end     after an epoch's last step, before its validation; `writer` is the run's
                     dsp.training.loggers.Logger (log at trainer.step, the run's one step axis)
    on_validation    the monitored metric of a validation (epoch 0: the stage's baseline) -> Verdict
    on_stage_end     the stage's epochs are over
    on_weights_loaded  the live model's weights were replaced (best.pt reloaded)
    checkpoint       entries of the hook's own that every checkpoint carries (plain values and
                     tensors), read back by on_stage_start(resume)

The hooks of a run, in the order they are called: EarlyStopping (always), the weight average
(trainer.ema_decay, dsp.training.ema.WeightAverage), online scaling (trainer.online_scaling,
dsp.training.scaling.OnlineScaling).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Verdict:
    """A hook's verdict on a validation: best -> the epoch becomes best.pt; stop -> the reason to
    end the stage after this epoch's checkpoints (printed)."""

    best: bool = False
    stop: str | None = None


class Hook:
    """Every method does nothing; a hook overrides those it needs (see the module docstring)."""

    def on_stage_start(self, trainer, stage, resume: dict | None) -> None:
        pass

    def should_stop(self, trainer, stage) -> bool:
        return False

    def on_step_end(self, trainer, stage) -> None:
        pass

    def on_epoch_end(self, trainer, stage, writer) -> None:
        pass

    def on_validation(self, trainer, stage, epoch: int, current: float) -> Verdict | None:
        return None

    def on_stage_end(self, trainer, stage) -> None:
        pass

    def on_weights_loaded(self, trainer) -> None:
        pass

    def checkpoint(self, trainer) -> dict:
        return {}


class EarlyStopping(Hook):
    """Model selection on the monitored validation metric. The incoming model (epoch 0) is the
    stage's baseline, so a stage that does not improve on the previous one's result leaves it in
    best.pt; an epoch is best when it beats the best by more than trainer.min_delta; the stage
    stops after its `patience` epochs without such progress, or once the metric reaches
    trainer.stop_at (the first epoch at or above it is the model to keep, even when min_delta would
    not count its gain as progress: every earlier epoch was below it); and it ends by restoring
    best.pt, so the next stage continues from (and the run finishes with) the stage's best weights.

    Checkpoint entries: best_metric, bad_epochs (trainer.stop_at's time to target is the trainer's
    target_reached_s)."""

    def __init__(self, min_delta: float = 0.0, stop_at=None):
        self.min_delta, self.stop_at = float(min_delta), stop_at  # (stop_at as configured, for the message)
        self.best, self.bad_epochs, self.epochs = -math.inf, 0, 0

    def on_stage_start(self, trainer, stage, resume):
        self.best, self.bad_epochs = (-math.inf, 0) if resume is None else (resume["best_metric"], resume["bad_epochs"])
        self.epochs = 0  # validated epochs of this stage in this process

    def should_stop(self, trainer, stage) -> bool:
        return self.bad_epochs >= stage.patience

    def on_validation(self, trainer, stage, epoch, current):
        if epoch == 0:  # the baseline: best.pt whatever it scores
            self.best, self.bad_epochs = current, 0
            return Verdict(best=True)
        self.epochs += 1
        improved = current > self.best + self.min_delta
        if improved:
            self.best, self.bad_epochs = current, 0
        else:
            self.bad_epochs += 1
        reached = self.stop_at is not None and current >= float(self.stop_at)
        if not reached:
            return Verdict(best=improved)
        if not improved:
            self.best, self.bad_epochs = current, 0
        trainer.target_reached_s = trainer.elapsed_s()  # before the checkpoint: a resumed run knows it is done
        return Verdict(best=True, stop=f"stage {stage.name}: val {trainer.monitor} {current:.2f} reached "
                                      f"trainer.stop_at={self.stop_at} after "
                                      f"{trainer.target_reached_s:.1f} s; stopping")

    def on_stage_end(self, trainer, stage):
        trainer.write(f"stage {stage.name}: best val {trainer.monitor} {self.best:.2f} after {self.epochs} epoch(s)")
        trainer.load_best()

    def checkpoint(self, trainer) -> dict:
        return {"best_metric": self.best, "bad_epochs": self.bad_epochs}
