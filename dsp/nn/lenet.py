"""LeNet-5-like letter classifier (Shevchenko & Osokin 2019, §6.1) applied to every letter of a word."""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from dsp import interfaces as I

from dsp.nn.mlp import Activation, make_activation
from dsp.schema import Range, Rate, Size


class LeNet(nn.Module):
    """conv 10@5×5, ReLU, 2×2 max-pool, conv 20@5×5, ReLU, 2×2 max-pool, FC hidden, ReLU, FC out.

    Input images of any size up to `pad_to` are zero-padded (centred) to pad_to × pad_to, as the
    paper pads the 16×8 OCR letters to 32×32. `out_activation` optionally follows the last layer
    (the scaling paper's Figure 1b compares a ReLU and a sigmoid there). `dropout` acts on the
    hidden layer's activations during training (off by default: the paper names none).
    `out_bias` sets the last layer's initial bias: with a ReLU on top, a positive value keeps every
    letter's scores above zero (and passing gradient) at the start of training.
    """

    def __init__(self, out_features: Size, pad_to: Annotated[int, Range(16)] = 32,  # (16: a 1×1 map after the convs)
                 channels: tuple[Size, Size] = (10, 20), hidden: Size = 140,
                 out_activation: Activation | None = None, dropout: Rate = 0.0,
                 out_bias: float | None = None):
        super().__init__()
        self.pad_to, self.out_features = pad_to, out_features
        c1, c2 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = ((pad_to - 4) // 2 - 4) // 2
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c2 * side * side, hidden),
                                  # ReLU and dropout share one slot so checkpoint keys stay head.1 / head.3
                                  nn.Sequential(nn.ReLU(), nn.Dropout(dropout)),
                                  nn.Linear(hidden, out_features))
        if out_bias is not None:
            nn.init.constant_(self.head[-1].bias, out_bias)
        self.out_activation = make_activation(out_activation) if out_activation else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, H, W] -> scores [N, out_features]."""
        h, w = images.shape[-2:]
        top, left = (self.pad_to - h) // 2, (self.pad_to - w) // 2
        x = F.pad(images, (left, self.pad_to - w - left, top, self.pad_to - h - top)).unsqueeze(1)  # [N, 1, P, P]
        return self.out_activation(self.head(self.conv(x)))


class PerPosition(nn.Module):
    """Apply a per-element network to the valid positions of padded sequences x [B, T, ...] -> [B, T, K].

    Padded positions are skipped (OCR words average ~8 of 14 letters) and get zeros.
    """

    inputs = frozenset({I.IMAGE_SEQUENCES})  # what dsp.compat matches against the data's input kind

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        b, t = x.shape[:2]
        if lengths is None:
            return self.net(x.reshape(b * t, *x.shape[2:])).reshape(b, t, -1)
        mask = torch.arange(t, device=x.device) < lengths.unsqueeze(-1)  # [B, T]
        scores = self.net(x[mask])  # [n_valid, K]
        out = scores.new_zeros(b, t, scores.shape[-1])
        out[mask] = scores
        return out
