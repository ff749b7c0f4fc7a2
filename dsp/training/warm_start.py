"""Warm start (trainer.init_from): copy model weights from an earlier run's checkpoint before
training starts, for fine-tuning or for reusing a finished stage. E.g. the unary stage of a chain
CRF trained once with cross-entropy, reused by the stage procedure of another objective:

    dsp-train experiment=crf_ocr_stage objective=crf_nll trainer.init_from=<run with the unary stage>
        trainer.init_parts=[unary_net] trainer.stages.unary=null

Only weights travel: the optimiser, the learning-rate schedule, the epoch count and the run folder
start fresh (trainer.resume=true is the way to continue a run). A resumed warm-started run takes
everything from its own last.pt instead.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dsp.errors import DspError
from dsp.training.checkpoint import load_checkpoint
from dsp.training.stages import model_parts


def _checkpoint_path(source) -> Path:
    path = Path(str(source))
    if path.is_dir():
        path = path / "checkpoints" / "best.pt"
    if not path.is_file():
        raise DspError(f"trainer.init_from={source}: no checkpoint there; give a .pt file or a dsp-train run "
                       "folder that has checkpoints/best.pt")
    return path


def _listing(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def warm_start(model: torch.nn.Module, source, parts="all") -> tuple[Path, int]:
    """Load the weights of `parts` (all, or a list of the model's top-level parts, as in a stage's
    `train`) from `source` (a checkpoint file or a run folder's best.pt) into `model`; returns the
    checkpoint path and the number of tensors copied. The checkpoint must hold every weight of
    those parts with the same shapes, else nothing is copied and a DspError says what differs."""
    path = _checkpoint_path(source)
    state = load_checkpoint(path, map_location="cpu")["model"]
    # the parts a stage may train (children, parameters of the model's own) and its own buffers (α)
    names = model_parts(model) + [n for n, _ in model.named_buffers(recurse=False)]
    chosen_parts = names if parts in (None, "all") else [str(p) for p in parts]
    unknown = [p for p in chosen_parts if p not in names]
    if unknown:
        raise DspError(f"trainer.init_parts names {unknown}, which the model does not have; its parts are "
                       f"{sorted(names)}")
    own = model.state_dict()
    buffers = {n for n, _ in model.named_buffers()}
    # a buffer the checkpoint predates (a SPEN's α) keeps the model's own value
    wanted = [k for k in own if k.split(".", 1)[0] in chosen_parts and (k in state or k not in buffers)]
    missing = [k for k in wanted if k not in state]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wanted
                  if k in state and state[k].shape != own[k].shape]
    if missing or mismatched:
        problem = f"lacks {_listing(missing)}" if missing else f"has other shapes: {_listing(mismatched)}"
        raise DspError(f"trainer.init_from={path}: the checkpoint {problem}; it must come from a model of the "
                       "same architecture (or limit trainer.init_parts to the parts they share)")
    model.load_state_dict({k: state[k] for k in wanted}, strict=False)
    return path, len(wanted)
