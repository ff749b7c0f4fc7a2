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
from dsp.training.stages import build_stages, check_predict_mode
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

    # ------------------------------------------------------------------ predictions for new inputs
    @property
    def family(self) -> str:
        """What the run predicts from what, read off its data loader's declared class: "multilabel"
        (feature vectors), "sequence" (images or vectors per position), "tokens" (text: word, POS and
        character ids per position) or "mask" (images); anything else is refused here."""
        from dsp import interfaces as I
        from dsp.compat import data_class

        tree = {"data": OmegaConf.to_container(self.config.data, resolve=False)}
        cls = data_class(tree)
        kind, source = (cls.output, cls.input) if cls is not None else (None, None)
        families = {(I.MULTILABEL, I.VECTORS): "multilabel", (I.SEQUENCE, I.IMAGE_SEQUENCES): "sequence",
                    (I.SEQUENCE, I.TOKEN_SEQUENCES): "tokens", (I.MASK, I.IMAGES): "mask"}
        if (kind, source) not in families:
            what = f"{kind} outputs from {source}" if kind else "outputs of a kind its data loader does not declare"
            raise DspError(f"this run ({self.config.data.get('_target_')}) predicts {what}; predictions for new "
                           f"inputs cover multi-label runs, sequence runs (image sequences or text) and mask runs")
        return families[kind, source]

    def _training_data(self, why: str | None):
        """The run's data as its stored config loads it (standardize off: predict() applies the training
        statistics itself), loaded once. When it cannot be loaded: a DspError saying `why` it is
        needed, or None when `why` is None (only nice-to-have, e.g. label names)."""
        import copy

        loaded = self.__dict__.setdefault("_loaded", {})  # loaded once per LoadedRun
        if "data" not in loaded:
            cfg = copy.deepcopy(self.config)
            if cfg.data.get("standardize") is True:
                cfg.data.standardize = False
            try:
                data = instantiate(cfg.data, "data")
                trained = OmegaConf.to_container(cfg.dims) if "dims" in cfg else {}
                other = [f"{k}={v} (the model: {trained[k]})" for k, v in data_dims(data).items()
                         if k in trained and trained[k] != v]
                if other:
                    raise DspError(f"the data its stored config loads now does not fit the model: {', '.join(other)}")
                loaded["data"] = data
            except DspError as err:
                loaded["data"] = err
        data = loaded["data"]
        if isinstance(data, DspError):
            if why:
                raise DspError(f"{why}, recomputed from the run's training data (the data.* keys of its stored "
                               f"config), which cannot be loaded here: {data}")
            return None
        return data

    def predict(self, x, lengths=None, batch_size: int = 1024) -> dict:
        """Predictions for new inputs, made as dsp-eval makes them (the task's predict with the
        checkpoint's prediction mode and decision threshold), after the preprocessing training applied.
        Returns numpy arrays:

        multilabel  x [N, D] features as stored (with data.standardize=true they are standardised
                    here by the training split's statistics, recomputed from the run's training
                    files, which must then be present) -> labels uint8 [N, L] (score >= threshold),
                    scores float32 [N, L], label_names, threshold
        sequence    x [N, T, ...] zero-padded inputs and lengths [N] (default: every sequence T long)
        tokens      a list of sentences, each a list of (word, POS) pairs, encoded with the run's
                    training vocabulary (its training files must be present); or x int64 [N, T, F]
                    of ids as the run's data encodes them, with lengths
                    -> tags int64 [N, T] (tag ids, -1 after each sequence's end), lengths [N],
                    tag_names (per sequence, a list of tag names), label_names (id -> name)
        mask        x [N, C, H, W] or [N, H, W] images in [0, 1] (uint8: divided by 255) of the size
                    the run was trained on -> masks uint8 [N, H, W], scores float32 [N, H, W]
        """
        import numpy as np
        from torch.utils.data import TensorDataset

        from dsp.data.inputs import check_lengths, encode_tokens
        from dsp.data.mulan import standardized
        from dsp.tasks.multilabel import MultiLabelTask, decode
        from dsp.tasks.sequence import SequenceTask

        family = self.family
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DspError(f"batch_size={batch_size!r}: give a whole number of at least 1")
        device = next(iter([*self.model.parameters(), *self.model.buffers()]), torch.zeros(0)).device
        dims = OmegaConf.to_container(self.config.dims) if "dims" in self.config else {}
        num_features = dims.get("num_features")

        def tensor(value, name: str) -> torch.Tensor:
            try:
                t = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
            except (TypeError, ValueError, RuntimeError) as err:
                raise DspError(f"{name} must be an array or tensor of numbers ({err})") from None
            if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int8, torch.int16,
                                                                                   torch.int32, torch.int64)):
                raise DspError(f"{name} holds {t.dtype} values; give numbers")
            return t

        def finite(t: torch.Tensor, name: str) -> None:
            if t.is_floating_point() and not torch.isfinite(t).all():
                row = int(torch.nonzero(~torch.isfinite(t.reshape(t.shape[0], -1)).any(1))[0])
                raise DspError(f"{name}: row {row} holds a NaN or infinite value; every input must be a finite number")

        if family == "multilabel":
            x = tensor(x, "x").float()
            x = x[None] if x.dim() == 1 else x
            if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] != num_features:
                raise DspError(f"x has shape {tuple(x.shape)}, but the run's model reads [examples, {num_features}] "
                               f"feature vectors (dims.num_features)")
            finite(x, "x")
            if self.config.data.get("standardize") is True:
                data = self._training_data("data.standardize=true: inputs are standardised by the training "
                                           "split's feature means and deviations")
                x = standardized(data.split("train"), TensorDataset(x))[1].tensors[0]
            data = self._training_data(None)
            soft, _ = MultiLabelTask().predict(self.model, self.inference, x.to(device), None, batch_size,
                                               self.predict_mode)
            threshold = 0.5 if self.threshold is None else self.threshold
            names = list(data.label_names) if data is not None and getattr(data, "label_names", None) else \
                [f"label{j}" for j in range(soft.shape[1])]
            return {"labels": decode(soft, threshold).cpu().numpy(), "scores": soft.float().cpu().numpy(),
                    "label_names": names, "threshold": threshold}

        if family in ("sequence", "tokens"):
            data = None
            if family == "tokens" and isinstance(x, (list, tuple)):
                target = self.config.data.get("_target_")
                if target != "dsp.data.conll.load_conll2000":
                    raise DspError(f"sentences are encoded as data=conll2000 encodes them (word, POS and character "
                                   f"ids); this run's data ({target}) may encode its tokens otherwise: give x as the "
                                   f"id arrays its loader makes, with lengths")
                data = self._training_data("a run over text encodes words with its training vocabulary")
                sentences = []
                for i, sentence in enumerate(x):
                    if not isinstance(sentence, (list, tuple)) or not sentence or not all(
                            isinstance(tok, (list, tuple)) and len(tok) == 2 for tok in sentence):
                        raise DspError(f"x[{i}]: give each sentence as a non-empty list of (word, POS) pairs")
                    sentences.append([(str(w), str(p)) for w, p in sentence])
                if not sentences:
                    raise DspError("x holds no sentences")
                ids, lengths = encode_tokens(sentences, data.vocab, data.num_features - 2,
                                             bool(self.config.data.get("lowercase", False)))
                x = torch.from_numpy(ids)
            else:
                x = tensor(x, "x")
                x = (x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()) if family == "sequence" else x
                per_position = int(np.prod(x.shape[2:])) if x.dim() >= 3 else None
                if x.dim() < 3 or x.shape[0] == 0 or per_position != num_features:
                    raise DspError(f"x has shape {tuple(x.shape)}, but the run's model reads [sequences, positions, "
                                   f"...] with {num_features} numbers per position (dims.num_features)")
                if family == "tokens" and x.is_floating_point():
                    raise DspError("x holds floats; a run over text reads integer ids (or give sentences of "
                                   "(word, POS) pairs)")
                finite(x, "x")
            data = data or self._training_data(None)
            if family == "sequence" and data is not None:
                trained = tuple(data.split("train").tensors[0].shape[2:])
                if tuple(x.shape[2:]) != trained:
                    raise DspError(f"x holds inputs of shape {tuple(x.shape[2:])} per position; the run was trained "
                                   f"on {trained}")
            n, t = x.shape[:2]
            lengths = torch.from_numpy(check_lengths(lengths.numpy() if isinstance(lengths, torch.Tensor) else
                                                     lengths, n, t, "lengths"))
            y = torch.where(torch.arange(t)[None] < lengths[:, None], 0, -1)  # the lengths, as targets carry them
            num_labels = dims.get("num_labels")
            names = [str(k) for k in range(num_labels)] if data is None else list(data.label_names)
            pred, _ = SequenceTask(names).predict(self.model, self.inference, x.to(device), y.to(device),
                                                  batch_size, self.predict_mode)
            pred = pred.cpu().numpy()
            return {"tags": pred, "lengths": lengths.numpy(), "label_names": names,
                    "tag_names": [[names[k] for k in row[:m]] for row, m in zip(pred.tolist(), lengths.tolist())]}

        from dsp.tasks.segmentation import SegmentationTask, decode as decode_masks

        x = tensor(x, "x")
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        x = x[:, None] if x.dim() == 3 else x
        if x.dim() != 4 or x.shape[0] == 0 or x.shape[1] != num_features:
            raise DspError(f"x has shape {tuple(x.shape)}, but the run's model reads images [examples, "
                           f"{num_features}, height, width] (dims.num_features channels)")
        finite(x, "x")
        size = self.config.data.get("size")
        if size is not None and tuple(x.shape[2:]) != (size, size):
            raise DspError(f"x holds {x.shape[2]}×{x.shape[3]} images; the run was trained on {size}×{size} "
                           f"(data.size): resize them first (dsp-predict reads image files at that size)")
        data = self.config.data
        task = SegmentationTask(data.get("crop"), False, data.get("test_crops"), data.get("combine", "average"))
        probs, _ = task.predict(self.model, self.inference, x.to(device), None, batch_size, self.predict_mode)
        return {"masks": decode_masks(probs).cpu().numpy(), "scores": probs.float().cpu().numpy()}


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
