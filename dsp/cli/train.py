"""dsp-train: build data, model, inference and objective from the Hydra config and train."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dsp.build import (attach_inference, build_data, build_inference, build_model, build_objective,
                       check_compatible, match_inference)
from dsp.errors import DspError
from dsp.cli.common import config_dir, print_table, user_errors
from dsp.training.preemption import EXIT_CODE as PREEMPTED, Preempted
from dsp.training.stages import build_stages
from dsp.training.trainer import Trainer, resolve_device, set_seed


class RunMetrics(dict):
    """The final "<split>/<metric>" numbers of a run, and which metric early stopping monitored."""

    def __init__(self, metrics: dict, monitor: str):
        super().__init__(metrics)
        self.monitor = monitor


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train one run into `run_dir` and return its final metrics (also usable without the CLI)."""
    set_seed(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    data = build_data(cfg)
    model = build_model(cfg)
    inference = build_inference(cfg)
    objective = build_objective(cfg)
    match_inference(inference, objective)
    check_compatible(model, inference, objective)
    attach_inference(model, inference)
    stages = build_stages(cfg.trainer, objective, model)
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    trainer = Trainer(cfg.trainer, model, inference, stages, data, run_dir, device, config_dict, cfg.seed)
    return RunMetrics(trainer.fit(), monitor=trainer.monitor)


@user_errors
def _main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        metrics = train(cfg, run_dir)
    except Preempted as stop:  # the whole process is going away: a sweep stops here too
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(PREEMPTED)
    except DspError as err:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise
        # In a sweep one failed job is reported and the others go on.
        print(f"error: job {hydra_cfg.job.num} ({run_dir}) failed: {err}", file=sys.stderr)
        return float("nan")
    print(f"run folder: {run_dir}")
    tuned = cfg.trainer.threshold == "tune" and "val/threshold" in metrics  # multi-label only
    print_table(metrics, "final metrics (best checkpoint, validation-tuned threshold):" if tuned
                else "final metrics (best checkpoint):")
    # The sweep objective (Optuna and friends maximise the validation metric).
    return metrics.get(f"val/{metrics.monitor}", float("nan"))


def main() -> None:
    hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()
