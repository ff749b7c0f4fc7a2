"""Disk faults as one line: which path, what the disk refused, and how much space is left.

Used by the checkpoint writer and the HDF5 files (cache, streamed splits): a full disk, a
read-only folder or a file where a folder should be becomes a `DiskError` (a DspError, so the CLIs
print it as `error: ...`), never a traceback from deep inside torch or h5py.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from dsp.errors import DiskError

FULL = {errno.ENOSPC: "no space is left on the disk", errno.EDQUOT: "the disk quota is exceeded"}
READ_ONLY = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable (permission denied)",
             errno.EPERM: "is not writable (operation not permitted)"}
NOT_A_FOLDER = (errno.ENOTDIR, errno.EEXIST)
# A writer that hides the OS error (torch's C++ writer: "basic_ios::clear") failed on a full disk
# when, with its partial file still there, less than this is free.
NEARLY_FULL = 64 << 20


def human(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def existing_folder(path: str | os.PathLike) -> Path:
    """The nearest folder that exists at or above path (what disk_usage can be asked about)."""
    path = Path(path).absolute()
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int | None:
    try:
        return shutil.disk_usage(existing_folder(path)).free
    except OSError:
        return None


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The first existing ancestor of path that is not a folder (a run folder that is a file)."""
    for parent in reversed(Path(path).absolute().parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def disk_error(path: str | os.PathLike, err: OSError, elsewhere: str, after: str = "") -> DiskError:
    """The DiskError for a failed write of path: the cause from the error's errno (a full disk also
    says how much is free), what to do about it or `elsewhere` (another folder), then `after`."""
    path = Path(path)
    code = getattr(err, "errno", None)
    free = free_bytes(path)
    blocker = file_in_the_way(path)
    if code in FULL or (code is None and free is not None and free < NEARLY_FULL):
        cause = f"{FULL.get(code, 'the disk is full')} ({human(free)} free in {existing_folder(path)})"
        fix = "free some space"
    elif code in READ_ONLY:
        cause, fix = f"{existing_folder(path.parent)} {READ_ONLY[code]}", "make it writable"
    elif blocker is not None or code in NOT_A_FOLDER:
        cause, fix = f"{blocker or path.parent} is a file, not a folder", "remove or rename that file"
    else:
        cause, fix = f"{err.strerror or err} with {human(free)} free in {existing_folder(path)}", "check the disk"
    out = DiskError(f"cannot write {path}: {cause}; {fix}, or {elsewhere}, then run again{after}")
    out.errno = code  # (not filename: that would change how an OSError prints)
    return out
