"""HDF5 storage of dataset splits, and batches read from it by a second thread.

Chen et al. (2015, §2) read training data "from HDF5 storage while a second thread simultaneously
performs the computation". Layout of a file: one group per split holding arrays that share their
first axis (`/train/x`, `/train/y`, ...), chunked along that axis so a batch of scattered examples
only touches the chunks it needs; file-level attributes carry metadata.

`PrefetchBatches` reads the batches of one pass (an epoch) in a background thread into a bounded
queue, so reading and decoding the next batch overlaps with the computation on the current one
(h5py serialises its own calls, but torch releases the GIL while it computes).
"""
from __future__ import annotations

import os
import queue
import shutil
import threading
from contextlib import suppress
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch

from dsp.data.diskspace import disk_error, human
from dsp.errors import DiskError, DspError

SPLITS = ("train", "val", "test")
# Small chunks (~16 KiB: four 5×28×28 uint8 words): a batch of scattered examples reads little
# more than itself (~2 ms per 100 random Word50 words; 256 KiB chunks: ~10× slower).
CHUNK_BYTES = 1 << 14
# Free space wanted beyond twice the arrays' bytes (HDF5's headers and chunk index, and more).
MARGIN = 16 << 20
WRITE_ELSEWHERE = "write it elsewhere (paths.cache_dir, or hydra.run.dir for a run's data.h5)"


def write_splits_h5(
    path: str | os.PathLike,
    splits: dict[str, dict[str, np.ndarray]],
    attrs: dict | None = None,
    compression: str | None = None,
) -> Path:
    """Write `/<split>/<name>` arrays (chunked along the first axis) and file attributes to `path`
    atomically: a temporary file in the same folder is renamed into place, so readers never see a
    half-written file. Uncompressed by default, which keeps random-access batch reads cheap.

    A disk without room for the arrays (h5py would crash the process on it), a read-only folder or
    a file where the folder should be is a DiskError (an OSError too) naming the path and the cause."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        need = 2 * sum(np.asarray(a).nbytes for arrays in splits.values() for a in arrays.values()) + MARGIN
        free = shutil.disk_usage(path.parent).free
        if free < need:  # checked before h5py opens the file: h5py crashes the process on a full disk
            raise DiskError(f"cannot write {path}: {human(free)} free in {path.parent}, about {human(need)} "
                            f"needed; free some space, or {WRITE_ELSEWHERE}, then run again")
        with h5py.File(tmp, "w") as f:
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
            for split, arrays in splits.items():
                group = f.create_group(split)
                for name, arr in arrays.items():
                    arr, chunks = np.asarray(arr), None
                    if arr.ndim and arr.size:
                        rows = min(len(arr), max(1, CHUNK_BYTES // arr[:1].nbytes))
                        chunks = (rows, *arr.shape[1:])
                    group.create_dataset(name, data=arr, chunks=chunks, compression=compression)
        os.replace(tmp, path)
    except DspError:
        raise
    except OSError as err:
        raise disk_error(path, err, WRITE_ELSEWHERE) from None
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def cache_to_hdf5(data, path: str | os.PathLike, compression: str | None = None) -> Path:
    """Store a dataset object's three splits (`data.split(name)` -> TensorDataset of (x, y)) as
    HDF5 so that training can stream them with `PrefetchBatches`."""
    splits = {}
    for name in SPLITS:
        x, y = data.split(name).tensors[:2]
        splits[name] = {"x": x.numpy(), "y": y.numpy()}
    attrs = {}
    if getattr(data, "label_names", None):
        attrs["label_names"] = [str(n) for n in data.label_names]
    return write_splits_h5(path, splits, attrs, compression)


def to_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Default batch transform: uint8 images become float32 in [0, 1]; the rest is kept as stored."""
    xt = torch.from_numpy(x)
    if xt.dtype == torch.uint8:
        xt = xt.float().div_(255.0)
    return xt, torch.from_numpy(y)


def _read_rows(ds: h5py.Dataset, idx: np.ndarray) -> np.ndarray:
    """`ds[idx]` for any indices: sorted unique rows are read one run of consecutive indices at a
    time (h5py's point selection, `ds[sorted]`, is ~15× slower on chunked data), then reordered."""
    uniq, inverse = np.unique(idx, return_inverse=True)
    cut = np.flatnonzero(np.diff(uniq) != 1) + 1
    out = np.empty((len(uniq), *ds.shape[1:]), ds.dtype)
    for a, b in zip(np.r_[0, cut], np.r_[cut, len(uniq)]):
        out[a:b] = ds[uniq[a] : uniq[b - 1] + 1]
    return out[inverse]


