"""Energies for image denoising (End-to-end SPENs §6.1) and the feed-forward baseline.

    E_x(y) = ‖y - x‖² + 2σ² R(y),     R(y) = -log P(y)                          (Eq. 12)

x is the noisy image [B, H, W], y the estimate. This is Eq. 12 exactly as the paper writes it,
i.e. ‖y - x‖²/(2σ²) + R(y) multiplied by 2σ²: the same minimiser, but the data term's curvature is
2 whatever σ is, so gradient step sizes η_t are in natural units (≈ 0.1-0.5) and a trainable σ²
only weighs the prior. σ² is trainable (kept positive through its log).

Priors R(y), both summed over the image so that their gradient per pixel is on the data term's
scale (a spatial *average* would shrink it by H·W, which the learned weights would have to undo):
  FieldOfExperts  Σ_k Σ_p SoftAbs((f_k * y)_p)     (ℓ1 field of experts, Eq. 13-14; K filters)
  DeepPrior       conv 7×7×32, SoftPlus, conv 7×7×32, SoftPlus, conv 1×1, summed   (Eq. 15)
`convex: true` turns DeepPrior into an input-convex network (Amos et al. 2017): weights after the
first layer are used through max(w, 0) and the activations are convex and non-decreasing, so R is
convex in y. Convolutions pad by reflection, so the image border is not treated as an edge.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsp.errors import DspError
from dsp import interfaces as I
from dsp.nn.mlp import Activation, make_activation
from dsp.nn.smooth import softabs
from dsp.schema import NonNegative, Positive, Size


@dataclass
class NoisyImage:
    """What inference needs from x: the noisy image itself (the feature network is the identity)."""

    noisy: torch.Tensor  # [B, H, W]

    def detach(self) -> "NoisyImage":
        return NoisyImage(self.noisy.detach())


def _same_pad(y: torch.Tensor, kernel: int) -> torch.Tensor:
    """[B, C, H, W] reflect-padded so that a kernel×kernel convolution keeps H×W."""
    p = kernel // 2
    return F.pad(y, (p, p, p, p), mode="reflect") if p > 0 else y


class GaussianLikelihood(nn.Module):
    """‖y - x‖² and the trainable noise variance σ² that weighs the prior."""

    def __init__(self, sigma: Positive = 25 / 255, learn_sigma: bool = True):
        super().__init__()
        if sigma <= 0:
            raise DspError(f"model.likelihood.sigma must be > 0, got {sigma}")
        value = torch.tensor(math.log(sigma**2))
        if learn_sigma:
            self.log_sigma2 = nn.Parameter(value)
        else:  # a buffer: stages switch requires_grad of whole modules on, which must not train it
            self.register_buffer("log_sigma2", value)

    @property
    def sigma2(self) -> torch.Tensor:
        return self.log_sigma2.exp()

    def forward(self, y: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        return ((y - noisy) ** 2).flatten(1).sum(-1)  # [B]


class FieldOfExperts(nn.Module):
    """R(y) = Σ_k Σ_p SoftAbs_β((f_k * y)_p), K learned filters of size kernel×kernel."""

    def __init__(self, filters: Size = 24, kernel: Size = 5, beta: Positive = 25.0, init_scale: NonNegative = 0.1):
        super().__init__()
        weight = torch.randn(filters, 1, kernel, kernel) * init_scale
        # Zero-mean filters: a constant image costs nothing, so the prior starts as an edge model.
        self.filters = nn.Parameter(weight - weight.mean(dim=(2, 3), keepdim=True))
        self.kernel, self.beta = kernel, beta

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        responses = F.conv2d(_same_pad(y.unsqueeze(1), self.kernel), self.filters)  # [B, K, H, W]
        return softabs(responses, self.beta).flatten(1).sum(-1)  # [B]


class DeepPrior(nn.Module):
    """R(y) = Σ_p conv1×1(g(conv(g(conv(y)))))_p  (Eq. 15), g a smooth activation."""

    def __init__(self, channels: Size = 32, kernel: Size = 7, activation: Activation = "softplus:25",
                 convex: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, kernel)
        self.conv2 = nn.Conv2d(channels, channels, kernel)
        self.out = nn.Conv2d(channels, 1, 1)
        self.act1, self.act2 = make_activation(activation), make_activation(activation)
        self.kernel, self.convex = kernel, convex
        if convex and activation.partition(":")[0] not in ("softplus", "relu"):
            raise DspError(f"model.prior.convex=true needs a convex non-decreasing activation (softplus), got {activation!r}")

    def _weight(self, conv: nn.Conv2d) -> torch.Tensor:
        return conv.weight.clamp_min(0) if self.convex else conv.weight

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.conv1(_same_pad(y.unsqueeze(1), self.kernel)))  # [B, C, H, W]
        h = self.act2(F.conv2d(_same_pad(h, self.kernel), self._weight(self.conv2), self.conv2.bias))
        return F.conv2d(h, self._weight(self.out), self.out.bias).flatten(1).sum(-1)  # [B]


class DenoisingEnergy(I.Model):
    """E_x(y) = ‖y - x‖² + 2σ² R(y); prediction minimises it from y_0 = x."""

    parts = ("likelihood", "prior")  # the children a training stage may name
    y_parts = ("prior",)  # what must be twice differentiable in y for unrolled learning
    inputs = frozenset({I.IMAGES})
    relaxation = "real"  # images: unconstrained values
    outputs = frozenset({I.IMAGE})
    provides = frozenset({I.ENERGY, I.LOCAL})

    def __init__(self, prior: nn.Module, likelihood: nn.Module | None = None):
        super().__init__()
        self.likelihood = likelihood if likelihood is not None else GaussianLikelihood()
        self.prior = prior

    def features(self, x: torch.Tensor, lengths=None) -> NoisyImage:
        return NoisyImage(x)

    def energy(self, y: torch.Tensor, feats: NoisyImage) -> torch.Tensor:
        return self.likelihood(y, feats.noisy) + 2 * self.likelihood.sigma2 * self.prior(y)  # [B]

    def local_probs(self, feats: NoisyImage) -> torch.Tensor:
        """Init(F(x)): the noisy image, the minimiser of the data term alone."""
        return feats.noisy


class FeedForwardDenoiser(I.Model):
    """The baseline of §6.1.3: the deep prior's convolutions without the pooling, predicting y
    from x in one pass (as y = x + residual when `residual`, the usual denoising CNN form)."""

    parts = ("net",)  # the children a training stage may name
    inputs = frozenset({I.IMAGES})
    relaxation = "real"  # images: unconstrained values
    outputs = frozenset({I.IMAGE})
    provides = frozenset({I.LOCAL, I.LOCAL_LOGITS})
    structured = classmethod(lambda cls, config: False)  # predicted by its local term alone

    def __init__(self, channels: Size = 32, kernel: Size = 7, activation: Activation = "softplus:25",
                 residual: bool = True):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReflectionPad2d(kernel // 2), nn.Conv2d(1, channels, kernel), make_activation(activation),
            nn.ReflectionPad2d(kernel // 2), nn.Conv2d(channels, channels, kernel), make_activation(activation),
            nn.Conv2d(channels, 1, 1),
        )
        self.residual = residual
        if residual:  # start as the identity (y = x) rather than from a random correction
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def features(self, x: torch.Tensor, lengths=None) -> torch.Tensor:
        out = self.net(x.unsqueeze(1)).squeeze(1)  # [B, H, W]
        return x + out if self.residual else out

    def local_logits(self, prediction: torch.Tensor) -> torch.Tensor:
        return prediction  # real-valued output: the scores are the prediction

    def local_probs(self, prediction: torch.Tensor) -> torch.Tensor:
        return prediction
