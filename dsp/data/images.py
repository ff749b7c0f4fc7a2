"""Image / mask folder pairs for binary segmentation, e.g. the Weizmann horses.

Layout: ROOT/rgb/NAME.ext and ROOT/figure_ground/NAME.ext (jpg, jpeg, png, bmp; the stems must
match one to one, the extensions and image sizes may differ). Masks are greyscale and may be
JPEG, so they are thresholded at 128 after resizing.

Splits are inclusive 1-based ranges over the images in sorted name order; for the Weizmann set
image k is horse{k:03d}. The defaults are the 32×32 protocol of DVN §5.2 (Li et al. 2013):
train horse001-200, test horse201-328, and horse171-200 held out of train for validation while
tuning (the DVN authors' advice). `val=None` validates on the training images themselves (DVN's
final fine-tuning on train + val); early stopping then watches the training IoU. `val_holdout=False`
keeps the val images in train while still validating on them (cheaper than val=None; both are only
a training-fit monitor, so train a fixed number of epochs).

The loader only carries the crop protocol to the task (dsp.tasks.segmentation), which applies it:
  crop        train on a uniformly random crop×crop window of each image, fresh every batch
              (DVN §5.2: "for training data augmentation purposes we randomly crop the image");
              null trains on whole images. flip: also mirror each training image (or crop) left-right with p = 1/2.
  augment     random zoom, rotation, shift, brightness and contrast of every training image (and
              its mask) before the crop, fresh every batch (dsp.data.augment); null or zeros: off.
  warp_source_scale  k > 1: the warps resample a k× larger copy of each training image and its
              soft mask and shrink the result to size×size (antialiased), so a warped training
              image is as sharp as a test image and its mask lines up with it to the sub-pixel.
              1 warps the size×size image and its 0/1 mask, which blurs the image and loses where
              inside a pixel a mask edge lies (on the horses, random shifts of up to 0.64 pixel
              leave the two paths' masks at 89 % mean IoU of each other; scripts/mask_fidelity.py).
  test_crops  predict (val, test, dsp-eval) from a √n × √n grid of crop windows (DVN §5.2, Table 4:
              9, 25 or 36 crops), combined into one full-size mask by `combine`: "average" (mask
              averaging) or "joint" (joint inference: gradient steps on the whole mask through all
              crops at once). null predicts from the whole image.

Decoding: each JPEG is decoded at full size and then resized (jpeg_draft=False, the default).
jpeg_draft=True lets PIL decode at a reduced scale (1/2 to 1/8, never below size) before the
resize, which is faster but not the same resize: at 32×32 its masks agree with the exact pixel
coverage of the originals (area-pooled, ≥ 1/2) at 93.2 % mean IoU against 97.9 % for full decoding,
a ceiling on any model's score against them. Every horses figure in docs/RESULTS.md before the
section on JPEG draft decoding used True. All 328 horses load in about a second either way, so
there is no cache.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dsp import interfaces as I
from dsp.data.splits import NamedSplits
from dsp.errors import DspError
from dsp.data.augment import AugmentSettings, augment_settings, geometric
from dsp.schema import Size

IMAGE_DIR, MASK_DIR = "rgb", "figure_ground"
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass
class ImageMaskSplits(NamedSplits):
    """Per split x float32 [N, C, H, W] in [0, 1] and y float32 [N, H, W] in {0, 1}."""

    output, input = I.MASK, I.IMAGES

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    names: dict[str, list[str]] = field(default_factory=dict)  # split -> image stems, in order
    label_names: list[str] = field(default_factory=lambda: ["background", "foreground"])
    crop: int | None = None  # training crop side (None: whole images)
    flip: bool = False  # random left-right mirroring of training images (or crops)
    test_crops: int | None = None  # crops per image at prediction (a square number; None: whole image)
    combine: str = "average"  # how test crops become one mask: average | joint
    augment: dict = field(default_factory=dict)  # training augmentation magnitudes (dsp.data.augment)
    # The training rows again at warp_source_scale × the side, images and *soft* masks (not
    # thresholded): geometric warps resample these and shrink the result to size×size (None: warp
    # the size×size rows themselves). Row i belongs to row i of `train`.
    warp_source: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_features(self) -> int:
        return self.train.tensors[0].shape[1]  # image channels (3, or 1 with grayscale)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _images_in(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DspError(
            f"image folder not found: {folder}. data.root must hold {IMAGE_DIR}/ and {MASK_DIR}/ with "
            f"matching file names (the Weizmann horses: DSP_DATA_DIR/weizmann_horse_db); set data.root "
            f"or the DSP_DATA_DIR environment variable"
        )
    files = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in EXTENSIONS:
            if p.stem in files:
                raise DspError(f"{folder} holds two images named {p.stem!r} ({files[p.stem].name}, {p.name}); keep one")
            files[p.stem] = p
    return files


def image_mask_pairs(root: Path) -> list[tuple[str, Path, Path]]:
    images, masks = _images_in(root / IMAGE_DIR), _images_in(root / MASK_DIR)
    for have, lack, kind in ((images, masks, "mask"), (masks, images, "image")):
        missing = sorted(set(have) - set(lack))
        if missing:
            src = have[missing[0]]
            raise DspError(
                f"{src} has no {kind} with the same name in {root / (MASK_DIR if kind == 'mask' else IMAGE_DIR)} "
                f"({len(missing)} unmatched in all); every {IMAGE_DIR}/NAME.ext needs a {MASK_DIR}/NAME.ext"
            )
    if not images:
        raise DspError(f"{root / IMAGE_DIR} holds no images ({', '.join(EXTENSIONS)})")
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


def read_resized(path: Path, mode: str, size: int, draft: bool = False) -> np.ndarray:
    """One image file as a size×size uint8 array (PIL mode "RGB" or "L"), bilinear; `draft`: JPEG
    draft decoding first (module docstring)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if draft:  # JPEG: decode at a reduced scale (>= size) first (module docstring)
                im.draft(mode, (size, size))
            im = im.convert(mode).resize((size, size), Image.BILINEAR)
            return np.asarray(im)
    except (UnidentifiedImageError, OSError) as err:
        raise DspError(f"cannot read image {path}: {err}; replace or remove the file") from None


