"""dsp-eval run_dir=DIR [split=test] [ckpt=best] [predict=local] [+set.KEY=VALUE ...] [out=eval] [overwrite=true]:
re-evaluate a trained run's checkpoint.

`predict=local` scores the local (unary) term alone, e.g. a jointly trained CRF's unaries without
its pairwise term: how much of the model's accuracy the structured part carries. By default the
checkpoint predicts as its training stage validated (`inference` for the full model). A multi-label
decision threshold stays the one tuned on validation for the checkpoint's own mode.

`+set.KEY=VALUE` changes a key of the run's stored config before the model is built, for
prediction-side settings (+set.data.test_crops=36 +set.data.combine=joint
+set.inference.max_iter=50); give `out` a new folder name so the default evaluation is kept.

Writes DIR/eval/metrics.json ("<split>/<metric>"), DIR/eval/predictions.npz,
DIR/eval/evaluation.json (the split, ckpt, predict and +set changes evaluated) and
DIR/eval/environment.json (where it was computed: dsp.training.provenance) and prints the metrics.
An evaluation folder holding a different evaluation is not replaced unless overwrite=true.
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
import json
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from dsp.build import load_run
from dsp.cli.common import config_dir, print_table, user_errors
from dsp.errors import DspError
from dsp.tasks import task_for
from dsp.training.checkpoint import _atomic, write_json
from dsp.training.provenance import environment
from dsp.training.stages import check_predict_mode
from dsp.training.trainer import resolve_device

EVALUATION = "evaluation.json"  # what an evaluation folder holds: split, ckpt, predict and +set changes


def _evaluate(run_dir, split, ckpt, device, batch_size, overrides=None, predict=None, trust=()):
    """(metrics, arrays, figures) of a run folder's checkpoint on one split; `predict` overrides
    the checkpoint's prediction mode; `trust`: modules of the user's own parts (dsp.instantiate)."""
    run = load_run(run_dir, ckpt=ckpt, device=device, overrides=overrides, trust=trust)
    if predict is not None:
        check_predict_mode(run.model, predict, "predict")
        run.predict_mode = predict
    data = run.data()
    task = task_for(data)
    x, y = (t.to(device) for t in data.split(split).tensors)
    out, iters = task.predict(run.model, run.inference, x, y, batch_size, run.predict_mode)
    metrics = {f"{split}/{k}": v for k, v in task.evaluate(out, y, run.threshold).items()}
    metrics[f"{split}/inference_iters"] = iters
    figures = task.figures(out, y, x)
    # e.g. the DVN's shape prior and trajectory (Figures 5, 1); on the host: the figure needs only its mean image
    train = data.split("train").tensors
    figures.update(task.inference_figures(run.model, run.inference, train, (x, y), batch_size, run.predict_mode))
    # learned parameters as pictures (MRF: Chen et al. Fig. 5, 8; SPEN Fig. 1)
    figures.update({f"model_{k}": (v.numpy() * 255).round().astype(np.uint8) for k, v in run.model.images().items()})
    return metrics, task.arrays(out, y, run.threshold, x=x), figures


def evaluate_run(run_dir: str | Path, split: str = "test", ckpt: str = "best", device="cpu", batch_size=1024,
                 overrides=None, predict=None, trust=()):
    """Evaluate a run folder's checkpoint on one split (its stored config changed by `overrides`,
    e.g. {"data": {"test_crops": 36}}; `predict`: "local" or "inference" instead of the
    checkpoint's mode); returns (metrics, arrays)."""
    metrics, arrays, _ = _evaluate(run_dir, split, ckpt, device, batch_size, overrides, predict, trust)
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


def _check_run_dir(cfg: DictConfig) -> Path:
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise DspError("pass run_dir=<a run folder>, the hydra.run.dir that dsp-train wrote (its default: "
                       "outputs/<model>_<data>/<date_time>)")
    run_dir = Path(cfg.run_dir)
    if (run_dir / "multirun.yaml").is_file() and not (run_dir / "checkpoints").is_dir():
        jobs = sorted((p.name for p in run_dir.iterdir() if (p / "checkpoints").is_dir()), key=lambda n: (len(n), n))
        example = f"run_dir={run_dir / jobs[0]}" if jobs else "run_dir=<sweep folder>/<job number>"
        raise DspError(f"{run_dir} is a sweep folder, not a run: pass one of its jobs ({example}), or "
                       f"tabulate them all with dsp-summary sweep_dir={run_dir}")
    return run_dir


