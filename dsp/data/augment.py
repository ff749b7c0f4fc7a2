"""Random geometric and photometric augmentation of training images and their masks
(`data.augment` of the segmentation loaders) and of OCR letters (`data.augment` of `data=ocr`,
augment_letters), vectorised over the batch on the batch's device.

Every training example gets its own draw, fresh every batch:
  scale      zoom by a factor uniform in [1 - scale, 1 + scale] (> 1 magnifies)
  rotate     rotation by an angle uniform in ±rotate degrees
  translate  shift by a fraction of the side uniform in ±translate, on each axis
  brightness add a constant uniform in ±brightness to every channel (images in [0, 1])
  contrast   scale the deviation from the image's mean by a factor uniform in [1 - c, 1 + c]

The warp resamples image and mask through the same grid (bilinear; pixels from outside the image
repeat its border, so the mask and the image stay consistent at the edges); the warped mask is
rounded at 0.5, so targets stay 0/1 for the metrics and the value network's oracle. Photometric
changes touch the image only and are clamped to [0, 1]. All zeros (the default) is the identity
and costs nothing. Why an affine warp and not only crops: with 170-200 training images the
segmentation networks fit their training masks far better than held-out ones (docs/RESULTS.md),
and crops alone shift the horse but never change its size or pose.
"""
from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F

from dsp.errors import DspError
from dsp.schema import Check

KEYS = ("scale", "rotate", "translate", "brightness", "contrast")
# (scale's limit is exclusive: a zoom factor of 0; a shift beyond half the side leaves mostly border)
LIMITS = {"scale": 1.0, "rotate": 180.0, "translate": 0.5, "brightness": 1.0, "contrast": 1.0}


def augment_settings(augment) -> dict[str, float]:
    """Check `data.augment` at start-up: a mapping of KEYS to magnitudes (missing keys are 0)."""
    if augment is None:
        return {k: 0.0 for k in KEYS}
    try:
        items = dict(augment).items()
    except (TypeError, ValueError):
        raise DspError(f"data.augment must be a mapping like {{scale: 0.1, rotate: 10}}, got {augment!r}") from None
    out = {k: 0.0 for k in KEYS}
    for key, value in items:
        if key not in KEYS:
            raise DspError(f"data.augment.{key}: unknown augmentation; known: {', '.join(KEYS)}")
        try:
            if isinstance(value, bool):  # (float(True) would be a silent 1)
                raise TypeError
            out[key] = float(value)
        except (TypeError, ValueError):
            raise DspError(f"data.augment.{key} must be a number, got {value!r}") from None
        limit = LIMITS[key]
        if not (0.0 <= out[key] < limit if key == "scale" else 0.0 <= out[key] <= limit):
            raise DspError(f"data.augment.{key}={value} is out of range: use 0 (off) ≤ {key} "
                           f"{'<' if key == 'scale' else '≤'} {limit:g}")
    return out


# data.augment: a mapping of KEYS to magnitudes (or null), checked by augment_settings at start-up.
AugmentSettings = Annotated[dict | None, Check(augment_settings)]


def _uniform(b: int, magnitude: float, device) -> torch.Tensor:
    return (2 * torch.rand(b, device=device) - 1) * magnitude  # [B] in [-m, m]


def affine_matrices(zoom: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor, aspect: float = 1.0) -> torch.Tensor:
    """Sampling matrices [B, 2, 3] for F.affine_grid (output coordinates -> input coordinates, both
    (x, y) in [-1, 1]) of the warps that map an input point p to zoom·R(angle)·p + shift: the grid
    samples the input at R(-angle)·(q - shift) / zoom. zoom [B], angle [B] in radians, shift [B, 2]
    in normalised units (the side is 2). aspect = W / H: the rotation is rigid in pixels, so its
    off-diagonal terms are rescaled between the two normalised axes."""
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    inverse = torch.stack([torch.stack([cos, sin / aspect], -1), torch.stack([-sin * aspect, cos], -1)], -2)  # R(-a)/s
    return torch.cat([inverse, -(inverse @ shift.unsqueeze(-1))], -1)  # [B, 2, 3]


