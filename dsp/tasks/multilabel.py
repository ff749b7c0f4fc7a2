"""The multi-label output space: decoding the relaxation, metrics, the SSVM surrogate losses."""
from __future__ import annotations

import numpy as np
import torch

from dsp import metrics as M
from dsp import interfaces as I
from dsp.errors import DspError


def decode(soft: torch.Tensor, threshold: float) -> torch.Tensor:
    """Round the relaxed output ȳ [N, L] to 0/1 labels."""
    return (soft >= threshold).to(torch.uint8)


def evaluate(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    return {"example_f1": M.example_f1(pred, target), "hamming": M.hamming(pred, target),
            "empty_predictions": M.empty_rate(pred)}


def tune_threshold(soft: torch.Tensor, target: torch.Tensor, grid=None) -> float:
    """The threshold on ȳ that maximises example F1 on (validation) data (SPEN §7.1)."""
    grid = [round(0.05 * i, 2) for i in range(1, 20)] if grid is None else grid
    scores = [M.example_f1(decode(soft, t), target) for t in grid]
    return float(grid[max(range(len(grid)), key=scores.__getitem__)])


def squared_delta(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Differentiable surrogate of the Hamming loss: Σ_i (ȳ_i - y_i)² -> [B]."""
    return ((y - target) ** 2).sum(-1)


def log_delta(y: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Log-loss surrogate of the Hamming loss: -Σ_i [y_i log ȳ_i + (1-y_i) log(1-ȳ_i)] -> [B]."""
    y = y.clamp(eps, 1 - eps)
    return -(target * y.log() + (1 - target) * torch.log1p(-y)).sum(-1)


DELTAS = {"squared": squared_delta, "log": log_delta}


def delta_fn(name: str):
    try:
        return DELTAS[name]
    except KeyError:
        raise DspError(f"objective.delta={name!r}: choose one of {', '.join(DELTAS)}") from None


class MultiLabelTask(I.Task):
    """What the trainer and dsp-eval need to know of multi-label outputs: predictions are relaxed
    ȳ [N, L], decoded by a threshold that is tuned on validation data (or fixed)."""

    output = I.MULTILABEL
    main_metric = "example_f1"

    def predict(self, model, inference, x, y, batch_size: int, mode: str):
        from dsp.tasks.predict import predict_soft

        return predict_soft(model, inference, x, batch_size, mode)

    def calibrate(self, soft, y, setting) -> float:
        return tune_threshold(soft, y) if setting == "tune" else float(setting)

    def evaluate(self, soft, y, threshold) -> dict[str, float]:
        return evaluate(decode(soft, threshold), y)

    def arrays(self, soft, y, threshold, x=None) -> dict[str, np.ndarray]:
        return {
            "pred": decode(soft, threshold).cpu().numpy().astype(np.uint8),  # [N, L]
            "target": y.cpu().numpy().astype(np.uint8),  # [N, L]
            "score": soft.cpu().numpy().astype(np.float32),  # [N, L]
        }
