"""dsp-train: build data, model, inference and objective from the Hydra config and train."""
from __future__ import annotations

import math
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dsp.build import assemble
from dsp.compat import check_config
from dsp.errors import DspError
from dsp.cli.common import config_dir, print_table, user_errors
from dsp.training import distributed
from dsp.training import run_folder
from dsp.training.checkpoint import load_latest, refuse_used_run_dir
from dsp.training.loggers import check_logger
from dsp.training.config_checks import check_settings, check_trainer, trainer_defaults
from dsp.training.preemption import EXIT_CODE as PREEMPTED, Preempted, hand_on
from dsp.training.trainer import Trainer, resolve_device


class RunMetrics(dict):
    """The final "<split>/<metric>" numbers of a run, and which metric early stopping monitored."""

    def __init__(self, metrics: dict, monitor: str):
        super().__init__(metrics)
        self.monitor = monitor


class CreateSweepFolder(Callback):
    """hydra.callbacks entry of the Optuna presets: the sweeper opens its SQLite storage inside the
    sweep folder before Hydra's launcher creates that folder, so create it first."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # The folder's name and the storage URL use ${hydra:...}, which resolves only once this is set.
        HydraConfig.instance().set_config(config)
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)


class GuardUsedFolders(Callback):
    """hydra.callbacks entry of every run, before Hydra rewrites the folder's .hydra/ record (which it
    does before the task starts, so the trainer's own checks would come too late to keep that record):
    the run (or sweep) folder is locked for this process (dsp.training.run_folder: one writer per
    folder); a fresh run refuses a folder that holds another run's results; a resume refuses settings
    that differ from the ones its checkpoint was trained with."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, lambda: [Path(config.hydra.run.dir)])

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        def jobs():
            sweep = Path(config.hydra.sweep.dir)
            return [sweep] + sorted(p for p in sweep.iterdir() if p.is_dir()) if sweep.is_dir() else []

        self._check(config, jobs)

    @staticmethod
    def _check(config: DictConfig, folders) -> None:
        HydraConfig.instance().set_config(config)  # the folder names use ${hydra:...}
        multirun = config.hydra.mode == RunMode.MULTIRUN
        resume = OmegaConf.select(config, "trainer.resume", default=False) is True

        def check():
            ranks = distributed.scheduler_ranks() or {}  # torchrun's RANK, else an srun step's or submitit's
            if int(os.environ.get("RANK") or ranks.get("RANK") or 0) == 0:  # rank 0 holds the folder for all
                run_folder.hold(config.hydra.sweep.dir if multirun else config.hydra.run.dir)
            for folder in folders():  # a preempted or requeued run continues by itself
                if resume or run_folder.continues(folder):
                    if not multirun:
                        refuse_changed_resume_of(folder, config)
                else:
                    refuse_used_run_dir(folder)

        where = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        _refuse(check, rename=("hydra.run.dir", where))


def refuse_changed_resume_of(run_dir: Path, config: DictConfig) -> None:
    """A resume into `run_dir` with settings other than its checkpoint's is refused (nothing written)."""
    latest = load_latest(run_dir / "checkpoints")
    if latest is None or not isinstance(latest[0].get("config"), dict):
        return  # nothing to continue (the trainer starts the run), or a checkpoint without a config
    state, path = latest
    task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    run_folder.refuse_changed_resume(state["config"], run_folder.resolved(task, state["config"].get("dims")), path)


