"""The three splits every task trains on, and the held-out validation split carved from train."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import TensorDataset

from dsp import interfaces as I
from dsp.data.preprocessing import InputTransform


class NamedSplits(I.Dataset):
    """`.split(name)` for the dataclasses below, whose fields train, val, test hold the splits."""

    def split(self, name: str) -> TensorDataset:
        if name not in ("train", "val", "test"):
            from dsp.errors import DspError

            raise DspError(f"unknown split {name!r}: choose one of train, val, test")
        return getattr(self, name)


def data_dims(data) -> dict:
    """The data's sizes the model's YAML reads through ${dims.*}: features, labels and the size of
    every vocabulary (words, pos, chars for text) as dims.num_words, dims.num_pos, ..."""
    dims = {"num_features": data.num_features, "num_labels": data.num_labels}
    dims.update({f"num_{name}": len(items) for name, items in (data.vocab or {}).items()})
    return dims


@dataclass
class MultiLabelSplits(NamedSplits):
    """Dense features `x [N, D]` (float32) and 0/1 labels `y [N, L]` (float32) per split."""

    output, input = I.MULTILABEL, I.VECTORS

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    label_names: list[str] = field(default_factory=list)
    # what was fitted on the training features and applied to every split (missing values filled,
    # standardisation); checkpoints keep it, so predictions for new inputs apply it too
    input_transform: "InputTransform | None" = None

    @property
    def num_features(self) -> int:
        return self.train.tensors[0].shape[1]

    @property
    def num_labels(self) -> int:
        return self.train.tensors[1].shape[1]


def min_examples(fraction: float) -> int:
    """The fewest examples from which `holdout(..., fraction, ...)` keeps at least one for training
    and one for validation."""
    n = max(2, int(0.5 / (1.0 - fraction)) - 1)
    while n - max(1, int(round(fraction * n))) < 1:
        n += 1
    return n


def holdout(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int, source: str | None = None,
            key: str = "data.val_fraction"):
    """Split (x, y) into (train, val) with a fixed permutation; `fraction` goes to val.

    Too few examples to keep one on each side is refused, naming `source` (the file they came from)
    and the smallest count that works; `key` is the setting that holds `fraction`, for messages."""
    from dsp.errors import DspError

    if not 0.0 < fraction < 1.0:
        raise DspError(f"{key} must be in (0, 1), got {fraction}")
    need = min_examples(fraction)
    if x.shape[0] < need:
        raise DspError(f"{source + ': ' if source else ''}{x.shape[0]} example(s) are too few to hold out "
                       f"{key}={fraction:g}: at least {need} are needed (one or more to validate, one or more "
                       f"to train); give more examples or change {key}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    n_val = max(1, int(round(fraction * x.shape[0])))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx])
