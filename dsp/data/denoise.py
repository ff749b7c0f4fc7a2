"""Grayscale image denoising data from any folder of images (End-to-end SPENs §6.1 protocol).

Layout: ROOT/SUBDIR/NAME.ext (jpg, jpeg, png, bmp), e.g. the Weizmann horses' rgb/ folder. Images
are converted to grayscale (PIL "L", ITU-R 601 luma) float32 in [0, 1]; one smaller than the crop
in either side is upscaled (bilinear, aspect kept) until both sides cover it. A crop taller or wider
than every image is refused (it would upscale them all: surely a typo).

Ranges are inclusive 1-based over the images in sorted name order (as dsp.data.images); image k of
the Weizmann set is horse{k:03d}. The paper trains on "random 96×128 crops from 200 images" and
reports PSNR on held-out images; here:
  train  whole clean images, packed one after another into one uint8 pixel buffer (no padding:
         the Weizmann horse001-200 are 45 M pixels, from 200×150 to 1280×960, which zero-padding
         to the largest would blow up to 938 MiB of float32), as (offset, size) per image: the task
         cuts a fresh random crop and fresh noise per batch (augmentation, as the paper). Loading
         all 328 images takes about 2 s, so there is no cache.
  val    central crops + Gaussian noise σ (not clipped), fixed per image: image k's noise comes
  test   from a generator seeded with noise_seed·100003 + k, so no image's noise depends on which
         other images are loaded. val_holdout=False (default) keeps the val images in train too
         (the paper trains on all 200); val=None validates on the training images' central crops.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dsp.data.images import EXTENSIONS, _images_in
from dsp import interfaces as I
from dsp.data.splits import NamedSplits
from dsp.errors import DspError
from dsp.schema import Count, Positive, Size


@dataclass
class DenoiseSplits(NamedSplits):
    """train: (offsets int64 [N] into `pixels`, sizes int64 [N, 2] as (h, w)), the images packed
    row-major in `pixels` (uint8 [P], intensity·255); val, test: (noisy float32 [N, h, w], clean
    float32 [N, h, w]) with (h, w) = crop."""

    output, input = I.IMAGE, I.IMAGES

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    pixels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.uint8))  # [P]
    crop: tuple[int, int] = (96, 128)
    sigma: float = 25 / 255
    names: dict[str, list[str]] = field(default_factory=dict)  # split -> image stems, in order

    def train_image(self, i: int) -> torch.Tensor:
        """Training image i as float32 [h, w] in [0, 1]."""
        (offset, (h, w)) = int(self.train.tensors[0][i]), self.train.tensors[1][i].tolist()
        return self.pixels[offset : offset + h * w].view(h, w).float() / 255

    @property
    def num_features(self) -> int:
        return 1  # one grayscale channel

    @property
    def num_labels(self) -> int:
        return 1  # one intensity per pixel


def _range(name: str, value, n: int, folder: Path) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in value)
    except (TypeError, ValueError):
        raise DspError(f"data.{name} must be a range [first, last] of image numbers, got {value!r}") from None
    if lo > hi:
        raise DspError(f"data.{name}=[{lo}, {hi}] is empty (first > last); give [first, last] with first <= last")
    if not 1 <= lo <= hi <= n:
        raise DspError(f"data.{name}=[{lo}, {hi}] is out of range: {folder} has images 1..{n} (in sorted name order)")
    return lo, hi


def _pair(name: str, value, what: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise DspError(f"data.{name} must be [{what}], got {value!r}") from None
    if a < 1 or b < 1:
        raise DspError(f"data.{name}=[{a}, {b}] must be positive")
    return a, b


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as err:
        raise DspError(f"cannot read image {path}: {err}; replace or remove the file") from None


def _read_gray(path: Path, crop: tuple[int, int]) -> np.ndarray:
    """Grayscale float32 [h, w] in [0, 1], upscaled (bilinear, aspect kept) to cover the crop."""
    from PIL import Image

    with _open(path) as im:
        try:
            im = im.convert("L")
        except OSError as err:  # truncated or corrupt pixel data
            raise DspError(f"cannot read image {path}: {err}; replace or remove the file") from None
        w, h = im.size
        scale = max(crop[0] / h, crop[1] / w)
        if scale > 1:  # too small for a crop: enlarge; ceil so both sides reach the crop
            size = (max(crop[1], int(np.ceil(w * scale))), max(crop[0], int(np.ceil(h * scale))))
            im = im.resize(size, Image.BILINEAR)
        return np.asarray(im, dtype=np.float32) / 255.0


def _central(img: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    h, w = img.shape
    top, left = (h - crop[0]) // 2, (w - crop[1]) // 2
    return img[top : top + crop[0], left : left + crop[1]]  # [ch, cw]


def _noisy_pairs(imgs: dict[int, np.ndarray], index: list[int], crop, sigma: float, noise_seed: int):
    """(noisy, clean) [N, ch, cw] of the central crops; image k's noise depends only on (seed, k)."""
    clean = torch.from_numpy(np.stack([_central(imgs[k], crop) for k in index]))  # [N, ch, cw]
    noise = torch.stack([
        torch.randn(crop, generator=torch.Generator().manual_seed(noise_seed * 100003 + k)) for k in index
    ])  # [N, ch, cw]
    return TensorDataset(clean + sigma * noise, clean)


