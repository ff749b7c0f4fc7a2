"""Exact Gaussian CRF inference by conjugate gradients (Shevchenko & Osokin 2019, Eq. 12 and 15).

The system is the two-class reduction of the class-agnostic Potts model (Eq. 16, see
dsp/models/gcrf.py): per image (λ_eff I - A Aᵀ) d = U on the score difference d, with pixel
embeddings A [P, D] (D << P) and a per-image λ_eff = λ_max(Aᵀ A)·(1 + margin) + λ. The non-zero
eigenvalues of A Aᵀ (P×P) are those of the D×D Gram matrix Aᵀ A, so λ_max is exact and cheap
(eigvalsh, differentiable) and the system is positive definite with smallest eigenvalue >= λ > 0.
The P×P matrix is never formed: one matvec is v ↦ λ_eff v - A(Aᵀv), O(P·D), batched over
images. The matrix has at most D + 1 distinct eigenvalues, so CG converges in at most D + 1
iterations in exact arithmetic.

The backward pass does not unroll CG. With M = λ_eff I - A Aᵀ symmetric, Eq. 15 gives
    g = ∂L/∂U = M⁻¹ ∂L/∂d          (a second CG solve)
    ∂L/∂M = -g dᵀ,   so   ∂L/∂λ_eff = tr(∂L/∂M) = -⟨g, d⟩
    and, through M = λ_eff I - A Aᵀ,   ∂L/∂A = -(∂L/∂M + ∂L/∂Mᵀ) A = (g dᵀ + d gᵀ) A.
λ_eff is an input of the autograd Function, so its own dependence on A (through eigvalsh) is
added by autograd.
"""
from __future__ import annotations

from typing import Callable

import torch

from dsp import interfaces as I
from dsp.inference.full_precision import full_precision
from dsp.inference.gradient import InferenceResult


def low_rank_matvec(emb: torch.Tensor, v: torch.Tensor, lam) -> torch.Tensor:
    """(λ_eff I - A Aᵀ) v for embeddings A [B, P, D], vectors v [B, P] and λ_eff a float or [B]
    -> [B, P]."""
    lam = torch.as_tensor(lam, dtype=v.dtype, device=v.device)
    if lam.dim() == 1:
        lam = lam[:, None]
    return lam * v - torch.einsum("bpd,bd->bp", emb, torch.einsum("bpd,bp->bd", emb, v))


def top_gram_eigenvalue(emb: torch.Tensor) -> torch.Tensor:
    """λ_max(A Aᵀ) = λ_max(Aᵀ A) per image for embeddings A [B, P, D] -> [B] (differentiable).

    The D×D Gram matrix and its eigenvalues are computed in float64: the system's smallest
    eigenvalue λ is a difference λ_eff - λ_max, so λ_max must be accurate relative to λ_eff."""
    a = emb.double()
    gram = a.transpose(1, 2) @ a  # [B, D, D]
    return torch.linalg.eigvalsh(gram)[:, -1].to(emb.dtype)  # ascending order


def effective_lambda(emb: torch.Tensor, lam: float, margin: float = 0.0) -> torch.Tensor:
    """λ_eff = λ_max(Aᵀ A)·(1 + margin) + λ per image [B]: λ_eff I - A Aᵀ has smallest eigenvalue
    >= λ (> 0 required)."""
    return top_gram_eigenvalue(emb) * (1.0 + margin) + lam


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


