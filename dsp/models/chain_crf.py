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

from dsp import interfaces as I
from dsp.nn.modes import eval_mode
from dsp.schema import NonNegative, Positive, Size


@dataclass
class ChainPotentials:
    """What inference and the objectives need from x: potentials as inference sees them."""

    unary: torch.Tensor  # [B, T, K], scaled
    pairwise: torch.Tensor  # [K, K]
    lengths: torch.Tensor  # [B]
    unary_norm: torch.Tensor  # [B] mean |U| of the unscaled unaries (Eq. 21 regulariser, logs)
    pairwise_norm: torch.Tensor  # [] mean |W|

    def detach(self) -> "ChainPotentials":
        return ChainPotentials(self.unary.detach(), self.pairwise.detach(), self.lengths, self.unary_norm.detach(),
                               self.pairwise_norm.detach())

    def take(self, index: torch.Tensor) -> "ChainPotentials":
        """The potentials of a subset of the batch (the pairwise table is shared)."""
        return ChainPotentials(self.unary[index], self.pairwise, self.lengths[index], self.unary_norm[index],
                               self.pairwise_norm)


def mean_abs(u: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean absolute value of U [B, T, K] over each example's valid positions -> [B]."""
    mask = (torch.arange(u.shape[1], device=u.device) < lengths.unsqueeze(-1)).unsqueeze(-1)  # [B, T, 1]
    return (u.abs() * mask).sum((1, 2)) / (lengths * u.shape[-1]).clamp_min(1)


class ChainCRF(I.Model):
    parts = ("unary_net", "pairwise")  # the children a training stage may name
    outputs = frozenset({I.SEQUENCE})
    provides = frozenset({I.CHAIN_POTENTIALS, I.LOCAL, I.LOCAL_LOGITS, I.SCALABLE_LOCAL, I.ENERGY, I.SMOOTH_ENERGY,
                          I.VALUE})
    relaxation = "simplex"  # relaxed labels: a distribution over the K labels per position

    def __init__(self, num_labels: Size, unary_net: nn.Module, unary_scale: Positive = 1.0,
                 normalise: bool = False, pairwise_init_std: NonNegative = 0.01, eps: Positive = 1e-6):
        super().__init__()
        self.num_labels, self.normalise, self.eps = num_labels, normalise, eps
        self.unary_net = unary_net
        self.pairwise = PairwiseTable(num_labels, pairwise_init_std)
        self.register_buffer("unary_scale", torch.tensor(float(unary_scale)))

    def features(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> ChainPotentials:
        if lengths is None:  # every position of x is a label (fixed-length sequences)
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
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

    def energy(self, y: torch.Tensor, feats: ChainPotentials) -> torch.Tensor:
        """-F at relaxed labels y [B, T, K] (rows on the simplex): -Σ_j y_j·αU_j - Σ_j y_jᵀ W y_{j+1},
        positions past each sequence's end ignored; equals -F(Y | X) at one-hot labels. Bilinear in
        y, so smooth enough for unrolled learning."""
        valid = torch.arange(y.shape[1], device=y.device) < feats.lengths.unsqueeze(-1)  # [B, T]
        y = y * valid.unsqueeze(-1).to(y.dtype)
        unary = (y * feats.unary).sum((1, 2))  # [B]
        pairwise = torch.einsum("btk,kl,btl->b", y[:, :-1], feats.pairwise, y[:, 1:])  # [B]
        return -(unary + pairwise)

    def score(self, y: torch.Tensor, feats: ChainPotentials) -> torch.Tensor:
        """-E per position: the CRF's score read as the pre-sigmoid value of a relaxed labelling (the
        value objective), per position so that σ(score) can match a per-token accuracy at any length."""
        return -self.energy(y, feats) / feats.lengths.clamp_min(1).to(y.dtype)

    def local_logits(self, feats: ChainPotentials) -> torch.Tensor:
        return feats.unary  # [B, T, K]

    def local_probs(self, feats: ChainPotentials) -> torch.Tensor:
        """softmax of the unaries per position [B, T, K] (zero rows past each sequence's end)."""
        mask = torch.arange(feats.unary.shape[1], device=feats.unary.device) < feats.lengths.unsqueeze(-1)  # [B, T]
        return torch.softmax(feats.unary, -1) * mask.unsqueeze(-1)

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
