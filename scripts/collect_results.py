#!/usr/bin/env python
"""Print a Markdown table of the final metrics of finished dsp-train run folders.

    python scripts/collect_results.py outputs/repro/*                  # one row per run folder
    python scripts/collect_results.py --mean outputs/ocr/crf_ocr_online/fold*   # + a mean ± std row

The columns follow the task: example F1 for multi-label runs, char / word accuracy for sequences,
chunk F1 for chunking, IoU for segmentation.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

HEADLINES = ["example_f1", "chunk_f1", "char_acc", "mean_iou"]  # the first one a run has leads
EXTRA = {"example_f1": ["hamming"], "char_acc": ["letter_acc", "word_acc"], "chunk_f1": ["char_acc"],
         "mean_iou": ["global_iou"]}
TAIL = [("val/threshold", "threshold", "{:.2f}"), ("train/epochs", "epochs", "{:.0f}"),
        ("train/time_s", "train time", "{:.0f} s"), ("train/peak_rss_mb", "peak RSS", "{:.0f} MiB")]


def columns(metrics: dict) -> list[tuple[str, str, str]]:
    head = next((h for h in HEADLINES if f"test/{h}" in metrics), "example_f1")
    cols = [(f"test/{head}", f"test {head}", "{:.2f}"), (f"val/{head}", f"val {head}", "{:.2f}")]
    cols += [(f"test/{m}", f"test {m}", "{:.2f}") for m in EXTRA.get(head, [])]
    return cols + [c for c in TAIL if c[0] in metrics]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--mean", action="store_true", help="add a mean ± std row (e.g. over CV folds)")
    args = parser.parse_args()
    found = []
    for run in args.runs:
        path = run / "metrics.json"
        if not path.is_file():
            what = "does not exist" if not run.exists() else "has no metrics.json (unfinished run, or a sweep folder: give its jobs)"
            print(f"warning: {run} {what}", file=sys.stderr)
            continue
        try:
            found.append((run, json.loads(path.read_text())))
        except ValueError as err:
            print(f"warning: {path} is not valid JSON ({err}); skipped", file=sys.stderr)
    if not found:
        print("error: no finished run among the folders given", file=sys.stderr)
        return 1
    cols = columns(found[0][1])
    print("| run | " + " | ".join(title for _, title, _ in cols) + " |")
    print("| --- " * (len(cols) + 1) + "|")
    for run, metrics in found:
        cells = [fmt.format(metrics[key]) if key in metrics else "–" for key, _, fmt in cols]
        print(f"| {run.name} | " + " | ".join(cells) + " |")
    if args.mean and len(found) > 1:
        cells = []
        for key, _, fmt in cols:
            values = [float(m[key]) for _, m in found if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
            cells.append(f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else "–")
        print(f"| mean ± std over {len(found)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
