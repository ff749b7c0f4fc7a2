"""Where a run's scalars, hyper-parameters and figures go: the `logger` config group.

    logger=tensorboard          (the default) TensorBoard event files in the run folder's tb/
    logger=csv                  one CSV file in the run folder (scalars.csv: step,key,value) and
                                hparams.json (the hyper-parameters with the final metrics)
    logger=wandb                Weights & Biases (needs the wandb package: pip install 'dsp[wandb]')
    logger=mlflow               MLflow (needs the mlflow package: pip install 'dsp[mlflow]')
    logger=[tensorboard,csv]    several at once; logger=none: none

The config is a mapping from logger name to its settings (conf/logger/*.yaml: each file holds one
entry, so a list of choices merges into one mapping), e.g. logger.wandb.project=myproject.

Every scalar is logged against one axis, the global step (optimiser updates since the run began,
counted across stages and resumes): train/* every trainer.log_every steps, and after each epoch
val/*, lr, epoch (the number of epochs so far, as a scalar of its own) and the time at the step the
epoch ended. A resumed run continues the same axis; what was logged after the checkpoint it resumes
from (an interrupted epoch's steps) is dropped (TensorBoard's purge_step; the CSV is cut back).

The trainer uses the `Logger` interface below (scalar, hparams, image, close) and never a logging
library directly; under trainer.strategy=ddp only rank 0 has loggers (the others get `Logger()`,
which does nothing). Hooks written against TensorBoard's SummaryWriter may keep calling
add_scalar / add_image.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dsp.errors import DspError

# name -> (settings and their defaults, the package it needs or None)
LOGGERS: dict[str, tuple[dict, str | None]] = {
    "tensorboard": ({}, None),
    "csv": ({"file": "scalars.csv"}, None),
    "wandb": ({"project": "dsp", "entity": None, "name": None, "mode": None, "tags": None}, "wandb"),
    "mlflow": ({"tracking_uri": None, "experiment": "dsp", "run_name": None}, "mlflow"),
}
DEFAULT = {"tensorboard": {}}  # a config without a logger entry (e.g. one written before the group existed)


class Logger:
    """The interface; this base class logs nothing (ranks > 0 under ddp, logger=null)."""

    def scalar(self, key: str, value: float, step: int) -> None:
        pass

    def hparams(self, params: dict, metrics: dict) -> None:
        """The run's settings (flat key -> int, float, str or bool) with its final metrics."""

    def image(self, key: str, image: np.ndarray, step: int, dataformats: str = "HW") -> None:
        """A figure: an array in [0, 1] laid out as `dataformats` (HW or HWC)."""

    def close(self) -> None:
        pass

    # SummaryWriter's names, for hooks written against TensorBoard
    def add_scalar(self, tag: str, value, step: int) -> None:
        self.scalar(tag, float(value), int(step))

    def add_image(self, tag: str, image, step: int, dataformats: str = "CHW") -> None:
        self.image(tag, np.asarray(image), int(step), dataformats)


def check_logger(spec) -> dict:
    """The `logger` config as {name: settings}, refused in one line naming the key when a name or
    setting is unknown or a logger's package is not installed."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise DspError(f"logger={spec!r}: choose logger=tensorboard, csv, wandb or mlflow (or a list of them, "
                       f"e.g. logger=[tensorboard,csv]; logger=none for none)")
    out = {}
    for name, settings in spec.items():
        if name not in LOGGERS:
            raise DspError(f"logger.{name} is not a logger: choose among {', '.join(LOGGERS)}")
        defaults, package = LOGGERS[name]
        settings = dict(settings or {})
        unknown = sorted(set(settings) - set(defaults))
        if unknown:
            raise DspError(f"logger.{name}.{unknown[0]} is not a setting of the {name} logger"
                           + (f"; its settings: {', '.join(defaults)}" if defaults else "; it has none"))
        if package is not None and importlib.util.find_spec(package) is None:
            raise DspError(f"logger={name}: the {package} package is not installed; "
                           f"pip install 'dsp[{name}]' (or pip install {package}), or choose another logger")
        if name == "csv" and (not settings.get("file") or os.sep in str(settings["file"])):
            raise DspError(f"logger.csv.file={settings.get('file')!r}: give a file name (it is written in the run folder)")
        out[name] = {**defaults, **settings}
    return out


def make_logger(spec, run_dir, resume_step: int | None = None, params: dict | None = None) -> Logger:
    """The loggers of `spec` (the `logger` config; DEFAULT when the config has none) for `run_dir`,
    as one Logger. resume_step: the step of the checkpoint a resumed run continues from (what was
    logged after it is dropped); params: the hyper-parameters, for loggers that record them at the
    start (W&B's config, MLflow's params)."""
    loggers = []
    for name, settings in check_logger(spec).items():
        cls = {"tensorboard": TensorBoardLogger, "csv": CSVLogger, "wandb": WandbLogger, "mlflow": MLflowLogger}[name]
        loggers.append(cls(Path(run_dir), resume_step=resume_step, params=params or {}, **settings))
    return loggers[0] if len(loggers) == 1 else Loggers(loggers)


class Loggers(Logger):
    """Several loggers as one."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def scalar(self, key, value, step):
        for lg in self.loggers:
            lg.scalar(key, value, step)

    def hparams(self, params, metrics):
        for lg in self.loggers:
            lg.hparams(params, metrics)

    def image(self, key, image, step, dataformats="HW"):
        for lg in self.loggers:
            lg.image(key, image, step, dataformats)

    def close(self):
        for lg in self.loggers:
            lg.close()


