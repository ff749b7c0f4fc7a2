"""End-to-end learning through unrolled inference (End-to-end SPENs Eq. 9):

    L = (1/T) Σ_t w_t ℓ(y_t, y*),     w_t = 1 / (T - t + 1)  by default,

a loss on every iterate of the unrolled optimiser, which rewards good predictions early and puts
a learning signal at every step (fewer vanishing gradients). `weights: final` is the loss on y_T
alone (the FOE-20 row of Table 1), `uniform` weighs every iterate alike.

ℓ is the task's loss: binary cross-entropy (multi-label), squared error summed over labels, or the
mean squared error per pixel (images).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsp.errors import DspError

WEIGHTS = ("inverse", "final", "uniform")


def _bce(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(y.clamp(1e-6, 1 - 1e-6), target)


def _squared(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((y - target) ** 2).flatten(1).sum(-1).mean()


def _mse(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(y, target)


LOSSES = {"bce": _bce, "squared": _squared, "mse": _mse}


def iterate_weights(steps: int, scheme: str) -> list[float]:
    """w_1..w_T of Eq. 9, already divided by T (the final scheme puts everything on y_T)."""
    if scheme == "inverse":
        return [1.0 / (steps - t + 1) / steps for t in range(1, steps + 1)]
    if scheme == "uniform":
        return [1.0 / steps] * steps
    if scheme == "final":
        return [0.0] * (steps - 1) + [1.0]
    raise DspError(f"objective.weights={scheme!r}: choose one of {', '.join(WEIGHTS)}")


class UnrolledLoss:
    """Back-propagate ℓ through T steps of the model's own test-time optimiser."""

    needs_second_order = True  # the energy's gradient is differentiated: ReLU energies are refused

    def __init__(self, loss: str = "bce", weights: str = "inverse"):
        if loss not in LOSSES:
            raise DspError(f"objective.loss={loss!r}: choose one of {', '.join(LOSSES)}")
        iterate_weights(1, weights)  # validates the name at start-up
        self.loss_name, self.weights = loss, weights
        self.loss_fn = LOSSES[loss]

    def loss(self, model, inference, x, y):
        feats = model.features(x)
        result = inference(model, feats, train=True, differentiable=True)
        weights = iterate_weights(len(result.trajectory), self.weights)
        per_step = [self.loss_fn(y_t, y) for y_t in result.trajectory]
        loss = sum(w * l for w, l in zip(weights, per_step) if w > 0)
        logs = {"final_loss": per_step[-1].detach(), "first_loss": per_step[0].detach(),
                "inference_iters": result.iterations}
        if getattr(inference, "learned", False):
            logs["step_size_mean"] = inference.lr.detach().mean()
        return loss, logs
