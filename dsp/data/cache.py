"""HDF5 cache of parsed data files, keyed by the source file's path, size and modification time.

Writes go to a temporary file that is renamed into place, so an interrupted run never leaves a
half-written cache entry.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("DSP_CACHE_DIR", Path.home() / ".cache" / "dsp"))


def _key(path: Path) -> str:
    st = path.stat()
    raw = f"{FORMAT_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def cached_arrays(
    path: str | os.PathLike,
    parse: Callable[[Path], tuple[np.ndarray, list[str]]],
    cache_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Return `parse(path)`, reading it from / writing it to the HDF5 cache when possible."""
    path = Path(path)
    if not path.is_file() or cache_dir == "":
        return parse(path)
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    entry = folder / f"{path.stem}-{_key(path)}.h5"
    if entry.is_file():
        try:
            with h5py.File(entry, "r") as f:
                return f["matrix"][()], [n.decode() for n in f["names"][()]]
        except (OSError, KeyError):
            pass  # unreadable entry: parse again and overwrite it
    mat, names = parse(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".tmp{os.getpid()}")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("matrix", data=mat, compression="gzip", compression_opts=4)
            f.create_dataset("names", data=np.array([n.encode() for n in names]))
            f.attrs["source"] = str(path.resolve())
        os.replace(tmp, entry)
    except OSError:
        pass  # a read-only cache folder only costs speed
    return mat, names
