#!/usr/bin/env python
"""dsp's speed suite (issue 8): every timed row of docs/PERFORMANCE.md, dsp and its references side
by side in one process, on CPU or CUDA.

    python scripts/bench.py --suite {spen_inference,chain_crf,mrf,e2e,dvn,all} --device {cpu,cuda} --json FILE
    python scripts/bench.py --suite all --quick          # tiny shapes: checks that every row runs

A benchmark, not a test: it prints figures and never asserts on them. FILE gets a list of rows,
each with `name`, `device`, `median_ms`, `min_ms`, `max_ms`, `shapes` (plus what was timed and any
agreement check); rows of reference implementations have `reference` in their name.

  spen_inference  SPEN inference over the Bibtex test set (2515 × 159 labels, 150 features, 15
                  measurements, 40 mirror-descent steps with momentum; the features F(x) are
                  computed once, outside the timer). dsp's GradientInference with its hand-written
                  ∂E/∂ȳ and convergence tests on the device (the stop test reads back every 10 steps;
                  tolerances too tight to fire, so all 40 steps run), and with autograd; against
                  bare loops: eager autograd, a hand-written gradient, and (CUDA) that loop captured
                  in a CUDA graph.
  chain_crf       log Z + marginals, NLL + gradient and Viterbi at batch 512, length 14, 26 labels,
                  against pytorch-struct and pytorch-crf (scripts/bench_chain.py, which also checks
                  that all three agree).
  mrf             one blended-learning iteration of the Word50 MRFs at batch 100 (1st and 2nd
                  order, 10 sweeps) and of the fully connected tagging MRF (1 sweep).
  e2e             one training step of the deep-prior denoiser (Eq. 15, 96×128, batch 8) through
                  T = 3 and T = 20 unrolled steps, with a profiler split of the step into time in
                  kernels (CUDA) or in operators (CPU) and the rest (launches, Python, autograd).
  dvn             DVN inference on the 128 horse test images × 36 crops (24×24, 30 ascent steps),
                  crops combined by mask averaging.

The reference libraries (pytorch-struct, pytorch-crf) are for benchmarking only; a missing one is
reported and its rows skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start-up chatter (e.g. no GPU found)
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_* scripts
import bench_chain  # noqa: E402

SUITES = ("spen_inference", "chain_crf", "mrf", "e2e", "dvn")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_row(name: str, fn, device, repeats: int, warmup: int, shapes: dict, **extra) -> dict:
    """Time fn() (bench_chain.time_op: device synchronised, ms) into one JSON row."""
    median, lo, hi = bench_chain.time_op(fn, device, repeats, warmup)
    return {"name": name, "device": str(device), "median_ms": median,
            "min_ms": lo, "max_ms": hi, "shapes": shapes, "repeats": repeats,
            "threads": torch.get_num_threads(), "torch": torch.__version__, **extra}


# ----------------------------------------------------------------------------------------------
# SPEN inference
# ----------------------------------------------------------------------------------------------
def spen_problem(examples: int, labels: int, features: int, measurements: int, device):
    """A SPEN of the Bibtex shape and its test-set features (computed once, outside any timer).
    Weights are scaled so that the energy has the magnitudes of a trained model's."""
    from dsp.models.spen import SPEN, GlobalEnergy, LocalEnergy
    from dsp.nn.mlp import MLP

    torch.manual_seed(0)
    model = SPEN(labels, MLP(features, []), partial(LocalEnergy),
                 partial(GlobalEnergy, measurements=measurements, init_scale=5.0)).to(device).eval()
    with torch.no_grad():
        feats = model.features(torch.randn(examples, features, device=device))
    return model, feats


def spen_reference_loops(model, feats, steps: int, lr: float, momentum: float):
    """Bare mirror-descent loops (no convergence tests), written independently of dsp's code."""
    logits, c1, b1 = feats.logits, model.global_energy.measure.weight, model.global_energy.measure.bias
    c2 = model.global_energy.out.weight  # [1, M]

    def handwritten_grad(y):  # ∂/∂ȳ of -ȳ·logits + c2ᵀ softplus(C1 ȳ + b1)
        return -logits + (torch.sigmoid(y @ c1.t() + b1) * c2) @ c1

    def autograd_grad(y):
        y = y.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(model.energy(y, feats).sum(), y)
        return g

    def loop(grad_fn, z, velocity):
        for _ in range(steps):
            velocity = momentum * velocity + grad_fn(torch.sigmoid(z))
            z = z - lr * velocity
        return torch.sigmoid(z)

    z0 = logits.clone()  # start at σ(local logits), as dsp's init="local"
    return {"eager_autograd": lambda: loop(autograd_grad, z0, torch.zeros_like(z0)),
            "handwritten": lambda: loop(handwritten_grad, z0, torch.zeros_like(z0))}, handwritten_grad, z0


