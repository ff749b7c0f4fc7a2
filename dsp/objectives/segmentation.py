"""Training objectives for binary segmentation with the Gaussian CRF (Shevchenko & Osokin 2019, §4.2).

The cross-entropy of Eq. 5 on the two-class "marginals" of Eq. 14, σ(s*), averaged over pixels;
the gradient reaches the unary and pairwise networks through the CG backward pass of Eq. 15.
Each objective scores GCRFPotentials against masks y [B, H, W] (0/1 floats), so online scaling
can re-evaluate it for other unary scales α without re-running the networks.

`iou_weight` (0 = the paper) adds w · (1 − soft IoU) per image, the soft IoU of DVN Eq. 6/9 on
σ(s): the test metric averages IoU over images, so a small horse's pixels count for more there
than in the per-pixel cross-entropy. Not in Shevchenko & Osokin; an option to screen.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsp import interfaces as I
from dsp.errors import DspError
from dsp.schema import NonNegative
from dsp.tasks.oracles import soft_iou


class SegmentationCrossEntropy(I.Objective):
    """Per-pixel cross-entropy of σ(s*) against the mask: the only objective of the paper's
    binary-segmentation row (Table 2)."""

    outputs = frozenset({I.MASK})
    needs = frozenset({I.GAUSSIAN_POTENTIALS})
    prediction = "inference"
    rescores_potentials = True  # loss_on(potentials, y): online scaling re-scores cached unaries

    def __init__(self, iou_weight: NonNegative = 0.0):
        try:
            self.iou_weight = float(iou_weight)
        except (TypeError, ValueError):
            self.iou_weight = float("nan")
        if not self.iou_weight >= 0:
            raise DspError(f"objective.iou_weight={iou_weight!r}: the soft-IoU term's weight must be a number ≥ 0 (0 = off)")

    def logit_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of foreground logits [B, H, W] against masks, plus the optional IoU term."""
        loss = F.binary_cross_entropy_with_logits(logits, y)
        if self.iou_weight:
            loss = loss + self.iou_weight * (1 - soft_iou(torch.sigmoid(logits), y)).mean()
        return loss

    def loss(self, model, inference, x, y):
        s, iterations, _ = model.features(x).solve()  # [B, H, W]
        return self.logit_loss(s, y), {"cg_iterations": iterations}

    def loss_on(self, feats, y) -> torch.Tensor:
        return self.logit_loss(feats.solve()[0], y)


class UnaryCrossEntropy(SegmentationCrossEntropy):
    """Per-pixel cross-entropy of σ(α u), the unaries alone (the unary-only UNet baseline; the
    first stage of stage training). No linear system is solved."""

    needs = frozenset({I.LOCAL_LOGITS})
    prediction = "unary"

    def loss(self, model, inference, x, y):  # any model's local logits (the FCN's, the Gaussian CRF's α u)
        return self.logit_loss(model.local_logits(model.features(x)), y), {}

    def loss_on(self, feats, y) -> torch.Tensor:  # online scaling: the Gaussian CRF's scaled unaries
        return self.logit_loss(feats.unary, y)
