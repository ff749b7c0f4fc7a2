"""End-to-end learning through unrolled inference (End-to-end SPENs Eq. 9):

    L = (1/T) Σ_t w_t ℓ(y_t, y*),     w_t = 1 / (T - t + 1)  by default,

a loss on every iterate of the unrolled optimiser, which rewards good predictions early and puts
a learning signal at every step (fewer vanishing gradients). `weights: final` is the loss on y_T
alone (the FOE-20 row of Table 1), `uniform` weighs every iterate alike.

ℓ is the task's loss: binary cross-entropy (multi-label), squared error summed over labels, or the
mean squared error per pixel (images).
"""
from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

from dsp import interfaces as I
from dsp.errors import DspError

Weights = Literal["inverse", "final", "uniform"]
WEIGHTS = get_args(Weights)
Loss = Literal["bce", "squared", "mse"]  # the keys of LOSSES


def _bce(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(y.clamp(1e-6, 1 - 1e-6), target)


def _squared(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((y - target) ** 2).flatten(1).sum(-1).mean()


def _mse(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(y, target)


LOSSES = {"bce": _bce, "squared": _squared, "mse": _mse}


def one_hot_targets(y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class ids [B, T] (-1 past each sequence's end) -> one-hot rows [B, T, K] and the valid mask [B, T]."""
    valid = y >= 0
    return F.one_hot(y.clamp_min(0), num_classes).to(torch.get_default_dtype()) * valid.unsqueeze(-1), valid


def sequence_loss(name: str, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ℓ for relaxed label sequences y [B, T, K] against class ids [B, T], over valid positions:
    bce is the categorical cross-entropy -log y[target], squared and mse compare with one-hot rows."""
    one_hot, valid = one_hot_targets(target, y.shape[-1])
    if name == "bce":
        return -y.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)[valid].clamp_min(1e-6).log().mean()
    squared = ((y - one_hot.to(y.dtype)) ** 2).sum(-1)[valid]  # [n_valid]
    return squared.sum() / target.shape[0] if name == "squared" else squared.mean() / y.shape[-1]


def iterate_weights(steps: int, scheme: str) -> list[float]:
    """w_1..w_T of Eq. 9, already divided by T (the final scheme puts everything on y_T)."""
    if scheme == "inverse":
        return [1.0 / (steps - t + 1) / steps for t in range(1, steps + 1)]
    if scheme == "uniform":
        return [1.0 / steps] * steps
    if scheme == "final":
        return [0.0] * (steps - 1) + [1.0]
    raise DspError(f"objective.weights={scheme!r}: choose one of {', '.join(WEIGHTS)}")


class UnrolledLoss(I.Objective):
    """Back-propagate ℓ through T steps of the model's own test-time optimiser."""

    outputs = frozenset({I.MULTILABEL, I.MASK, I.IMAGE, I.SEQUENCE})
    needs = frozenset({I.ENERGY, I.SMOOTH_ENERGY, I.LOCAL})
    needs_inference = frozenset({I.UNROLLED})
    second_order = True  # the energy's gradient is differentiated: ReLU energies are refused

    def __init__(self, loss: Loss = "bce", weights: Weights = "inverse"):
        if loss not in LOSSES:
            raise DspError(f"objective.loss={loss!r}: choose one of {', '.join(LOSSES)}")
        iterate_weights(1, weights)  # validates the name at start-up
        self.loss_name, self.weights = loss, weights
        self.loss_fn = LOSSES[loss]

    def loss(self, model, inference, x, y):
        feats = model.features(x, I.sequence_lengths(y))
        result = inference(model, feats, train=True, differentiable=True)
        weights = iterate_weights(len(result.trajectory), self.weights)
        if y.is_floating_point():
            per_step = [self.loss_fn(y_t, y) for y_t in result.trajectory]
        else:  # label sequences: relaxed rows [B, T, K] against class ids
            per_step = [sequence_loss(self.loss_name, y_t, y) for y_t in result.trajectory]
        loss = sum(w * l for w, l in zip(weights, per_step) if w > 0)
        logs = {"final_loss": per_step[-1].detach(), "first_loss": per_step[0].detach(),
                "inference_iters": result.iterations}
        if inference.learned:
            logs["step_size_mean"] = inference.lr.detach().mean()
        return loss, logs
