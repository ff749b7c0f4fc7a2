#!/usr/bin/env python
"""How faithful are the loader's size×size masks to the originals? Compares the masks that
dsp.data.images makes (resized, thresholded at 128) with JPEG draft decoding and with full decoding
against the exact pixel coverage: the full-size mask thresholded at 128, box-filtered to size×size
(each pixel's foreground fraction) and thresholded at 1/2. A model that predicted the coverage
masks perfectly would score the printed mean IoU against the loader's.

It then compares the two ways of warping training images (data.warp_source_scale): the size×size
image and its 0/1 mask (scale 1) against a --source× copy and its soft mask, shrunk afterwards
(dsp.data.augment.warp_from_source), one random warp per image (--seed): how far apart the two
paths' masks are (mean IoU), and how sharp their images are (mean absolute difference of
horizontally adjacent pixels; the unwarped loader images for reference).

    python scripts/mask_fidelity.py [--root DIR] [--size 32] [--source 4] [--seed 0]

DIR defaults to $DSP_DATA_DIR/weizmann_horse_db (any rgb/ + figure_ground/ folder pair works).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from dsp.cli.common import positive_int, user_errors
from dsp.data.images import image_mask_pairs, read_resized
from dsp.data.augment import affine_matrices, warp, warp_from_source, warp_matrices
from dsp.tasks.segmentation import global_iou, mean_iou

# (name, scale, rotate, translate): sub-pixel shifts only (0.02 of the side is 0.64 pixel at 32),
# and the warps of the horses presets (data.augment)
WARPS = (("shifts under 0.64 px", 0.0, 0.0, 0.02), ("the presets' warps", 0.1, 10.0, 0.1))


def coverage_mask(path: Path, size: int) -> np.ndarray:
    """Exact coverage ≥ 1/2 of the full-size mask (thresholded at 128) on a size×size grid."""
    from PIL import Image

    with Image.open(path) as im:
        full = (np.asarray(im.convert("L")) >= 128).astype(np.float32)
    box = Image.fromarray(full).resize((size, size), Image.BOX)  # area averages
    return np.asarray(box) >= 0.5


def fidelity(root: Path, size: int) -> dict[str, dict[str, float]]:
    masks = [mask for _, _, mask in image_mask_pairs(root)]
    truth = torch.from_numpy(np.stack([coverage_mask(m, size) for m in masks]))
    rows = {}
    for name, draft in (("full decoding (data.jpeg_draft=false)", False),
                        ("draft decoding (data.jpeg_draft=true)", True)):
        pred = torch.from_numpy(np.stack([read_resized(m, "L", size, draft) >= 128 for m in masks]))
        rows[name] = {"mean_iou": mean_iou(pred, truth), "global_iou": global_iou(pred, truth),
                      "pixels_differing_%": 100.0 * (pred != truth).double().mean().item()}
    return rows


def sharpness(x: torch.Tensor) -> float:
    return (x[..., 1:] - x[..., :-1]).abs().mean().item()


def warp_paths(root: Path, size: int, source: int, seed: int) -> dict[str, dict[str, float]]:
    """The two warp paths on every image of root (full decoding), one draw of each WARPS row."""
    def read(column, mode, side):  # [N, side, side(, 3)] uint8 as a tensor
        return torch.from_numpy(np.stack([read_resized(pair[column], mode, side) for pair in pairs]))

    pairs = image_mask_pairs(root)
    x = read(1, "RGB", size).permute(0, 3, 1, 2).float() / 255  # [N, 3, s, s], as the loader
    xs = read(1, "RGB", size * source).permute(0, 3, 1, 2).float() / 255
    y = (read(2, "L", size) >= 128).float()  # [N, s, s], thresholded as the loader
    ys = read(2, "L", size * source).float() / 255  # soft
    n = x.shape[0]
    identity = affine_matrices(torch.ones(n), torch.zeros(n), torch.zeros(n, 2))
    rows = {"no warp": {"masks_iou": mean_iou(warp_from_source(xs, ys, identity, (size, size))[1], y),
                        "sharpness_small": sharpness(x), "sharpness_source": sharpness(x)}}
    torch.manual_seed(seed)
    for name, scale, rotate, translate in WARPS:
        theta = warp_matrices(n, scale, rotate, translate)
        xa, ya = warp(x, y, theta)
        xb, yb = warp_from_source(xs, ys, theta, (size, size))
        rows[name] = {"masks_iou": mean_iou(ya, yb), "sharpness_small": sharpness(xa),
                      "sharpness_source": sharpness(xb)}
    return rows


@user_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--size", type=positive_int, default=32)
    parser.add_argument("--source", type=positive_int, default=4, help="the larger copy's scale (data.warp_source_scale)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = args.root or Path(os.environ.get("DSP_DATA_DIR", "data")) / "weizmann_horse_db"
    rows = fidelity(root, args.size)  # a DspError (no such folder) is printed as one line by user_errors
    warps = warp_paths(root, args.size, args.source, args.seed)
    print(f"{root} at {args.size}×{args.size}: the loader's masks against the exact pixel coverage")
    print(f"{'decoding':<40} {'mean IoU':>9} {'global IoU':>11} {'pixels differing %':>19}")
    for name, r in rows.items():
        print(f"{name:<40} {r['mean_iou']:9.2f} {r['global_iou']:11.2f} {r['pixels_differing_%']:19.2f}")
    print(f"\nwarping the {args.size}×{args.size} rows against a {args.source}× source "
          f"(full decoding, seed {args.seed})")
    header = ("warp", "masks' IoU between the paths", "sharpness, small", "sharpness, source")
    print(f"{header[0]:<22} {header[1]:>29} {header[2]:>17} {header[3]:>18}")
    for name, r in warps.items():
        print(f"{name:<22} {r['masks_iou']:29.2f} {r['sharpness_small']:17.4f} {r['sharpness_source']:18.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
