"""Mulan multi-label datasets: ARFF files (sparse or dense) plus the XML file naming the labels.

Parsing is done by liac-arff; the parsed arrays are cached in HDF5 (see `dsp.data.cache`) so a
dataset is parsed once per machine, not once per run.

How the files' quirks are read:
  names       quoted attribute names lose their ARFF escapes ('Swainson\\'s Thrush' is the birds
              label Swainson's Thrush), and so do the XML's label names, so the two always match.
  nominal     an attribute with one or two values stays one column: the value itself when the values
              are numbers ({0,1}), else the value's position (0 or 1). One with more values (flags'
              language {1..10}, birds' location) is one-hot encoded, a column `NAME=VALUE` per value:
              its codes are categories, not quantities. In a sparse row an omitted nominal value is
              the attribute's first value (ARFF's rule: omitted values are index 0).
  missing     `?` (dense or sparse) is a missing value. A missing feature is imputed with the mean of
              that feature over the training split (validation and test use the training means; a
              feature missing on every training row is 0), as Weka's ReplaceMissingValues and
              scikit-learn's SimpleImputer do by default; a one-hot encoded nominal feature thus gets
              each value's training frequency. `missing="refuse"` refuses any `?` instead. A missing
              label is always refused: no value is a neutral guess for a 0/1 target.
  NaN, inf    a literal NaN or infinite value (or a number too large for float32) is refused with
              its file and line: it is a defect of the file, not a missing value (write `?` for that).
  checks      a label named twice in the XML, an ARFF file with no data rows, a sparse row naming an
              attribute twice, and a training file too small to hold out a validation split are each
              refused in one line naming the file (and line) and what to do.
"""
from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import arff
import numpy as np
import torch
from torch.utils.data import TensorDataset

from dsp.data.cache import cached_arrays, default_cache_dir
from dsp.data.preprocessing import Standardize, check_standardize, fit_input_transform, transformed
from dsp.data.splits import MultiLabelSplits, holdout
from dsp.errors import DspError
from dsp.schema import Count, OpenFraction, Positive, Size

DOWNLOAD_HINT = (
    "Point paths.data_dir (or the DSP_DATA_DIR environment variable) at the folder that holds "
    "mulan/<name>/, or fetch the data with `python scripts/download.py <name> --data-dir DIR`."
)
# Bump when parse_arff returns something else for the same file: cached entries of older parses are
# then never served (see _parsed).
PARSE_VERSION = 2
_STAMP = f"#dsp-arff-parse-v{PARSE_VERSION}"
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def unescape(name: str) -> str:
    """An ARFF (or Mulan XML) name with its backslash escapes resolved: \\' -> ', \\\\ -> \\, \\t -> tab."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), name) if "\\" in name else name


def read_label_names(xml_path: str | os.PathLike) -> list[str]:
    """Label attribute names from a Mulan XML header (`<labels><label name=.../>...`), unescaped."""
    path = Path(xml_path)
    if not path.is_file():
        raise DspError(f"Mulan label file not found: {path}. {DOWNLOAD_HINT}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DspError(f"malformed Mulan XML {path} (line {err.position[0]}): {err}") from None
    labels = [el for el in root.iter() if el.tag.split("}")[-1] == "label"]
    if any("name" not in el.attrib for el in labels):
        raise DspError(f"Mulan XML {path} has a <label> element without a name attribute; give every "
                       f"<label name=\"...\"> the name of its ARFF attribute")
    names = [unescape(el.attrib["name"]) for el in labels]
    if not names:
        raise DspError(f"Mulan XML {path} names no <label> elements")
    seen = set()
    for name in names:
        if name in seen:
            raise DspError(f"Mulan XML {path} names the label {name!r} twice; remove the repeated <label> "
                           f"element (each label is one output)")
        seen.add(name)
    return names


def _first_data_row(text: str) -> str:
    after = text.split("@data", 1)[-1] if "@data" in text else text.split("@DATA", 1)[-1]
    for line in after.splitlines():
        line = line.strip()
        if line and not line.startswith("%"):
            return line
    return ""


def _data_lines(text: str) -> list[int]:
    """The 1-based line number of every data row (the rows liac-arff reads: not blank, not a % comment)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().lower().startswith("@data")), len(lines))
    return [i + 1 for i in range(start + 1, len(lines))
            if lines[i].strip() and not lines[i].strip().startswith("%")]