class CheckParts(Callback):
    """hydra.callbacks entry of every run: the chosen data, model, inference, objective and stages
    are checked against each other (dsp.compat) before Hydra creates a run folder; in a sweep every
    job's combination is checked before the first job starts."""

    MAX_JOBS = 500  # larger grids are checked job by job as they start

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _refuse(lambda: check_run(config))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper"):
            return  # other sweepers draw their jobs later: each is checked as it starts
        from hydra import compose
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        overrides = list(config.hydra.overrides.task)
        jobs = [job for batch in BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
                for job in batch]
        if len(jobs) > self.MAX_JOBS:
            return
        for number, job in enumerate(jobs):
            try:  # (options found through hydra.searchpath are not seen here: such jobs are checked as they start)
                cfg = compose(config_name=config.hydra.job.config_name, overrides=job, return_hydra_config=True)
            except KeyboardInterrupt:
                _interrupted()
            except Exception:  # noqa: BLE001 -- whatever Hydra cannot compose here, the job itself reports
                return
            _refuse(lambda: check_run(cfg, cfg.hydra.runtime.choices), f"job {number} ({' '.join(job)}): ")
            subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")
            if cfg.trainer.get("resume") is True and subdir == "${hydra.job.num}":
                folder = Path(config.hydra.sweep.dir) / str(number)  # (other layouts: checked as each job starts)
                _refuse(lambda: refuse_changed_resume_of(folder, cfg), f"job {number} ({' '.join(job)}): ")


def check_run(cfg: DictConfig, choices=None) -> None:
    """Every setting and the parts' fit, before Hydra creates a folder (the trainer's settings too)."""
    if cfg.get("trainer") is not None:
        check_trainer(cfg.trainer)
    if cfg.get("logger") is not None:  # a logger whose package is missing, before a folder is made
        check_logger(OmegaConf.to_container(cfg.logger, resolve=True))
    check_config(cfg, choices)


def _refuse(check, prefix: str = "", rename: tuple[str, str] = ("", "")) -> None:
    try:
        check()
    except (DspError, OmegaConfBaseException) as err:
        print(f"error: {prefix}{str(err).replace(*rename) if rename[0] else err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()


def _interrupted() -> None:
    print("interrupted while checking the configuration: nothing was written", file=sys.stderr)
    sys.exit(130)


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train one run into `run_dir` and return its final metrics (also usable without the CLI).
    With trainer.strategy=ddp (torchrun's or a scheduler's ranks) every rank calls this; rank 0's run_dir is used."""
    check_settings(cfg)
    check_trainer(cfg.trainer)
    dist = distributed.setup(cfg.trainer.get("strategy"), cfg.trainer.device, cfg.trainer.get("sync_batchnorm", "auto"))
    try:
        device = dist.device if dist.enabled else resolve_device(cfg.trainer.device)
        if dist.enabled:
            run_dir = _shared_run_dir(dist, Path(run_dir))
        if dist.is_main:  # one writer per run folder (the dsp-train callback may hold it already)
            run_folder.hold(run_dir)
        run = assemble(cfg)
        # ddp: BatchNorm over the global batch (trainer.sync_batchnorm), the same Parameters kept
        dist.prepare(run.model, len(run.data.split("train")), [s.batch_size for s in run.stages])
        config_dict = OmegaConf.to_container(cfg, resolve=True)
        trainer = Trainer(cfg.trainer, run.model, run.inference, run.stages, run.data, run_dir, device, config_dict,
                          cfg.seed, dist, task=run.task)
        metrics = RunMetrics(trainer.fit(), monitor=trainer.monitor)
        metrics.is_main = dist.is_main
        # ddp: no rank tears its gloo/NCCL connections down while another still finishes (rank 0
        # writes the final files); the SIGABRT at exit this was once meant to stop had another
        # cause (see Distributed.__init__).
        dist.barrier()
        return metrics
    finally:
        if dist.is_main:
            run_folder.release(run_dir)
        dist.close()


def _shared_run_dir(dist, run_dir: Path) -> Path:
    """ddp: every rank uses rank 0's run folder. Hydra's default folder name holds a timestamp, so
    ranks > 0 may have created folders of their own: those are removed if they hold only Hydra's
    files (.hydra/, the job log)."""
    shared = Path(dist.broadcast_object(str(run_dir)))
    if not dist.is_main and run_dir.resolve() != shared.resolve() and run_dir.is_dir():
        if all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
    return shared


@user_errors
def _main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        metrics = train(cfg, run_dir)
    except KeyboardInterrupt:
        print(f"interrupted: checkpoints written so far are intact; continue with trainer.resume=true "
              f"hydra.run.dir={run_dir}", file=sys.stderr)
        sys.exit(130)
    except Preempted as stop:  # the whole process is going away: a sweep stops here too
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"stopped: {stop}", file=sys.stderr)
        hand_on(stop.signum)  # submitit's handler, when there is one, requeues the job and exits
        sys.exit(PREEMPTED)
    except Exception as err:  # noqa: BLE001 -- a DspError, or a bug that only one job's settings hit
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise
        return _failed_job(hydra_cfg, run_dir, err)
    if not getattr(metrics, "is_main", True):  # ddp: only rank 0 prints
        return metrics.get(f"val/{metrics.monitor}", float("nan"))
    print(f"run folder: {run_dir}")
    tuned = cfg.trainer.threshold == "tune" and "val/threshold" in metrics  # multi-label only
    print_table(metrics, "final metrics (best checkpoint, validation-tuned threshold):" if tuned
                else "final metrics (best checkpoint):")
    # The sweep objective (Optuna and friends maximise the validation metric).
    value = metrics.get(f"val/{metrics.monitor}", float("nan"))
    if hydra_cfg.mode == RunMode.MULTIRUN and not math.isfinite(value):
        return _failed_job(hydra_cfg, run_dir, DspError(f"the objective val/{metrics.monitor} is {value}"))
    return value


