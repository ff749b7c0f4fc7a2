"""Multi-label data from plain array files: NumPy `.npz` archives and CSV tables.

Both give the same splits as the Mulan loader (dsp.data.mulan.load_mulan): a training file and a
test file (or one file and `test_size` held out as the test split with a fixed seed), the
validation split carved from the training file (`val_fraction`, `split_seed`, the same permutation
rule as every other task), and `standardize` (features shifted and scaled by their mean and
standard deviation over the training split; validation and test use the training statistics).

Layouts
-------
`.npz` (data=npz), one archive per file (np.savez or np.savez_compressed):

    x            [N, D]  numeric features (stored as float32)
    y            [N, L]  labels, every value 0 or 1 (bool or any numeric dtype)
    label_names  [L]     optional: the labels' names (strings); default label0..label{L-1}

CSV (data=csv): a header row of column names, then one row per example of numbers (comma-separated
unless `delimiter` says otherwise; blank lines are skipped). The label columns are named by
`labels: [name, ...]` or counted by `num_labels: K` at the `label_position` end (the last K
columns) or start (the first K); every other column is a feature. A test file is read by the
training file's column names, so its columns may come in another order.

Every file is checked as it is read, and a problem is one DspError naming the file and the array or
column: a missing file, array or column; x and y of different lengths; labels other than 0/1 (the
first offending row); NaN or infinite features (the first such row); a file without rows; train
and test of different feature or label counts.
"""
from __future__ import annotations

import csv
import io
import os
import warnings
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dsp.data.preprocessing import Standardize, check_standardize, fit_input_transform, transformed
from dsp.data.splits import MultiLabelSplits, holdout
from dsp.errors import DspError
from dsp.schema import Count, OpenFraction, Positive, Size

NPZ_LAYOUT = "x [N, D] features, y [N, L] 0/1 labels, optional label_names [L]"


# ------------------------------------------------------------------------------ checks
def check_features(x: np.ndarray, where: str, row_name=lambda i: f"row {i}",
                   column_name=lambda j: f"column {j}") -> None:
    """Refuse NaN or infinite features, naming `where` (file and array), the first such row and its column."""
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        value = x[tuple(bad)]
        column = f" ({column_name(int(bad[1]))})" if x.ndim == 2 else ""
        raise DspError(f"{where}: {row_name(int(bad[0]))} holds {'a NaN' if np.isnan(value) else 'an infinite'} "
                       f"feature{column}; fix or drop the row, every feature must be a finite number")


def check_labels01(y: np.ndarray, where: str, row_name=lambda i: f"row {i}",
                   column_name=lambda j: f"label column {j}") -> None:
    """Refuse labels other than 0/1, naming the first offending row, its column and the value."""
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        index = tuple(int(v) for v in np.argwhere(bad)[0])
        column = f" ({column_name(index[1])})" if y.ndim == 2 else ""
        raise DspError(f"{where}: labels must be 0 or 1, but {row_name(index[0])} holds {y[index].item()!r}{column}")


def check_multilabel(x: np.ndarray, y: np.ndarray, path, x_key: str = "x", y_key: str = "y",
                     row_name=lambda i: f"row {i}", x_columns=None, y_columns=None) -> None:
    """The checks every multi-label file passes: shapes, rows, 0/1 labels, finite features."""
    if x.ndim != 2:
        raise DspError(f"{path}: {x_key} must be a 2-d array [examples, features], found shape {x.shape}")
    if y.ndim != 2:
        raise DspError(f"{path}: {y_key} must be a 2-d array [examples, labels], found shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DspError(f"{path}: {x_key} has {x.shape[0]} rows but {y_key} has {y.shape[0]}; they must hold one "
                       f"row per example each")
    if x.shape[0] == 0:
        raise DspError(f"{path}: {x_key} and {y_key} hold no rows (zero examples)")
    if x.shape[1] == 0:
        raise DspError(f"{path}: {x_key} has no feature columns (shape {x.shape})")
    if y.shape[1] == 0:
        raise DspError(f"{path}: {y_key} has no label columns (shape {y.shape})")
    check_labels01(y, f"{path}: {y_key}", row_name, *([y_columns] if y_columns else []))
    check_features(x, f"{path}: {x_key}", row_name, *([x_columns] if x_columns else []))


# ----------------------------------------------------------------------------- readers
def read_npz(path: str | os.PathLike, need: tuple[str, ...] = ("x", "y")) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive (only numbers and strings: object arrays are not unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise DspError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            missing = [k for k in need if k not in names]
            if missing:
                raise DspError(f"{path}: no array {missing[0]!r} (the archive holds {', '.join(names) or 'nothing'}); "
                               f"the layout is {NPZ_LAYOUT}")
            return {k: archive[k] for k in names}
    except DspError:
        raise
    except ValueError as err:  # object arrays (pickled) or a damaged member
        raise DspError(f"{path}: cannot read the .npz archive without unpickling ({err}); store plain numeric and "
                       f"string arrays (np.savez)") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise DspError(f"{path} is not a readable .npz archive ({err}); write it with np.savez") from None


def _numeric(arr: np.ndarray, path, key: str) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.number):
        raise DspError(f"{path}: array {key!r} holds {arr.dtype} values; it must be numeric")
    return arr


