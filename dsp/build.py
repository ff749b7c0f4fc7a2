"""Build a run's parts from its (Hydra) config, and load a finished run from Python without Hydra."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from dsp.compat import check_built, check_config
from dsp.data.splits import data_dims
from dsp.errors import DspError
from dsp.instantiate import check_trusted, instantiate
from dsp.seed import set_seed
from dsp.tasks import task_for
from dsp.training.stages import build_stages, check_predict_mode
from dsp.training.checkpoint import load_checkpoint


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
    stages = build_stages(cfg.trainer, objective, model, _size(data.split("train")))
    return RunParts(data, task_for(data), model, inference, objective, stages)


def _size(split) -> int | None:
    try:
        return len(split)
    except TypeError:  # a dataset without a length (a stream): trainer.batch_size=auto takes 64
        return None


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

    # ------------------------------------------------------------------ predictions for new inputs
    @property
    def family(self) -> str:
        """What the run predicts from what (dsp.prediction.family)."""
        from dsp.prediction import family

        return family(self)

    def predict(self, x, lengths=None, batch_size: int = 1024) -> dict:
        """Predictions for new inputs, made as dsp-eval makes them (dsp.prediction.predict)."""
        from dsp.prediction import predict

        return predict(self, x, lengths, batch_size)


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
    _check_fields(state, path)
    source = f"the config stored in {path}"
    check_trusted(state["config"], source, trust)  # before anything is read, imported or called
    cfg = override_config(legacy_defaults(OmegaConf.create(state["config"])), overrides, "dsp-eval +set.")
    check_trusted(cfg, source, trust)  # (with the +set changes)
    check_config(cfg, {})  # a +set change of inference (or a user's part) that no longer fits
    _refuse_other_shapes(cfg, state["model"], path)  # before a stored size is allocated
    model = build_model(cfg)
    inference = build_inference(cfg)
    attach_inference(model, inference)  # before loading: learned step sizes live in the state
    _refuse_learned_overrides(model, overrides)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise DspError(f"checkpoint {path} does not fit the model its config describes: {err}") from None
    model.to(device).eval()
    check_predict_mode(model, state["predict"], f"checkpoint {path}: predict")
    objective = build_objective(cfg)
    check_built(None, model, inference, objective, cfg)
    inference.match(objective)
    return LoadedRun(cfg, model, inference, None if state["threshold"] is None else float(state["threshold"]),
                     state["predict"], state)


def _check_fields(state: dict, path: Path) -> None:
    """The fields load_run reads have the types dsp-train writes, or the checkpoint is refused."""
    threshold = state["threshold"]
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 <= threshold <= 1):
        raise DspError(f"checkpoint {path}: threshold={threshold!r} is not a number between 0 and 1 or null")
    weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise DspError(f"checkpoint {path}: model is not a mapping of parameter names to tensors")
    if not isinstance(state["predict"], str):
        raise DspError(f"checkpoint {path}: predict={state['predict']!r} is not a prediction mode")

    def depth(node, level=0):
        if level > 50:
            raise DspError(f"checkpoint {path}: its config is nested more than 50 levels deep")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            depth(child, level + 1)

    depth(state["config"])


def _refuse_other_shapes(cfg: DictConfig, weights: dict, path: Path) -> None:
    """Build the model on the meta device (no memory) and compare its shapes with the checkpoint's,
    so a stored config asking for a huge layer is refused before anything is allocated. A model
    that cannot be built there is checked by load_state_dict instead."""
    try:
        with torch.device("meta"):
            model = build_model(cfg)
            attach_inference(model, build_inference(cfg))
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except Exception:  # noqa: BLE001 -- a part that needs real tensors to build
        return
    other = [k for k, shape in shapes.items() if k in weights and tuple(weights[k].shape) != shape]
    if other:
        k = other[0]
        raise DspError(f"checkpoint {path} does not fit the model its config describes: {k} is "
                       f"{tuple(weights[k].shape)} in the checkpoint, {shapes[k]} in the config")