class JobFailed(Exception):
    """A sweep job that failed, raised to sweepers that optimise the return value (Optuna)."""


_FAILED_JOBS: list[str] = []  # this process's failed sweep jobs: the sweep's exit status is 1 if any


def _failed_job(hydra_cfg, run_dir: Path, err: Exception) -> float:
    """In a sweep one failed job is reported, with its folder, and the others go on."""
    if not isinstance(err, (DspError, OmegaConfBaseException)):
        traceback.print_exc()  # not a bad setting but a bug: keep the traceback
    message = f"job {hydra_cfg.job.num} ({run_dir}) failed: {err}"
    print(f"error: {message}", file=sys.stderr)
    _FAILED_JOBS.append(f"job {hydra_cfg.job.num}")
    if str(hydra_cfg.sweeper.get("_target_", "")).endswith(".BasicSweeper"):
        return float("nan")  # the basic sweeper ignores return values but stops at an exception
    # Optuna records an exception as a failed trial (a NaN objective would end its sweep instead).
    raise JobFailed(message) from err


def refuse_unknown_trainer_keys(argv: list[str]) -> None:
    """`trainer.<key>=...` naming no trainer setting would stop in Hydra's own multi-line error: name
    it in one line with the closest setting instead (keys added with + are checked at compose time)."""
    import difflib

    settings = trainer_defaults()
    stage_keys = sorted(settings["stages"]["train"])
    for arg in argv:
        if not arg.startswith("trainer.") or "=" not in arg:
            continue
        parts = arg.split("=", 1)[0].split(".")
        known, key = (sorted(settings), parts[1]) if len(parts) == 2 else (
            (stage_keys, parts[3]) if len(parts) == 4 and parts[1] == "stages" else (None, None))
        if known is not None and key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {'.'.join(parts[:-1] + close)}?)" if close else ""
            print(f"error: {'.'.join(parts)} is not a trainer setting{hint}; conf/trainer/default.yaml lists them",
                  file=sys.stderr)
            sys.exit(2)


def main() -> None:
    refuse_unknown_trainer_keys(sys.argv[1:])
    hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")(_main)()
    if _FAILED_JOBS:  # jobs run in this process (the basic launcher): a script sees the failure
        print(f"error: {len(_FAILED_JOBS)} job(s) of the sweep failed ({', '.join(_FAILED_JOBS)}); "
              f"the others finished", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
