"""An exponential moving average of the model's weights (trainer.ema_decay).

With small data and a constant learning rate the weights, and validation with them, swing from
epoch to epoch; their running average is a smoother predictor that costs one forward pass less than
an ensemble. Training updates the live weights; validation, best.pt and therefore dsp-eval and
init_from see the average.

What is averaged: the parameters and the batch-norm running statistics. Every other buffer (a
CRF's unary scale α set by online scaling, counters) is copied from the live model, since averaging
a value that is chosen, not learned, would blur the choice.

As a trainer hook (dsp.training.hooks): every stage averages its own updates (the average restarts
from the stage's incoming weights, and again whenever best.pt is reloaded); checkpoints carry the
average as "model" (Trainer.predictor), the live weights as "train_model" and the average's age as
"ema_updates", so a resumed run continues both exactly.
"""
from __future__ import annotations

import copy

import torch

from dsp.errors import DspError
from dsp.training.hooks import Hook

_BN_STATS = ("running_mean", "running_var")


class WeightAverage(Hook):
    """w̄ ← d·w̄ + (1 − d)·w after every optimiser step, with d = min(decay, (1 + n)/(10 + n)) after n
    updates since the last reset, so that the first epochs are not dominated by the initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        decay = float(decay)
        if not 0.0 < decay < 1.0:
            raise DspError(f"trainer.ema_decay={decay}: choose a value in (0, 1) such as 0.999, or null for no average")
        self.decay = decay
        self.module = copy.deepcopy(model).requires_grad_(False)
        params = {name for name, _ in model.named_parameters()}
        self._averaged = {name for name, t in model.state_dict().items()
                          if t.is_floating_point() and (name in params or name.rsplit(".", 1)[-1] in _BN_STATS)}
        self.updates = 0

    @torch.no_grad()
    def reset(self, model: torch.nn.Module) -> None:
        """Start the average again from the model's weights (a new stage, or best.pt reloaded)."""
        self.module.load_state_dict(model.state_dict())
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        live = model.state_dict()
        for name, avg in self.module.state_dict().items():
            if name in self._averaged:
                avg.lerp_(live[name], 1.0 - decay)
            else:
                avg.copy_(live[name])
        self.updates += 1

    # ------------------------------------------------------------------------- trainer hook
    def on_stage_start(self, trainer, stage, resume) -> None:
        if resume is None:  # each stage averages its own updates
            self.reset(trainer.model)
        else:  # a checkpoint without an average starts one from its weights
            self.module.load_state_dict(resume["model"])
            self.updates = resume.get("ema_updates", 0)

    def on_step_end(self, trainer, stage) -> None:
        self.update(trainer.model)

    def on_weights_loaded(self, trainer) -> None:
        self.reset(trainer.model)  # the next stage averages from these weights

    def checkpoint(self, trainer) -> dict:
        # ("model" is the average: Trainer.predictor) the live weights and the average's age, for resuming
        return {"train_model": trainer.model.state_dict(), "ema_updates": self.updates}
