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

`load_masks` reads any two folders of image / mask pairs matched by file name (data=masks), with
any mask encoding a binary segmentation (module docstring of that function). Every image is opened
behind a pixel limit (PIL's Image.MAX_IMAGE_PIXELS, about 89 million): a larger one, which could
exhaust memory while decoding (a "decompression bomb"), is refused in one line naming the file.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dsp import interfaces as I
from dsp.data.splits import NamedSplits, holdout
from dsp.errors import DspError
from dsp.data.augment import AugmentSettings, augment_settings, geometric
from dsp.schema import Count, OpenFraction, Size

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


def open_image(path: Path):
    """PIL's Image.open(path), refusing an image above PIL's pixel limit (Image.MAX_IMAGE_PIXELS) in one
    line: decoding it could exhaust memory. Unreadable files are refused too. The caller closes it."""
    from PIL import Image, UnidentifiedImageError

    limit = Image.MAX_IMAGE_PIXELS
    advice = ("shrink or crop it (the loader resizes every image to data.size anyway) or remove it from the "
              "folder")
    try:
        with warnings.catch_warnings():  # PIL only warns between the limit and twice the limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        pixels = str(err).split("(")[1].split()[0] if "(" in str(err) else "too many"
        raise DspError(f"image {path} is too large to decode safely ({pixels} pixels, PIL's limit is "
                       f"{limit:,}); {advice}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DspError(f"cannot read image {path}: {err}; replace or remove the file") from None
    if limit and im.size[0] * im.size[1] > limit:
        w, h = im.size
        im.close()
        raise DspError(f"image {path} is too large to decode safely ({w}×{h} = {w * h:,} pixels, PIL's limit is "
                       f"{limit:,}); {advice}")
    return im


def read_resized(path: Path, mode: str, size: int, draft: bool = False) -> np.ndarray:
    """One image file as a size×size uint8 array (PIL mode "RGB" or "L"), bilinear; `draft`: JPEG
    draft decoding first (module docstring)."""
    from PIL import Image

    with open_image(path) as im:
        try:
            if draft:  # JPEG: decode at a reduced scale (>= size) first (module docstring)
                im.draft(mode, (size, size))
            im = im.convert(mode).resize((size, size), Image.BILINEAR)
            return np.asarray(im)
        except OSError as err:  # truncated or damaged data
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


# ---------------------------------------------------------------------------- any image / mask folders

LOSSY = (".jpg", ".jpeg")
MASK_SUFFIXES = ("_mask", "-mask", "_masks", "_seg", "-seg", "_gt", "-gt", "_label", "_labels")
BINARY_MODELS = "model=gcrf, unet, fcn, dvn_seg and dvn_seg_unet"


def _pairs(images: Path, masks: Path, key: str) -> list[tuple[str, Path, Path]]:
    """(stem, image, mask) by file name: the same stem, or the mask's stem with a suffix such as
    `_mask` (MASK_SUFFIXES) after the image's; every image needs a mask and every mask an image."""
    for folder, which in ((images, f"data.{key}images"), (masks, f"data.{key}masks")):
        if not folder.is_dir():
            raise DspError(f"{which}={folder} is not a folder; give the folder that holds the "
                           f"{'images' if 'images' in which else 'masks'}")
    image_files = _images_in(images)
    if not image_files:
        raise DspError(f"{images} holds no images ({', '.join(EXTENSIONS)})")
    mask_files = {}
    for stem, path in _images_in(masks).items():
        if stem not in image_files:
            stem = next((stem[: -len(sfx)] for sfx in MASK_SUFFIXES if stem.endswith(sfx)
                         and stem[: -len(sfx)] in image_files), stem)
        if stem in mask_files:
            raise DspError(f"{masks} holds two masks for the image {stem!r} ({mask_files[stem].name}, {path.name}); keep one")
        mask_files[stem] = path
    for have, lack, kind, where in ((image_files, mask_files, "mask", masks), (mask_files, image_files, "image", images)):
        missing = sorted(set(have) - set(lack))
        if missing:
            raise DspError(f"{have[missing[0]]} has no {kind} of the same name in {where} ({len(missing)} unmatched in "
                           f"all); pairs are matched by file name (a mask may add {MASK_SUFFIXES[0]} or "
                           f"{MASK_SUFFIXES[1]}), the extensions may differ")
    return [(stem, image_files[stem], mask_files[stem]) for stem in sorted(image_files)]


def _mask_values(path: Path) -> np.ndarray:
    """A mask file's values at its own resolution: palette indices for a palette PNG, grey levels
    otherwise (colour masks are turned to grey, so each colour is one level)."""
    with open_image(path) as im:
        try:
            if im.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
                im = im.convert("L")
            values = np.asarray(im)
        except OSError as err:
            raise DspError(f"cannot read mask {path}: {err}; replace or remove the file") from None
    return values.astype(np.int64)


def _binary_masks(pairs, foreground, threshold) -> list[np.ndarray]:
    """Each pair's mask as float32 0/1 at the mask's own resolution (the rules of load_masks)."""
    masks = [_mask_values(m) for _, _, m in pairs]
    lossless = [i for i, (_, _, m) in enumerate(pairs) if m.suffix.lower() not in LOSSY]
    if foreground is not None:
        wanted = [int(v) for v in foreground]
        seen = set().union(*(np.unique(m).tolist() for m in masks))
        if not seen & set(wanted):
            raise DspError(f"data.foreground={wanted}, but no mask holds any of these values (they hold "
                           f"{', '.join(map(str, sorted(seen)[:12]))}); name the values of the foreground classes")
        return [np.isin(m, wanted).astype(np.float32) for m in masks]
    if threshold is not None:
        return [(m >= threshold).astype(np.float32) for m in masks]
    values: set[int] = set()
    for i in lossless:
        new = set(np.unique(masks[i]).tolist()) - values
        if len(values | new) > 2:
            stem, _, path = pairs[i]
            every = sorted(values | new)
            raise DspError(
                f"the masks hold {'more than two' if len(every) > 3 else 'three'} values ({', '.join(map(str, every[:8]))}"
                f"{', ...' if len(every) > 8 else ''}; the third first in {path}): a multi-class segmentation, but the "
                f"segmentation models here ({BINARY_MODELS}) predict one foreground class against the background; "
                f"set data.foreground=[VALUES] to train those classes against the rest, or data.threshold=128 for "
                f"greyscale masks (anti-aliased edges)")
        values |= new
    lossy = set(range(len(masks))) - set(lossless)
    top = max(values) if len(values) == 2 else 1  # two values: the larger is foreground; one: any but 0
    # JPEG masks: compression noise around 0 and 255 (the horses' masks): thresholded at 128.
    return [((m >= 128) if i in lossy else (m >= top)).astype(np.float32) for i, m in enumerate(masks)]


def _resized_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A 0/1 float mask resized to size×size (bilinear, so the coverage of each new pixel), then cut at 1/2."""
    from PIL import Image

    soft = np.asarray(Image.fromarray(mask, mode="F").resize((size, size), Image.BILINEAR))
    return (soft >= 0.5).astype(np.float32)


def _read_pairs(pairs, size: int, grayscale: bool, foreground, threshold, draft: bool):
    mode = "L" if grayscale else "RGB"
    x = np.stack([read_resized(img, mode, size, draft) for _, img, _ in pairs]).astype(np.float32) / 255.0
    x = x[:, None] if grayscale else x.transpose(0, 3, 1, 2)
    masks = _binary_masks(pairs, foreground, threshold)
    for (_, img, m), mask in zip(pairs, masks):
        with open_image(img) as im:
            iw, ih = im.size
        mh, mw = mask.shape
        if abs(iw / ih - mw / mh) > 0.05 * (iw / ih) + 1.0 / min(mh, ih):
            raise DspError(f"the mask {m} is {mw}×{mh} but its image {img} is {iw}×{ih}, another shape: is it the "
                           f"mask of another image? Masks may be of another size, not of another aspect ratio")
    y = np.stack([_resized_mask(mask, size) for mask in masks])
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)


def load_masks(images: str | os.PathLike, masks: str | os.PathLike, test_images: str | os.PathLike | None = None,
               test_masks: str | os.PathLike | None = None, size: Size = 64, val_fraction: OpenFraction = 0.2,
               test_fraction: OpenFraction = 0.2, split_seed: Count = 0, grayscale: bool = False,
               foreground: list[Count] | None = None, threshold: Size | None = None, crop: Size | None = None,
               flip: bool = False, test_crops: Size | None = None,
               combine: Literal["average", "joint"] = "average", augment: AugmentSettings = None,
               jpeg_draft: bool = False) -> ImageMaskSplits:
    """Binary segmentation from any folder of images and a folder of their masks, matched by name.

    Pairs: images/NAME.ext and masks/NAME.ext, or masks/NAME_mask.ext (the suffixes of
    MASK_SUFFIXES); .jpg, .jpeg, .png, .bmp; images and masks may differ in size (not in shape).
    Every image and mask is resized to size×size (bilinear; a mask by its coverage, cut at 1/2).
    Test: test_images / test_masks when given, else `test_fraction` of the pairs; validation:
    `val_fraction` of the rest (both with split_seed).

    Masks (foreground = 1): PNG/BMP masks of two values, whatever they are ({0, 1}, {0, 255}, a
    two-colour palette), take the larger as foreground; one value alone is background everywhere
    (value 0) or foreground everywhere. JPEG masks are thresholded at 128 (compression blurs the
    values). Three or more values are a multi-class segmentation, which every segmentation model
    here refuses to learn (they predict one foreground class): `foreground=[v, ...]` trains the
    classes of those values (palette indices or grey levels) against the rest; `threshold=t`
    counts every value >= t as foreground (greyscale or anti-aliased masks).
    The crop protocol keys (crop, flip, test_crops, combine) and augment are those of load_horses.
    """
    size = int(size)
    protocol = _crop_settings(size, crop, flip, test_crops, combine)
    protocol["augment"] = augment_settings(augment)
    if (test_images is None) != (test_masks is None):
        raise DspError("data.test_images and data.test_masks go together: give both (a test folder pair) or "
                       "neither (test_fraction of the pairs is held out)")
    pairs = _pairs(Path(images), Path(masks), "")
    x, y = _read_pairs(pairs, size, grayscale, foreground, threshold, jpeg_draft)
    idx = torch.arange(len(pairs))
    if test_images is None:
        rest, test_idx = holdout(idx, idx, test_fraction, split_seed + 1, source=str(images), key="data.test_fraction")
        rest, test_idx = rest.tensors[0], test_idx.tensors[0]
        test = TensorDataset(x[test_idx], y[test_idx])
        test_names = [pairs[i][0] for i in test_idx.tolist()]
    else:
        test_pairs = _pairs(Path(test_images), Path(test_masks), "test_")
        test = TensorDataset(*_read_pairs(test_pairs, size, grayscale, foreground, threshold, jpeg_draft))
        rest, test_names = idx, [p[0] for p in test_pairs]
    fit, val = holdout(rest, rest, val_fraction, split_seed, source=str(images))
    fit_idx, val_idx = fit.tensors[0], val.tensors[0]
    splits = {"train": TensorDataset(x[fit_idx], y[fit_idx]), "val": TensorDataset(x[val_idx], y[val_idx]), "test": test}
    names = {"train": [pairs[i][0] for i in fit_idx.tolist()], "val": [pairs[i][0] for i in val_idx.tolist()],
             "test": test_names}
    return ImageMaskSplits(**splits, names=names, **protocol)