def _pinned(batch):
    """Page-locked copies, so the consumer's `.to(cuda, non_blocking=True)` overlaps the copy."""
    return tuple(t.pin_memory() if isinstance(t, torch.Tensor) else t for t in batch)


def _reader(path, split, order, batch_size, start, transform, out: queue.Queue, stop: threading.Event,
            pin: bool = False):
    """Background thread: holds no reference to the PrefetchBatches, so that it can be collected."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    try:
        with h5py.File(path, "r") as f:
            xs, ys = f[split]["x"], f[split]["y"]
            for a in range(start, len(order), batch_size):
                idx = order[a : a + batch_size]
                batch = transform(_read_rows(xs, idx), _read_rows(ys, idx))
                if stop.is_set() or not put(("batch", _pinned(batch) if pin else batch)):
                    return
        put(("done", None))
    except BaseException as err:  # surfaces in the consumer, which re-raises it
        put(("error", err))


def _check_split(path: Path, f: h5py.File, split: str) -> int:
    """The number of examples in /<split>/x and /<split>/y: two datasets of at least one axis, the
    first the same length (a file of another shape would fail later, in the reader, as an IndexError)."""
    shapes = {}
    for name in ("x", "y"):
        ds = f[split][name]
        if not isinstance(ds, h5py.Dataset) or ds.ndim < 1:
            found = f"shape {ds.shape}" if isinstance(ds, h5py.Dataset) else "a group"
            raise DspError(f"HDF5 file {path}: dataset /{split}/{name} should be an array of shape "
                           f"[examples, ...], found {found}; rewrite the file or delete it to have it written again")
        shapes[name] = ds.shape
    if shapes["y"][0] != shapes["x"][0]:
        raise DspError(f"HDF5 file {path}: dataset /{split}/y should hold one row per example of /{split}/x, "
                       f"shape [{shapes['x'][0]}, ...], found shape {shapes['y']} (x: {shapes['x']}); rewrite "
                       f"the file or delete it to have it written again")
    return shapes["x"][0]


class PrefetchBatches:
    """One pass over `order[start:]` in batches of `batch_size`, read from `<path>/<split>/{x,y}`
    by a background thread while the caller computes on the previous batch.

    Yields `transform(x, y)` (default `to_tensors`: uint8 -> float32 / 255) in order; at most
    `depth` batches wait in memory; with `pin_memory` (training on CUDA) they are page-locked by
    the reader thread, so copies to the GPU can be asynchronous. The reader stops and closes the
    file when the pass ends, on `close()` (or leaving a `with` block) and when the object is
    garbage collected, so breaking out of a `for` loop never leaves a thread behind. Errors in the
    reader are raised here.
    One object is one pass: make a new one (with a new `order`) for each epoch.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str,
        order,
        batch_size: int,
        start: int = 0,
        depth: int = 2,
        transform: Callable[[np.ndarray, np.ndarray], tuple] | None = None,
        pin_memory: bool = False,
    ):
        if batch_size < 1 or depth < 1 or start < 0:
            raise ValueError(f"need batch_size >= 1, depth >= 1, start >= 0 (got {batch_size}, {depth}, {start})")
        self.path, self.split = Path(path), split
        self.order = order.numpy() if isinstance(order, torch.Tensor) else np.asarray(order)
        self.order = self.order.astype(np.int64).reshape(-1)
        self.batch_size, self.start, self.depth = batch_size, start, depth
        self.transform = transform or to_tensors
        self.pin_memory = pin_memory
        try:
            with h5py.File(self.path, "r") as f:
                n = _check_split(self.path, f, split)
        except (OSError, KeyError) as err:
            raise DspError(f"cannot read split {split!r} (x, y) from HDF5 file {self.path}: {err}; "
                           f"delete the file to have it written again") from None
        if self.order.size and not (0 <= self.order.min() and self.order.max() < n):
            raise ValueError(f"order holds indices outside 0..{n - 1} (split {split!r} has {n} examples)")
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = False

    def __len__(self) -> int:
        return -(-max(0, len(self.order) - self.start) // self.batch_size)

    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        if self._thread is None:
            self._queue = queue.Queue(self.depth)
            args = (self.path, self.split, self.order, self.batch_size, self.start, self.transform,
                    self._queue, self._stop, self.pin_memory)
            self._thread = threading.Thread(target=_reader, args=args, name="dsp-prefetch", daemon=True)
            self._thread.start()
        kind, item = self._queue.get()
        if kind == "batch":
            return item
        self.close()
        if kind == "error":
            raise item
        raise StopIteration

    def close(self) -> None:
        """Stop the reader (it closes the file) and wait for it; further iteration stops."""
        self._finished = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._queue = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_stop", None) is not None:
            self.close()
