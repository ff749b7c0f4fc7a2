"""Crash-safe files: everything is written to a temporary file and renamed into place, so a run
killed mid-write leaves the previous checkpoint or result intact."""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import torch

from dsp.errors import DspError


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    _atomic(Path(path), lambda tmp: torch.save(state, tmp))


def write_json(obj, path: str | os.PathLike) -> None:
    _atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a dsp checkpoint, turning a missing or damaged file into a clear DspError."""
    path = Path(path)
    if not path.is_file():
        raise DspError(
            f"no checkpoint at {path}: the run folder has no finished epoch yet, or ckpt= names "
            f"a checkpoint that does not exist (use ckpt=best or ckpt=last)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise DspError(f"checkpoint {path} is corrupted or truncated ({type(err).__name__}); "
                       f"use the other checkpoint (ckpt=last or ckpt=best) or retrain") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise DspError(f"{path} is not a dsp checkpoint (no model weights or config inside)")
    return state
