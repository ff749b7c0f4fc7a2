#!/usr/bin/env python
"""Train-step time and peak memory of learning through unrolled inference (End-to-end SPENs §4.3):
T = 3, 10, 20 steps, backward by double backward, with checkpointing, or by finite differences.

    python scripts/bench_unrolled.py                       # CPU, deep-prior denoiser, all settings
    python scripts/bench_unrolled.py --device cuda --json out.json
    python scripts/bench_unrolled.py --energy spen         # a Bibtex-sized SPEN instead

One train step = features, T unrolled steps, the Eq. 9 loss, backward, optimiser step. Each
setting runs in its own subprocess, so the peak memory (CUDA: max allocated; CPU: the process's
peak resident set minus the one after building the model) belongs to that setting alone.
Prints median step time over --repeats steps after --warmup steps.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

MODES = {"double backward": dict(hessian="autograd", checkpoint=False),
         "checkpoint": dict(hessian="autograd", checkpoint=True),
         "finite differences": dict(hessian="finite_difference")}


def build(energy: str, steps: int, mode: str, batch: int, device):
    from dsp.build import attach_inference
    from dsp.inference.unrolled import UnrolledGradientDescent

    torch.manual_seed(0)
    if energy == "denoise":
        from dsp.models.denoise import DeepPrior, DenoisingEnergy

        model = DenoisingEnergy(DeepPrior())
        clean = torch.rand(batch, 96, 128)
        x, y = clean + 0.1 * torch.randn_like(clean), clean
        inference = UnrolledGradientDescent(steps=steps, lr=0.2, momentum=0.25, learn_lr=True,
                                            parameterisation="unconstrained", entropy_temperature=0.0, **MODES[mode])
        loss = "mse"
    else:
        from functools import partial

        from dsp.models.spen import SPEN, GlobalEnergy, LocalEnergy
        from dsp.nn.mlp import MLP

        model = SPEN(159, MLP(1836, [400, 400]), partial(LocalEnergy), partial(GlobalEnergy, measurements=15))
        x = (torch.rand(batch, 1836) < 0.05).float()
        y = (torch.rand(batch, 159) < 0.02).float()
        inference = UnrolledGradientDescent(steps=steps, lr=1.0, learn_lr=True, **MODES[mode])
        loss = "bce"
    attach_inference(model, inference)
    return model.to(device), inference, x.to(device), y.to(device), loss


def one_setting(args) -> dict:
    from dsp.objectives.unrolled import UnrolledLoss

    device = torch.device(args.device)
    model, inference, x, y, loss_name = build(args.energy, args.steps, args.mode, args.batch, device)
    objective = UnrolledLoss(loss=loss_name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device) / 2**20
    times = []
    for i in range(args.warmup + args.repeats):
        sync()
        start = time.perf_counter()
        loss, _ = objective.loss(model, inference, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    row = {"energy": args.energy, "device": args.device, "batch": args.batch, "T": args.steps, "mode": args.mode,
           "step_ms": round(1000 * statistics.median(times), 1),
           "peak_rss_growth_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss, 1)}
    if device.type == "cuda":
        row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20 - base_cuda, 1)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--energy", choices=["denoise", "spen"], default="denoise")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, nargs="*", default=[3, 10, 20])
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    p.add_argument("--batch", type=int, default=None, help="default: 8 images or 32 label vectors")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json")
    p.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one setting in this process
    args = p.parse_args()
    args.batch = args.batch or (8 if args.energy == "denoise" else 32)
    if args.mode:
        args.steps = args.steps[0]
        print(json.dumps(one_setting(args)))
        return 0
    rows = []
    print(f"{'T':>3} {'backward':<20} {'step ms':>9} {'peak MiB':>9}   ({args.energy}, batch {args.batch}, {args.device})")
    for steps in args.steps:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--energy", args.energy, "--device", args.device, "--steps", str(steps),
                   "--batch", str(args.batch), "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--mode", mode]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return out.returncode
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            peak = row.get("peak_cuda_mb", row["peak_rss_growth_mb"])
            print(f"{steps:>3} {mode:<20} {row['step_ms']:>9.1f} {peak:>9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
