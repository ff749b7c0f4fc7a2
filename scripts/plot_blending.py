"""Chen et al. 2015, Fig. 9: training NLL against training time, blended vs non-blended.

    python scripts/plot_blending.py BLENDED_RUN NONBLENDED_RUN [--out docs/figures/mrf_blending.png]

Reads each run's TensorBoard scalars train/nll_converged (the objective's probe: Eq. 5 after
message passing to convergence on a fixed training subset) and time/train_s (seconds spent in
training steps, probes and validation excluded), prints when the blended run first reaches the
non-blended run's final NLL, and draws both curves (PIL; no plotting library needed).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def curve(run: Path) -> list[tuple[float, float]]:
    if not (run / "tb").is_dir():
        raise SystemExit(f"error: {run} has no tb/ folder: give a dsp-train run folder")
    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    tags = ea.Tags()["scalars"]
    if "train/nll_converged" not in tags or "time/train_s" not in tags:
        raise SystemExit(f"error: {run}: no train/nll_converged and time/train_s scalars; train an MRF with "
                         f"trainer.probe_every > 0")
    time = {e.step: e.value for e in ea.Scalars("time/train_s")}
    return [(time[e.step], e.value) for e in ea.Scalars("train/nll_converged") if e.step in time]


def draw(curves: dict[str, list], path: Path, size=(720, 440), margin=60) -> None:
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [p for c in curves.values() for p in c]
    t_max = max(t for t, _ in pts)
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    w, h = size[0] - 2 * margin, size[1] - 2 * margin
    xy = lambda t, v: (margin + w * t / t_max, margin + h * (hi - v) / max(hi - lo, 1e-9))  # noqa: E731
    d.rectangle([margin, margin, margin + w, margin + h], outline="black")
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        d.text((4, xy(0, v)[1] - 6), f"{v:.1f}", fill="black")
        t = t_max * i / 4
        d.text((xy(t, lo)[0] - 10, margin + h + 8), f"{t:.0f}s", fill="black")
    for (name, c), colour in zip(curves.items(), ("red", "blue")):
        d.line([xy(t, v) for t, v in c], fill=colour, width=2)
        d.text((margin + 10, margin + 10 + 16 * list(curves).index(name)), name, fill=colour)
    d.text((margin, 20), "training NLL (converged message passing, fixed subset) vs training time", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("blended", type=Path)
    ap.add_argument("nonblended", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/figures/mrf_blending.png"))
    args = ap.parse_args()
    blended, nonblended = curve(args.blended), curve(args.nonblended)
    t_ref, nll_ref = nonblended[-1]
    reach = next((t for t, v in blended if v <= nll_ref), None)
    print(f"non-blended: final NLL {nll_ref:.3f} after {t_ref:.1f} s of training")
    print(f"blended:     final NLL {blended[-1][1]:.3f} after {blended[-1][0]:.1f} s of training")
    if reach is None:
        print("blended never reached the non-blended final NLL")
    else:
        print(f"blended reaches it after {reach:.1f} s = {reach / t_ref:.3f} of the non-blended time")
    draw({"blended": blended, "non-blended": nonblended}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