def _check_out(run_dir: Path, out: str, spec: dict, overwrite: bool) -> None:
    """An evaluation folder is only replaced by the same evaluation (split, checkpoint, prediction
    mode and +set changes), unless overwrite=true: a second dsp-eval never silently discards the
    first one's results."""
    if not out or Path(out).name != out or out in (".", ".."):
        raise DspError(f"out={out!r} must be a plain folder name inside the run folder (e.g. eval_joint36)")
    folder = run_dir / out
    if folder.is_symlink() or (folder.exists() and folder.resolve().parent != run_dir.resolve()):
        raise DspError(f"{folder} is a link to {folder.resolve()}: dsp-eval writes inside the run folder only; "
                       f"remove the link or choose another out=")
    if overwrite or not (folder / "metrics.json").is_file():
        return
    try:
        held = json.loads((folder / EVALUATION).read_text())
    except (OSError, ValueError):  # a folder from before evaluation.json: its metrics name the split
        try:
            splits = {k.split("/")[0] for k in json.loads((folder / "metrics.json").read_text())}
        except (OSError, ValueError, AttributeError):
            splits = {"unknown"}
        held = spec if splits == {spec["split"]} else {"split": ", ".join(sorted(splits))}
    if held != spec:
        what = " ".join(f"{k}={held[k]}" for k in ("split", "ckpt", "predict", "set") if held.get(k) not in (None, {}))
        raise DspError(f"{folder} holds another evaluation ({what}); keep both with out=<a new folder name> "
                       f"(e.g. out=eval_{spec['split']}_{spec['ckpt']}), or replace it with overwrite=true")


@user_errors
def _main(cfg: DictConfig) -> None:
    run_dir = _check_run_dir(cfg)
    device = resolve_device(cfg.device)
    out = str(cfg.out)
    if not isinstance(cfg.ckpt, str) or Path(cfg.ckpt).name != cfg.ckpt or cfg.ckpt in ("", ".", ".."):
        raise DspError(f"ckpt={cfg.ckpt!r}: give the name of a checkpoint in {run_dir / 'checkpoints'} (best or last); "
                       f"to evaluate another run, pass its folder as run_dir")
    spec = {"split": cfg.split, "ckpt": cfg.ckpt, "predict": cfg.get("predict"),
            "set": OmegaConf.to_container(cfg.set, resolve=True)}
    _check_out(run_dir, out, spec, bool(cfg.get("overwrite")))
    metrics, arrays, figures = _evaluate(run_dir, cfg.split, cfg.ckpt, device, cfg.batch_size, cfg.set,
                                         cfg.get("predict"), _trust(cfg.get("trust")))
    write_json(spec, run_dir / out / EVALUATION)
    write_json(metrics, run_dir / out / "metrics.json")
    write_json([environment(device)], run_dir / out / "environment.json")  # what computed these metrics
    save_npz(arrays, run_dir / out / "predictions.npz")
    for name, image in figures.items():
        save_png(image, run_dir / out / f"{name}.png")
    mode = f", predict={cfg.predict}" if cfg.get("predict") else ""
    changes = "".join(f", {k}={v}" for k, v in _flat(spec["set"]).items())
    print_table(metrics, f"{run_dir} ({cfg.ckpt}.pt, {cfg.split} split{mode}{changes}) -> {run_dir / out}:")


def _trust(trust) -> list[str]:
    """trust=my_pkg or trust=[my_pkg, other_pkg]: the modules whose parts a stored config may build."""
    if trust is None:
        return []
    names = [trust] if isinstance(trust, str) else list(trust) if OmegaConf.is_list(trust) else None
    if names is None or not all(isinstance(n, str) and n for n in names):
        raise DspError(f"trust={trust!r}: give a module name or a list of them, e.g. trust=[my_pkg]")
    return names


def _flat(tree: dict, prefix: str = "set.") -> dict:
    """{"data": {"test_crops": 36}} -> {"set.data.test_crops": 36}"""
    flat = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def main() -> None:
    hydra.main(config_path=config_dir(), config_name="eval", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()
