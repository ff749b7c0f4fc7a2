"""Task metrics reported by the papers. All return percentages (0-100) as Python floats.

Inputs are 0/1 tensors `[N, L]` (or anything `bool()`-able), predictions already decoded.
"""
from __future__ import annotations

import torch


def example_f1(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Example-averaged F1 (SPEN, DVN): mean over examples of 2|y ∩ ŷ| / (|y| + |ŷ|).

    An example with no true and no predicted label counts as 100 (a perfect, empty answer).
    """
    pred, target = pred.bool(), target.bool()
    inter = (pred & target).sum(-1).double()  # [N]
    denom = (pred.sum(-1) + target.sum(-1)).double()  # [N]
    f1 = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))
    return 100.0 * f1.mean().item()


def hamming(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Percentage of wrong label bits (Hamming loss)."""
    return 100.0 * (pred.bool() != target.bool()).double().mean().item()
