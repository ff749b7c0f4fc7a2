"""Build a run's parts from its (Hydra) config, and load a finished run from Python without Hydra."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from dsp.compat import check_built, check_config
from dsp.errors import DspError
from dsp.instantiate import check_trusted, instantiate
from dsp.seed import set_seed
from dsp.tasks import task_for
from dsp.training.stages import build_stages
from dsp.training.checkpoint import load_checkpoint


def data_dims(data) -> dict:
    """The data's sizes the model's YAML reads through ${dims.*}: features, labels and the size of
    every vocabulary (words, pos, chars for text) as dims.num_words, dims.num_pos, ..."""
    dims = {"num_features": data.num_features, "num_labels": data.num_labels}
    dims.update({f"num_{name}": len(items) for name, items in (data.vocab or {}).items()})
    return dims


def build_data(cfg: DictConfig):
    data = instantiate(cfg.data, "data")
    with open_dict(cfg):
        cfg.dims = data_dims(data)
    return data


def build_model(cfg: DictConfig) -> torch.nn.Module:
    return instantiate(cfg.model, "model")


def build_inference(cfg: DictConfig):
    return instantiate(cfg.inference, "inference")


def build_objective(cfg: DictConfig):
    return instantiate(cfg.objective, "objective")


def attach_inference(model: torch.nn.Module, inference) -> None:
    """Inference with trainable parts (the learned step sizes of unrolled descent) becomes the
    child `model.inference`: stages can train it, optimisers see it, checkpoints save it."""
    if isinstance(inference, torch.nn.Module) and any(True for _ in inference.parameters()):
        if "inference" in dict(model.named_children()):
            raise DspError("the model already has a part named `inference`; rename it")
        model.add_module("inference", inference)


def build_run(cfg: DictConfig):
    """(data, model, inference, objective) of a config, seeded and checked, as dsp-train builds
    them: the parts checked against each other before the data loads, learned inference attached
    to the model, inference matched to the objective."""
    check_config(cfg)
    set_seed(cfg.seed)
    data = build_data(cfg)
    model = build_model(cfg)
    inference = build_inference(cfg)
    objective = build_objective(cfg)
    check_built(data, model, inference, objective, cfg)
    inference.match(objective)
    attach_inference(model, inference)
    return data, model, inference, objective


@dataclass
class RunParts:
    """Everything a training run is made of, assembled from its config."""

    data: object
    task: object
    model: torch.nn.Module
    inference: object
    objective: object
    stages: list


def assemble(cfg: DictConfig) -> RunParts:
    """The one place a config becomes a run: its parts checked against each other before the data
    loads (dsp.compat), then data, task, model, inference, objective and training stages built.
    dsp-train and dsp-gradcheck call this; dsp-eval rebuilds a trained run with load_run."""
    data, model, inference, objective = build_run(cfg)
    return RunParts(data, task_for(data), model, inference, objective, build_stages(cfg.trainer, objective, model))


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
        """The run's data (with any +set.data changes); refused when its sizes are not the ones the
        model was trained with."""
        data = instantiate(self.config.data, "data")
        trained = OmegaConf.to_container(self.config.dims) if "dims" in self.config else {}
        other = {k: (v, trained[k]) for k, v in data_dims(data).items() if k in trained and trained[k] != v}
        if other:
            sizes = ", ".join(f"{k}={now} (the model: {then})" for k, (now, then) in other.items())
            raise DspError(f"the data this run is evaluated on does not fit its model: {sizes}; evaluate on data "
                           f"with the sizes it was trained on")
        return data


def _dotted(tree, prefix: str = ""):
    """(dotted key, value) pairs of the leaves of a nested mapping."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def override_config(cfg: DictConfig, overrides, source: str) -> DictConfig:
    """The stored config with `overrides` (a nested mapping, e.g. {"data": {"test_crops": 36}})
    merged in: prediction-side settings such as data.test_crops or inference.max_iter. Keys the
    stored config lacks are refused (a typo would otherwise be ignored silently)."""
    if not overrides:
        return cfg
    tree = OmegaConf.to_container(overrides, resolve=True) if isinstance(overrides, DictConfig) else dict(overrides)
    for key, _ in _dotted(tree):
        group = key.split(".")[0]
        if group in ("trainer", "objective", "seed"):  # read by training only: a change would do nothing
            raise DspError(f"{source}{key}: {group} settings only affect training, not a trained "
                           f"run's predictions (a multi-label threshold is the one stored with the checkpoint); "
                           f"change data, inference or model keys")
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise DspError(f"{source}{key}: the run's config has no key {key!r}; only keys it already has "
                           "can be changed (see .hydra/config.yaml in the run folder)")
    return OmegaConf.merge(cfg, OmegaConf.create(tree))


