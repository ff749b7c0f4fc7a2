"""Gaussian CRF for binary segmentation (Shevchenko & Osokin 2019, §4.2, Eq. 9-16).

    F(s | X) = -½ sᵀ(W + λI)s + α Uᵀs,      s* = (W + λI)⁻¹ α U,      p_j(fg) = σ(s*_j)

Two classes. Only the difference of the two classes' scores enters the two-class softmax of
Eq. 14, so the unary network outputs one channel per pixel, u = u_fg - u_bg, and we solve for the
score difference s = s_fg - s_bg: p_j(fg) = softmax(s_fg, s_bg)_fg = σ(s_j).

Sign convention (the paper is ambiguous here). Eq. 9-12 ask for a symmetric positive semi-definite
W, so that λ > 0 makes the system positive definite and CG applies. Eq. 16's block matrix
[[0, AAᵀ], [AAᵀ, 0]] is not PSD: for two classes it turns into (λI - AAᵀ) on the score difference,
which is indefinite unless λ exceeds the largest eigenvalue of AAᵀ, and CG may then fail. We keep
Eq. 9-12 and the PSD requirement and use the class-agnostic W = I₂ ⊗ AAᵀ (the same embedding
kernel for both classes); for two classes that is exactly

    s* = (A Aᵀ + λI)⁻¹ α u,        A [P, D] the pixel embeddings of the pairwise network.

α (the `unary_scale` buffer) multiplies U as in ChainCRF: 1 for joint training, re-chosen every
epoch by online scaling (Algorithm 1). Without a pairwise network the model is the unary-only
baseline, s = α u (W = 0, λ = 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsp.errors import DspError
from dsp.inference.cg import gcrf_solve


@dataclass
class GCRFRaw:
    """What the networks compute once per image (online scaling reuses it for every α)."""

    unary: torch.Tensor  # [B, H, W] unscaled u = u_fg - u_bg
    embeddings: torch.Tensor | None  # [B, P, D] pixel embeddings A, P = H·W; None: unary only
    unit_solution: tuple | None = None  # s*(α = 1) once solved without gradients (see solve)


@dataclass
class GCRFPotentials:
    """The potentials as inference sees them, with the solver settings that define s*."""

    unary: torch.Tensor  # [B, H, W], α-scaled
    embeddings: torch.Tensor | None  # [B, P, D]
    lam: float
    tol: float
    max_iter: int
    raw: GCRFRaw | None = None  # the unscaled potentials these were made from, and their scale α
    scale: float | torch.Tensor = 1.0

    def solve(self):
        """s* [B, H, W] (differentiable), CG iterations, and whether every image converged."""
        if self.embeddings is None:
            return self.unary, 0, True
        if self.raw is not None and not torch.is_grad_enabled():
            # s*(α) = α s*(1): the system is linear in α u. Online scaling scores 17 values of α on
            # the same raw potentials, so without gradients one solve serves them all.
            if self.raw.unit_solution is None:
                self.raw.unit_solution = self._solve(self.raw.unary)
            s, iterations, converged = self.raw.unit_solution
            return self.scale * s, iterations, converged
        return self._solve(self.unary)

    def _solve(self, unary: torch.Tensor):
        b, h, w = unary.shape
        s, iterations, converged = gcrf_solve(unary.reshape(b, h * w), self.embeddings, self.lam,
                                              self.tol, self.max_iter)  # [B, P]
        return s.reshape(b, h, w), iterations, converged


class GaussianCRF(nn.Module):
    """`unary`: images [B, C, H, W] -> [B, 1, H, W]; `pairwise`: images -> embeddings [B, D, H, W]
    (or None for the unary-only model). `lam` is λ of Eq. 9, `cg_tol` / `cg_max_iter` the
    conjugate-gradient settings of the forward and backward solves."""

    def __init__(self, unary: nn.Module, pairwise: nn.Module | None = None, lam: float = 1.0,
                 unary_scale: float = 1.0, cg_tol: float = 1e-5, cg_max_iter: int = 100):
        super().__init__()
        if lam <= 0:
            raise DspError(f"model.lam must be > 0 (it makes the Gaussian CRF system positive definite), got {lam}")
        self.unary, self.pairwise = unary, pairwise
        self.lam, self.cg_tol, self.cg_max_iter = float(lam), float(cg_tol), int(cg_max_iter)
        self.register_buffer("unary_scale", torch.tensor(float(unary_scale)))

    def unary_net(self, x: torch.Tensor, lengths=None) -> GCRFRaw:
        """Both networks once (the online-scaling contract: everything α does not change).
        `lengths` is accepted for the chain-CRF signature and ignored."""
        u = self.unary(x)  # [B, 1, H, W]
        if u.dim() != 4 or u.shape[1] != 1:
            raise DspError(f"model.unary must output one channel per pixel [B, 1, H, W], got {tuple(u.shape)}; "
                           f"set model.unary.out_channels=1")
        emb = None
        if self.pairwise is not None:
            a = self.pairwise(x)  # [B, D, H, W]
            emb = a.flatten(2).transpose(1, 2)  # [B, P, D]
        return GCRFRaw(u[:, 0], emb)

    def potentials(self, raw: GCRFRaw, lengths=None, scale: float | None = None) -> GCRFPotentials:
        alpha = self.unary_scale if scale is None else scale
        return GCRFPotentials(alpha * raw.unary, raw.embeddings, self.lam, self.cg_tol, self.cg_max_iter, raw, alpha)

    def features(self, x: torch.Tensor, lengths=None) -> GCRFPotentials:
        return self.potentials(self.unary_net(x))

    @torch.no_grad()
    def diagnostics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Mean |α u| and mean |W_ij| = mean |A_iᵀA_j| over pixel pairs (on the first 16 images:
        P×P per image), and their ratio (the unary / pairwise balance of the paper's §5, Fig. 1b)."""
        was_training = self.training
        self.eval()
        feats = self.features(x)
        s, iterations, _ = feats.solve()
        self.train(was_training)
        u = feats.unary.abs().mean().item()
        out = {"potentials/unary_mean_abs": u, "potentials/unary_scale": self.unary_scale.item(),
               "potentials/score_mean_abs": s.abs().mean().item(), "potentials/cg_iterations": float(iterations)}
        if feats.embeddings is not None:
            w = mean_abs_gram(feats.embeddings[:16])
            out.update({"potentials/pairwise_mean_abs": w, "potentials/unary_pairwise_ratio": u / max(w, 1e-12)})
        return out


def mean_abs_gram(emb: torch.Tensor, chunk: int = 8) -> float:
    """Mean |A Aᵀ| over all images and pixel pairs of embeddings [B, P, D], a few images at a time
    so the P×P matrices stay small."""
    total = sum((a @ a.transpose(1, 2)).abs().sum().item() for a in emb.split(chunk))  # [b, P, P] each
    return total / (emb.shape[0] * emb.shape[1] ** 2)
