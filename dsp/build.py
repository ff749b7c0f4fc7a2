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


# Modules whose second derivative is zero or undefined: unrolled learning differentiates ∇_y E.
NOT_TWICE_DIFFERENTIABLE = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.Hardtanh,
                            torch.nn.Threshold, torch.nn.MaxPool1d, torch.nn.MaxPool2d)


def attach_inference(model: torch.nn.Module, inference) -> None:
    """Inference with trainable parts (the learned step sizes of unrolled descent) becomes the
    child `model.inference`: stages can train it, optimisers see it, checkpoints save it."""
    if isinstance(inference, torch.nn.Module) and any(True for _ in inference.parameters()):
        if "inference" in dict(model.named_children()):
            raise DspError("the model already has a part named `inference`; rename it")
        model.add_module("inference", inference)


def check_compatible(model: torch.nn.Module, inference, objective) -> None:
    """Refuse, at start-up, combinations that cannot learn: an unrolled objective needs an
    unrolled optimiser and an energy that is twice differentiable in y."""
    if not getattr(objective, "needs_second_order", False):
        return
    from dsp.inference.unrolled import UnrolledGradientDescent

    if not isinstance(inference, UnrolledGradientDescent):
        raise DspError(f"objective=unrolled back-propagates through the optimiser, which "
                       f"{type(inference).__name__} does not offer: use inference=unrolled_gd "
                       f"(or inference=unrolled_denoise for images)")
    for part in getattr(model, "y_parts", ()):
        module = getattr(model, part, None)
        for name, sub in ([] if module is None else module.named_modules()):
            if isinstance(sub, NOT_TWICE_DIFFERENTIABLE):
                where = f"model.{part}" + (f".{name}" if name else "")
                raise DspError(
                    f"{where} is a {type(sub).__name__}, whose second derivative is zero or undefined, "
                    f"but objective=unrolled differentiates the energy's gradient in y (End-to-end SPENs "
                    f"§5). Use a smooth activation for the parts that see y, e.g. activation: softplus:25"
                )


def match_inference(inference, objective) -> None:
    """Let an inference routine with a choice to make (chain decoding, method=auto) follow the
    objective it was trained with."""
    match = getattr(inference, "match", None)
    if match is not None:
        match(objective)


def build_run(cfg: DictConfig):
    """(data, model, inference, objective) of a config, seeded and checked, as dsp-train builds
    them: learned inference attached to the model, inference matched to the objective."""
    from dsp.training.trainer import set_seed

    set_seed(cfg.seed)
    data = build_data(cfg)
    model = build_model(cfg)
    inference = build_inference(cfg)
    objective = build_objective(cfg)
    match_inference(inference, objective)
    check_compatible(model, inference, objective)
    attach_inference(model, inference)
    return data, model, inference, objective


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


def legacy_defaults(cfg: DictConfig) -> DictConfig:
    """A stored config from before a data key existed gets the value that run was made with, not
    today's default, so an old run re-evaluates on the data it was scored on: horses runs saved
    before data.jpeg_draft decoded their JPEGs in draft mode."""
    data = cfg.get("data")
    if data is not None and data.get("_target_") == "dsp.data.images.load_horses" and "jpeg_draft" not in data:
        cfg.data.jpeg_draft = True
    return cfg


def load_run(run_dir: str | Path, ckpt: str = "best", device: str | torch.device = "cpu",
             overrides=None) -> LoadedRun:
    """Load `run_dir/checkpoints/<ckpt>.pt` with the config stored inside it, changed by
    `overrides` ({"data": {"test_crops": 36}}; see override_config) when given."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DspError(f"run folder {run_dir} does not exist; pass run_dir=<a dsp-train output folder>")
    path = run_dir / "checkpoints" / f"{ckpt}.pt"
    state = load_checkpoint(path, map_location=device)
    cfg = override_config(legacy_defaults(OmegaConf.create(state["config"])), overrides, "dsp-eval +set.")
    model = build_model(cfg)
    inference = build_inference(cfg)
    attach_inference(model, inference)  # before loading: learned step sizes live in the state
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise DspError(f"checkpoint {path} does not fit the model its config describes: {err}") from None
    model.to(device).eval()
    match_inference(inference, build_objective(cfg))
    return LoadedRun(cfg, model, inference, None if state["threshold"] is None else float(state["threshold"]), state["predict"], state)
