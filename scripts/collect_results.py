#!/usr/bin/env python
"""Print a Markdown table of the final metrics of finished dsp-train run folders.

    python scripts/collect_results.py outputs/repro/*            # one row per run folder
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = [("test/example_f1", "test F1", "{:.2f}"), ("val/example_f1", "val F1", "{:.2f}"),
           ("test/hamming", "test Hamming %", "{:.2f}"), ("val/threshold", "threshold", "{:.2f}"),
           ("train/epochs", "epochs", "{}"), ("train/time_s", "train time", "{:.0f} s"),
           ("train/peak_rss_mb", "peak RSS", "{:.0f} MiB")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    print("| run | " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("| --- " * (len(COLUMNS) + 1) + "|")
    missing = 0
    for run in args.runs:
        path = run / "metrics.json"
        if not path.is_file():
            print(f"warning: {run} has no metrics.json (unfinished run?)", file=sys.stderr)
            missing += 1
            continue
        metrics = json.loads(path.read_text())
        cells = [fmt.format(metrics[key]) if key in metrics else "–" for key, _, fmt in COLUMNS]
        print(f"| {run.name} | " + " | ".join(cells) + " |")
    return 1 if missing == len(args.runs) else 0


if __name__ == "__main__":
    sys.exit(main())
