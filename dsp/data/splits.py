"""The three splits every task trains on, and the held-out validation split carved from train."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import TensorDataset

from dsp import interfaces as I


class NamedSplits(I.Dataset):
    """`.split(name)` for the dataclasses below, whose fields train, val, test hold the splits."""

    def split(self, name: str) -> TensorDataset:
        if name not in ("train", "val", "test"):
            from dsp.errors import DspError

            raise DspError(f"unknown split {name!r}: choose one of train, val, test")
        return getattr(self, name)


@dataclass
class MultiLabelSplits(NamedSplits):
    """Dense features `x [N, D]` (float32) and 0/1 labels `y [N, L]` (float32) per split."""

    output, input = I.MULTILABEL, I.VECTORS

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    label_names: list[str] = field(default_factory=list)

    @property
    def num_features(self) -> int:
        return self.train.tensors[0].shape[1]

    @property
    def num_labels(self) -> int:
        return self.train.tensors[1].shape[1]


def holdout(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int):
    """Split (x, y) into (train, val) with a fixed permutation; `fraction` goes to val."""
    if not 0.0 < fraction < 1.0:
        from dsp.errors import DspError

        raise DspError(f"data.val_fraction must be in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    n_val = max(1, int(round(fraction * x.shape[0])))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx])
