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
import json
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from dsp.build import build_data
from dsp.cli.common import user_errors
from dsp.data.conll import UNK_ID
from dsp.errors import DspError


@user_errors
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--eval-dir", default=None, help="the folder dsp-eval wrote (default: eval_<split>)")
    args = parser.parse_args()
    eval_dir = args.eval_dir or f"eval_{args.split}"
    print(f"| run | {args.split} tokens unknown | tag acc, unknown words | tag acc, known words |")
    print("| --- | --- | --- | --- |")
    used = 0
    for run in args.runs:
        config, predictions = run / ".hydra" / "config.yaml", run / eval_dir / "predictions.npz"
        if not config.is_file() or not predictions.is_file():
            print(f"warning: {run} lacks {config.name} or {eval_dir}/predictions.npz; run dsp-eval "
                  f"run_dir={run} split={args.split} out={eval_dir}", file=sys.stderr)
            continue
        cfg = OmegaConf.load(config)
        if not str(OmegaConf.select(cfg, "data._target_", default="")).endswith("load_conll2000"):
            raise DspError(f"{run} is not a chunking run (data=conll2000): unknown words are a chunking notion")
        evaluated = run / eval_dir / "evaluation.json"
        if evaluated.is_file() and json.loads(evaluated.read_text()).get("split") != args.split:
            raise DspError(f"{run / eval_dir} holds predictions for split={json.loads(evaluated.read_text())['split']}, "
                           f"not {args.split}: pass --split or --eval-dir to match")
        words = getattr(build_data(cfg), args.split).tensors[0][..., 0].numpy()  # [N, T]
        saved = np.load(predictions)
        pred, target = saved["pred"], saved["target"]  # [N, T'], padded with -1
        if len(target) != len(words):
            raise DspError(f"{predictions} holds {len(target)} sentences, the {args.split} split {len(words)}: "
                           f"they are predictions for another split; pass --split or --eval-dir to match")
        words = words[:, : target.shape[1]]
        real = target >= 0
        unknown, known = real & (words == UNK_ID), real & (words != UNK_ID)
        def acc(m):
            return 100.0 * float((pred[m] == target[m]).mean())
        print(f"| {run.name} | {100.0 * unknown.sum() / real.sum():.2f}% | {acc(unknown):.2f} | {acc(known):.2f} |")
        used += 1
    if not used:
        raise DspError("none of the runs had what this needs (warnings above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
