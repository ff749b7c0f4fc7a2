"""HDF5 cache of parsed data files, keyed by the source file's path, size and modification time.

Writes go to a temporary file that is renamed into place, so an interrupted run never leaves a
half-written cache entry. The cache only saves parsing time, so it never stops a run: a read-only
cache folder is skipped quietly, a nearly full disk with a one-line warning (checked before h5py
opens the file: h5py crashes the process on a full disk), and a damaged entry is parsed again.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
from contextlib import suppress
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from dsp.data.diskspace import free_bytes, human

FORMAT_VERSION = 1
# HDF5's own overhead on top of the data (headers, chunk index), and more: a cache entry never
# takes the last megabytes of a disk.
MARGIN = 16 << 20


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
    cached = _read(entry) if entry.is_file() else None
    if cached is not None:
        return cached
    mat, names = parse(path)
    _write(entry, mat, names, path)
    return mat, names


def _read(entry: Path) -> tuple[np.ndarray, list[str]] | None:
    """The entry's (matrix, names), or None when it is unreadable or not shaped as parse's output
    (a damaged or foreign file): then the source is parsed again and the entry overwritten."""
    try:
        with h5py.File(entry, "r") as f:
            mat, names = f["matrix"], f["names"]
            if mat.ndim != 2 or names.ndim != 1 or names.shape[0] != mat.shape[1]:
                return None
            return mat[()], [n.decode() for n in names[()]]
    except (OSError, KeyError, ValueError, AttributeError, UnicodeDecodeError):  # (AttributeError: a group)
        return None


def _write(entry: Path, mat: np.ndarray, names: list[str], source: Path) -> None:
    encoded = np.array([n.encode() for n in names])
    need = 2 * (mat.nbytes + encoded.nbytes) + MARGIN  # uncompressed, twice: gzip never needs more
    tmp = entry.with_suffix(f".tmp{os.getpid()}")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(entry.parent).free
        if free < need:  # never hand h5py a disk it could fill (it would crash the process)
            print(f"warning: not caching {source.name} in {entry.parent}: {human(free)} free there, "
                  f"{human(need)} wanted (the cache only saves parsing time)", file=sys.stderr, flush=True)
            return
        with h5py.File(tmp, "w") as f:
            f.create_dataset("matrix", data=mat, compression="gzip", compression_opts=4)
            f.create_dataset("names", data=encoded)
            f.attrs["source"] = str(source.resolve())
        os.replace(tmp, entry)
    except OSError as err:  # a read-only cache folder only costs speed: quietly
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"warning: not caching {source.name} in {entry.parent}: {err.strerror} "
                  f"({human(free_bytes(entry.parent))} free)", file=sys.stderr, flush=True)
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
