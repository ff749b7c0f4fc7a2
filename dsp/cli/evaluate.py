"""dsp-eval run_dir=DIR [split=test] [ckpt=best] [predict=local] [+set.KEY=VALUE ...] [out=eval]:
re-evaluate a trained run's checkpoint.

`predict=local` scores the local (unary) term alone, e.g. a jointly trained CRF's unaries without
its pairwise term: how much of the model's accuracy the structured part carries. By default the
checkpoint predicts as its training stage validated (`inference` for the full model). A multi-label
decision threshold stays the one tuned on validation for the checkpoint's own mode.

`+set.KEY=VALUE` changes a key of the run's stored config before the model is built, for
prediction-side settings (+set.data.test_crops=36 +set.data.combine=joint
+set.inference.max_iter=50); give `out` a new folder name so the default evaluation is kept.

Writes DIR/eval/metrics.json ("<split>/<metric>"), DIR/eval/predictions.npz and
DIR/eval/environment.json (where it was computed: dsp.training.provenance) and prints the metrics.
Multi-label: pred and target uint8 [N, L], score float32 [N, L]; sequences: pred and target
int64 [N, T] padded with -1, lengths [N], labels (index -> tag name); segmentation: pred and target
uint8 [N, H, W], score float32 [N, H, W]; denoising: pred, target, noisy float32 [N, H, W] in [0, 1].
Tasks with figures also get DIR/eval/<name>.png (denoising: eval/denoising.png, rows noisy /
prediction / clean); models that draw their parameters get DIR/eval/model_<name>.png (MRFs: the
pairwise tables per edge distance, the tag-coupling matrix, first-layer unary weights); segmentation
models predicted by gradient inference (the DVN) get eval/shape_prior.png and eval/trajectory.png
(DVN Figures 5 and 1; dsp.tasks.segmentation_figures).
"""
from __future__ import annotations

import io
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from dsp.build import load_run
from dsp.cli.common import config_dir, print_table, user_errors
from dsp.errors import DspError
from dsp.tasks import task_for
from dsp.training.checkpoint import _atomic, write_json
from dsp.training.provenance import environment
from dsp.training.stages import check_predict_mode
from dsp.training.trainer import resolve_device


def _evaluate(run_dir, split, ckpt, device, batch_size, overrides=None, predict=None):
    """(metrics, arrays, figures) of a run folder's checkpoint on one split; `predict` overrides
    the checkpoint's prediction mode."""
    run = load_run(run_dir, ckpt=ckpt, device=device, overrides=overrides)
    if predict is not None:
        check_predict_mode(run.model, predict, "predict")
        run.predict_mode = predict
    data = run.data()
    task = task_for(data)
    x, y = (t.to(device) for t in data.split(split).tensors)
    out, iters = task.predict(run.model, run.inference, x, y, batch_size, run.predict_mode)
    metrics = {f"{split}/{k}": v for k, v in task.evaluate(out, y, run.threshold).items()}
    metrics[f"{split}/inference_iters"] = iters
    figures = task.figures(out, y, x) if hasattr(task, "figures") else {}
    if hasattr(task, "inference_figures"):  # e.g. the DVN's shape prior and trajectory (Figures 5, 1)
        train = data.split("train").tensors  # on the host: the figure needs only its mean image
        figures.update(task.inference_figures(run.model, run.inference, train, (x, y), batch_size, run.predict_mode))
    images = getattr(run.model, "images", None)  # learned parameters as pictures (MRF: Chen et al. Fig. 5, 8)
    if images is not None:
        figures.update({f"model_{k}": (v.numpy() * 255).round().astype(np.uint8) for k, v in images().items()})
    return metrics, task.arrays(out, y, run.threshold, x=x), figures


def evaluate_run(run_dir: str | Path, split: str = "test", ckpt: str = "best", device="cpu", batch_size=1024,
                 overrides=None, predict=None):
    """Evaluate a run folder's checkpoint on one split (its stored config changed by `overrides`,
    e.g. {"data": {"test_crops": 36}}; `predict`: "local" or "inference" instead of the
    checkpoint's mode); returns (metrics, arrays)."""
    metrics, arrays, _ = _evaluate(run_dir, split, ckpt, device, batch_size, overrides, predict)
    return metrics, arrays


def save_npz(arrays: dict, path: Path) -> None:
    def write(tmp: Path) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        tmp.write_bytes(buf.getvalue())

    _atomic(path, write)


def save_png(image: np.ndarray, path: Path) -> None:
    """A uint8 [H, W] (grayscale) or [H, W, 3] image as PNG, written atomically."""
    from PIL import Image

    _atomic(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


@user_errors
def _main(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    device = resolve_device(cfg.device)
    out = str(cfg.out)
    if not out or Path(out).name != out or out in (".", ".."):
        raise DspError(f"out={out!r} must be a plain folder name inside the run folder (e.g. eval_joint36)")
    metrics, arrays, figures = _evaluate(run_dir, cfg.split, cfg.ckpt, device, cfg.batch_size, cfg.set,
                                         cfg.get("predict"))
    write_json(metrics, run_dir / out / "metrics.json")
    write_json([environment(device)], run_dir / out / "environment.json")  # what computed these metrics
    save_npz(arrays, run_dir / out / "predictions.npz")
    for name, image in figures.items():
        save_png(image, run_dir / out / f"{name}.png")
    mode = f", predict={cfg.predict}" if cfg.get("predict") else ""
    print_table(metrics, f"{run_dir} ({cfg.ckpt}.pt, {cfg.split} split{mode}):")


def main() -> None:
    hydra.main(config_path=config_dir(), config_name="eval", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()