def warp_matrices(b: int, scale: float, rotate: float, translate: float, device=None, aspect: float = 1.0,
                  side=(1.0, 1.0)) -> torch.Tensor:
    """One random warp per example [B, 2, 3] (module docstring); aspect = W / H. `side` (x, y): the
    length that `translate` is a fraction of, as a fraction of the image's side on each axis (1:
    the image itself; less when the object sits on a larger canvas, as augment_letters' glyphs do)."""
    zoom = 1 + _uniform(b, scale, device)  # [B]
    angle = _uniform(b, rotate, device) * (math.pi / 180)  # [B]
    shift = torch.stack([_uniform(b, translate, device), _uniform(b, translate, device)], -1)  # [B, 2]
    return affine_matrices(zoom, angle, shift * 2 * torch.tensor(side, device=device), aspect)


def resample(x: torch.Tensor, theta: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Images x [B, C, H, W] resampled (bilinear) through the grids of theta [B, 2, 3]."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)  # [B, H, W, 2]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def warp(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images x [B, C, H, W] and masks y [B, H, W] resampled through the same grid (theta [B, 2, 3]);
    the mask rounded at 0.5."""
    ym = resample(y.unsqueeze(1).to(x.dtype), theta)
    return resample(x, theta), (ym.squeeze(1) >= 0.5).to(y.dtype)


def geometric(settings: dict[str, float]) -> bool:
    return bool(settings["scale"] or settings["rotate"] or settings["translate"])


def recolour(x: torch.Tensor, settings: dict[str, float]) -> torch.Tensor:
    """The photometric part of the settings: images x [B, C, H, W] in [0, 1], one draw per image."""
    b, device = x.shape[0], x.device
    if settings["contrast"]:
        mean = x.mean((1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
        x = (x - mean) * (1 + _uniform(b, settings["contrast"], device)).view(b, 1, 1, 1) + mean
    if settings["brightness"]:
        x = x + _uniform(b, settings["brightness"], device).view(b, 1, 1, 1)
    if settings["contrast"] or settings["brightness"]:
        x = x.clamp(0.0, 1.0)
    return x


def warp_from_source(xs: torch.Tensor, ys: torch.Tensor, theta: torch.Tensor,
                     size) -> tuple[torch.Tensor, torch.Tensor]:
    """Larger copies of the images xs [B, C, kH, kW] and their soft masks ys [B, kH, kW] warped through
    theta [B, 2, 3] and shrunk to size (H, W) with an antialiased bilinear filter (the loader's PIL
    resize is one too); the mask thresholded at 0.5 afterwards, as the loader thresholds its masks."""
    def shrink(t):
        return F.interpolate(t, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)

    ym = shrink(resample(ys.unsqueeze(1).to(xs.dtype), theta)).squeeze(1)  # [B, H, W]
    return shrink(resample(xs, theta)), (ym >= 0.5).to(ys.dtype)


def augment_batch(x: torch.Tensor, y: torch.Tensor, settings: dict[str, float],
                  source: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images x [B, C, H, W] in [0, 1] and masks y [B, H, W] -> augmented copies. source:
    the same examples at a multiple of the resolution (images, soft masks; dsp.data.images'
    warp_source), which the warp then resamples instead of x and y."""
    if geometric(settings):
        theta = warp_matrices(x.shape[0], settings["scale"], settings["rotate"], settings["translate"], x.device,
                              aspect=x.shape[-1] / x.shape[-2])
        x, y = warp(x, y, theta) if source is None else warp_from_source(*source, theta, x.shape[-2:])
    return recolour(x, settings), y


def augment_letters(x: torch.Tensor, settings: dict[str, float]) -> torch.Tensor:
    """Glyphs x [N, H, W] on a zero ground (OCR letters) -> warped copies [N, H + 2m, W + 2m], m = H // 4.

    The glyph is first set on a zero canvas with a margin m on every side, so a shift or zoom moves
    strokes instead of cutting them off at the frame; the warp fills with zeros (the ground), not
    the border. `translate` stays a fraction of the glyph's own side on each axis. The canvas keeps
    the glyph's centre, so a network that centres its input (LeNet's padding) sees clean and
    augmented letters at the same place. Geometric keys only (load_ocr refuses the colour ones)."""
    (h, w) = x.shape[-2:]
    m = h // 4
    canvas = F.pad(x, (m, m, m, m)).unsqueeze(1)  # [N, 1, H + 2m, W + 2m]
    if geometric(settings):
        theta = warp_matrices(x.shape[0], settings["scale"], settings["rotate"], settings["translate"], x.device,
                              aspect=(w + 2 * m) / (h + 2 * m), side=(w / (w + 2 * m), h / (h + 2 * m)))
        canvas = resample(canvas, theta, padding_mode="zeros")
    return canvas.squeeze(1)