def cuda_graph_loop(grad_fn, z0, steps: int, lr: float, momentum: float):
    """The hand-written loop captured once in a CUDA graph; each call replays it (one launch)."""
    z, velocity = z0.clone(), torch.zeros_like(z0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():  # warm-up outside the graph, as capture requires
        for _ in range(3):
            velocity.copy_(momentum * velocity + grad_fn(torch.sigmoid(z)))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        for _ in range(steps):
            velocity.copy_(momentum * velocity + grad_fn(torch.sigmoid(z)))
            z.sub_(lr * velocity)
        out = torch.sigmoid(z)

    def replay():
        z.copy_(z0)
        velocity.zero_()
        graph.replay()
        return out

    return replay


def suite_spen_inference(args, device) -> list[dict]:
    from dsp.inference.gradient import GradientInference

    shapes = dict(examples=2515, labels=159, features=150, measurements=15, steps=40)
    if args.quick:
        shapes.update(examples=16, labels=7, features=5, measurements=3, steps=4)
    steps, lr, momentum = shapes["steps"], 0.1, 0.95
    model, feats = spen_problem(shapes["examples"], shapes["labels"], shapes["features"], shapes["measurements"], device)
    # Tolerances too tight to fire: the per-example tests run every step, yet all `steps` steps run.
    common = dict(method="mirror", lr=lr, momentum=momentum, max_iter=steps, rel_tol=1e-30, abs_tol=1e-30,
                  init="local", eps=1e-6)
    ops = {
        "spen_inference_dsp": ("GradientInference, hand-written dE/dy, stop test every 10 steps",
                               GradientInference(gradient="analytic", check_every=10, **common)),
        "spen_inference_dsp_autograd": ("GradientInference, autograd dE/dy, stop test every step",
                                        GradientInference(gradient="autograd", check_every=1, **common)),
    }
    refs, grad_fn, z0 = spen_reference_loops(model, feats, steps, lr, momentum)
    table = {name: (what, partial(lambda inf: inf(model, feats).y, inf)) for name, (what, inf) in ops.items()}
    table["spen_inference_reference_eager_autograd"] = ("bare loop, autograd dE/dy", refs["eager_autograd"])
    table["spen_inference_reference_handwritten"] = ("bare loop, hand-written dE/dy", refs["handwritten"])
    if device.type == "cuda":
        table["spen_inference_reference_cuda_graph"] = (
            "bare hand-written loop captured in one CUDA graph", cuda_graph_loop(grad_fn, z0, steps, lr, momentum))
    # dsp clamps the logits to keep ȳ in [eps, 1-eps]; far from that bound all rows agree.
    expected = refs["handwritten"]()
    rows = []
    for name, (what, fn) in table.items():
        with torch.no_grad():
            diff = float((fn() - expected).abs().max())
        rows.append(timed_row(name, fn, device, args.repeats, args.warmup, shapes, what=what,
                              max_abs_diff_vs_handwritten=diff))
    return rows


# ----------------------------------------------------------------------------------------------
# Chain CRF (delegates to scripts/bench_chain.py)
# ----------------------------------------------------------------------------------------------
def suite_chain_crf(args, device) -> list[dict]:
    shapes = dict(batch=512, length=14, labels=26, mixed_lengths=False)
    if args.quick:
        shapes.update(batch=4, length=3, labels=3)
    refs, notes = bench_chain.load_references(not args.no_references)
    for note in notes:
        print(f"note: {note}")
    problem = bench_chain.make_problem(shapes["batch"], shapes["length"], shapes["labels"], False, device)
    table = bench_chain.ops(*problem, refs)
    agreement = bench_chain.check_agreement(table, *problem)
    rows = []
    for (task, library), (what, fn) in table.items():
        rows.append(timed_row(bench_chain.row_name(task, library), fn, device, args.repeats, args.warmup,
                              shapes, what=what, library=library, agreement=agreement))
    return rows


# ----------------------------------------------------------------------------------------------
# Blended MRF learning (the models of scripts/bench_mrf.py)
# ----------------------------------------------------------------------------------------------
def suite_mrf(args, device) -> list[dict]:
    import bench_mrf
    from dsp.objectives.mrf import BlendedMRFLoss

    b = 4 if args.quick else 100
    torch.manual_seed(0)
    x, y = torch.rand(b, 5, 28, 28, device=device), torch.randint(0, 26, (b, 5), device=device)
    labels, feats = (7, 11) if args.quick else (159, 1836)
    xt = (torch.rand(b, feats, device=device) < 0.05).float()
    yt = (torch.rand(b, labels, device=device) < 0.02).float()
    cases = [("mrf_word50_order1_train_iteration_dsp", bench_mrf.word50_model("chain", [512]), x, y, 10, 64.0),
             ("mrf_word50_order2_train_iteration_dsp", bench_mrf.word50_model("chain2", [512]), x, y, 10, 104.0),
             ("mrf_tagging_blended_train_iteration_dsp", bench_mrf.tagging_model(labels, feats), xt, yt, 1, None)]
    rows = []
    for name, model, inputs, targets, sweeps, paper_ms in cases:
        model.to(device)
        loss_fn = BlendedMRFLoss(iterations=sweeps)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.95)
        index = torch.arange(b, device=device)

        def step():
            loss, _ = loss_fn.loss(model, None, inputs, targets, index=index)
            opt.zero_grad()
            loss.backward()
            opt.step()

        repeats = args.repeats if "word50" in name else max(1, args.repeats // 4)
        shapes = dict(batch=b, sweeps=sweeps, variables=inputs.shape[1] if inputs.dim() > 2 else labels)
        rows.append(timed_row(name, step, device, repeats, args.warmup, shapes, paper_ms=paper_ms,
                              what="unaries, message-passing sweeps, Eq. 5 loss, backward, SGD step"))
    return rows


# ----------------------------------------------------------------------------------------------
# End-to-end SPEN denoising train step, with a profiler split
# ----------------------------------------------------------------------------------------------
def profile_split(fn, device) -> dict:
    """Share of one call's wall time spent in kernels (CUDA: device time of the kernels; CPU: self
    time of the aten operators), the rest being launches, Python and autograd bookkeeping."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    wall_ms = 1000.0 * (time.perf_counter() - t0)
    events = prof.key_averages()
    if device.type == "cuda":
        kernel_ms = sum(e.self_device_time_total for e in events) / 1000.0
    else:
        kernel_ms = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1000.0
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    return {"profiled_wall_ms": wall_ms, "kernel_ms": kernel_ms, "kernel_share": kernel_ms / wall_ms,
            "aten_ops": ops}


def suite_e2e(args, device) -> list[dict]:
    import bench_unrolled
    from dsp.objectives.unrolled import UnrolledLoss

    batch = 1 if args.quick else 8
    rows = []
    for steps in ((1,) if args.quick else (3, 20)):
        model, inference, x, y, loss_name = bench_unrolled.build("denoise", steps, "double backward", batch, device)
        if args.quick:
            x, y = x[..., :16, :16], y[..., :16, :16]
        objective = UnrolledLoss(loss=loss_name)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            loss, _ = objective.loss(model, inference, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        repeats = args.repeats if steps <= 3 else max(1, args.repeats // 2)
        rows.append(timed_row(f"e2e_denoise_train_step_T{steps}_dsp", step, device, repeats, args.warmup,
                              dict(batch=batch, height=x.shape[-2], width=x.shape[-1], T=steps),
                              what="deep prior (Eq. 15): features, T unrolled steps, Eq. 9 loss, backward, Adam",
                              profile=profile_split(step, device)))
    return rows


# ----------------------------------------------------------------------------------------------
# DVN inference on the horse test images, 36 crops each
# ----------------------------------------------------------------------------------------------
def suite_dvn(args, device) -> list[dict]:
    from dsp.inference.gradient import GradientInference
    from dsp.models.dvn_seg import SegmentationValueNetwork
    from dsp.tasks.segmentation import average_crops, crop_grid, take_crops

    images, side, crop, count, steps, width = 128, 32, 24, 36, 30, 64
    if args.quick:
        images, side, crop, count, steps, width = 2, 12, 8, 4, 2, 4
    torch.manual_seed(0)
    model = SegmentationValueNetwork(3, crop, {"base_width": width}).to(device).eval()
    inference = GradientInference(method="projected", lr=50.0, momentum=0.0, max_iter=steps, rel_tol=0.0,
                                  abs_tol=0.0, init="constant", init_value=0.0)
    x = torch.rand(images, 3, side, side, device=device)
    corners = crop_grid((side, side), crop, count, device=device)
    chunk = 128 * 8  # crops per inference batch

    def predict():
        crops = take_crops(x, corners, crop).flatten(0, 1)  # [N·K, 3, c, c]
        with torch.no_grad():
            feats = [model.features(part) for part in crops.split(chunk)]
        masks = torch.cat([inference(model, f).y for f in feats])  # [N·K, c, c]
        return average_crops(masks.view(images, count, crop, crop), corners, (side, side))

    return [timed_row("dvn_inference_horses_dsp", predict, device, args.repeats, args.warmup,
                      dict(images=images, side=side, crop=crop, crops=count, steps=steps, base_width=width,
                           crops_per_batch=chunk),
                      what="36 crops per image, projected ascent from 0, mask averaging")]


# ----------------------------------------------------------------------------------------------
def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} thread(s))"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="all", choices=[*SUITES, "all"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny shapes: check that every row runs")
    p.add_argument("--no-references", action="store_true", help="skip the third-party libraries")
    p.add_argument("--json", help="write the rows (a JSON list) to this file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    suites = SUITES if args.suite == "all" else (args.suite,)
    print(f"device {describe(device)}, torch {torch.__version__}, median of {args.repeats} "
          f"after {args.warmup} warm-up run(s){', quick shapes' if args.quick else ''}")
    rows = []
    for suite in suites:
        print(f"\n== {suite}")
        new = globals()[f"suite_{suite}"](args, device)
        for r in new:
            extra = ""
            if "profile" in r:
                extra = f"  kernels {100 * r['profile']['kernel_share']:.0f}% of {r['profile']['profiled_wall_ms']:.1f} ms"
            print(f"  {r['name']:<48} median {r['median_ms']:10.2f} ms  (min {r['min_ms']:.2f}, max {r['max_ms']:.2f}){extra}")
        rows += new
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
        print(f"\nwrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
