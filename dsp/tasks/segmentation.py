"""The binary-segmentation output space (Weizmann horses): masks y [N, H, W] of 0/1 floats.

Predictions are soft foreground probabilities [N, H, W]: σ(s*) of the Gaussian CRF (Eq. 14), or
σ(α u) of the unaries alone in mode="local". They are decoded at a fixed 0.5 (the two-class
argmax of Eq. 13); nothing is tuned on validation data.

The crop protocol of DVN §5.2 / §5.4 (data.crop, data.flip, data.test_crops, data.combine; see
dsp.data.images), vectorised over the batch and the crops:
  training    batch() warps and recolours each example when data.augment is set
              (dsp.data.augment), cuts one uniformly random crop×crop window per example, fresh
              every batch (the trainer calls it on every training batch), and mirrors it
              left-right with p = 1/2 when flip is set (whole images too).
  prediction  every image is cut into a fixed √n × √n grid of windows (offsets evenly spaced from 0
              to size - crop, rounded: for 36 crops of 24 in 32, 0 2 3 5 6 8 on each axis). Then
              "average": each crop is predicted on its own and every pixel takes the mean of the
              crops that contain it (mask averaging); "joint": one full-size mask is optimised by
              the inference routine, each step moving a pixel by the mean of the gradients of the
              crops that contain it (joint inference, Table 4). Pixels that no crop contains (a
              single centred crop) are background. eval_batch_size counts crops.

Metrics (DVN §5.2, "the mean image IOU, as well as the IOU over the whole test set"), both of the
foreground class and in percent:
  mean_iou    per-image |ŷ ∩ y| / |ŷ ∪ y|, averaged over images; an image whose prediction and
              mask are both empty counts 100.
  global_iou  Σ|ŷ ∩ y| / Σ|ŷ ∪ y| over all pixels of the split.
  soft_mean_iou  per-image Σ min(p, y) / Σ max(p, y) of the soft masks p before rounding (DVN
              Table 4's "non-binary" rows: how close to 0/1 the combined masks are matters).
"""
from __future__ import annotations

import numpy as np
import torch

from dsp import interfaces as I
from dsp.errors import DspError
from dsp.data.augment import augment_batch, augment_settings
from dsp.tasks.oracles import soft_iou
from dsp.inference.gradient import GradientInference
from dsp.nn.modes import eval_mode

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


def soft_mean_iou(probs: torch.Tensor, target: torch.Tensor) -> float:
    """Per-image soft IoU of the undecoded foreground probabilities, Σ min / Σ max (Eq. 6, 9-10),
    averaged over images, in percent: DVN Table 4's "non-binary" rows."""
    return 100.0 * soft_iou(probs.double(), target.double()).mean().item()


