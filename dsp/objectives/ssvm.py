"""Structured SVM for SPENs (Eq. 8-9) with loss-augmented gradient inference.

    L = mean_b [ m·Δ(ȳ_b, y_b) - E(ȳ_b) + E(y_b) ]_+ ,   ȳ_b ≈ argmin_ȳ E(ȳ) - m·Δ(ȳ, y_b)

Δ is a differentiable surrogate of the Hamming loss (squared or log loss). ȳ is not rounded
(§4), and the hinge is kept because inference is only approximate. L2 regularisation is the
optimiser's weight decay.
"""
from __future__ import annotations

from typing import Literal

import torch

from dsp import interfaces as I
from dsp.objectives.unrolled import one_hot_targets
from dsp.schema import NonNegative
from dsp.tasks.multilabel import delta_fn


class SSVMLoss(I.Objective):
    outputs = frozenset({I.MULTILABEL, I.MASK, I.IMAGE, I.SEQUENCE})
    needs = frozenset({I.ENERGY})
    needs_inference = frozenset({I.LOSS_AUGMENTED})

    def __init__(self, margin_weight: NonNegative = 1.0, delta: Literal["squared", "log"] = "squared"):
        self.margin_weight = margin_weight
        self.delta = delta_fn(delta)

    def loss(self, model, inference, x, y):
        feats = model.features(x, I.sequence_lengths(y))
        target, valid = y, None
        if not y.is_floating_point():  # label sequences: one-hot rows, positions past the end ignored
            target, valid = one_hot_targets(y, model.local_probs(feats).shape[-1])
            valid = valid.unsqueeze(-1).to(target.dtype)

        def margin(y_bar: torch.Tensor) -> torch.Tensor:  # outputs of any shape (labels, images, sequences)
            y_bar = y_bar if valid is None else y_bar * valid
            return self.margin_weight * self.delta(y_bar.flatten(1), target.flatten(1))  # [B]

        result = inference(model, feats, augment=margin, train=True)
        y_hat = result.y  # detached: the subgradient only flows through E
        hinge = margin(y_hat) - model.energy(y_hat, feats) + model.energy(target, feats)  # [B]
        loss = torch.relu(hinge).mean()
        logs = {
            "violated": (hinge > 0).float().mean(),
            "inference_iters": result.iterations,
        }
        return loss, logs