class _PottsSolve(torch.autograd.Function):
    """d* = (λ_eff I - A Aᵀ)⁻¹ U with the implicit-function backward of Eq. 15; λ_eff [B] is an
    input with its own gradient -⟨g, d*⟩."""

    @staticmethod
    def forward(ctx, unary, emb, lam_eff, tol, max_iter):
        d, iterations, converged = conjugate_gradient(lambda v: low_rank_matvec(emb, v, lam_eff), unary, tol, max_iter)
        ctx.save_for_backward(emb, lam_eff, d)
        ctx.settings = (tol, max_iter)
        stats = torch.tensor([iterations, int(converged.all())], device=unary.device)
        ctx.mark_non_differentiable(stats)
        return d, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_d, _grad_stats):
        emb, lam_eff, d = ctx.saved_tensors
        tol, max_iter = ctx.settings
        g, _, _ = conjugate_gradient(lambda v: low_rank_matvec(emb, v, lam_eff), grad_d, tol, max_iter)  # [B, P]
        grad_emb = grad_lam = None
        if ctx.needs_input_grad[1]:
            # (g dᵀ + d gᵀ) A without the P×P outer products: [B, P, 1] * [B, 1, D]
            at_d = torch.einsum("bpd,bp->bd", emb, d)  # [B, D]
            at_g = torch.einsum("bpd,bp->bd", emb, g)  # [B, D]
            grad_emb = g[:, :, None] * at_d[:, None, :] + d[:, :, None] * at_g[:, None, :]  # [B, P, D]
        if ctx.needs_input_grad[2]:
            grad_lam = -(g * d).sum(-1)  # [B]
        return g, grad_emb, grad_lam, None, None


@full_precision  # fp32 under bf16/fp16 autocast: CG's residual tests (tol 1e-5) and its backward solve
def potts_solve(unary: torch.Tensor, emb: torch.Tensor, lam_eff: torch.Tensor, tol: float = 1e-5,
                max_iter: int = 100):
    """Differentiable d* = (λ_eff I - A Aᵀ)⁻¹ U for a given λ_eff [B] (which must exceed
    λ_max(A Aᵀ)); returns (d* [B, P], iterations, whether every example converged)."""
    if unary.dim() != 2 or emb.dim() != 3 or emb.shape[:2] != unary.shape:
        raise ValueError(f"expected unary [B, P] and embeddings [B, P, D], got {tuple(unary.shape)} "
                         f"and {tuple(emb.shape)}")
    lam_eff = torch.as_tensor(lam_eff, dtype=unary.dtype, device=unary.device).expand(unary.shape[0])
    d, stats = _PottsSolve.apply(unary, emb, lam_eff, float(tol), int(max_iter))
    return d, int(stats[0]), bool(stats[1])


@full_precision  # fp32 before λ_eff is formed: λ_eff - λ_max(AAᵀ) (the smallest eigenvalue) is a small difference
def gcrf_solve(unary: torch.Tensor, emb: torch.Tensor, lam: float, tol: float = 1e-5, max_iter: int = 100,
               margin: float = 0.0):
    """Differentiable d* = (λ_eff I - A Aᵀ)⁻¹ U for unary U [B, P] and embeddings A [B, P, D], with
    λ_eff = λ_max(Aᵀ A)·(1 + margin) + λ per image (gradients reach A through λ_eff too).

    Returns (d* [B, P], iterations of the forward solve, whether every example converged).
    """
    if unary.dim() != 2 or emb.dim() != 3 or emb.shape[:2] != unary.shape:
        raise ValueError(f"expected unary [B, P] and embeddings [B, P, D], got {tuple(unary.shape)} "
                         f"and {tuple(emb.shape)}")
    if lam <= 0:
        raise ValueError(f"lam must be > 0 (the smallest eigenvalue of the system), got {lam}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    return potts_solve(unary, emb, effective_lambda(emb, lam, margin), tol, max_iter)


class GCRFInference(I.Inference):
    """Prediction for the Gaussian CRF: foreground probabilities σ(s*) (the two-class softmax of
    Eq. 14), s* solved by CG with the model's settings (λ, margin, tolerance and iteration cap
    define the model's output in training as well, so they live in the model config)."""

    outputs = frozenset({I.MASK})
    needs = frozenset({I.GAUSSIAN_POTENTIALS})

    def __call__(self, model, feats, y0=None) -> InferenceResult:
        with torch.no_grad():
            s, iterations, converged = feats.solve()  # [B, H, W]
        done = torch.full((s.shape[0],), converged, dtype=torch.bool, device=s.device)
        # ½ Uᵀd* = max_d of -½ dᵀ(λ_eff I - A Aᵀ)d + Uᵀd (the score of the returned solution)
        score = 0.5 * (feats.unary * s).flatten(1).sum(1)  # [B]
        return InferenceResult(torch.sigmoid(s), iterations, done, score)
