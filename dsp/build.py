"""Build a run's parts from its (Hydra) config, and load a finished run from Python without Hydra."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict

from dsp.errors import DspError
from dsp.training.checkpoint import load_checkpoint


def instantiate(node, key: str):
    """hydra.utils.instantiate, with errors that name the config key (and no wrapped traceback)."""
    try:
        return hydra.utils.instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, DspError):  # our own message, already clear
            raise err.__cause__ from None
        raise DspError(f"could not build `{key}` from the config: {err}") from None


def build_data(cfg: DictConfig):
    data = instantiate(cfg.data, "data")
    dims = {"num_features": data.num_features, "num_labels": data.num_labels}
    # vocabularies (words, pos, chars for text): their sizes as dims.num_words, dims.num_pos, ...
    dims.update({f"num_{name}": len(items) for name, items in (getattr(data, "vocab", None) or {}).items()})
    with open_dict(cfg):  # the model's YAML reads the sizes through ${dims.*}
        cfg.dims = dims
    return data


def build_model(cfg: DictConfig) -> torch.nn.Module:
    return instantiate(cfg.model, "model")


def build_inference(cfg: DictConfig):
    return instantiate(cfg.inference, "inference")


def build_objective(cfg: DictConfig):
    return instantiate(cfg.objective, "objective")


def match_inference(inference, objective) -> None:
    """Let an inference routine with a choice to make (chain decoding, method=auto) follow the
    objective it was trained with."""
    match = getattr(inference, "match", None)
    if match is not None:
        match(objective)


@dataclass
class LoadedRun:
    """A trained run: its config, model (eval mode), inference routine and decision threshold."""

    config: DictConfig
    model: torch.nn.Module
    inference: object
    threshold: float | None  # multi-label decision threshold; None for tasks without one
    predict_mode: str
    checkpoint: dict

    def data(self):
        return instantiate(self.config.data, "data")


def load_run(run_dir: str | Path, ckpt: str = "best", device: str | torch.device = "cpu") -> LoadedRun:
    """Load `run_dir/checkpoints/<ckpt>.pt` with the config stored inside it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DspError(f"run folder {run_dir} does not exist; pass run_dir=<a dsp-train output folder>")
    path = run_dir / "checkpoints" / f"{ckpt}.pt"
    state = load_checkpoint(path, map_location=device)
    cfg = OmegaConf.create(state["config"])
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise DspError(f"checkpoint {path} does not fit the model its config describes: {err}") from None
    model.to(device).eval()
    inference = build_inference(cfg)
    match_inference(inference, build_objective(cfg))
    return LoadedRun(cfg, model, inference, None if state["threshold"] is None else float(state["threshold"]), state["predict"], state)