def crop_grid(size: tuple[int, int], crop: int, count: int, device=None) -> torch.Tensor:
    """Top-left corners int64 [count, 2] of a √count × √count grid of crop×crop windows in an image
    of size (H, W): offsets evenly spaced from 0 to H - crop (W - crop), rounded; one crop is centred."""
    side = round(count**0.5)

    def axis(n: int) -> torch.Tensor:
        if side == 1:
            return torch.tensor([(n - crop) // 2], device=device)
        return torch.linspace(0, n - crop, side, device=device, dtype=torch.float64).round().long()  # [side]

    rows, cols = torch.meshgrid(axis(size[0]), axis(size[1]), indexing="ij")  # [side, side]
    return torch.stack([rows.flatten(), cols.flatten()], -1)  # [count, 2]


def take_crops(img: torch.Tensor, corners: torch.Tensor, crop: int) -> torch.Tensor:
    """Windows of images [B, C, H, W] or masks [B, H, W] at corners [B, K, 2] (per example) or
    [K, 2] (shared) -> [B, K, C, crop, crop] or [B, K, crop, crop], in one gather."""
    b = img.shape[0]
    corners = corners.expand(b, *corners.shape[-2:]) if corners.dim() == 2 else corners  # [B, K, 2]
    steps = torch.arange(crop, device=img.device)
    rows = (corners[..., 0, None] + steps)[..., :, None]  # [B, K, c, 1]
    cols = (corners[..., 1, None] + steps)[..., None, :]  # [B, K, 1, c]
    batch = torch.arange(b, device=img.device)[:, None, None, None]  # [B, 1, 1, 1]
    if img.dim() == 3:
        return img[batch, rows, cols]  # [B, K, c, c]
    return img[batch, :, rows, cols].movedim(-1, 2)  # [B, K, c, c, C] -> [B, K, C, c, c]


def coverage(corners: torch.Tensor, crop: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat pixel index int64 [K·c·c] of every crop pixel (row-major, crop by crop) and how many
    crops contain each pixel, float [H·W]."""
    steps = torch.arange(crop, device=corners.device)
    rows, cols = corners[:, 0, None] + steps, corners[:, 1, None] + steps  # [K, c], [K, c]
    index = (rows[:, :, None] * size[1] + cols[:, None, :]).flatten()  # [K·c·c]
    return index, torch.bincount(index, minlength=size[0] * size[1]).float()  # [K·c·c], [H·W]


def average_crops(crops: torch.Tensor, corners: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask averaging: crop masks [B, K, c, c] at shared corners [K, 2] -> [B, H, W], every pixel
    the mean over the crops that contain it (0 where none does)."""
    b, crop = crops.shape[0], crops.shape[-1]
    index, count = coverage(corners, crop, size)
    total = crops.new_zeros(b, size[0] * size[1]).index_add_(1, index, crops.reshape(b, -1))  # [B, H·W]
    return (total / count.clamp_min(1).to(crops.dtype)).view(b, *size)


def joint_inference(model, inference, feats, corners: torch.Tensor, crop: int, size: tuple[int, int], batch: int):
    """Joint inference over crops (DVN §5.4): minimise Σ_k E(x_k, crop_k(ȳ)) over one full mask
    ȳ [B, H, W] with the routine's own steps, where feats hold the B·K crops' features. Each pixel
    moves by the mean (not the sum) of its crops' gradients, so the step size tuned for single
    crops carries over and the border pixels, in few crops, move as fast as the centre."""
    if not isinstance(inference, GradientInference):
        raise DspError(f"data.combine=joint needs gradient-based inference over the mask (e.g. "
                       f"inference=dvn_seg_ascent), not {type(inference).__name__}; use data.combine=average")
    routine = inference.predictor or inference  # the prediction-time settings
    _, count = coverage(corners, crop, size)
    k = corners.shape[0]
    scale = count.clamp_min(1).view(*size)  # [H, W]

    def energy(y_flat: torch.Tensor) -> torch.Tensor:  # [B, H·W] -> [B] (restarts call it per copy)
        y = y_flat.view(batch, *size)
        y = y.detach() + (y - y.detach()) / scale  # the same values; ∂/∂ȳ of each pixel ÷ its crop count
        crops = take_crops(y, corners, crop).flatten(0, 1)  # [B·K, c, c]
        return model.energy(crops, feats).view(batch, k).sum(1)  # [B]

    y0 = average_crops(routine.initial(model, feats).view(batch, k, crop, crop), corners, size)  # [B, H, W]
    res = routine.minimise(energy, y0.flatten(1), temperature=routine.entropy_temperature)
    return res.y.view(batch, *size), res.iterations


class SegmentationTask(I.Task):
    output = I.MASK
    main_metric = "mean_iou"
    takes_rows = True  # batch(index=): the rows' larger copies, for warping

    def __init__(self, crop: int | None = None, flip: bool = False, test_crops: int | None = None,
                 combine: str = "average", augment: dict | None = None, warp_source=None):
        self.crop, self.flip, self.test_crops, self.combine = crop, flip, test_crops, combine
        self.augment = augment_settings(augment)
        self.augmenting = any(self.augment.values())
        self.warp_source = warp_source  # (images, soft masks) of the training rows, larger (dsp.data.images)

    def batch(self, x, y, index=None):
        """Training only: the random warp and colour changes of data.augment, one random crop per
        example (DVN §5.2 augmentation) and the left-right mirror of data.flip; x [B, C, H, W] and
        y [B, H, W] -> [B, C, c, c] and [B, c, c]. Whole images when data.crop is null. index [B]:
        the examples' rows in the training split, for warping their larger copies (warp_source);
        without it, or without a source, the warp resamples x and y themselves."""
        if self.augmenting:
            source = None
            if self.warp_source is not None and index is not None:
                if self.warp_source[0].device != x.device:  # moved once, to wherever the splits live
                    self.warp_source = tuple(t.to(x.device) for t in self.warp_source)
                source = tuple(t[index] for t in self.warp_source)
            x, y = augment_batch(x, y, self.augment, source)
        b, (h, w) = x.shape[0], x.shape[-2:]
        if self.crop is not None:
            c = self.crop
            room = torch.tensor([h - c + 1, w - c + 1], device=x.device)  # [2] valid offsets per axis
            corners = (torch.rand(b, 1, 2, device=x.device) * room).long().minimum(room - 1)  # [B, 1, 2]
            x, y = take_crops(x, corners, c)[:, 0], take_crops(y, corners, c)[:, 0]  # [B, C, c, c], [B, c, c]
        if self.flip:  # whole images too (it used to apply to crops only)
            mirror = torch.rand(b, device=x.device) < 0.5  # [B]
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
            y = torch.where(mirror[:, None, None], y.flip(-1), y)
        return x, y

    def predict(self, model, inference, x, y, batch_size: int, mode: str):
        """Foreground probabilities [N, H, W] and the mean inference iterations per batch; from
        the test-crop grid when data.test_crops is set (module docstring)."""
        if self.test_crops is None:
            return self._predict_whole(model, inference, x, batch_size, mode)
        if self.combine == "joint" and self.predicts_locally(model, mode):
            raise DspError("data.combine=joint optimises one mask through all crops, but this stage predicts "
                           "locally (predict: local, e.g. the FCN): use data.combine=average")
        size, k, c = tuple(x.shape[-2:]), self.test_crops, self.crop
        corners = crop_grid(size, c, k, device=x.device)  # [K, 2]
        step = max(1, batch_size // k)  # images per chunk: about batch_size crops each
        outs, iters = [], []
        with eval_mode(model):
            for start in range(0, x.shape[0], step):
                xb = x[start : start + step]
                crops = take_crops(xb, corners, c).flatten(0, 1)  # [B·K, C, c, c]
                if self.combine == "joint":
                    with torch.no_grad():
                        feats = model.features(crops)
                    probs, n = joint_inference(model, inference, feats, corners, c, size, xb.shape[0])
                else:
                    probs, n = self._predict_whole(model, inference, crops, crops.shape[0], mode)  # [B·K, c, c]
                    probs = average_crops(probs.view(xb.shape[0], k, c, c), corners, size)  # [B, H, W]
                outs.append(probs)
                iters.append(n)
        return torch.cat(outs), sum(iters) / max(1, len(iters))

    def _predict_whole(self, model, inference, x, batch_size: int, mode: str):
        """Probabilities [N, h, w] for inputs x [N, C, h, w] as they are (whole images or crops)."""
        outs, iters = [], []
        with eval_mode(model):
            for start in range(0, x.shape[0], batch_size):
                with torch.no_grad():
                    feats = model.features(x[start : start + batch_size])
                    if self.predicts_locally(model, mode):
                        probs, n = model.local_probs(feats), 0  # [B, H, W]
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
        return {"mean_iou": mean_iou(pred, y), "global_iou": global_iou(pred, y),
                "soft_mean_iou": soft_mean_iou(probs, y)}

    def inference_figures(self, model, inference, train, shown, batch_size: int, mode: str) -> dict:
        """The shape prior and inference trajectory pictures of models predicted by gradient
        inference (DVN Figures 5 and 1; dsp.tasks.segmentation_figures), else {}."""
        from dsp.tasks.segmentation_figures import inference_figures

        return inference_figures(self, model, inference, train, shown, batch_size, mode)

    def arrays(self, probs, y, state=None, x=None) -> dict[str, np.ndarray]:
        return {
            "pred": decode(probs).cpu().numpy().astype(np.uint8),  # [N, H, W]
            "target": y.cpu().numpy().astype(np.uint8),  # [N, H, W]
            "score": probs.cpu().numpy().astype(np.float32),  # [N, H, W] foreground probability
        }
