"""Per-label logistic loss on the local logits: the MLP baseline and SPEN's pretraining stage."""
from __future__ import annotations

import torch.nn.functional as F


class LocalLoss:
    """Binary cross-entropy of σ(b_iᵀF(x)) against each label, averaged over labels and batch."""

    def loss(self, model, inference, x, y):
        feats = model.features(x)
        loss = F.binary_cross_entropy_with_logits(feats.logits, y)
        return loss, {}
