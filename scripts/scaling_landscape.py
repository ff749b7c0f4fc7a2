#!/usr/bin/env python
"""Print the training loss L_α (Eq. 19 of Shevchenko & Osokin 2019) of a trained chain-CRF run
against the unary scale α, on a fine log grid around the run's own α.

    DSP_DATA_DIR=../shared/data python scripts/scaling_landscape.py outputs/ocr/crf_ocr_online/fold1

Online scaling (Algorithm 1) picks α on the grid {2^t} by this loss on the same training subset;
this shows where the continuous minimum lies, i.e. why the grid search moves α or keeps it.
"""
from __future__ import annotations

import argparse

from dsp.build import build_objective, load_run
from dsp.cli.common import positive_int, user_errors
from dsp.training.scaling import subset_losses


@user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished dsp-train run folder of a chain CRF")
    parser.add_argument("--ckpt", default="best", help="checkpoint name (best or last)")
    parser.add_argument("--octaves", type=positive_int, default=2, help="grid half-width, in factors of 2")
    parser.add_argument("--steps", type=positive_int, default=4, help="grid points per octave")
    parser.add_argument("--subset", type=positive_int, default=2000, help="training examples (Algorithm 1's subset)")
    args = parser.parse_args()
    run = load_run(args.run_dir, ckpt=args.ckpt)
    x, y = run.data().split("train").tensors
    own = float(getattr(run.model, "unary_scale", 1.0))
    grid = [own * 2 ** (t / args.steps) for t in range(-args.octaves * args.steps, args.octaves * args.steps + 1)]
    losses = subset_losses(run.model, build_objective(run.config), x, y, grid, args.subset,
                           seed=int(run.checkpoint["seed"]))
    best = int(losses.argmin())
    print(f"{args.run_dir} ({args.ckpt}.pt): the run's α = {own:g}; L_α on {min(args.subset, x.shape[0])} "
          "training examples")
    for alpha, loss in zip(grid, losses.tolist()):
        print(f"  α = {alpha:8.4g}  L_α = {loss:.4f}" + ("  <- minimum" if alpha == grid[best] else ""))


if __name__ == "__main__":
    main()
