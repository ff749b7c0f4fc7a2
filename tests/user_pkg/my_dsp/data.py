"""A user's data loader: multi-label examples from CSV files whose last `num_labels` columns are the
0/1 labels, a validation split held out of the training file."""
from __future__ import annotations

import numpy as np
import torch

from dsp.data.splits import MultiLabelSplits, holdout
from dsp.errors import DspError


def _read(path: str, num_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        table = np.loadtxt(path, delimiter=",", ndmin=2)
    except (OSError, ValueError) as err:
        raise DspError(f"data: cannot read {path}: {err}") from None
    return torch.tensor(table[:, :-num_labels], dtype=torch.float32), torch.tensor(table[:, -num_labels:], dtype=torch.float32)


def load_csv(train: str, test: str, num_labels: int, val_fraction: float = 0.2, seed: int = 0) -> MultiLabelSplits:
    x, y = _read(train, num_labels)
    train_split, val_split = holdout(x, y, val_fraction, seed)
    return MultiLabelSplits(train_split, val_split, torch.utils.data.TensorDataset(*_read(test, num_labels)))
