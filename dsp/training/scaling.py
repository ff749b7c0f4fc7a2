"""Online scaling (Shevchenko & Osokin 2019, Algorithm 1): after every epoch, pick the unary scale
α on the grid {2^t} that minimises the training objective on a fixed subset of the training set.

For the CRFs' objectives (rescores_potentials) the unary network runs once per example and each α
only re-scores the cached potentials; any other model with a scalable local term (a SPEN's local
energy) is scored by its objective's own loss at each α, inference included.
OnlineScaling is the trainer hook (dsp.training.hooks) that does it after every epoch.
"""
from __future__ import annotations

import copy

import torch

from dsp import interfaces as I
from dsp.errors import DspError
from dsp.tasks.sequence import lengths_of
from dsp.nn.modes import eval_mode
from dsp.training.hooks import Hook


SETTINGS = {"min_exp", "max_exp", "subset", "batch_size", "split"}
MIN_EXP, MAX_EXP = -8, 8  # the paper's grid {2^t, t = -8..8}


def scaling_settings(online_scaling) -> tuple[str, dict]:
    """Check `trainer.online_scaling` at start-up -> (the split α is chosen on, choose_unary_scale's
    keyword arguments). split: train (Algorithm 1) or val (held-out images: an ablation that tells
    whether α chosen on fitted training data is what hurts; with data.val_holdout=false the val
    images are training images too)."""
    try:
        settings = dict(online_scaling)
    except (TypeError, ValueError):
        raise DspError("trainer.online_scaling must be a mapping like {min_exp: -8, max_exp: 8, subset: 2000}, "
                       f"got {online_scaling!r}") from None
    unknown = set(settings) - SETTINGS
    if unknown:
        raise DspError(f"trainer.online_scaling: unknown key(s) {sorted(unknown)}; known: {sorted(SETTINGS)}")
    split = settings.pop("split", "train")
    if split not in ("train", "val"):
        raise DspError(f"trainer.online_scaling.split={split!r}: use train (Algorithm 1) or val")
    for key, low, high in (("min_exp", -30, 30), ("max_exp", -30, 30), ("subset", 1, None), ("batch_size", 1, None)):
        if key in settings:
            value = settings[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
                span = f"a whole number in [{low}, {high}]" if high is not None else f"a whole number >= {low}"
                raise DspError(f"trainer.online_scaling.{key}={value!r}: give {span}")
    if settings.get("min_exp", MIN_EXP) > settings.get("max_exp", MAX_EXP):
        raise DspError("trainer.online_scaling: min_exp must not exceed max_exp (the grid is 2^min_exp..2^max_exp)")
    return split, settings


def subset_losses(model, objective, x, y, grid: list[float], subset: int = 2000, seed: int = 0,
                  batch_size: int = 512, inference=None) -> torch.Tensor:
    """L_α (Eq. 19) for every α of `grid` on a fixed random subset of (x, y) -> float64 [len(grid)]."""
    if I.SCALABLE_LOCAL not in model.provides:
        raise DspError(f"trainer.online_scaling needs a model with a scalable local term; {type(model).__name__} "
                       "has none: set trainer.online_scaling=null for this model")
    gen = torch.Generator().manual_seed(seed)  # the same subset every epoch
    idx = torch.randperm(x.shape[0], generator=gen)[: min(subset, x.shape[0])].to(x.device)
    totals = torch.zeros(len(grid), dtype=torch.float64, device=x.device)  # summed on the device: no syncs
    kept = model.unary_scale.clone()
    state = copy.deepcopy(objective.state_dict())  # e.g. a replay ring the scoring must not fill
    rng = torch.get_rng_state()
    with eval_mode(model), torch.no_grad():
        for start in range(0, idx.shape[0], batch_size):
            xb, yb = x[idx[start : start + batch_size]], y[idx[start : start + batch_size]]
            lengths = lengths_of(yb) if not yb.is_floating_point() else None
            if objective.rescores_potentials:  # the unary network once for the whole grid
                raw = model.unary_net(xb, lengths)  # [B, T, K]
                for i, alpha in enumerate(grid):
                    totals[i] += objective.loss_on(model.potentials(raw, lengths, scale=alpha), yb).double() * xb.shape[0]
            else:  # the objective itself at each α (inference included)
                for i, alpha in enumerate(grid):
                    model.unary_scale.fill_(alpha)
                    torch.manual_seed(seed + start)  # the same random draws (tuple sources) for every α
                    totals[i] += objective.loss(model, inference, xb, yb)[0].double() * xb.shape[0]
    model.unary_scale.copy_(kept)
    objective.load_state_dict(state)
    torch.set_rng_state(rng)
    return totals / idx.shape[0]


def choose_unary_scale(model, objective, x, y, min_exp: int = MIN_EXP, max_exp: int = MAX_EXP, subset: int = 2000,
                       seed: int = 0, batch_size: int = 512, inference=None) -> dict[str, float]:
    """Set model.unary_scale to the best α of the grid {2^t}; returns the logs (α and its loss)."""
    grid = [2.0 ** t for t in range(min_exp, max_exp + 1)]
    losses = subset_losses(model, objective, x, y, grid, subset, seed, batch_size, inference)
    best = int(losses.argmin())
    model.unary_scale.fill_(grid[best])
    return {"scaling/alpha": grid[best], "scaling/subset_loss": float(losses[best])}


class OnlineScaling(Hook):
    """trainer.online_scaling: after every epoch, before its validation, α is chosen for the weights
    that predict (Trainer.predictor: the moving average under trainer.ema_decay) and the live model
    trains with it too. Under trainer.strategy=ddp rank 0's choice is broadcast."""

    def __init__(self, online_scaling):
        self.split, self.settings = scaling_settings(online_scaling)  # checked now, not after the first epoch

    def on_epoch_end(self, trainer, stage, writer) -> None:
        logs = choose_unary_scale(trainer.predictor, stage.objective, *trainer.splits[self.split], seed=trainer.seed,
                                  inference=trainer.inference, **self.settings)
        for k, v in logs.items():
            writer.scalar(k, v, trainer.step)  # the run's one step axis (dsp.training.loggers)
        if trainer.predictor is not trainer.model:
            trainer.model.unary_scale.copy_(trainer.predictor.unary_scale)
        trainer.dist.broadcast_module(trainer.model)  # ddp: rank 0's choice of α everywhere
