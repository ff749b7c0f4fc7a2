"""Online scaling (Shevchenko & Osokin 2019, Algorithm 1): after every epoch, pick the unary scale
α on the grid {2^t} that minimises the training objective on a fixed subset of the training set.

The unary network runs once per example; each α only re-scores the cached potentials.
"""
from __future__ import annotations

import torch

from dsp.errors import DspError
from dsp.tasks.sequence import lengths_of
from dsp.training.predict import eval_mode


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
    if settings.get("min_exp", MIN_EXP) > settings.get("max_exp", MAX_EXP):
        raise DspError("trainer.online_scaling: min_exp must not exceed max_exp (the grid is 2^min_exp..2^max_exp)")
    return split, settings


def subset_losses(model, objective, x, y, grid: list[float], subset: int = 2000, seed: int = 0,
                  batch_size: int = 512) -> torch.Tensor:
    """L_α (Eq. 19) for every α of `grid` on a fixed random subset of (x, y) -> float64 [len(grid)]."""
    if not hasattr(model, "potentials") or not hasattr(objective, "loss_on"):
        raise DspError("trainer.online_scaling needs a model with unary potentials (model=chain_crf) "
                       "and a CRF objective; set trainer.online_scaling=null for this model")
    gen = torch.Generator().manual_seed(seed)  # the same subset every epoch
    idx = torch.randperm(x.shape[0], generator=gen)[: min(subset, x.shape[0])].to(x.device)
    totals = torch.zeros(len(grid), dtype=torch.float64, device=x.device)  # summed on the device: no syncs
    with eval_mode(model), torch.no_grad():
        for start in range(0, idx.shape[0], batch_size):
            xb, yb = x[idx[start : start + batch_size]], y[idx[start : start + batch_size]]
            lengths = lengths_of(yb)
            raw = model.unary_net(xb, lengths)  # [B, T, K], computed once for the whole grid
            for i, alpha in enumerate(grid):
                totals[i] += objective.loss_on(model.potentials(raw, lengths, scale=alpha), yb).double() * xb.shape[0]
    return totals / idx.shape[0]


def choose_unary_scale(model, objective, x, y, min_exp: int = MIN_EXP, max_exp: int = MAX_EXP, subset: int = 2000,
                       seed: int = 0, batch_size: int = 512) -> dict[str, float]:
    """Set model.unary_scale to the best α of the grid {2^t}; returns the logs (α and its loss)."""
    grid = [2.0 ** t for t in range(min_exp, max_exp + 1)]
    losses = subset_losses(model, objective, x, y, grid, subset, seed, batch_size)
    best = int(losses.argmin())
    model.unary_scale.fill_(grid[best])
    return {"scaling/alpha": grid[best], "scaling/subset_loss": float(losses[best])}