def _range(name: str, value, n: int) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in value)
    except (TypeError, ValueError):
        raise DspError(f"data.{name} must be a range [first, last] of image numbers, got {value!r}") from None
    if not 1 <= lo <= hi <= n:
        raise DspError(f"data.{name}=[{lo}, {hi}] is out of range: the folder has images 1..{n} "
                       f"(in sorted name order)")
    return lo, hi


def _crop_settings(size: int, crop, flip, test_crops, combine) -> dict:
    """Check the crop protocol keys at start-up, with the key's name in the error."""
    if combine not in ("average", "joint"):
        raise DspError(f"data.combine={combine!r}: choose 'average' (mask averaging) or 'joint' (joint inference)")
    if crop is None:
        if test_crops is not None:
            raise DspError("data.test_crops needs data.crop (the side of the crop windows); set data.crop, "
                           "or data.test_crops=null to predict from whole images")
        return {"crop": None, "flip": bool(flip), "test_crops": None, "combine": combine}
    if not 1 <= int(crop) <= size:
        raise DspError(f"data.crop={crop} must be between 1 and data.size={size}")
    crop = int(crop)
    if test_crops is not None:
        side = round(int(test_crops) ** 0.5)
        if int(test_crops) < 1 or side * side != int(test_crops):
            raise DspError(f"data.test_crops={test_crops} must be a square number (a √n × √n grid: 9, 25, "
                           f"36, ...) or null")
        if side > size - crop + 1:
            raise DspError(f"data.test_crops={test_crops} needs {side} crop positions per side, but a {crop}-pixel "
                           f"crop has only {size - crop + 1} in a {size}-pixel image; use fewer crops or a "
                           f"smaller data.crop")
        test_crops = int(test_crops)
    return {"crop": crop, "flip": bool(flip), "test_crops": test_crops, "combine": combine}


def load_horses(root: str | os.PathLike, size: Size = 32, train: tuple[Size, Size] = (1, 200),
                test: tuple[Size, Size] = (201, 328), val: tuple[Size, Size] | None = (171, 200),
                grayscale: bool = False, val_holdout: bool = True, crop: Size | None = None, flip: bool = False,
                test_crops: Size | None = None, combine: Literal["average", "joint"] = "average",
                augment: AugmentSettings = None, warp_source_scale: Size = 1,
                jpeg_draft: bool = False) -> ImageMaskSplits:
    """Load an rgb/ + figure_ground/ folder pair, resized to size×size (bilinear; masks thresholded)."""
    if int(size) < 1:
        raise DspError(f"data.size must be >= 1, got {size}")
    if isinstance(warp_source_scale, bool) or not isinstance(warp_source_scale, int) or warp_source_scale < 1:
        raise DspError(f"data.warp_source_scale must be a whole number >= 1 (1: warp the size×size images), "
                       f"got {warp_source_scale!r}")
    root, size = Path(root), int(size)
    protocol = _crop_settings(size, crop, flip, test_crops, combine)
    protocol["augment"] = augment_settings(augment)
    files = image_mask_pairs(root)
    n = len(files)
    tr, te = _range("train", train, n), _range("test", test, n)
    if max(tr[0], te[0]) <= min(tr[1], te[1]):
        raise DspError(f"data.train={list(tr)} and data.test={list(te)} overlap; choose disjoint ranges")
    va = None
    if val is not None:
        va = _range("val", val, n)
        if not (tr[0] <= va[0] and va[1] <= tr[1]) or va == tr:
            raise DspError(f"data.val={list(va)} must be a part of data.train={list(tr)} (it is carved "
                           f"out of it), and not all of it; or data.val=null to validate on train")
    mode = "L" if grayscale else "RGB"

    def images(rows_, side):  # [n, C, side, side] in [0, 1]
        x_ = np.stack([read_resized(files[i][1], mode, side, jpeg_draft) for i in rows_]).astype(np.float32) / 255.0
        return torch.from_numpy(np.ascontiguousarray(x_[:, None] if grayscale else x_.transpose(0, 3, 1, 2)))

    def soft_masks(rows_, side):  # [n, side, side] in [0, 1]
        y_ = np.stack([read_resized(files[i][2], "L", side, jpeg_draft) for i in rows_]).astype(np.float32)
        return torch.from_numpy(y_ / 255.0)

    x, y = images(range(n), size), (soft_masks(range(n), size) >= 0.5).float()  # masks thresholded at 128

    def rows(lo, hi, drop=None):
        return [i for i in range(lo - 1, hi) if drop is None or not drop[0] - 1 <= i < drop[1]]

    index = {"train": rows(*tr, drop=va if val_holdout else None), "val": rows(*(va or tr)), "test": rows(*te)}
    splits = {k: TensorDataset(x[idx], y[idx]) for k, idx in index.items()}
    names = {k: [files[i][0] for i in idx] for k, idx in index.items()}
    source = None
    if warp_source_scale > 1 and geometric(protocol["augment"]):
        side = size * warp_source_scale
        source = (images(index["train"], side), soft_masks(index["train"], side))
    return ImageMaskSplits(**splits, names=names, warp_source=source, **protocol)