def load_denoise_images(root: str | os.PathLike, subdir: str = "rgb", crop: tuple[Size, Size] = (96, 128),
                        train: tuple[Size, Size] = (1, 200), val: tuple[Size, Size] | None = (171, 200),
                        val_holdout: bool = False, test: tuple[Size, Size] = (201, 328), sigma: Positive = 25 / 255,
                        noise_seed: Count = 0) -> DenoiseSplits:
    """Load ROOT/SUBDIR as grayscale denoising splits; crop = (height, width), sigma on the [0, 1] scale."""
    folder = Path(root) / (subdir or "")
    if not folder.is_dir():
        raise DspError(f"image folder not found: {folder}. data.root/data.subdir must name a folder of images "
                       f"({', '.join(EXTENSIONS)}), e.g. DSP_DATA_DIR/weizmann_horse_db with subdir rgb; set "
                       f"data.root or the DSP_DATA_DIR environment variable")
    files = _images_in(folder)
    if not files:
        raise DspError(f"{folder} holds no images ({', '.join(EXTENSIONS)}); check data.root and data.subdir")
    crop = _pair("crop", crop, "height, width")
    try:
        ok = float(sigma) > 0  # NaN fails too
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DspError(f"data.sigma must be a number > 0 (the noise standard deviation on the [0, 1] scale, "
                       f"e.g. 0.0980392156862745 = 25/255), got {sigma!r}")
    sigma = float(sigma)
    stems = sorted(files)
    n = len(stems)
    tr, te = _range("train", train, n, folder), _range("test", test, n, folder)
    va = None if val is None else _range("val", val, n, folder)
    for name, r in (("train", tr), ("val", va)):
        if r is not None and max(r[0], te[0]) <= min(r[1], te[1]):
            raise DspError(f"data.{name}={list(r)} and data.test={list(te)} overlap; choose disjoint ranges "
                           f"(test images must stay unseen)")
    index = {  # 1-based image numbers per split
        "train": [k for k in range(tr[0], tr[1] + 1)
                  if not (val_holdout and va is not None and va[0] <= k <= va[1])],
        "val": list(range(va[0], va[1] + 1)) if va is not None else list(range(tr[0], tr[1] + 1)),
        "test": list(range(te[0], te[1] + 1)),
    }
    if not index["train"]:
        raise DspError(f"data.val={list(va)} with data.val_holdout=true leaves no training images of "
                       f"data.train={list(tr)}; shrink data.val or set data.val_holdout=false")
    needed = sorted(set().union(*index.values()))  # decode only the images a split uses
    # Check the crop against the headers before decoding: a typo must not upscale every image.
    dims = []
    for k in needed:
        with _open(files[stems[k - 1]]) as im:
            dims.append(im.size)  # (w, h)
    hmax, wmax = max(h for _, h in dims), max(w for w, _ in dims)
    if crop[0] > hmax or crop[1] > wmax:
        raise DspError(f"data.crop={list(crop)} (height, width) is larger than every image of {folder} "
                       f"(the largest are {hmax} high, {wmax} wide); choose a crop no larger than that")
    imgs = {k: _read_gray(files[stems[k - 1]], crop) for k in needed}

    sizes = torch.tensor([imgs[k].shape for k in index["train"]], dtype=torch.int64)  # [N, 2] (h, w)
    counts = sizes.prod(1)  # [N]
    offsets = torch.cumsum(counts, 0) - counts  # [N]: where each image starts in `pixels`
    # Exact: the images are 8-bit (PIL "L", resized in 8 bits), so ·255 recovers their values.
    pixels = torch.from_numpy(np.concatenate([np.rint(imgs[k] * 255).astype(np.uint8).ravel()
                                              for k in index["train"]]))  # [P]
    splits = {"train": TensorDataset(offsets, sizes)}
    for name in ("val", "test"):
        splits[name] = _noisy_pairs(imgs, index[name], crop, sigma, int(noise_seed))
    names = {k: [stems[i - 1] for i in idx] for k, idx in index.items()}
    return DenoiseSplits(**splits, pixels=pixels, crop=crop, sigma=sigma, names=names)
