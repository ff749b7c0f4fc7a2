"""Mean-field marginals for the linear-chain CRF (Shevchenko & Osokin 2019, Eq. 6).

    log q_j(y_j) = U[j, y_j] + E_{q_{j-1}} W(y_{j-1}, y_j) + E_{q_{j+1}} W(y_j, y_{j+1}) + C_j

Same conventions as `dsp.inference.chain` (unary [B, T, K]; pairwise [K, K] or [B, T-1, K, K];
lengths [B]). Exact marginals are tractable on a chain; this approximation is here because the
paper trains with it too (and it is the only option on loopier graphs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsp.inference.chain import _check, _clean
from dsp.inference.full_precision import full_precision


def _neighbour_messages(q: torch.Tensor, pairwise: torch.Tensor) -> torch.Tensor:
    """Σ over neighbours of E_q[W] for every position -> [B, T, K]; padded q is zero, so padding sends nothing."""
    if pairwise.dim() == 2:
        from_right = q[:, 1:] @ pairwise.T  # [B, T-1, K]: Σ_l W(k, l) q_{j+1}(l), to positions 0..T-2
        from_left = q[:, :-1] @ pairwise  # [B, T-1, K]: Σ_k q_{j-1}(k) W(k, l), to positions 1..T-1
    else:
        from_right = torch.einsum("btkl,btl->btk", pairwise, q[:, 1:])  # [B, T-1, K]
        from_left = torch.einsum("btkl,btk->btl", pairwise, q[:, :-1])  # [B, T-1, K]
    return F.pad(from_right, (0, 0, 0, 1)) + F.pad(from_left, (0, 0, 1, 0))  # [B, T, K]


@full_precision  # fp32 under bf16/fp16 autocast: softmax of accumulated messages, sweep after sweep
def mean_field_marginals(unary, pairwise, lengths, sweeps: int = 5, init=None) -> torch.Tensor:
    """Approximate unary marginals q -> [B, T, K] (zero at padded positions), differentiable.

    Schedule: alternating "checkerboard" updates, all even positions at once, then all odd ones.
    On a chain the even positions are conditionally independent given the odd ones, so each half
    step is an exact block coordinate-ascent step on the mean-field objective (it never diverges
    or oscillates, unlike undamped fully parallel updates). One sweep = both half steps. Plain
    tensor ops throughout, so training backpropagates through the unrolled sweeps.
    """
    lengths, mask = _check(unary, pairwise, lengths)
    unary, pairwise = _clean(unary, pairwise, mask)
    B, T, K = unary.shape
    valid = mask[..., None]  # [B, T, 1]
    if init is None:
        q = torch.softmax(unary, dim=-1)  # [B, T, K]: the pairwise-free solution
    elif init.shape != unary.shape:
        raise ValueError(f"init must have the shape of unary {tuple(unary.shape)}, got {tuple(init.shape)}")
    else:
        q = init.to(unary)
    q = torch.where(valid, q, torch.zeros_like(q))  # [B, T, K]
    parity = torch.arange(T, device=unary.device) % 2  # [T]
    for _ in range(sweeps):
        for p in (0, 1):
            new = torch.softmax(unary + _neighbour_messages(q, pairwise), dim=-1)  # [B, T, K]
            q = torch.where(valid & (parity == p)[None, :, None], new, q)
    return q  # [B, T, K]
