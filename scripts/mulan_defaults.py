"""The generic command on every Mulan dataset: how model=linear / mlp / spen / dvn do with no
override beyond the data paths. Prints one markdown row per dataset × model (test example F1 and
Hamming loss, mean ± std over seeds, seconds per run) and keeps the run folders under --out.

  DSP_DATA_DIR=../shared/data python scripts/mulan_defaults.py --datasets birds flags \
      --models linear mlp spen dvn --seeds 0 1 2 [--out outputs/mulan_defaults] [-- extra overrides]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mulan_datasets import FILES, data_overrides  # noqa: E402


def run(dataset: str, model: str, seed: int, out: str, extra: list[str]) -> dict:
    folder = os.path.join(out, dataset, model, f"seed{seed}")
    metrics = os.path.join(folder, "metrics.json")
    if not os.path.exists(metrics):
        cmd = ["dsp-train", f"model={model}", *data_overrides(dataset), f"seed={seed}", "trainer.progress=false",
               "logger=none", f"hydra.run.dir={folder}", *extra]
        t0 = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"FAILED {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}", file=sys.stderr)
            return {}
        print(f"# {dataset} {model} seed {seed}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    with open(metrics) as f:
        return json.load(f)


def cell(values: list[float], digits: int = 2) -> str:
    if not values:
        return "failed"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(FILES), choices=list(FILES))
    parser.add_argument("--models", nargs="+", default=["linear", "mlp", "spen", "dvn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="outputs/mulan_defaults")
    parser.add_argument("extra", nargs="*", help="overrides added to every run (after --)")
    args = parser.parse_args()
    print("| dataset | model | test example F1 | test Hamming (%) | empty predictions (%) | seconds per run |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dataset in args.datasets:
        for model in args.models:
            results = [r for r in (run(dataset, model, s, args.out, args.extra) for s in args.seeds) if r]
            f1 = [r["test/example_f1"] for r in results]
            ham = [r["test/hamming"] for r in results]
            empty = [r["test/empty_predictions"] for r in results if "test/empty_predictions" in r]
            secs = [r["train/time_s"] for r in results]
            print(f"| {dataset} | {model} | {cell(f1)} | {cell(ham, 3)} | {cell(empty, 1) if empty else '–'} | "
                  f"{statistics.mean(secs):.0f} |" if results else f"| {dataset} | {model} | failed | | | |", flush=True)


if __name__ == "__main__":
    main()