class TensorBoardLogger(Logger):
    """Event files in run_dir/tb (the run folder's contract: dsp's scripts read them there)."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, params: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides events of an earlier start at or after this step
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1)

    def scalar(self, key, value, step):
        self.writer.add_scalar(key, value, step)

    def hparams(self, params, metrics):
        self.writer.add_hparams(params, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def image(self, key, image, step, dataformats="HW"):
        self.writer.add_image(key, image, step, dataformats=dataformats)

    def close(self):
        self.writer.close()


class CSVLogger(Logger):
    """run_dir/<file>: one row per scalar, `step,key,value` (long format: keys may appear at any
    step, and train and val rows share the step column); run_dir/hparams.json at the end. Rows are
    flushed as they are written, so the file is readable while the run goes on."""

    HEADER = ["step", "key", "value"]

    def __init__(self, run_dir: Path, file: str = "scalars.csv", resume_step: int | None = None,
                 params: dict | None = None):
        self.path, self.hparams_path = run_dir / file, run_dir / "hparams.json"
        if resume_step is not None and self.path.is_file():
            self._cut_back(resume_step)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 -- closed by close()
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(self.HEADER)
            self._file.flush()

    def _cut_back(self, step: int) -> None:
        """Drop the rows an earlier start wrote after `step` (the checkpoint this start resumes from)."""
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [r for r in rows[1:] if len(r) == 3 and r[0].isdigit() and int(r[0]) <= step] if rows else []
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(kept)
        os.replace(tmp, self.path)

    def scalar(self, key, value, step):
        self._csv.writerow([int(step), key, repr(float(value))])
        self._file.flush()

    def hparams(self, params, metrics):
        tmp = self.hparams_path.with_name(".hparams.json.tmp")
        tmp.write_text(json.dumps({"hparams": params, "metrics": metrics}, indent=2, default=str) + "\n")
        os.replace(tmp, self.hparams_path)

    def close(self):
        if not self._file.closed:
            self._file.close()


def _run_id_file(run_dir: Path, name: str) -> Path:
    return run_dir / f".{name}_run_id"


class WandbLogger(Logger):
    """Weights & Biases: one W&B run per run folder (its id kept in run_dir/.wandb_run_id, so a resume
    continues it), files under run_dir/wandb. mode: online, offline or disabled (null: W&B's own
    default or $WANDB_MODE)."""

    def __init__(self, run_dir: Path, project="dsp", entity=None, name=None, mode=None, tags=None,
                 resume_step: int | None = None, params: dict | None = None):
        import wandb

        id_file = _run_id_file(run_dir, "wandb")
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        self._wandb = wandb
        self.run = wandb.init(project=project, entity=entity, name=name or run_dir.name, mode=mode,
                              tags=list(tags) if tags else None, dir=str(run_dir), id=run_id, resume="allow",
                              config=params or {})

    def scalar(self, key, value, step):
        self.run.log({key: value}, step=int(step))

    def hparams(self, params, metrics):
        self.run.config.update(params, allow_val_change=True)
        self.run.summary.update(metrics)

    def image(self, key, image, step, dataformats="HW"):
        self.run.log({key: self._wandb.Image(_hwc(image, dataformats))}, step=int(step))

    def close(self):
        self.run.finish()


class MLflowLogger(Logger):
    """MLflow: one MLflow run per run folder (its id kept in run_dir/.mlflow_run_id, so a resume
    continues it). tracking_uri null: $MLFLOW_TRACKING_URI when set, else run_dir/mlruns."""

    def __init__(self, run_dir: Path, tracking_uri=None, experiment="dsp", run_name=None,
                 resume_step: int | None = None, params: dict | None = None):
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                                or (run_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(experiment)
        id_file = _run_id_file(run_dir, "mlflow")
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else (run_name or run_dir.name))
        id_file.write_text(self.run.info.run_id + "\n")
        if params and run_id is None:
            self._log_params(params)

    def _log_params(self, params: dict) -> None:
        items = [(k, str(v)[:500]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a call
            self._mlflow.log_params(dict(items[i:i + 100]))

    def scalar(self, key, value, step):
        self._mlflow.log_metric(key, float(value), step=int(step))

    def hparams(self, params, metrics):
        self._mlflow.log_metrics({f"final/{k}": float(v) for k, v in metrics.items()})

    def image(self, key, image, step, dataformats="HW"):
        self._mlflow.log_image(_hwc(image, dataformats), key=key, step=int(step))

    def close(self):
        self._mlflow.end_run()


def _hwc(image, dataformats: str) -> np.ndarray:
    """An image array as H×W×C (or H×W) for libraries that take PIL-like layouts."""
    image = np.asarray(image)
    if dataformats == "CHW":
        image = np.transpose(image, (1, 2, 0))
    return image
