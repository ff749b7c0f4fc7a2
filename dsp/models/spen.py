"""Structured prediction energy networks (Belanger & McCallum 2016) and the MLP baseline.

E_x(ȳ) = -Σ_i ȳ_i b_iᵀF(x)  +  E_global(ȳ [, F(x)])            (Eq. 4-6; prediction minimises E)

The local term is written as a negative score so that b_iᵀF(x) are ordinary logits: the same
numbers train the MLP baseline with a per-label logistic loss and initialise SPEN inference.
A SPEN without a global energy *is* the MLP baseline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from dsp import interfaces as I
from dsp.nn.mlp import MLP, Activation, make_activation
from dsp.nn.smooth import SoftAbs
from dsp.schema import Positive, Size

# g'(h) of the activations a global energy may use, for the hand-written ∂E/∂ȳ (fast inference).
_DERIVATIVES = {
    nn.Softplus: lambda m, h: torch.sigmoid(m.beta * h),  # past torch's linear threshold σ(βh) = 1 in float
    nn.ReLU: lambda m, h: (h > 0).to(h.dtype),
    nn.LeakyReLU: lambda m, h: torch.where(h > 0, 1.0, m.negative_slope).to(h.dtype),
    nn.Tanh: lambda m, h: 1 - torch.tanh(h) ** 2,
    nn.Sigmoid: lambda m, h: torch.sigmoid(h) * torch.sigmoid(-h),
    nn.Identity: lambda m, h: torch.ones_like(h),
    nn.Hardtanh: lambda m, h: ((h > m.min_val) & (h < m.max_val)).to(h.dtype),
    SoftAbs: lambda m, h: 0.5 * (torch.sigmoid(m.beta * h) - torch.sigmoid(-m.beta * h)),
}


@dataclass
class SpenFeatures:
    """What inference needs from x, computed once per batch: F(x) [B, f] and local logits [B, L]."""

    features: torch.Tensor
    logits: torch.Tensor

    def detach(self) -> "SpenFeatures":
        return SpenFeatures(self.features.detach(), self.logits.detach())

    def take(self, index: torch.Tensor) -> "SpenFeatures":
        """The features of a subset of the batch."""
        return SpenFeatures(self.features[index], self.logits[index])


class LocalEnergy(nn.Module):
    """Per-label linear models on the features: logits_i = b_iᵀF(x) + a_i."""

    def __init__(self, in_features: Size, num_labels: Size):
        super().__init__()
        self.linear = nn.Linear(in_features, num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)  # [B, L]


class GlobalEnergy(nn.Module):
    """Label energy c2ᵀ g(C1 ȳ + c1) (Eq. 5), optionally deeper.

    `measurements` is the number of rows of C1; `hidden` adds further layers after it.
    `conditional=True` gives Eq. 6, d2ᵀ g(D1 [ȳ; F(x)]): label interactions that depend on x.
    """

    def __init__(
        self,
        num_labels: Size,
        measurements: Size = 15,
        hidden: Sequence[Size] = (),
        activation: Activation = "softplus",
        init_scale: float = 1.0,
        conditional: bool = False,
        num_features: Size | None = None,
    ):
        super().__init__()
        if conditional and not num_features:
            raise ValueError("a conditional global energy needs num_features")
        self.num_labels, self.conditional = num_labels, conditional
        self.measure = nn.Linear(num_labels + (num_features if conditional else 0), measurements)  # C1
        self.activation = make_activation(activation)
        self.deeper = MLP(measurements, hidden, activation=activation)
        self.out = nn.Linear(self.deeper.out_features, 1, bias=False)  # c2
        with torch.no_grad():
            self.out.weight.mul_(init_scale)

    def forward(self, y: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        inputs = torch.cat([y, features], dim=-1) if self.conditional else y
        h = self.activation(self.measure(inputs))
        return self.out(self.deeper(h)).squeeze(-1)  # [B]

    def _layers(self) -> list[nn.Module]:
        return [self.measure, self.activation, *self.deeper.net, self.out]

    def has_analytic_gradient(self) -> bool:
        """True when every layer has a hand-written derivative here (no active dropout)."""
        for layer in self._layers():
            if isinstance(layer, nn.Dropout):
                if self.training and layer.p > 0:
                    return False
            elif not isinstance(layer, nn.Linear) and type(layer) not in _DERIVATIVES:
                return False
        return True

    def value_and_grad(self, y: torch.Tensor, features: torch.Tensor | None = None):
        """E_global(ȳ) [B] and ∂E_global/∂ȳ [B, L] by a hand-written backward pass, without autograd:
        one matrix product per layer each way, which is what makes gradient inference cheap
        (check has_analytic_gradient() first)."""
        h = torch.cat([y, features], dim=-1) if self.conditional else y
        pre_activations = []  # (layer, its input) for the non-linear layers; (layer, None) for Linear
        for layer in self._layers():
            if isinstance(layer, nn.Dropout):
                continue  # identity in eval mode; has_analytic_gradient refuses active dropout
            pre_activations.append((layer, None if isinstance(layer, nn.Linear) else h))
            h = layer(h)
        grad = torch.ones_like(h)  # [B, 1]
        for layer, pre in reversed(pre_activations):
            grad = grad @ layer.weight if pre is None else grad * _DERIVATIVES[type(layer)](layer, pre)
        return h.squeeze(-1), grad[:, : self.num_labels]

    @property
    def measurement_matrix(self) -> torch.Tensor:
        """The label columns of C1 [measurements, L] (SPEN Figure 1)."""
        return self.measure.weight[:, : self.num_labels]


class SPEN(I.Model):
    """Feature network + local energy + optional global energy; see the module docstring."""

    parts = ("feature_net", "local_energy", "global_energy")  # the children a training stage may name
    outputs = frozenset({I.MULTILABEL})
    provides = frozenset({I.ENERGY, I.LOCAL, I.LOCAL_LOGITS, I.VALUE, I.SCALABLE_LOCAL})
    y_parts = ("global_energy",)  # the parts that see ȳ (twice differentiable for unrolled learning)

    def __init__(self, num_labels: Size, feature_net: nn.Module, local_energy: Callable[..., nn.Module],
                 global_energy: Callable[..., nn.Module] | None = None, unary_scale: Positive = 1.0):
        """`local_energy` and `global_energy` are factories (Hydra `_partial_` nodes) that get the
        sizes wired in here, so a config never repeats the feature width."""
        super().__init__()
        width = feature_net.out_features
        self.feature_net = feature_net
        self.local_energy = local_energy(in_features=width, num_labels=num_labels)
        self.global_energy = None if global_energy is None else global_energy(num_labels=num_labels, num_features=width)
        # α multiplies the local energy (the scaling paper's §5 on a SPEN); trainer.online_scaling
        # re-chooses it every epoch. A buffer: checkpoints keep it.
        self.register_buffer("unary_scale", torch.tensor(float(unary_scale)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "unary_scale", torch.tensor(1.0))  # checkpoints from before α existed
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def parts_for(cls, config) -> tuple[str, ...] | None:
        own = super().parts_for(config)  # None for a subclass without a list of its own
        return own if own is None or config.get("global_energy", True) is not None else own[:2]  # the MLP

    @classmethod
    def structured(cls, config) -> bool:
        return config.get("global_energy", True) is not None  # the MLP baseline reads its logits

    @property
    def is_structured(self) -> bool:
        """False for the MLP baseline, whose minimiser is read off the logits."""
        return self.global_energy is not None

    def features(self, x: torch.Tensor, lengths=None) -> SpenFeatures:
        f = self.feature_net(x)  # [B, f]
        return SpenFeatures(f, self.unary_scale * self.local_energy(f))  # logits [B, L], scaled by α

    def energy(self, y: torch.Tensor, feats: SpenFeatures) -> torch.Tensor:
        e = -(y * feats.logits).sum(-1)  # [B]
        if self.global_energy is not None:
            e = e + self.global_energy(y, feats.features)
        return e

    def score(self, y: torch.Tensor, feats: SpenFeatures) -> torch.Tensor:
        """-E_x(ȳ) [B], read as the pre-sigmoid value of ȳ: the value objective trains a SPEN to
        rank outputs by their task score (a deep value network of SPEN's shape)."""
        return -self.energy(y, feats)

    def has_analytic_gradient(self) -> bool:
        return self.global_energy is None or self.global_energy.has_analytic_gradient()

    def energy_and_grad(self, y: torch.Tensor, feats: SpenFeatures):
        """E_x(ȳ) [B] and ∂E/∂ȳ [B, L] in closed form (see has_analytic_gradient); no graph is built."""
        with torch.no_grad():
            local = -torch.linalg.vecdot(y, feats.logits)  # [B]
            if self.global_energy is None:
                return local, -feats.logits
            e_global, g_global = self.global_energy.value_and_grad(y, feats.features)
            return local + e_global, g_global - feats.logits

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """E_x(ȳ) [B] in one call (features are usually computed once and reused instead)."""
        return self.energy(y, self.features(x))

    def local_probs(self, feats: SpenFeatures) -> torch.Tensor:
        return torch.sigmoid(feats.logits)

    def local_logits(self, feats: SpenFeatures) -> torch.Tensor:
        return feats.logits  # [B, L]

    @torch.no_grad()
    def images(self) -> dict[str, torch.Tensor]:
        """The global energy's measurement matrix C1 [M, L] (SPEN Figure 1)."""
        if self.global_energy is None:
            return {}
        c1 = self.global_energy.measurement_matrix.detach().float().cpu()  # [M, L]
        return {"global_energy_C1": (c1 - c1.min()) / (c1.max() - c1.min()).clamp_min(1e-12)}
