"""The local (unary) loss: each output variable's own logit against its label, no structured term.

The MLP baseline and SPEN's pretraining stage on multi-label data (binary cross-entropy per label),
the per-pixel loss of a mask's unaries, and the per-position cross-entropy of a sequence's unaries:
one objective for every model that exposes its local term's logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsp import interfaces as I


def local_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean loss of local logits against labels: class scores [B, T, K] against class ids [B, T]
    (-1 positions ignored), or log-odds of the same shape as 0/1 labels."""
    if logits.dim() == y.dim() + 1:  # categorical: one score per class
        valid = y >= 0
        return F.cross_entropy(logits[valid], y[valid])
    if not y.is_floating_point():  # binary variables of a sequence, -1 past its end
        valid = y >= 0
        return F.binary_cross_entropy_with_logits(logits[valid], y[valid].to(logits.dtype))
    return F.binary_cross_entropy_with_logits(logits, y)


class LocalLoss(I.Objective):
    """Cross-entropy of the local term's logits against each output variable's label."""

    outputs = frozenset({I.MULTILABEL, I.MASK, I.SEQUENCE})
    needs = frozenset({I.LOCAL_LOGITS})
    prediction = "unary"

    def loss(self, model, inference, x, y):
        feats = model.features(x, I.sequence_lengths(y))
        return local_loss(model.local_logits(feats), y), {}