def _label_names(raw, count: int, path, key: str = "label_names") -> list[str]:
    if raw is None:
        return [f"label{j}" for j in range(count)]
    names = [str(n) for n in np.asarray(raw).reshape(-1).tolist()]
    if len(names) != count:
        raise DspError(f"{path}: {key} names {len(names)} labels but y has {count} label columns")
    return names


def read_npz_multilabel(path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """x float32 [N, D], y float32 [N, L] and the label names of a multi-label .npz file, checked."""
    arrays = read_npz(path)
    x, y = _numeric(arrays["x"], path, "x"), _numeric(arrays["y"], path, "y")
    check_multilabel(x, y, path)
    names = _label_names(arrays.get("label_names"), y.shape[1], path)
    return x.astype(np.float32), y.astype(np.float32), names


def read_csv_table(path: str | os.PathLike, delimiter: str = ",") -> tuple[np.ndarray, list[str], np.ndarray]:
    """A CSV file with a header row: (float64 values [N, C], column names, 1-based line number of each row).
    A cell that is not a number is refused with its line and column."""
    path = Path(path)
    if not path.is_file():
        raise DspError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DspError(f"cannot read {path} as a UTF-8 text file: {err}") from None
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not numbered:
        raise DspError(f"{path} is empty: a CSV file needs a header row of column names, then one row per example")
    header = [h.strip() for h in next(csv.reader([numbered[0][1]], delimiter=delimiter))]
    if len(set(header)) != len(header):
        twice = next(h for h in header if header.count(h) > 1)
        raise DspError(f"{path}: the header names column {twice!r} twice; give every column its own name")
    lines = np.array([n for n, _ in numbered[1:]], dtype=np.int64)
    if not len(lines):
        return np.empty((0, len(header))), header, lines
    try:  # fast path: plain numbers (the scan below finds the offending cell otherwise)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = np.loadtxt(io.StringIO(text), delimiter=delimiter, skiprows=numbered[0][0], ndmin=2,
                                dtype=np.float64, comments=None)
        if values.shape == (len(lines), len(header)):
            return values, header, lines
    except ValueError:
        pass
    body = [(n, r) for n, r in zip(lines.tolist(), csv.reader([line for _, line in numbered[1:]], delimiter=delimiter))]
    values = np.empty((len(body), len(header)), dtype=np.float64)
    for i, (lineno, row) in enumerate(body):
        if len(row) != len(header):
            raise DspError(f"{path}, line {lineno}: {len(row)} values, but the header names {len(header)} columns")
        for j, cell in enumerate(row):
            try:
                values[i, j] = float(cell)
            except ValueError:
                raise DspError(f"{path}, line {lineno}, column {header[j]!r}: {cell.strip()!r} is not a number") from None
    return values, header, lines


def label_columns(header: list[str], path, labels=None, num_labels=None, label_position="end") -> list[int]:
    """Indices of the label columns: those named by `labels`, or the last / first `num_labels`."""
    if (labels is None) == (num_labels is None):
        raise DspError("data.labels (the label columns' names) or data.num_labels (how many at "
                       "data.label_position) must be set, and only one of them")
    if labels is not None:
        labels = [str(n) for n in labels]
        if not labels:
            raise DspError("data.labels is empty: name at least one label column")
        missing = [n for n in labels if n not in header]
        if missing:
            raise DspError(f"{path}: no column {missing[0]!r} named in data.labels (the header has "
                           f"{', '.join(header[:8])}{', ...' if len(header) > 8 else ''})")
        return [header.index(n) for n in labels]
    if label_position not in ("end", "start"):
        raise DspError(f"data.label_position={label_position!r}: choose end or start")
    if not 0 < num_labels < len(header):
        raise DspError(f"data.num_labels={num_labels} does not fit {path}, which has {len(header)} columns; "
                       f"the features need at least one")
    n = len(header)
    return list(range(n - num_labels, n)) if label_position == "end" else list(range(num_labels))


def read_csv_multilabel(path, labels=None, num_labels=None, label_position="end", delimiter=",",
                        features: list[str] | None = None):
    """x float32 [N, D], y float32 [N, L], label names and feature names of a CSV file; `features`
    (a training file's feature names) selects the feature columns by name."""
    values, header, lines = read_csv_table(path, delimiter)
    lab = label_columns(header, path, labels, num_labels, label_position)
    if features is None:
        feat = [j for j in range(len(header)) if j not in set(lab)]
    else:
        missing = [n for n in features if n not in header]
        if missing:
            raise DspError(f"{path}: no feature column {missing[0]!r}, which the training file has; test and "
                           f"training files need the same columns")
        feat = [header.index(n) for n in features]
    x, y = values[:, feat], values[:, lab]
    check_multilabel(x, y, path, "feature columns", "label columns", row_name=lambda i: f"line {lines[i]}",
                     x_columns=lambda j: f"column {header[feat[j]]!r}", y_columns=lambda j: f"column {header[lab[j]]!r}")
    return x.astype(np.float32), y.astype(np.float32), [header[j] for j in lab], [header[j] for j in feat]


