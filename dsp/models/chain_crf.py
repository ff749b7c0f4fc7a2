"""Linear-chain CRF with neural unary potentials (Shevchenko & Osokin 2019, Eq. 1).

    F(Y | X) = Σ_j α·U(x, y_j) + Σ_j W(y_j, y_{j+1})          (higher is better)

The unary network maps padded sequences x [B, T, ...] (with their lengths) to U [B, T, K]; W is a
learned K×K table. α is the unary scale of the paper's §5: 1 for plain joint training, chosen after
every epoch by online scaling (a buffer, so checkpoints keep it), or fixed with `normalise=True`,
the offline scaling of Eq. 20 (Û = α U/‖U‖, Ŵ = W/‖W‖, ‖·‖ the mean absolute value per example).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsp.training.predict import eval_mode


@dataclass
class ChainPotentials:
    """What inference and the objectives need from x: potentials as inference sees them."""

    unary: torch.Tensor  # [B, T, K], scaled
    pairwise: torch.Tensor  # [K, K]
    lengths: torch.Tensor  # [B]
    unary_norm: torch.Tensor  # [B] mean |U| of the unscaled unaries (Eq. 21 regulariser, logs)
    pairwise_norm: torch.Tensor  # [] mean |W|


def mean_abs(u: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean absolute value of U [B, T, K] over each example's valid positions -> [B]."""
    mask = (torch.arange(u.shape[1], device=u.device) < lengths.unsqueeze(-1)).unsqueeze(-1)  # [B, T, 1]
    return (u.abs() * mask).sum((1, 2)) / (lengths * u.shape[-1]).clamp_min(1)


class ChainCRF(nn.Module):
    def __init__(self, num_labels: int, unary_net: nn.Module, unary_scale: float = 1.0,
                 normalise: bool = False, pairwise_init_std: float = 0.01, eps: float = 1e-6):
        super().__init__()
        self.num_labels, self.normalise, self.eps = num_labels, normalise, eps
        self.unary_net = unary_net
        self.pairwise = PairwiseTable(num_labels, pairwise_init_std)
        self.register_buffer("unary_scale", torch.tensor(float(unary_scale)))

    def features(self, x: torch.Tensor, lengths: torch.Tensor) -> ChainPotentials:
        return self.potentials(self.unary_net(x, lengths), lengths)

    def potentials(self, unary: torch.Tensor, lengths: torch.Tensor, scale: float | None = None) -> ChainPotentials:
        """Scale raw unaries [B, T, K] (and normalise, for offline scaling) into ChainPotentials."""
        alpha = self.unary_scale if scale is None else scale
        w = self.pairwise()  # [K, K]
        u_norm, w_norm = mean_abs(unary, lengths), w.abs().mean()
        if self.normalise:  # Eq. 20
            unary = unary / u_norm.clamp_min(self.eps)[:, None, None]
            w = w / w_norm.clamp_min(self.eps)
        return ChainPotentials(alpha * unary, w, lengths, u_norm, w_norm)

    @torch.no_grad()
    def diagnostics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Mean |potential| as inference sees them, and their ratio (the paper's Figure 1b/c)."""
        with eval_mode(self):
            feats = self.features(x, (y >= 0).sum(-1))
        u = mean_abs(feats.unary, feats.lengths).mean().item()
        w = feats.pairwise.abs().mean().item()
        return {"potentials/unary_mean_abs": u, "potentials/pairwise_mean_abs": w,
                "potentials/unary_pairwise_ratio": u / max(w, 1e-12), "potentials/unary_scale": self.unary_scale.item()}


class PairwiseTable(nn.Module):
    """A data-independent K×K table of pairwise potentials W(y_j, y_{j+1})."""

    def __init__(self, num_labels: int, init_std: float = 0.01):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_labels, num_labels) * init_std)

    def forward(self) -> torch.Tensor:
        return self.weight
