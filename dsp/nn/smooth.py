"""Smooth stand-ins for non-smooth functions, so energies stay twice differentiable in ȳ."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def softabs(x: torch.Tensor, beta: float = 25.0) -> torch.Tensor:
    """0.5·SoftPlus_β(x) + 0.5·SoftPlus_β(-x)  (End-to-end SPENs Eq. 14): |x| smoothed at 0, with
    curvature β/4 there (not |x|/2 + log(1+e^{-β|x|})/β: autograd's abs would zero the second
    derivative at exactly 0)."""
    return 0.5 * (F.softplus(x, beta=beta) + F.softplus(-x, beta=beta))


class SoftAbs(nn.Module):
    def __init__(self, beta: float = 25.0):
        super().__init__()
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softabs(x, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"
