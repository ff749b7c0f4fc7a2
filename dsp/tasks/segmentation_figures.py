"""Pictures of what a segmentation model predicted by gradient inference (the deep value network)
has learned (Gygli, Norouzi & Angelova 2017):

  shape_prior  Figure 5: (a) the mean training mask, (b) the mask inference finds for the mean
               training image, (c, d) for the mean image plus Gaussian noise of σ = 10 grey
               levels (two fixed draws). A value network that learned horse shapes hallucinates a
               horse silhouette even without one in the input.
  trajectory   Figure 1: one row per image (the first `rows` of a split): the image, the soft mask
               after t = 1, 2, 5, 10, 20, ... ascent steps up to the routine's last, and the ground
               truth.

Both predict through the task, so the crop protocol (data.test_crops, data.combine) applies. The
trajectory comes from copies of the inference routine stopped after t steps: the ascent is
deterministic, so each truncated run is a prefix of the full one. Figures are RGB uint8 [H, W, 3]
with a white gutter between tiles (dsp-eval saves them as PNG, the trainer logs them to
TensorBoard once training ends).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from dsp.inference.gradient import GradientInference

GUTTER = 2  # white pixels between tiles
NOISE_SIGMA = 10 / 255  # Figure 5's noise, σ = 10 grey levels on images scaled to [0, 1]
STEPS = (1, 2, 5, 10, 20, 50, 100, 200)  # trajectory columns, up to the routine's max_iter


def has_inference_figures(model, inference) -> bool:
    """Only models predicted by gradient inference over the mask have a trajectory to show."""
    return model.is_structured and isinstance(inference, GradientInference)


def _tile(img: torch.Tensor) -> np.ndarray:
    """An image [C, H, W] (C = 1 or 3) or a mask [H, W] in [0, 1] -> uint8 [H, W, 3]."""
    img = img.detach().float().cpu().clamp(0, 1)
    if img.dim() == 2:
        img = img.unsqueeze(0)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def _grid(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Tiles of one size in rows -> one uint8 [H, W, 3] picture with white gutters."""
    h, w = rows[0][0].shape[:2]
    n_cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + GUTTER) - GUTTER, n_cols * (w + GUTTER) - GUTTER, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            out[i * (h + GUTTER) : i * (h + GUTTER) + h, j * (w + GUTTER) : j * (w + GUTTER) + w] = tile
    return out


def _truncated(inference: GradientInference, steps: int) -> GradientInference:
    """The prediction-time routine stopped after `steps` iterations."""
    routine = copy.copy(inference.predictor or inference)
    routine.predictor, routine.max_iter = None, steps
    return routine


def shape_prior(task, model, inference, x_train, y_train, batch_size: int, mode: str) -> np.ndarray:
    """Figure 5: [mean training mask | mask from the mean image | two noisy-mean masks]."""
    # the split may stay on the host: only its mean image goes to the model's device
    mean_x = x_train.float().mean(0, keepdim=True).to(next(model.parameters()).device)  # [1, C, H, W]
    gen = torch.Generator().manual_seed(0)
    noisy = [(mean_x + NOISE_SIGMA * torch.randn(mean_x.shape, generator=gen).to(mean_x.device)).clamp(0, 1)
             for _ in range(2)]
    inputs = torch.cat([mean_x, *noisy])  # [3, C, H, W]
    probs, _ = task.predict(model, inference, inputs, None, batch_size, mode)  # [3, H, W]
    return _grid([[_tile(y_train.float().mean(0))] + [_tile(p) for p in probs]])


def trajectory(task, model, inference, x, y, batch_size: int, mode: str, rows: int = 4) -> np.ndarray:
    """Figure 1: per image, [image | soft mask after t steps, t in STEPS up to max_iter | truth]."""
    x, y = x[:rows], y[:rows]
    last = (inference.predictor or inference).max_iter
    steps = [t for t in STEPS if t < last] + [last]
    masks = [task.predict(model, _truncated(inference, t), x, y, batch_size, mode)[0] for t in steps]
    return _grid([[_tile(x[i])] + [_tile(m[i]) for m in masks] + [_tile(y[i])] for i in range(x.shape[0])])


def inference_figures(task, model, inference, train, shown, batch_size: int, mode: str) -> dict:
    """{"shape_prior", "trajectory"} uint8 [H, W, 3] pictures, or {} for models without gradient
    inference. `train` and `shown` are (x, y) pairs: the training split (for its mean image) and
    the split whose first images the trajectory shows."""
    if not has_inference_figures(model, inference) or mode == "local":
        return {}
    return {
        "shape_prior": shape_prior(task, model, inference, *train, batch_size, mode),
        "trajectory": trajectory(task, model, inference, *shown, batch_size, mode),
    }
