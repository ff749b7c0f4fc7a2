#!/usr/bin/env python
"""How faithful are the loader's size×size masks to the originals? Compares the masks that
dsp.data.images makes (resized, thresholded at 128) with JPEG draft decoding and with full decoding
against the exact pixel coverage: the full-size mask thresholded at 128, box-filtered to size×size
(each pixel's foreground fraction) and thresholded at 1/2. A model that predicted the coverage
masks perfectly would score the printed mean IoU against the loader's.

    python scripts/mask_fidelity.py [--root DIR] [--size 32]

DIR defaults to $DSP_DATA_DIR/weizmann_horse_db (any rgb/ + figure_ground/ folder pair works).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from dsp.data.images import image_mask_pairs, read_resized
from dsp.errors import DspError
from dsp.tasks.segmentation import global_iou, mean_iou


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)
    root = args.root or Path(os.environ.get("DSP_DATA_DIR", "data")) / "weizmann_horse_db"
    try:
        rows = fidelity(root, args.size)
    except DspError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{root} at {args.size}×{args.size}: the loader's masks against the exact pixel coverage")
    print(f"{'decoding':<40} {'mean IoU':>9} {'global IoU':>11} {'pixels differing %':>19}")
    for name, r in rows.items():
        print(f"{name:<40} {r['mean_iou']:9.2f} {r['global_iou']:11.2f} {r['pixels_differing_%']:19.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