def _line_of(path: Path, row: int) -> int | str:
    """The line of data row `row` of an ARFF file (for messages; the file is read again)."""
    lines = _data_lines(Path(path).read_text(encoding="utf-8", errors="replace"))
    return lines[row] if row < len(lines) else "?"


@dataclass
class _Nominal:
    values: list[str]  # as declared (liac-arff's strings)
    codes: dict[str, float]  # value -> the number stored before one-hot encoding
    identity: bool  # codes are the values as numbers ({0,1})
    expand: bool  # one-hot: more than two values


def _kind(attr, path: Path) -> _Nominal | None:
    """None for a numeric attribute, a _Nominal for a nominal one; other types are refused."""
    name, kind = attr
    if isinstance(kind, (list, tuple)):
        values = [str(v) for v in kind]
        try:
            numbers = [float(v) for v in values]
        except ValueError:
            numbers = None
        if len(values) <= 2 and numbers is not None:
            return _Nominal(values, dict(zip(values, numbers)), True, False)
        return _Nominal(values, {v: float(i) for i, v in enumerate(values)}, False, len(values) > 2)
    if str(kind).upper() in ("NUMERIC", "REAL", "INTEGER"):
        return None
    raise DspError(f"{path}: attribute {unescape(name)!r} is of type {kind}; only numeric and nominal attributes "
                   f"can be features or labels: remove it (Weka's RemoveType filter) or make it nominal")


def _numbers(values, kinds, cols) -> np.ndarray:
    """float64 values of (value, column) pairs; `?` (None) -> NaN; literal NaN/inf refused."""
    out = np.empty(len(values), dtype=np.float64)
    for i, (v, c) in enumerate(zip(values, cols)):
        k = kinds[c]
        if v is None:
            out[i] = math.nan
        elif k is None:
            out[i] = float(v)
        else:
            out[i] = k.codes[str(v)]
    return out


def _refuse_non_finite(vals: np.ndarray, missing: np.ndarray, where, text: str, path: Path, names):
    """Refuse the first value of `vals` that is NaN, infinite or too large for float32 without being
    a `?`; `where(i)` gives (row, column) of entry i."""
    bad = ~missing & ~(np.abs(vals) <= _FLOAT32_MAX)  # NaN compares False: bad too
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        row, col = where(i)
        lines = _data_lines(text)
        v = vals[i]
        what = "too large for float32" if math.isfinite(v) else "not a number (NaN and infinite values cannot train a model)"
        raise DspError(f"{path}, line {lines[row] if row < len(lines) else '?'}: attribute {names[col]!r} is {v!r}, "
                       f"{what}; fix the value, or write ? where it is missing (missing features are imputed)")


_SPARSE_ENTRY = re.compile(r"""\s*(\d+)\s+('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^,}]*)\s*(?:,|}|$)""")


def _refuse_repeated_index(text: str, rows: np.ndarray, n_rows: int, path: Path, names) -> None:
    """Refuse a sparse row that names an attribute twice (liac-arff keeps one of the two silently).
    Rows whose entry count in the text exceeds what was parsed are read again, entry by entry."""
    lines = text.splitlines()
    numbers = _data_lines(text)
    parsed = np.bincount(rows, minlength=n_rows) if len(rows) else np.zeros(n_rows, np.int64)
    for row, lineno in enumerate(numbers):
        body = lines[lineno - 1].strip()
        if not body.startswith("{"):
            continue
        written = 0 if body[1:].strip().startswith("}") else body.count(",") + 1
        if written <= parsed[row]:
            continue
        seen = set()
        for m in _SPARSE_ENTRY.finditer(body.strip("{} \t")):
            index = int(m.group(1))
            if index in seen:
                name = f" ({names[index]!r})" if index < len(names) else ""
                raise DspError(f"{path}, line {lineno}: this sparse row gives index {index}{name} twice; each index "
                               f"may appear once per row: remove the repeat")
            seen.add(index)