def _refuse_learned_overrides(model: torch.nn.Module, overrides) -> None:
    """A +set.model.<key> that names state the checkpoint restores (a learned or chosen buffer such as
    unary_scale) would be recorded but have no effect: refused."""
    if not overrides:
        return
    tree = OmegaConf.to_container(overrides, resolve=True) if isinstance(overrides, DictConfig) else dict(overrides)
    state = set(model.state_dict())
    for key, _ in _dotted(tree.get("model") or {}, "model."):
        if key.removeprefix("model.") in state:
            raise DspError(f"dsp-eval +set.{key}: the checkpoint restores {key.removeprefix('model.')} (it was "
                           f"trained or chosen during training), so the change would do nothing")


def legacy_defaults(cfg: DictConfig) -> DictConfig:
    """A stored config from before a data key existed gets the value that run was made with, not
    today's default, so an old run re-evaluates on the data it was scored on: horses runs saved
    before data.jpeg_draft decoded their JPEGs in draft mode."""
    data = cfg.get("data")
    if data is not None and data.get("_target_") == "dsp.data.images.load_horses" and "jpeg_draft" not in data:
        cfg.data.jpeg_draft = True
    return cfg


def load_run(run_dir: str | Path, ckpt: str = "best", device: str | torch.device = "cpu",
             overrides=None, trust=()) -> LoadedRun:
    """Load `run_dir/checkpoints/<ckpt>.pt` with the config stored inside it, changed by
    `overrides` ({"data": {"test_crops": 36}}; see override_config) when given. The stored config
    builds only dsp's parts, torch.nn and torch.optim, and the modules named in `trust`
    (dsp.instantiate.check_trusted): a checkpoint from elsewhere cannot call arbitrary code."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DspError(f"run folder {run_dir} does not exist; pass run_dir=<a dsp-train output folder>")
    if not isinstance(ckpt, str) or not ckpt or Path(ckpt).name != ckpt or ckpt in (".", ".."):
        raise DspError(f"ckpt={ckpt!r}: give the name of a checkpoint in {run_dir / 'checkpoints'} (best or last); "
                       f"to evaluate another run, pass its folder as run_dir")
    path = run_dir / "checkpoints" / f"{ckpt}.pt"
    state = load_checkpoint(path, map_location=device)
    missing = [k for k in ("config", "model", "threshold", "predict") if k not in state]
    if missing or not isinstance(state["config"], dict):
        raise DspError(f"checkpoint {path} lacks {', '.join(missing) or 'a run config'}: it was not written by "
                       f"dsp-train; use the other checkpoint (ckpt=last or ckpt=best) or retrain")
    cfg = override_config(legacy_defaults(OmegaConf.create(state["config"])), overrides, "dsp-eval +set.")
    check_trusted(cfg, f"the config stored in {path}", trust)  # before anything is imported or called
    check_config(cfg, {})  # a +set change of inference (or a user's part) that no longer fits
    model = build_model(cfg)
    inference = build_inference(cfg)
    attach_inference(model, inference)  # before loading: learned step sizes live in the state
    _refuse_learned_overrides(model, overrides)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise DspError(f"checkpoint {path} does not fit the model its config describes: {err}") from None
    model.to(device).eval()
    objective = build_objective(cfg)
    check_built(None, model, inference, objective, cfg)
    inference.match(objective)
    return LoadedRun(cfg, model, inference, None if state["threshold"] is None else float(state["threshold"]),
                     state["predict"], state)
