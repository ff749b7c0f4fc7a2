"""A SPEN over label sequences (SPEN §3 with per-position outputs, e.g. OCR words):

    E_x(ȳ) = -α Σ_t ȳ_t·u_t(x)  +  Σ_t g(ȳ_{t-w+1}, …, ȳ_t)

ȳ_t is a distribution over the K labels of position t (the relaxation of one-hot labels), u_t the
per-position logits of a unary network (the chain CRF's), and g a small SoftPlus network on each
window of w consecutive relaxed labels: a learned label-n-gram energy, SPEN's global energy made to
slide along a sequence of any length. With w = 2 and one linear layer, g is the chain CRF's pairwise
term; deeper g scores longer and non-linear label patterns. Prediction minimises E by mirror descent
on every position's simplex (inference=mirror: entropic steps, rows stay distributions) or by
unrolled descent (inference=unrolled_gd, softmax link).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from dsp import interfaces as I
from dsp.nn.mlp import MLP, Activation, make_activation
from dsp.schema import Positive, Size


@dataclass
class SequenceFeatures:
    """What inference needs from x: unary logits [B, T, K] (already scaled by α) and lengths [B]."""

    logits: torch.Tensor
    lengths: torch.Tensor

    def detach(self) -> "SequenceFeatures":
        return SequenceFeatures(self.logits.detach(), self.lengths)

    def take(self, index: torch.Tensor) -> "SequenceFeatures":
        return SequenceFeatures(self.logits[index], self.lengths[index])

    @property
    def valid(self) -> torch.Tensor:
        """[B, T] True at each sequence's positions."""
        return torch.arange(self.logits.shape[1], device=self.logits.device) < self.lengths.unsqueeze(-1)


class WindowEnergy(nn.Module):
    """g: a SoftPlus network on the concatenated relaxed labels of a window of `window` positions."""

    def __init__(self, num_labels: Size, window: Size = 2, measurements: Size = 32, hidden: Sequence[Size] = (),
                 activation: Activation = "softplus"):
        super().__init__()
        if window < 1 or measurements < 1:
            from dsp.errors import DspError

            raise DspError(f"model.global_energy: window ({window}) and measurements ({measurements}) must be >= 1")
        self.window = int(window)
        self.measure = nn.Linear(window * num_labels, measurements)
        self.activation = make_activation(activation)
        self.deeper = MLP(measurements, hidden, activation=activation)
        self.out = nn.Linear(self.deeper.out_features, 1, bias=False)

    def forward(self, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Σ over each sequence's windows of g -> [B]; windows reaching before the start see zeros."""
        b, t, k = y.shape
        padded = torch.nn.functional.pad(y, (0, 0, self.window - 1, 0))  # [B, T + w - 1, K]
        windows = padded.unfold(1, self.window, 1).transpose(2, 3).reshape(b, t, self.window * k)  # [B, T, w·K]
        g = self.out(self.deeper(self.activation(self.measure(windows)))).squeeze(-1)  # [B, T]
        return (g * valid.to(g.dtype)).sum(-1)


class SequenceSPEN(I.Model):
    """Unary network + window energy; see the module docstring."""

    parts = ("unary_net", "global_energy")  # the children a training stage may name
    outputs = frozenset({I.SEQUENCE})
    provides = frozenset({I.ENERGY, I.LOCAL, I.LOCAL_LOGITS, I.VALUE, I.SCALABLE_LOCAL})
    relaxation = "simplex"
    y_parts = ("global_energy",)

    @classmethod
    def structured(cls, config) -> bool:
        return config.get("global_energy", True) is not None

    def __init__(self, num_labels: Size, unary_net: nn.Module, global_energy: Callable[..., nn.Module] | None = None,
                 unary_scale: Positive = 1.0):
        """`global_energy` is a factory (a Hydra `_partial_` node) that gets num_labels, or None for
        the unary network alone."""
        super().__init__()
        self.unary_net = unary_net
        self.global_energy = None if global_energy is None else global_energy(num_labels=num_labels)
        self.register_buffer("unary_scale", torch.tensor(float(unary_scale)))

    @property
    def is_structured(self) -> bool:
        return self.global_energy is not None

    def features(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> SequenceFeatures:
        if lengths is None:  # every position of x is a label
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        return SequenceFeatures(self.unary_scale * self.unary_net(x, lengths), lengths)  # [B, T, K]

    def energy(self, y: torch.Tensor, feats: SequenceFeatures) -> torch.Tensor:
        valid = feats.valid
        y = y * valid.unsqueeze(-1).to(y.dtype)  # positions past the end play no part
        e = -(y * feats.logits).sum((1, 2))  # [B]
        if self.global_energy is not None:
            e = e + self.global_energy(y, valid)
        return e

    def score(self, y: torch.Tensor, feats: SequenceFeatures) -> torch.Tensor:
        """-E per position, read as the pre-sigmoid value of ȳ (the value objective): per position so
        that σ(score) can match a per-token accuracy at any length."""
        return -self.energy(y, feats) / feats.lengths.clamp_min(1).to(y.dtype)

    def local_logits(self, feats: SequenceFeatures) -> torch.Tensor:
        return feats.logits  # [B, T, K]

    def local_probs(self, feats: SequenceFeatures) -> torch.Tensor:
        """softmax of the unaries per position [B, T, K] (zero rows past each sequence's end)."""
        return torch.softmax(feats.logits, -1) * feats.valid.unsqueeze(-1).to(feats.logits.dtype)
