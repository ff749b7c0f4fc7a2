"""Predictions for new inputs from a trained run (`dsp.load_run(...).predict`, dsp-predict).

Inputs are preprocessed as training preprocessed them: a multi-label run's fitted input transform
(missing features filled, standardisation; dsp.data.preprocessing) is read from its checkpoint, so
the training files are not needed; runs over text encode words with their training vocabulary,
which is rebuilt from the training files named in the stored config.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from omegaconf import OmegaConf

from dsp import interfaces as I
from dsp.compat import data_class
from dsp.data.inputs import check_lengths, encode_tokens
from dsp.data.splits import data_dims
from dsp.data.preprocessing import InputTransform, fit_input_transform
from dsp.errors import DspError
from dsp.instantiate import instantiate
from dsp.tasks.multilabel import MultiLabelTask, decode as decode_labels
from dsp.tasks.segmentation import SegmentationTask, decode as decode_masks
from dsp.tasks.sequence import SequenceTask


def input_transform(run) -> InputTransform | None:
    """The multi-label preprocessing the run was trained with: from its checkpoint, or for a checkpoint
    written before checkpoints kept it, refitted on the training split its stored config loads."""
    if "input_transform" in run.checkpoint:
        state = run.checkpoint["input_transform"]
        return None if state is None else InputTransform.from_state(state)
    setting = run.config.data.get("standardize", False)
    if setting is False:
        return None
    cfg = copy.deepcopy(run.config)
    cfg.data.standardize = False
    try:
        raw = instantiate(cfg.data, "data")
    except DspError as err:
        raise DspError(f"data.standardize={setting}: inputs are standardised by the training split's statistics, "
                       f"which this older checkpoint does not keep and which cannot be recomputed here: {err}") from None
    return fit_input_transform(raw.split("train").tensors[0], setting)


def family(run) -> str:
    """What the run predicts from what, read off its data loader's declared class: "multilabel"
    (feature vectors), "sequence" (images or vectors per position), "tokens" (text: word, POS and
    character ids per position) or "mask" (images); anything else is refused here."""
    tree = {"data": OmegaConf.to_container(run.config.data, resolve=False)}
    cls = data_class(tree)
    kind, source = (cls.output, cls.input) if cls is not None else (None, None)
    families = {(I.MULTILABEL, I.VECTORS): "multilabel", (I.SEQUENCE, I.IMAGE_SEQUENCES): "sequence",
                (I.SEQUENCE, I.TOKEN_SEQUENCES): "tokens", (I.MASK, I.IMAGES): "mask"}
    if (kind, source) not in families:
        what = f"{kind} outputs from {source}" if kind else "outputs of a kind its data loader does not declare"
        raise DspError(f"this run ({run.config.data.get('_target_')}) predicts {what}; predictions for new "
                       f"inputs cover multi-label runs, sequence runs (image sequences or text) and mask runs")
    return families[kind, source]


def training_data(run, why: str | None):
    """The run's data as its stored config loads it, loaded once (label names, vocabularies). When it cannot be loaded: a DspError saying `why` it is
    needed, or None when `why` is None (only nice-to-have, e.g. label names)."""
    loaded = run.__dict__.setdefault("_loaded", {})  # loaded once per LoadedRun
    if "data" not in loaded:
        cfg = run.config
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


def predict(run, x, lengths=None, batch_size: int = 1024) -> dict:
    """Predictions for new inputs, made as dsp-eval makes them (the task's predict with the
    checkpoint's prediction mode and decision threshold), after the preprocessing training applied.
    Returns numpy arrays:

    multilabel  x [N, D] features as the data files hold them (NaN for a missing one when training
                filled missing features), preprocessed with the checkpoint's input transform
                -> labels uint8 [N, L] (score >= threshold), scores float32 [N, L], label_names,
                threshold
    sequence    x [N, T, ...] zero-padded inputs and lengths [N] (default: every sequence T long)
    tokens      a list of sentences, each a list of (word, POS) pairs, encoded with the run's
                training vocabulary (its training files must be present); or x int64 [N, T, F]
                of ids as the run's data encodes them, with lengths
                -> tags int64 [N, T] (tag ids, -1 after each sequence's end), lengths [N],
                tag_names (per sequence, a list of tag names), label_names (id -> name)
    mask        x [N, C, H, W] or [N, H, W] images in [0, 1] (uint8: divided by 255) of the size
                the run was trained on -> masks uint8 [N, H, W], scores float32 [N, H, W]
    """
    kind = family(run)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DspError(f"batch_size={batch_size!r}: give a whole number of at least 1")
    device = next(iter([*run.model.parameters(), *run.model.buffers()]), torch.zeros(0)).device
    dims = OmegaConf.to_container(run.config.dims) if "dims" in run.config else {}
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

    def finite(t: torch.Tensor, name: str, missing_allowed: bool = False) -> None:
        bad = ~torch.isfinite(t) & ~(torch.isnan(t) if missing_allowed else torch.zeros_like(t, dtype=torch.bool))
        if t.is_floating_point() and bad.any():
            row = int(torch.nonzero(bad.reshape(t.shape[0], -1).any(1))[0])
            what = "an infinite value" if missing_allowed else "a NaN or infinite value"
            raise DspError(f"{name}: row {row} holds {what}; every input must be a finite number"
                           + ("" if missing_allowed else " (this run's training data had no missing features to "
                              "fill one with)"))

    if kind == "multilabel":
        x = tensor(x, "x").float()
        x = x[None] if x.dim() == 1 else x
        if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] != num_features:
            raise DspError(f"x has shape {tuple(x.shape)}, but the run's model reads [examples, {num_features}] "
                           f"feature vectors (dims.num_features)")
        transform = input_transform(run)
        finite(x, "x", missing_allowed=transform is not None and transform.fill is not None)
        if transform is not None:
            x = transform(x)
        data = training_data(run, None)
        soft, _ = MultiLabelTask().predict(run.model, run.inference, x.to(device), None, batch_size,
                                           run.predict_mode)
        threshold = 0.5 if run.threshold is None else run.threshold
        names = list(data.label_names) if data is not None and getattr(data, "label_names", None) else \
            [f"label{j}" for j in range(soft.shape[1])]
        return {"labels": decode_labels(soft, threshold).cpu().numpy(), "scores": soft.float().cpu().numpy(),
                "label_names": names, "threshold": threshold}

    if kind in ("sequence", "tokens"):
        data = None
        if kind == "tokens" and isinstance(x, (list, tuple)):
            target = run.config.data.get("_target_")
            if target != "dsp.data.conll.load_conll2000":
                raise DspError(f"sentences are encoded as data=conll2000 encodes them (word, POS and character "
                               f"ids); this run's data ({target}) may encode its tokens otherwise: give x as the "
                               f"id arrays its loader makes, with lengths")
            data = training_data(run, "a run over text encodes words with its training vocabulary")
            sentences = []
            for i, sentence in enumerate(x):
                if not isinstance(sentence, (list, tuple)) or not sentence or not all(
                        isinstance(tok, (list, tuple)) and len(tok) == 2 for tok in sentence):
                    raise DspError(f"x[{i}]: give each sentence as a non-empty list of (word, POS) pairs")
                sentences.append([(str(w), str(p)) for w, p in sentence])
            if not sentences:
                raise DspError("x holds no sentences")
            ids, lengths = encode_tokens(sentences, data.vocab, data.num_features - 2,
                                         bool(run.config.data.get("lowercase", False)))
            x = torch.from_numpy(ids)
        else:
            x = tensor(x, "x")
            x = (x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()) if kind == "sequence" else x
            per_position = int(np.prod(x.shape[2:])) if x.dim() >= 3 else None
            if x.dim() < 3 or x.shape[0] == 0 or per_position != num_features:
                raise DspError(f"x has shape {tuple(x.shape)}, but the run's model reads [sequences, positions, "
                               f"...] with {num_features} numbers per position (dims.num_features)")
            if kind == "tokens" and x.is_floating_point():
                raise DspError("x holds floats; a run over text reads integer ids (or give sentences of "
                               "(word, POS) pairs)")
            finite(x, "x")
        data = data or training_data(run, None)
        if kind == "sequence" and data is not None:
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
        pred, _ = SequenceTask(names).predict(run.model, run.inference, x.to(device), y.to(device),
                                              batch_size, run.predict_mode)
        pred = pred.cpu().numpy()
        return {"tags": pred, "lengths": lengths.numpy(), "label_names": names,
                "tag_names": [[names[k] for k in row[:m]] for row, m in zip(pred.tolist(), lengths.tolist())]}


    x = tensor(x, "x")
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    x = x[:, None] if x.dim() == 3 else x
    if x.dim() != 4 or x.shape[0] == 0 or x.shape[1] != num_features:
        raise DspError(f"x has shape {tuple(x.shape)}, but the run's model reads images [examples, "
                       f"{num_features}, height, width] (dims.num_features channels)")
    finite(x, "x")
    size = run.config.data.get("size")
    if size is not None and tuple(x.shape[2:]) != (size, size):
        raise DspError(f"x holds {x.shape[2]}×{x.shape[3]} images; the run was trained on {size}×{size} "
                       f"(data.size): resize them first (dsp-predict reads image files at that size)")
    data = run.config.data
    task = SegmentationTask(data.get("crop"), False, data.get("test_crops"), data.get("combine", "average"))
    probs, _ = task.predict(run.model, run.inference, x.to(device), None, batch_size, run.predict_mode)
    return {"masks": decode_masks(probs).cpu().numpy(), "scores": probs.float().cpu().numpy()}


