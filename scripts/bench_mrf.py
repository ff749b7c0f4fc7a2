"""Time per training iteration of the Word50 MRFs at batch 100 (Chen et al. 2015 §3.1: 0.064 s for
the 1st-order and 0.104 s for the 2nd-order model on a 2015 GPU), and of the fully connected
tagging MRF (blended: 1 sweep, non-blended: 20 sweeps).

    python scripts/bench_mrf.py [--device cpu|cuda] [--iters 20]

An iteration = unary forward, `sweeps` message-passing sweeps (per-example messages read from and
written back to the store), the Eq. 5 loss, backward, and an SGD-with-momentum step. Prints the
median over --iters iterations after 3 warm-up ones.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsp.cli.common import positive_int, user_errors
from dsp.models.mrf import MRF
from dsp.nn.lenet import PerPosition
from dsp.nn.mlp import MLP
from dsp.objectives.mrf import BlendedMRFLoss


def word50_model(kind: str, hidden):
    return MRF(5, 26, PerPosition(MLP(784, hidden, 26, flatten=True)), {"kind": kind}, pairwise="table")


def tagging_model(labels=159, features=1836):
    return MRF(labels, 2, MLP(features, [150], labels), {"kind": "full", "share": False})


def time_iterations(model, loss_fn, x, y, iters: int, device) -> float:
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.95)
    index = torch.arange(x.shape[0], device=device)
    times = []
    for i in range(iters + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = loss_fn.loss(model, None, x, y, index=index)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@user_errors
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=positive_int, default=20)
    ap.add_argument("--batch", type=positive_int, default=100)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    b = args.batch
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), batch {b}")
    x, y = torch.rand(b, 5, 28, 28, device=device), torch.randint(0, 26, (b, 5), device=device)
    for kind, hidden, sweeps in (("chain", [512], 10), ("chain2", [512], 10), ("chain2", [512, 64], 10)):
        model = word50_model(kind, hidden)
        params = sum(p.numel() for p in model.parameters())
        t = time_iterations(model, BlendedMRFLoss(iterations=sweeps), x, y, args.iters, device)
        print(f"word50 {kind:6s} unary {str(hidden):10s} {sweeps:2d} sweeps  {params:8d} weights  {t * 1e3:8.1f} ms / iteration")
    xt, yt = (torch.rand(b, 1836, device=device) < 0.05).float(), (torch.rand(b, 159, device=device) < 0.02).float()
    for name, loss_fn in (("blended, 1 sweep", BlendedMRFLoss(iterations=1)),
                          ("non-blended, 20 sweeps", BlendedMRFLoss(iterations=20, persistent=False))):
        t = time_iterations(tagging_model(), loss_fn, xt, yt, max(3, args.iters // 4), device)
        print(f"tagging (159 labels, fully connected) {name:24s} {t * 1e3:8.1f} ms / iteration")


if __name__ == "__main__":
    main()
