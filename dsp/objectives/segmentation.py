"""Training objectives for binary segmentation with the Gaussian CRF (Shevchenko & Osokin 2019, §4.2).

The cross-entropy of Eq. 5 on the two-class "marginals" of Eq. 14, σ(s*), averaged over pixels;
the gradient reaches the unary and pairwise networks through the CG backward pass of Eq. 15.
Each objective scores GCRFPotentials against masks y [B, H, W] (0/1 floats), so online scaling
can re-evaluate it for other unary scales α without re-running the networks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class SegmentationCrossEntropy:
    """Per-pixel cross-entropy of σ(s*) against the mask: the only objective of the paper's
    binary-segmentation row (Table 2)."""

    prediction = "inference"

    def loss(self, model, inference, x, y):
        s, iterations, _ = model.features(x).solve()  # [B, H, W]
        return F.binary_cross_entropy_with_logits(s, y), {"cg_iterations": iterations}

    def loss_on(self, feats, y) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(feats.solve()[0], y)


class UnaryCrossEntropy(SegmentationCrossEntropy):
    """Per-pixel cross-entropy of σ(α u), the unaries alone (the unary-only UNet baseline; the
    first stage of stage training). No linear system is solved."""

    prediction = "unary"

    def loss(self, model, inference, x, y):
        return self.loss_on(model.features(x), y), {}

    def loss_on(self, feats, y) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(feats.unary, y)
