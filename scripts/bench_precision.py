"""Training speed of trainer.precision and trainer.compile side by side: fp32 eager, bf16, fp32
compiled and bf16 compiled, on two presets, in one run.

    DSP_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python scripts/bench_precision.py \\
        [--presets spen_bibtex crf_ocr_joint] [--modes fp32 bf16 compile bf16+compile] \\
        [--epochs 2] [--device cpu|cuda] [--json out.json] [--synthetic]

Every (preset, mode) trains in a fresh process (so compilation starts cold, as in a real run) with
trainer.max_epochs=--epochs (a staged preset runs that many epochs in each stage), progress off,
no logger, into a temporary run folder. Reported per run:
    first epochs   training-step seconds of each stage's first epoch (compilation happens there)
    ms/step        training-step time per optimiser step over the other epochs (steady state)
    speed-up       fp32 eager's ms/step over this mode's
    val            the monitored validation metric of best.pt (the modes should agree closely)
    total s        the whole run (data loading excluded; validation and final evaluation included)
Training-step time is the trainer's own train_seconds (validation, probes and checkpoints
excluded). --synthetic replaces the presets' data with the block-exclusive synthetic task (no
data folder needed; a rehearsal).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {
    "fp32": [],
    "bf16": ["trainer.precision=bf16"],
    "compile": ["trainer.compile=true"],
    "bf16+compile": ["trainer.precision=bf16", "trainer.compile=true"],
    "fp16": ["trainer.precision=fp16"],
}
SYNTHETIC = ["data=synthetic", "data.num_train=1500", "data.num_val=500", "data.num_test=500"]


def one_run(preset: str, mode: str, epochs: int, device: str, synthetic: bool) -> dict:
    """Train one (preset, mode) in this process and measure it."""
    from hydra import compose, initialize_config_dir

    from dsp.build import assemble
    from dsp.cli.common import config_dir
    from dsp.training.hooks import Hook
    from dsp.training.trainer import Trainer, resolve_device
    from omegaconf import OmegaConf

    class Clock(Hook):
        """(stage, epoch of the stage, step seconds, steps) of every epoch."""

        def __init__(self):
            self.epochs, self.mark = [], (0.0, 0)

        def on_stage_start(self, trainer, stage, resume):
            self.count = 0

        def on_epoch_end(self, trainer, stage, writer):
            self.count += 1
            seconds, steps = trainer.train_seconds - self.mark[0], trainer.step - self.mark[1]
            self.epochs.append((stage.name, self.count, seconds, steps))
            self.mark = (trainer.train_seconds, trainer.step)

    overrides = [f"experiment={preset}", f"trainer.max_epochs={epochs}", "trainer.progress=false",
                 f"trainer.device={device}", "logger=none", "trainer.patience=1000", *MODES[mode]]
    if synthetic:
        overrides += SYNTHETIC
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run = assemble(cfg)
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg.trainer, run.model, run.inference, run.stages, run.data, tmp,
                          resolve_device(cfg.trainer.device), OmegaConf.to_container(cfg, resolve=True), cfg.seed,
                          task=run.task)
        trainer.hooks.append(clock)
        metrics = trainer.fit()
    first = [e for e in clock.epochs if e[1] == 1]
    rest = [e for e in clock.epochs if e[1] > 1]
    steady = sum(e[2] for e in rest) / max(1, sum(e[3] for e in rest)) * 1e3 if rest else float("nan")
    return {"preset": preset, "mode": mode, "first_epochs_s": round(sum(e[2] for e in first), 2),
            "ms_per_step": round(steady, 2), "steps": trainer.step, "val": metrics[f"val/{trainer.monitor}"],
            "monitor": trainer.monitor, "total_s": metrics["train/time_s"],
            "compiled": trainer.compiled.parts if trainer.compiled.active else [],
            "compile_fallback": trainer.compiled.failed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["spen_bibtex", "crf_ocr_joint"])
    ap.add_argument("--modes", nargs="+", default=["fp32", "bf16", "compile", "bf16+compile"], choices=list(MODES))
    ap.add_argument("--epochs", type=int, default=2, help="epochs per stage (>= 2: the first one is warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--synthetic", action="store_true", help="the synthetic task instead of the presets' data")
    ap.add_argument("--one", nargs=2, metavar=("PRESET", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_run(*args.one, args.epochs, args.device, args.synthetic)), flush=True)
        return
    if args.epochs < 2:
        raise SystemExit("error: --epochs must be at least 2 (each stage's first epoch is the warm-up)")
    import torch

    print(f"torch {torch.__version__}, device {args.device}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, "
          f"{args.epochs} epochs per stage", flush=True)
    rows = []
    for preset in args.presets:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--one", preset, mode, "--epochs", str(args.epochs), "--device", args.device,
                   *(["--synthetic"] if args.synthetic else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            result = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
            if proc.returncode != 0 or result is None:
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                result = {"preset": preset, "mode": mode, "error": tail}
            warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
            if warnings:
                result["warnings"] = warnings
            rows.append(result)
            print(json.dumps(result), flush=True)
    base = {r["preset"]: r.get("ms_per_step") for r in rows if r["mode"] == "fp32"}
    print()
    print("| preset | mode | first epochs (s) | ms/step | speed-up vs fp32 | val | total s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['preset']} | {r['mode']} | failed: {r['error']} | | | | |")
            continue
        ref = base.get(r["preset"])
        speed = f"{ref / r['ms_per_step']:.2f}×" if ref and r["ms_per_step"] else "–"
        print(f"| {r['preset']} | {r['mode']} | {r['first_epochs_s']:.1f} | {r['ms_per_step']:.1f} | {speed} | "
              f"{r['monitor']} {r['val']:.2f} | {r['total_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
