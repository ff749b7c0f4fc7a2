"""A user's multi-label energy: a feature network, per-label logits, and a learned low-rank label
interaction E(ȳ) = -τ·Σ_i ȳ_i s_i(x) - ½ ȳᵀ U Uᵀ ȳ, with the temperature τ a parameter registered on
the model itself (not inside a child module)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsp import interfaces as I


@dataclass
class Features:
    logits: torch.Tensor  # [B, L]

    def detach(self) -> "Features":
        return Features(self.logits.detach())

    def take(self, index: torch.Tensor) -> "Features":
        return Features(self.logits[index])


class LowRankEnergy(I.Model):
    outputs = frozenset({I.MULTILABEL})
    inputs = frozenset({I.VECTORS})
    provides = frozenset({I.ENERGY, I.SMOOTH_ENERGY, I.LOCAL, I.LOCAL_LOGITS, I.VALUE})

    def __init__(self, num_features: int, num_labels: int, hidden: int = 32, rank: int = 4):
        super().__init__()
        self.features_net = nn.Sequential(nn.Linear(num_features, hidden), nn.Softplus(), nn.Linear(hidden, num_labels))
        self.interaction = nn.Linear(num_labels, rank, bias=False)  # U
        self.log_temperature = nn.Parameter(torch.zeros(()))  # τ = exp(·), directly on the model

    def features(self, x: torch.Tensor, lengths=None) -> Features:
        return Features(self.log_temperature.exp() * self.features_net(x))

    def energy(self, y: torch.Tensor, feats: Features) -> torch.Tensor:
        return -(y * feats.logits).sum(-1) - 0.5 * (self.interaction(y) ** 2).sum(-1)  # [B]

    def score(self, y: torch.Tensor, feats: Features) -> torch.Tensor:
        return -self.energy(y, feats)

    def local_logits(self, feats: Features) -> torch.Tensor:
        return feats.logits

    def local_probs(self, feats: Features) -> torch.Tensor:
        return torch.sigmoid(feats.logits)
