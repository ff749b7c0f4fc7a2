"""Gaussian CRF for binary segmentation (Shevchenko & Osokin 2019, §4.2, Eq. 9-16).

    F(s | X) = -½ sᵀ(W + λ_eff I)s + α Uᵀs,      s* = (W + λ_eff I)⁻¹ α U,      p_j(fg) = σ(s*_j)

Two classes. Only the difference of the two classes' scores enters the two-class softmax of
Eq. 14, so the unary network outputs one channel per pixel, u = u_fg - u_bg, and we solve for the
score difference s = s_fg - s_bg: p_j(fg) = softmax(s_fg, s_bg)_fg = σ(s_j).

Sign convention. We use the paper's class-agnostic Potts matrix (Eq. 16) W = [[0, K], [K, 0]],
K = A Aᵀ (A [P, D] the pixel embeddings). For two classes Eq. 12 becomes (λ_eff I - K) d = α u on the
score difference; (λ_eff I - K)⁻¹ = (1/λ_eff) Σ_k (K/λ_eff)^k is all positive, so pixels with similar
embeddings agree (smoothing; (K + λI)⁻¹ would push them apart). It needs λ_eff > λ_max(K): per image
λ_eff = λ_max(AᵀA)·(1 + margin) + λ, exact from the D×D Gram matrix, smallest eigenvalue >= λ = `lam`:

    s* = (λ_eff I - A Aᵀ)⁻¹ α u        (gradients reach A also through λ_eff).

α (the `unary_scale` buffer) multiplies U as in ChainCRF: 1 for joint training, re-chosen every
epoch by online scaling (Algorithm 1). Without a pairwise network the model is the unary-only
baseline, s = α u (W = 0, λ_eff = 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsp.errors import DspError
from dsp.inference.cg import effective_lambda, gcrf_solve
from dsp import interfaces as I
from dsp.nn.modes import eval_mode
from dsp.schema import NonNegative, Positive, Size


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
    lam: float  # λ: the smallest eigenvalue of λ_eff I - A Aᵀ
    tol: float
    max_iter: int
    raw: GCRFRaw | None = None  # the unscaled potentials these were made from, and their scale α
    scale: float | torch.Tensor = 1.0
    margin: float = 0.0  # λ_eff = λ_max(Aᵀ A)·(1 + margin) + λ
    unit_gain: bool = False  # solve (I - AAᵀ/λ_eff) s = α u instead (see GaussianCRF)

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
        if self.unit_gain:  # λ_eff (λ_eff I - K)⁻¹ u = (I - K/λ_eff)⁻¹ u
            unary = unary * effective_lambda(self.embeddings, self.lam, self.margin).to(unary.dtype)[:, None, None]
        s, iterations, converged = gcrf_solve(unary.reshape(b, h * w), self.embeddings, self.lam,
                                              self.tol, self.max_iter, self.margin)  # [B, P]
        return s.reshape(b, h, w), iterations, converged


class GaussianCRF(I.Model):
    """`unary`: images [B, C, H, W] -> [B, 1, H, W]; `pairwise`: images -> embeddings [B, D, H, W]
    (or None for the unary-only model). `lam` is λ, the smallest eigenvalue of the system
    λ_eff I - A Aᵀ with λ_eff = λ_max(Aᵀ A)·(1 + lam_margin) + lam per image; `cg_tol` /
    `cg_max_iter` the conjugate-gradient settings of the forward and backward solves.

    `unit_gain=True` solves (I - A Aᵀ/λ_eff) s = α u: the same smoothing operator with the unary
    passed through at gain 1 in directions the embeddings do not span, and at most (1 + m)/m
    (m = lam_margin) along the top one. Without it the gain of the unary falls as 1/λ_eff while the
    embeddings grow, and training collapses onto the top eigenvector (59.9 test mean IoU after 12
    epochs of gcrf_horses_joint, against 73.4 with unit_gain and lam_margin=1)."""

    parts = ("unary", "pairwise")  # the children a training stage may name
    outputs = frozenset({I.MASK})
    provides = frozenset({I.GAUSSIAN_POTENTIALS, I.LOCAL, I.LOCAL_LOGITS, I.SCALABLE_LOCAL})

    def __init__(self, unary: nn.Module, pairwise: nn.Module | None = None, lam: Positive = 1.0,
                 unary_scale: Positive = 1.0, cg_tol: Positive = 1e-5, cg_max_iter: Size = 100,
                 lam_margin: NonNegative = 0.0, unit_gain: bool = False):
        super().__init__()
        if lam <= 0:
            raise DspError(f"model.lam must be > 0 (it makes the Gaussian CRF system positive definite), got {lam}")
        if lam_margin < 0:
            raise DspError(f"model.lam_margin must be >= 0, got {lam_margin}")
        self.unary, self.pairwise = unary, pairwise
        self.lam, self.cg_tol, self.cg_max_iter = float(lam), float(cg_tol), int(cg_max_iter)
        self.lam_margin, self.unit_gain = float(lam_margin), bool(unit_gain)
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
        return GCRFPotentials(alpha * raw.unary, raw.embeddings, self.lam, self.cg_tol, self.cg_max_iter, raw, alpha,
                              self.lam_margin, self.unit_gain)

    def features(self, x: torch.Tensor, lengths=None) -> GCRFPotentials:
        return self.potentials(self.unary_net(x))

    def local_logits(self, feats: GCRFPotentials) -> torch.Tensor:
        return feats.unary  # [B, H, W]: α u

    def local_probs(self, feats: GCRFPotentials) -> torch.Tensor:
        return torch.sigmoid(feats.unary)

    @torch.no_grad()
    def diagnostics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Mean |α u| and mean |W_ij| = mean |A_iᵀA_j| over pixel pairs (on the first 16 images:
        P×P per image), and their ratio (the unary / pairwise balance of the paper's §5, Fig. 1b);
        the mean λ_eff."""
        with eval_mode(self):
            feats = self.features(x)
            s, iterations, _ = feats.solve()
        u = feats.unary.abs().mean().item()
        out = {"potentials/unary_mean_abs": u, "potentials/unary_scale": self.unary_scale.item(),
               "potentials/score_mean_abs": s.abs().mean().item(), "potentials/cg_iterations": float(iterations)}
        if feats.embeddings is not None:
            w = mean_abs_gram(feats.embeddings[:16])
            lam_eff = effective_lambda(feats.embeddings, self.lam, self.lam_margin).mean().item()
            out.update({"potentials/pairwise_mean_abs": w, "potentials/unary_pairwise_ratio": u / max(w, 1e-12),
                        "potentials/lam_eff": lam_eff})
        return out


def mean_abs_gram(emb: torch.Tensor, chunk: int = 8) -> float:
    """Mean |A Aᵀ| over all images and pixel pairs of embeddings [B, P, D], a few images at a time
    so the P×P matrices stay small."""
    total = sum((a @ a.transpose(1, 2)).abs().sum().item() for a in emb.split(chunk))  # [b, P, P] each
    return total / (emb.shape[0] * emb.shape[1] ** 2)
