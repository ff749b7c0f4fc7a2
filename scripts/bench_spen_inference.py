#!/usr/bin/env python
"""Time SPEN inference over a whole test split (SPEN §7.4: 2515 Bibtex test examples in 1.2 s).

    python scripts/bench_spen_inference.py --run-dir outputs/spen_bibtex/<run> [--device cuda]
    python scripts/bench_spen_inference.py --labels 159 --features 1836 --examples 2515  # untrained

With --run-dir it uses the trained model, its inference settings and its test split (the data must
be reachable through the run's paths.data_dir / DSP_DATA_DIR); otherwise a freshly initialised SPEN
of the given shape on random binary inputs. Prints the median / min / max wall time of --repeats
runs, the iterations used and the peak memory, and writes JSON rows with --json.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from functools import partial

import torch

from dsp.cli.common import positive_int, user_errors


def build_untrained(args, device):
    from dsp.inference.gradient import GradientInference
    from dsp.models.spen import SPEN, GlobalEnergy, LocalEnergy
    from dsp.nn.mlp import MLP

    torch.manual_seed(0)
    model = SPEN(args.labels, MLP(args.features, [150, 150]), partial(LocalEnergy),
                 partial(GlobalEnergy, measurements=args.measurements)).to(device).eval()
    x = (torch.rand(args.examples, args.features, device=device) < 0.05).float()
    return model, GradientInference(max_iter=args.max_iter), x, "untrained"


@user_errors
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=4096)
    p.add_argument("--labels", type=positive_int, default=159)
    p.add_argument("--features", type=positive_int, default=1836)
    p.add_argument("--examples", type=positive_int, default=2515)
    p.add_argument("--measurements", type=positive_int, default=15)
    p.add_argument("--max-iter", type=positive_int, default=100)
    p.add_argument("--json")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.run_dir:  # a DspError (no such run, no data) is printed as one line by user_errors
        import dsp

        run = dsp.load_run(args.run_dir, device=device)
        model, inference, source = run.model, run.inference, args.run_dir
        x = run.data().test.tensors[0].to(device)
    else:
        model, inference, x, source = build_untrained(args, device)
    from dsp.tasks.predict import predict_soft

    predict_soft(model, inference, x[:64], args.batch_size)  # warm-up
    times, iters = [], 0.0
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, iters = predict_soft(model, inference, x, args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    row = {
        "name": "spen_inference", "device": str(device), "source": source,
        "median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
        "examples": x.shape[0], "labels": model.local_energy.linear.out_features,
        "iterations": iters, "threads": torch.get_num_threads(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if device.type == "cuda":
        row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(json.dumps(row, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([row], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
