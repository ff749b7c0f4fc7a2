#!/usr/bin/env python
"""Per-token tag accuracy of chunking runs, split into unknown (out-of-vocabulary) and known words.

    dsp-eval run_dir=<run> split=test out=eval_test          # writes <run>/eval_test/predictions.npz
    python scripts/oov_accuracy.py --split test outputs/wd/*  # one row per run

The data is rebuilt from each run's stored config (so the vocabulary, and hence which words are
unknown, is the run's own); the predictions come from dsp-eval's predictions.npz. Needs
DSP_DATA_DIR as for training.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from dsp.build import build_data
from dsp.data.conll import UNK_ID


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--eval-dir", default=None, help="the folder dsp-eval wrote (default: eval_<split>)")
    args = parser.parse_args()
    eval_dir = args.eval_dir or f"eval_{args.split}"
    print(f"| run | {args.split} tokens unknown | tag acc, unknown words | tag acc, known words |")
    print("| --- | --- | --- | --- |")
    for run in args.runs:
        config, predictions = run / ".hydra" / "config.yaml", run / eval_dir / "predictions.npz"
        if not config.is_file() or not predictions.is_file():
            print(f"warning: {run} lacks {config.name} or {eval_dir}/predictions.npz; run dsp-eval "
                  f"run_dir={run} split={args.split} out={eval_dir}", file=sys.stderr)
            continue
        words = getattr(build_data(OmegaConf.load(config)), args.split).tensors[0][..., 0].numpy()  # [N, T]
        saved = np.load(predictions)
        pred, target = saved["pred"], saved["target"]  # [N, T'], padded with -1
        words = words[:, : target.shape[1]]
        real = target >= 0
        unknown, known = real & (words == UNK_ID), real & (words != UNK_ID)
        def acc(m):
            return 100.0 * float((pred[m] == target[m]).mean())
        print(f"| {run.name} | {100.0 * unknown.sum() / real.sum():.2f}% | {acc(unknown):.2f} | {acc(known):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
