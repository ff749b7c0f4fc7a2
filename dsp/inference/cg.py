"""Exact Gaussian CRF inference by conjugate gradients (Shevchenko & Osokin 2019, Eq. 12 and 15).

The system is (A Aᵀ + λI) s = U per image, with pixel embeddings A [P, D] (D << P). The P×P
matrix is never formed: one matvec is v ↦ A(Aᵀv) + λv, O(P·D), batched over images. Because
A Aᵀ has rank <= D, CG converges in at most D + 1 iterations in exact arithmetic.

The backward pass does not unroll CG. With M = A Aᵀ + λI symmetric, Eq. 15 gives
    ∂L/∂U = M⁻¹ ∂L/∂s*            (a second CG solve)
    ∂L/∂W = -(∂L/∂U) s*ᵀ          and, through W = A Aᵀ,  ∂L/∂A = (∂L/∂W + ∂L/∂Wᵀ) A.
"""
from __future__ import annotations

from typing import Callable

import torch

from dsp.inference.gradient import InferenceResult


def low_rank_matvec(emb: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    """(A Aᵀ + λI) v for embeddings A [B, P, D] and vectors v [B, P] -> [B, P]."""
    return torch.einsum("bpd,bd->bp", emb, torch.einsum("bpd,bp->bd", emb, v)) + lam * v


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       tol: float = 1e-5, max_iter: int = 100):
    """Solve M x = b for a batch of symmetric positive-definite systems, b [B, P].

    Stops an example when ‖r‖ <= tol·‖b‖ (converged examples are frozen on the device) and the
    batch when all have converged or after max_iter iterations.
    Returns (x [B, P], iterations run, converged [B] bool).
    """
    tiny = torch.finfo(b.dtype).tiny
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()  # residual and search direction (x0 = 0)
    rs = (r * r).sum(-1)  # [B]
    stop = (tol * tol) * rs  # [B] squared residual norm to reach
    done = rs <= stop  # b = 0 is solved by x = 0
    iterations = 0
    # One host sync per iteration to leave the loop early; at D + 1 iterations that is cheap.
    while iterations < max_iter and not bool(done.all()):
        mp = matvec(p)  # [B, P]
        step = torch.where(done, torch.zeros_like(rs), rs / (p * mp).sum(-1).clamp_min(tiny))  # [B]
        x = x + step[:, None] * p
        r = r - step[:, None] * mp
        rs_new = (r * r).sum(-1)
        p = torch.where(done[:, None], p, r + (rs_new / rs.clamp_min(tiny))[:, None] * p)
        rs = torch.where(done, rs, rs_new)
        done = done | (rs <= stop)
        iterations += 1
    return x, iterations, done


class _LowRankSolve(torch.autograd.Function):
    """s* = (A Aᵀ + λI)⁻¹ U with the implicit-function backward of Eq. 15."""

    @staticmethod
    def forward(ctx, unary, emb, lam, tol, max_iter):
        s, iterations, converged = conjugate_gradient(lambda v: low_rank_matvec(emb, v, lam), unary, tol, max_iter)
        ctx.save_for_backward(emb, s)
        ctx.settings = (lam, tol, max_iter)
        stats = torch.tensor([iterations, int(converged.all())], device=unary.device)
        ctx.mark_non_differentiable(stats)
        return s, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_s, _grad_stats):
        emb, s = ctx.saved_tensors
        lam, tol, max_iter = ctx.settings
        grad_u, _, _ = conjugate_gradient(lambda v: low_rank_matvec(emb, v, lam), grad_s, tol, max_iter)  # [B, P]
        grad_emb = None
        if ctx.needs_input_grad[1]:
            # -(g s*ᵀ + s* gᵀ) A without the P×P outer products: [B, P, 1] * [B, 1, D]
            at_s = torch.einsum("bpd,bp->bd", emb, s)  # [B, D]
            at_g = torch.einsum("bpd,bp->bd", emb, grad_u)  # [B, D]
            grad_emb = -(grad_u[:, :, None] * at_s[:, None, :] + s[:, :, None] * at_g[:, None, :])  # [B, P, D]
        return grad_u, grad_emb, None, None, None


def gcrf_solve(unary: torch.Tensor, emb: torch.Tensor, lam: float, tol: float = 1e-5, max_iter: int = 100):
    """Differentiable s* = (A Aᵀ + λI)⁻¹ U for unary U [B, P] and embeddings A [B, P, D].

    Returns (s* [B, P], iterations of the forward solve, whether every example converged).
    """
    if unary.dim() != 2 or emb.dim() != 3 or emb.shape[:2] != unary.shape:
        raise ValueError(f"expected unary [B, P] and embeddings [B, P, D], got {tuple(unary.shape)} "
                         f"and {tuple(emb.shape)}")
    if lam <= 0:
        raise ValueError(f"lam must be > 0 (it makes the system positive definite), got {lam}")
    s, stats = _LowRankSolve.apply(unary, emb, float(lam), float(tol), int(max_iter))
    return s, int(stats[0]), bool(stats[1])


class GCRFInference:
    """Prediction for the Gaussian CRF: foreground probabilities σ(s*) (the two-class softmax of
    Eq. 14), s* solved by CG with the model's settings (λ, tolerance and iteration cap define the
    model's output in training as well, so they live in the model config)."""

    def __call__(self, model, feats, y0=None) -> InferenceResult:
        with torch.no_grad():
            s, iterations, converged = feats.solve()  # [B, H, W]
        done = torch.full((s.shape[0],), converged, dtype=torch.bool, device=s.device)
        # F(s*) = ½ Uᵀs* at the maximum of Eq. 9 (the score of the returned solution)
        score = 0.5 * (feats.unary * s).flatten(1).sum(1)  # [B]
        return InferenceResult(torch.sigmoid(s), iterations, done, score)
