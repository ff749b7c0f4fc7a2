"""Oracle values v*(ȳ, y) on relaxed outputs (Gygli et al. 2017, Eq. 6-7, 9-10).

Intersection and union extend to ȳ ∈ [0,1] with element-wise min and max (Eq. 9-10):
    I = Σ_i min(ȳ_i, y_i),   U = Σ_i max(ȳ_i, y_i)
    soft IoU = I / U,   soft F1 = 2I / (I + U) = 2 Σ min / Σ (ȳ_i + y_i)   (min + max = a + b)
On 0/1 inputs they equal the discrete IoU and F1. An empty prediction for an empty target is a
perfect answer, valued 1 (as `dsp.metrics.example_f1` counts it). Everything after the batch
dimension is one output (labels [B, L] or masks [B, H, W]), reduced to [B]. Both are
differentiable almost everywhere, which the DVN's adversarial tuples rely on.
"""
from __future__ import annotations

import torch

from dsp.errors import DspError


def _overlap(y: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft intersection and union per example, both [B]."""
    if y.shape != target.shape:
        raise ValueError(f"oracle: prediction {tuple(y.shape)} and target {tuple(target.shape)} differ in shape")
    target = target.to(y.dtype)
    # min and max, with the derivative at a tie ȳ_i = y_i taken in the direction that stays in
    # [0,1] (what gradient steps on ȳ can do): a tie at 0 can only grow, so ȳ_i counts as the max;
    # a tie at 1 can only shrink, so ȳ_i counts as the min. (torch.minimum splits ties 50/50,
    # which at a 0/1 corner such as ȳ = y is the derivative of no feasible move.)
    y_is_min = (y < target) | ((y == target) & (target >= 0.5))
    inter = torch.where(y_is_min, y, target).flatten(1).sum(-1)  # [B]
    union = torch.where(y_is_min, target, y).flatten(1).sum(-1)  # [B]
    return inter, union


def soft_iou(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ min(ȳ, y) / Σ max(ȳ, y) -> [B] in [0, 1] (Eq. 6 with Eq. 9-10)."""
    inter, union = _overlap(y, target)
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.ones_like(union))


def soft_f1(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 Σ min(ȳ, y) / Σ (ȳ + y) -> [B] in [0, 1] (Eq. 7 with Eq. 9-10)."""
    inter, union = _overlap(y, target)
    denom = inter + union  # [B] = Σ (ȳ_i + y_i)
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1e-12), torch.ones_like(denom))


def soft_accuracy(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft per-token accuracy of relaxed label sequences y [B, T, K] against one-hot targets (zero
    rows past each sequence's end): the mean over positions of the mass on the true label -> [B]."""
    if y.shape != target.shape:
        raise ValueError(f"oracle: prediction {tuple(y.shape)} and target {tuple(target.shape)} differ in shape")
    target = target.to(y.dtype)
    return (y * target).flatten(1).sum(-1) / target.flatten(1).sum(-1).clamp_min(1)


ORACLES = {"f1": soft_f1, "iou": soft_iou, "token_accuracy": soft_accuracy}


def oracle_fn(name: str):
    try:
        return ORACLES[name]
    except KeyError:
        raise DspError(f"objective.oracle={name!r}: choose auto or one of {', '.join(ORACLES)}") from None


def default_oracle(y: torch.Tensor) -> str:
    """oracle=auto: soft token accuracy for label sequences (class ids), soft IoU for masks [B, H, W],
    soft F1 for multi-label vectors [B, L]."""
    if not y.is_floating_point():
        return "token_accuracy"
    return "iou" if y.dim() > 2 else "f1"
