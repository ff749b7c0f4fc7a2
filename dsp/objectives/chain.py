"""Training objectives for linear-chain CRFs (Shevchenko & Osokin 2019, Eq. 4-8, 21).

Each objective scores ChainPotentials against labels y [B, T] (-1 at padding), so online scaling
can re-evaluate it for other unary scales without re-running the unary network. `prediction` names
the decoding that matches the objective: MAP for likelihood and SSVM, argmax of (exact or
mean-field) marginals for the cross-entropies. `scale_reg_weight` > 0 adds the regulariser of
Eq. 21, λ (‖U‖/‖W‖ - α)², the third fix of §5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsp import interfaces as I
from dsp.errors import DspError
from dsp.inference import chain
from dsp.inference.mean_field import mean_field_marginals
from dsp.schema import Count, NonNegative
from dsp.tasks.sequence import lengths_of


class ChainObjective(I.Objective):
    outputs = frozenset({I.SEQUENCE})
    needs = frozenset({I.CHAIN_POTENTIALS})
    prediction = "viterbi"
    rescores_potentials = True  # loss_on(potentials, y): online scaling re-scores cached unaries

    def __init__(self, scale_reg_weight: NonNegative = 0.0, scale_reg_target: NonNegative = 1.0):
        self.scale_reg_weight, self.scale_reg_target = scale_reg_weight, scale_reg_target

    def loss(self, model, inference, x, y):
        feats = model.features(x, lengths_of(y))
        loss = self.loss_on(feats, y)
        logs = {}
        if self.scale_reg_weight > 0:  # Eq. 21
            ratio = feats.unary_norm / feats.pairwise_norm.clamp_min(1e-6)  # [B]
            reg = self.scale_reg_weight * ((ratio - self.scale_reg_target) ** 2).mean()
            loss, logs = loss + reg, {"scale_reg": reg.detach()}
        return loss, logs

    def loss_on(self, feats, y) -> torch.Tensor:
        raise NotImplementedError


class ChainNLL(ChainObjective):
    """Negative log-likelihood of the labelling (Eq. 4), per sequence, averaged over the batch."""

    def loss_on(self, feats, y):
        return chain.nll(y, feats.unary, feats.pairwise, feats.lengths).mean()


class MarginalCrossEntropy(ChainObjective):
    """Cross-entropy of the true labels under the marginals (Eq. 5), averaged over positions.

    `mean_field_sweeps` > 0 uses mean-field marginals instead of exact ones (Eq. 6).
    """

    def __init__(self, mean_field_sweeps: Count = 0, scale_reg_weight: NonNegative = 0.0,
                 scale_reg_target: NonNegative = 1.0):
        super().__init__(scale_reg_weight=scale_reg_weight, scale_reg_target=scale_reg_target)
        if mean_field_sweeps < 0:
            raise DspError(f"objective.mean_field_sweeps must be >= 0, got {mean_field_sweeps}")
        self.sweeps = mean_field_sweeps
        self.prediction = "mean_field" if mean_field_sweeps else "marginals"

    def loss_on(self, feats, y):
        if self.sweeps:
            q = mean_field_marginals(feats.unary, feats.pairwise, feats.lengths, sweeps=self.sweeps)
        else:
            q = chain.marginals(feats.unary, feats.pairwise, feats.lengths)  # [B, T, K]
        valid = y >= 0  # [B, T]
        picked = q.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)[valid]  # [n_valid]
        return -picked.clamp_min(1e-12).log().mean()


class ChainSSVM(ChainObjective):
    """Structured hinge with the normalised Hamming margin (Eq. 7-8), loss-augmented Viterbi."""

    def __init__(self, margin_weight: NonNegative = 1.0, scale_reg_weight: NonNegative = 0.0,
                 scale_reg_target: NonNegative = 1.0):
        super().__init__(scale_reg_weight=scale_reg_weight, scale_reg_target=scale_reg_target)
        self.margin_weight = margin_weight

    def loss_on(self, feats, y):
        return chain.ssvm_loss(y, feats.unary, feats.pairwise, feats.lengths, weight=self.margin_weight).mean()


class UnaryCrossEntropy(ChainObjective):
    """Per-position cross-entropy of the unaries alone: the unary-only model and the first stage
    of stage training (pairwise terms ignored)."""

    prediction = "unary"

    def loss_on(self, feats, y):
        valid = y >= 0
        return F.cross_entropy(feats.unary[valid], y[valid])