def parse_arff(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Parse a sparse or dense ARFF file into a dense float32 matrix `[N, A']` and column names.

    Nominal attributes with more than two values become one column per value (`NAME=VALUE`); `?`
    becomes NaN (see the module docstring for every rule). A' counts the columns after that.
    """
    path = Path(path)
    if not path.is_file():
        raise DspError(f"data file not found: {path}. {DOWNLOAD_HINT}")
    text = path.read_text(encoding="utf-8", errors="replace")
    sparse = _first_data_row(text).startswith("{")
    try:
        obj = arff.loads(text, return_type=arff.COO if sparse else arff.DENSE)
    except arff.ArffException as err:
        raise DspError(f"malformed ARFF file {path}: {err}") from None
    attrs = obj["attributes"]
    names = [unescape(a[0]) for a in attrs]
    kinds = [_kind(a, path) for a in attrs]
    width = len(attrs)
    if sparse:
        values, rows, cols = obj["data"]
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        # liac-arff drops trailing empty rows in COO mode; count data rows to keep them.
        n_rows = max(int(rows.max()) + 1 if len(rows) else 0, len(_data_lines(text)))
        _refuse_repeated_index(text, rows, n_rows, path, names)
        defaults = np.array([0.0 if k is None else k.codes[k.values[0]] if k.values else 0.0 for k in kinds])
        mat = np.broadcast_to(defaults.astype(np.float32), (n_rows, width)).copy()
        vals = None
        if all(k is None or k.identity for k in kinds):
            try:  # fast path: every value is numeric or a numeric string such as '1', none missing
                vals = np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError):
                vals = None
        if vals is None:
            vals = _numbers(values, kinds, cols)
        missing = np.array([v is None for v in values], dtype=bool) if np.isnan(vals).any() else np.zeros(len(vals), bool)
        _refuse_non_finite(vals, missing, lambda i: (int(rows[i]), int(cols[i])), text, path, names)
        mat[rows, cols] = vals.astype(np.float32)
    else:
        data = obj["data"]
        mat = np.empty((len(data), width), dtype=np.float32)
        for c, column in enumerate(zip(*data)) if data else ():
            vals = _numbers(column, kinds, [c] * len(column))
            missing = np.array([v is None for v in column], dtype=bool)
            _refuse_non_finite(vals, missing, lambda i, c=c: (i, c), text, path, names)
            mat[:, c] = vals
    if not any(k is not None and k.expand for k in kinds):
        return mat, names
    columns, out_names = [], []
    for c, (name, k) in enumerate(zip(names, kinds)):
        if k is not None and k.expand:
            col = mat[:, c]
            for j, value in enumerate(k.values):
                onehot = (col == j).astype(np.float32)
                onehot[np.isnan(col)] = np.nan
                columns.append(onehot)
                out_names.append(f"{name}={unescape(value)}")
        else:
            columns.append(mat[:, c])
            out_names.append(name)
    return np.stack(columns, 1) if columns else mat[:, :0], out_names


def _parsed(path: str, cache_dir: str | None) -> tuple[np.ndarray, list[str]]:
    """parse_arff(path) through the HDF5 cache, never serving an entry that an older parse_arff wrote.

    The cache keys entries by the file alone, so each entry carries a stamp: one more column named
    _STAMP (dropped here). An entry without the current stamp (an older parse of the same file) is
    stepped around: the file is parsed into (and later read from) a folder named after the stamp.
    """
    if cache_dir == "":
        return parse_arff(path)

    def stamped(p):
        mat, names = parse_arff(p)
        return np.concatenate([mat, np.zeros((mat.shape[0], 1), np.float32)], 1), [*names, _STAMP]

    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    mat, names = cached_arrays(path, stamped, folder)
    if not names or names[-1] != _STAMP:
        mat, names = cached_arrays(path, stamped, folder / _STAMP.lstrip("#"))
    return mat[:, :-1], names[:-1]


def _split_features_labels(mat, names, path, label_names, num_labels, label_position):
    if label_names:
        missing = [n for n in label_names if n not in names]
        if missing:
            nominal = [n for n in missing if any(m.startswith(f"{n}=") for m in names)]
            if nominal:
                raise DspError(f"{path}: the label {nominal[0]!r} is a nominal attribute with more than two values; "
                               f"labels must be {{0,1}} attributes: check data.labels_xml")
            raise DspError(
                f"{path}: {len(missing)} label(s) named in the Mulan XML are not attributes of the "
                f"ARFF file (first: {missing[0]!r}); check data.labels_xml"
            )
        if num_labels is not None and num_labels != len(label_names):
            raise DspError(
                f"data.num_labels={num_labels} but the Mulan XML names {len(label_names)} labels; "
                f"fix data.num_labels or leave it null to take the XML's count"
            )
        label_idx = [names.index(n) for n in label_names]
    else:
        if num_labels is None:
            raise DspError(f"{path}: no labels XML given, so data.num_labels must be set")
        if not 0 < num_labels < len(names):
            raise DspError(
                f"data.num_labels={num_labels} does not fit {path}, which has {len(names)} attributes"
            )
        label_idx = (
            list(range(len(names) - num_labels, len(names)))
            if label_position == "end"
            else list(range(num_labels))
        )
    feat_idx = [i for i in range(len(names)) if i not in set(label_idx)]
    return mat[:, feat_idx], mat[:, label_idx], [names[i] for i in label_idx]


def _check_rows(x: np.ndarray, y: np.ndarray, lnames: list[str], path: str, missing: str) -> None:
    if x.shape[0] == 0:
        raise DspError(f"{path} declares its attributes but holds no data rows (nothing after @data); "
                       f"the file is cut short: download or export it again")
    lost = np.isnan(y)
    if lost.any():
        row, col = (int(v) for v in np.argwhere(lost)[0])
        raise DspError(f"{path}, line {_line_of(path, row)}: the label {lnames[col]!r} is missing (?); every "
                       f"label must be 0 or 1: fill it in or remove the row")
    if not np.isin(y, (0.0, 1.0)).all():
        raise DspError(f"{path}: label columns hold values other than 0/1; check the label attributes")
    if missing == "refuse" and np.isnan(x).any():
        row = int(np.argwhere(np.isnan(x))[0][0])
        raise DspError(f"{path}, line {_line_of(path, row)}: a feature is missing (?) and data.missing=refuse; "
                       f"fill it in, or set data.missing=mean to impute training means")


def load_mulan(
    train: str,
    test: str | None,
    labels_xml: str | None = None,
    num_labels: Size | None = None,
    label_position: Literal["end", "start"] = "end",
    val_fraction: OpenFraction = 0.2,
    split_seed: Count = 0,
    cache_dir: str | None = None,
    test_size: Positive | None = None,  # a count (>= 1) or a fraction of the examples
    standardize: Standardize = "auto",
    missing: Literal["mean", "refuse"] = "mean",
) -> MultiLabelSplits:
    """Load a Mulan dataset: official train/test files, validation carved from train.

    A dataset that Mulan ships as one file (bookmarks) gives `test=None` and `test_size`: a count
    or a fraction of the examples held out as the test split with a fixed seed.
    `standardize` (auto: the non-binary features; true: all; false: none) shifts and scales features
    by their mean and standard deviation over the training split (validation and test use the
    training statistics; dsp.data.preprocessing). `missing`: "mean" imputes a missing (`?`) feature with its training mean, "refuse"
    refuses the file; a missing label is always refused (module docstring).
    """
    check_standardize(standardize)
    if missing not in ("mean", "refuse"):
        raise DspError(f"data.missing={missing!r}: choose mean (impute training means) or refuse")
    label_names = read_label_names(labels_xml) if labels_xml else None
    arrays = {}
    files = (("train", train),) if test is None else (("train", train), ("test", test))
    for split, path in files:
        mat, names = _parsed(path, cache_dir)
        x, y, lnames = _split_features_labels(mat, names, path, label_names, num_labels, label_position)
        _check_rows(x, y, lnames, path, missing)
        arrays[split] = (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))
    if test is None:
        if test_size is None:
            raise DspError("data.test is null, so data.test_size (a count or a fraction) must be set")
        n = arrays["train"][0].shape[0]
        fraction = test_size / n if test_size >= 1 else test_size
        if not 0 < fraction < 1:
            raise DspError(f"data.test_size={test_size} leaves nothing to train on: {train} has {n} examples")
        rest, held_out = holdout(*arrays["train"], fraction, split_seed + 1, source=train, key="data.test_size")
        arrays["train"], arrays["test"] = rest.tensors, held_out.tensors
    if arrays["train"][0].shape[1] != arrays["test"][0].shape[1]:
        raise DspError(
            f"{train} has {arrays['train'][0].shape[1]} features but {test} has "
            f"{arrays['test'][0].shape[1]}; they must come from the same dataset"
        )
    train_ds, val_ds = holdout(*arrays["train"], val_fraction, split_seed, source=train)
    test_ds = TensorDataset(*arrays["test"])
    transform = fit_input_transform(train_ds.tensors[0], standardize)  # `?` filled, features scaled
    train_ds, val_ds, test_ds = transformed(transform, train_ds, val_ds, test_ds)
    return MultiLabelSplits(train_ds, val_ds, test_ds, lnames, input_transform=transform)
