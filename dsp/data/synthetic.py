"""The block-exclusive multi-label task of SPEN §7.3, generated deterministically from a seed.

x ~ N(0, I_64); a fixed Gaussian weight matrix A [64, 16]; z = xA split into 4 blocks of 4 labels;
label j of a block is 1 exactly when z_j is its block's maximum. The weights and every split come
from one seeded generator, so the same config gives the same data on every machine.
"""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from dsp.data.splits import MultiLabelSplits
from dsp.errors import DspError
from dsp.schema import Count, Size


def block_exclusive_labels(z: torch.Tensor, block_size: int) -> torch.Tensor:
    """One-hot of each row-block's argmax: `z [N, L]` -> 0/1 `[N, L]` (L divisible by block_size)."""
    n, num_labels = z.shape
    blocks = z.reshape(n, num_labels // block_size, block_size)  # [N, nb, bs]
    onehot = torch.nn.functional.one_hot(blocks.argmax(-1), block_size)  # [N, nb, bs]
    return onehot.reshape(n, num_labels).float()


def make_block_exclusive(
    num_train: Size = 1500,
    num_val: Size = 500,
    num_test: Size = 10000,
    num_features: Size = 64,
    num_labels: Size = 16,
    block_size: Size = 4,
    seed: Count = 0,
) -> MultiLabelSplits:
    """Generate the synthetic task; validation and test are fresh draws from the same process."""
    if num_labels % block_size:
        raise DspError(f"data.num_labels={num_labels} must be a multiple of data.block_size={block_size}")
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(num_features, num_labels, generator=gen)  # A [D, L]

    def draw(n: int) -> TensorDataset:
        x = torch.randn(n, num_features, generator=gen)
        return TensorDataset(x, block_exclusive_labels(x @ weights, block_size))

    train, val, test = draw(num_train), draw(num_val), draw(num_test)
    return MultiLabelSplits(train, val, test, [f"label{i}" for i in range(num_labels)])
