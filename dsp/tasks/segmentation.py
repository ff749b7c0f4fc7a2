"""The binary-segmentation output space (Weizmann horses): masks y [N, H, W] of 0/1 floats.

Predictions are soft foreground probabilities [N, H, W]: σ(s*) of the Gaussian CRF (Eq. 14), or
σ(α u) of the unaries alone in mode="local". They are decoded at a fixed 0.5 (the two-class
argmax of Eq. 13); nothing is tuned on validation data.

Metrics (DVN §5.2, "the mean image IOU, as well as the IOU over the whole test set"), both of the
foreground class and in percent:
  mean_iou    per-image |ŷ ∩ y| / |ŷ ∪ y|, averaged over images; an image whose prediction and
              mask are both empty counts 100.
  global_iou  Σ|ŷ ∩ y| / Σ|ŷ ∪ y| over all pixels of the split.
"""
from __future__ import annotations

import numpy as np
import torch

from dsp.training.predict import eval_mode

THRESHOLD = 0.5


def decode(probs: torch.Tensor) -> torch.Tensor:
    """Foreground probabilities [N, H, W] -> 0/1 masks (uint8)."""
    return (probs >= THRESHOLD).to(torch.uint8)


def _intersection_union(pred: torch.Tensor, target: torch.Tensor):
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)  # [N, P]
    return (pred & target).sum(1).double(), (pred | target).sum(1).double()  # [N], [N]


def mean_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Per-image foreground IoU averaged over images, in percent (empty ∪ empty = 100)."""
    inter, union = _intersection_union(pred, target)
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return 100.0 * iou.mean().item()


def global_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Foreground IoU over all pixels of all images, in percent (100 when both are empty)."""
    inter, union = _intersection_union(pred, target)
    return 100.0 * (inter.sum() / union.sum()).item() if union.sum() > 0 else 100.0


class SegmentationTask:
    main_metric = "mean_iou"

    def batch(self, x, y):
        return x, y  # images of one size: nothing to trim

    def predict(self, model, inference, x, y, batch_size: int, mode: str):
        """Foreground probabilities [N, H, W] and the mean CG iterations per batch."""
        outs, iters = [], []
        with eval_mode(model):
            for start in range(0, x.shape[0], batch_size):
                with torch.no_grad():
                    feats = model.features(x[start : start + batch_size])
                    if mode == "local":
                        probs, n = torch.sigmoid(feats.unary), 0  # [B, H, W]
                    else:
                        result = inference(model, feats)
                        probs, n = result.y, result.iterations
                outs.append(probs)
                iters.append(n)
        return torch.cat(outs), sum(iters) / max(1, len(iters))

    def calibrate(self, probs, y, setting):
        return None  # decoded at 0.5: nothing to tune (trainer.threshold does not apply)

    def evaluate(self, probs, y, state=None) -> dict[str, float]:
        pred = decode(probs)
        return {"mean_iou": mean_iou(pred, y), "global_iou": global_iou(pred, y)}

    def arrays(self, probs, y, state=None, x=None) -> dict[str, np.ndarray]:
        return {
            "pred": decode(probs).cpu().numpy().astype(np.uint8),  # [N, H, W]
            "target": y.cpu().numpy().astype(np.uint8),  # [N, H, W]
            "score": probs.cpu().numpy().astype(np.float32),  # [N, H, W] foreground probability
        }
