#!/usr/bin/env python
"""Split a segmentation value network's errors into value errors and search errors
(dsp.tasks.value_diagnosis), one table row per run folder.

    python scripts/dvn_diagnose.py --split train outputs/dvn/run_a outputs/dvn/run_b

Each image is cut into the run's grid of --crops crops (data.crop; whole images when the run has no
crops), and every crop is diagnosed on its own. The data is rebuilt from each run's stored config,
so it needs DSP_DATA_DIR as for training. split=train diagnoses the images the network learned from
(under- or over-fitting: compare with val).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsp.build import load_run
from dsp.cli.common import square_int, user_errors
from dsp.errors import DspError
from dsp.tasks import task_for
from dsp.tasks.segmentation import SegmentationTask, crop_grid, take_crops
from dsp.tasks.value_diagnosis import value_diagnosis

COLUMNS = ("mean_iou", "exact", "value_error", "search_error", "v_truth", "v_pred", "v_pred_abs_error",
           "iou_from_truth")


def crops_of(run, split: str, count: int):
    """The split's images and masks cut into the run's crop grid: [N·K, C, c, c], [N·K, c, c]."""
    data = run.data()
    x, y = data.split(split).tensors
    task = task_for(data)
    if not isinstance(task, SegmentationTask):
        raise DspError(f"{type(task).__name__}: the diagnosis is for segmentation runs (data=horses32)")
    crop = task.crop
    if crop is None:
        return x, y
    corners = crop_grid(tuple(x.shape[-2:]), crop, count)
    return take_crops(x, corners, crop).flatten(0, 1), take_crops(y, corners, crop).flatten(0, 1)


@user_errors
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--crops", type=square_int, default=4, help="crops per image (a square number; default 4)")
    parser.add_argument("--ckpt", default="best")
    args = parser.parse_args()
    print(f"| run ({args.split}, {args.crops} crops an image) | crops | " + " | ".join(COLUMNS) + " |")
    print("| --- " * (len(COLUMNS) + 2) + "|")
    for run_dir in args.runs:
        run = load_run(run_dir, ckpt=args.ckpt)  # a DspError is printed as one line by user_errors
        if not hasattr(run.model, "value"):
            raise DspError(f"{run_dir}: the model has no value network (model=dvn_seg)")
        x, y = crops_of(run, args.split, args.crops)
        d = value_diagnosis(run.model, run.inference, x, y)
        print(f"| {run_dir} | {d['crops']} | " + " | ".join(f"{d[k]:.2f}" for k in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
