"""A small UNet-like fully convolutional network (Shevchenko & Osokin 2019, §6.1; Ronneberger et
al. 2015): conv blocks (conv-BN-ReLU ×2), max-pool down, bilinear up, skip connections between
encoder and decoder blocks of the same resolution.

With `out_channels` it ends in a 1×1 regression layer (the unary network: one foreground score
per pixel); with `out_channels=None` it stops at the last decoder block, whose `base_width`
channels are the pixel embeddings of the Gaussian CRF's pairwise term ("similar to the unary
network, but without the regression layer at the end").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsp import interfaces as I

from dsp.errors import DspError
from dsp.schema import Count, Size


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """(3×3 conv, BN, ReLU) ×2; the convs have no bias since BN follows."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """images [B, C, H, W] -> [B, out_channels (or base_width), H, W].

    `depth` is the number of 2× downsamplings (H and W need not be divisible by 2^depth: the
    upsampling follows each skip connection's size); block i has base_width·2^i channels.
    """

    inputs = frozenset({I.IMAGES})  # what dsp.compat matches against the data's input kind

    def __init__(self, in_channels: Size = 3, out_channels: Size | None = 1, base_width: Size = 16, depth: Count = 3):
        super().__init__()
        if depth < 0 or base_width < 1:
            raise DspError(f"UNet needs depth >= 0 and base_width >= 1, got depth={depth}, base_width={base_width}")
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([conv_block(in_channels, widths[0])] +
                                  [conv_block(widths[i - 1], widths[i]) for i in range(1, depth + 1)])
        self.up = nn.ModuleList([conv_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(base_width, out_channels, 1) if out_channels else None
        self.out_channels = out_channels or base_width

    def forward(self, x: torch.Tensor, lengths=None) -> torch.Tensor:
        """`lengths` is accepted (the CRF unary-network signature) and ignored."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))  # [B, w_i, H/2^i, W/2^i]
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))  # [B, w_i, ...] at the skip's resolution
        return x if self.head is None else self.head(x)
