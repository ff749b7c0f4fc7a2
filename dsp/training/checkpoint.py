"""Crash-safe checkpoint files.

Everything is written to a temporary file, flushed to disk and renamed into place, so a run killed
mid-write leaves the previous file intact; last.pt keeps its predecessor as last.prev.pt, the
fallback when last.pt turns out unreadable. Checkpoints hold tensors and plain Python values only
and are read with torch.load(weights_only=True): loading one cannot run code.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import sys
from contextlib import suppress
from pathlib import Path

import numpy as np
import torch

from dsp.data.diskspace import disk_error
from dsp.errors import DspError

# Checkpoints written before RNG states were stored as tensors hold numpy's Mersenne-Twister state
# as an ndarray. These three globals rebuild a plain array and nothing else, so they stay loadable.
_np_core = getattr(np, "_core", None) or np.core
_LEGACY_NUMPY = [_np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


WRITE_ELSEWHERE = "choose another folder (hydra.run.dir=...)"
WRITE_AFTER = ("; the files already there are intact, and a training run continues from its last checkpoint "
               "with trainer.resume=true")


def _atomic(path: Path, write, keep_previous: Path | None = None) -> None:
    """write(tmp) then rename tmp to path; with keep_previous, the old path is first renamed there.

    A write the disk refuses (full, read-only, a file where the folder should be) is a DiskError
    naming the path and the cause; the temporary file is removed and the old files stay as they were.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename, or a power cut may leave it empty
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)  # a kill between the two renames: resume finds the .prev
        os.replace(tmp, path)
    except DspError:
        raise
    except OSError as err:  # (while the partial file is still there: the free space it left tells a full disk)
        raise disk_error(path, err, WRITE_ELSEWHERE, WRITE_AFTER) from None
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


def previous_of(path: str | os.PathLike) -> Path:
    """last.pt -> last.prev.pt"""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _torch_save(state: dict, tmp: Path) -> None:
    # Through a Python file, a failed write is an OSError with its errno (ENOSPC, EDQUOT, ...), where
    # torch's own C++ writer only says "basic_ios::clear" or "unexpected pos".
    with open(tmp, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as err:  # still torch's writer failing: _atomic judges the cause by the free space
            raise OSError(f"torch.save failed ({err})") from None


def save_checkpoint(state: dict, path: str | os.PathLike, keep_previous: bool = False) -> None:
    path = Path(path)
    _atomic(path, lambda tmp: _torch_save(state, tmp), previous_of(path) if keep_previous else None)


def write_json(obj, path: str | os.PathLike) -> None:
    _atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


class UnreadableCheckpoint(DspError):
    """A checkpoint file that exists but cannot be read: damaged, truncated or not a checkpoint."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"checkpoint {path} is corrupted or truncated ({reason}); "
                         f"use the other checkpoint (ckpt=last or ckpt=best) or retrain")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a dsp checkpoint, turning a missing, damaged or unsafe file into a clear DspError."""
    path = Path(path)
    if not path.is_file():
        raise DspError(
            f"no checkpoint at {path}: the run folder has no finished epoch yet, or ckpt= names "
            f"a checkpoint that does not exist (use ckpt=best or ckpt=last)"
        )
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 -- a damaged file fails anywhere in torch's readers (a text file: KeyError)
        unsafe = _unsafe_globals(path) if isinstance(err, pickle.UnpicklingError) else []
        if unsafe:
            raise DspError(
                f"checkpoint {path} holds Python objects ({', '.join(unsafe)}), not only tensors and "
                f"plain values; dsp loads checkpoints with torch.load(weights_only=True) so that a file "
                f"cannot run code, and refuses this one. Use a checkpoint written by dsp-train"
            ) from None
        raise UnreadableCheckpoint(path, type(err).__name__) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise DspError(f"{path} is not a dsp checkpoint (no model weights or config inside)")
    return state


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not even a readable archive: it is damaged, not unsafe
        return []


def held_results(run_dir: str | os.PathLike) -> list[Path]:
    """What a run folder already holds that a fresh run would overwrite: checkpoints, metrics.json."""
    run_dir = Path(run_dir)
    found = sorted((run_dir / "checkpoints").glob("*.pt"))
    return found + [p for p in (run_dir / "metrics.json",) if p.is_file()]


def refuse_used_run_dir(run_dir: str | os.PathLike) -> None:
    """A fresh run never starts in a folder that holds another run's results."""
    held = held_results(run_dir)
    if held:
        names = ", ".join(str(p.relative_to(run_dir)) for p in held[:3]) + (", ..." if len(held) > 3 else "")
        raise DspError(f"{run_dir} already holds a run ({names}); pass trainer.resume=true to continue "
                       f"that run, or choose another hydra.run.dir")


# What Trainer._resume_state, Trainer._fit_stage and the early-stopping hook read from a checkpoint
# without a default: a last.pt lacking one cannot resume a run, however well it loads.
RESUME_KEYS = ("model", "optimizer", "scheduler", "stage_index", "stage", "epoch", "step", "global_epoch",
               "threshold", "rng", "best_metric", "bad_epochs")


def load_latest(ckpt_dir: str | os.PathLike, map_location="cpu",
                require: tuple[str, ...] = ()) -> tuple[dict, Path] | None:
    """(state, path) to resume from: last.pt, else last.prev.pt with a warning; None if neither exists.

    A file that loads but lacks one of the keys in `require` (the trainer: RESUME_KEYS) counts as
    unreadable. Never a silent fresh start: when both files exist but neither loads, a DspError names them.
    """
    last = Path(ckpt_dir) / "last.pt"
    prev = previous_of(last)
    if not last.exists() and not prev.exists():
        return None
    problems = []
    for path in (last, prev):
        try:
            state = load_checkpoint(path, map_location)
            missing = [k for k in require if k not in state]
            if missing:
                raise UnreadableCheckpoint(path, f"no {', '.join(missing)} inside")
        except DspError as err:
            problems.append(f"{path} is unreadable ({err.reason})" if isinstance(err, UnreadableCheckpoint) else str(err))
            continue
        if path == prev:
            print(f"warning: {problems[0]}; resuming from the previous checkpoint {prev} instead "
                  f"(one epoch or one preemption earlier)", file=sys.stderr, flush=True)
        return state, path
    raise DspError(f"cannot resume: neither {last} nor {prev} can be loaded ({'; '.join(problems)}). "
                   f"Start the run again in a new hydra.run.dir, or delete both files to restart this one")


# ------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """Every random generator training draws from, as tensors and plain values (weights_only-safe)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),  # (version, tuple of ints, None): plain values
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # an ndarray in older checkpoints
    np.random.set_state((name, keys.astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _tuples(x):
    """random.setstate wants tuples; be lenient if a state came back as lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