# ------------------------------------------------------------------------------ splits
def multilabel_splits(arrays: dict, names: list[str], paths: dict, val_fraction: float, split_seed: int,
                      test_size, standardize: Standardize) -> MultiLabelSplits:
    """MultiLabelSplits from {"train": (x, y)[, "test": (x, y)][, "val": (x, y)]} numpy arrays, as
    load_mulan assembles them: test held out of train when there is no test file, validation carved
    from train when there is no validation file."""
    check_standardize(standardize)
    tensors = {k: (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))
               for k, (x, y) in arrays.items()}
    if "test" not in tensors:
        if test_size is None:
            raise DspError("data.test is null, so data.test_size (a count or a fraction) must be set")
        n = tensors["train"][0].shape[0]
        fraction = test_size / n if test_size >= 1 else test_size
        if not 0 < fraction < 1:
            raise DspError(f"data.test_size={test_size} leaves no training examples of the {n} in {paths['train']}")
        rest, held_out = holdout(*tensors["train"], fraction, split_seed + 1)
        tensors["train"], tensors["test"] = rest.tensors, held_out.tensors
    (xtr, ytr), (xte, yte) = tensors["train"], tensors["test"]
    if xtr.shape[1] != xte.shape[1]:
        raise DspError(f"{paths['train']} has {xtr.shape[1]} features but {paths.get('test')} has {xte.shape[1]}; "
                       f"they must come from the same dataset")
    if ytr.shape[1] != yte.shape[1]:
        raise DspError(f"{paths['train']} has {ytr.shape[1]} labels but {paths.get('test')} has {yte.shape[1]}; "
                       f"they must come from the same dataset")
    if "val" in tensors:  # a validation file of its own: nothing carved
        xva, yva = tensors["val"]
        if xva.shape[1] != xtr.shape[1] or yva.shape[1] != ytr.shape[1]:
            raise DspError(f"{paths['val']} has {xva.shape[1]} features and {yva.shape[1]} labels but "
                           f"{paths['train']} has {xtr.shape[1]} and {ytr.shape[1]}; they must come from the same dataset")
        train_ds, val_ds = TensorDataset(xtr, ytr), TensorDataset(xva, yva)
    else:
        if xtr.shape[0] < 2:
            raise DspError(f"{paths['train']} has {xtr.shape[0]} training example(s): too few to carve a validation "
                           f"split (data.val_fraction) out of")
        train_ds, val_ds = holdout(xtr, ytr, val_fraction, split_seed)
        if len(train_ds) == 0:
            raise DspError(f"data.val_fraction={val_fraction} leaves no training examples of the {xtr.shape[0]} in "
                           f"{paths['train']}")
    test_ds = TensorDataset(xte, yte)
    transform = fit_input_transform(train_ds.tensors[0], standardize)
    train_ds, val_ds, test_ds = transformed(transform, train_ds, val_ds, test_ds)
    return MultiLabelSplits(train_ds, val_ds, test_ds, list(names), input_transform=transform)


def load_npz(
    train: str,
    test: str | None,
    val_fraction: OpenFraction = 0.2,
    split_seed: Count = 0,
    test_size: Positive | None = None,
    standardize: Standardize = "auto",
) -> MultiLabelSplits:
    """Multi-label data from .npz archives (module docstring: x [N, D], y [N, L] 0/1, optional
    label_names). `test=None` holds out `test_size` (a count or a fraction) of the training file."""
    arrays, paths, names = {}, {"train": train, "test": test}, None
    for split, path in (("train", train), ("test", test)):
        if path is None:
            continue
        x, y, lnames = read_npz_multilabel(path)
        arrays[split] = (x, y)
        names = names or lnames
    return multilabel_splits(arrays, names, paths, val_fraction, split_seed, test_size, standardize)


def load_csv(
    train: str,
    test: str | None,
    labels: list[str] | None = None,
    num_labels: Size | None = None,
    label_position: Literal["end", "start"] = "end",
    delimiter: str = ",",
    val_fraction: OpenFraction = 0.2,
    split_seed: Count = 0,
    test_size: Positive | None = None,
    standardize: Standardize = "auto",
) -> MultiLabelSplits:
    """Multi-label data from CSV tables with a header row (module docstring): label columns named by
    `labels` or the last / first `num_labels` (`label_position`); the rest are features."""
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise DspError(f"data.delimiter={delimiter!r}: give one character, e.g. ',' or ';' or '\\t'")
    x, y, names, features = read_csv_multilabel(train, labels, num_labels, label_position, delimiter)
    arrays = {"train": (x, y)}
    if test is not None:
        xt, yt, _, _ = read_csv_multilabel(test, names, None, label_position, delimiter, features=features)
        arrays["test"] = (xt, yt)
    return multilabel_splits(arrays, names, {"train": train, "test": test}, val_fraction, split_seed, test_size,
                             standardize)
