"""Mulan multi-label datasets: ARFF files (sparse or dense) plus the XML file naming the labels.

Parsing is done by liac-arff; the parsed arrays are cached in HDF5 (see `dsp.data.cache`) so a
dataset is parsed once per machine, not once per run.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import Literal
from pathlib import Path

import arff
import numpy as np
import torch
from torch.utils.data import TensorDataset

from dsp.data.cache import cached_arrays
from dsp.data.splits import MultiLabelSplits, holdout
from dsp.errors import DspError
from dsp.schema import Count, OpenFraction, Positive, Size

DOWNLOAD_HINT = (
    "Point paths.data_dir (or the DSP_DATA_DIR environment variable) at the folder that holds "
    "mulan/<name>/, or fetch the data with `python scripts/download.py <name> --data-dir DIR`."
)


def read_label_names(xml_path: str | os.PathLike) -> list[str]:
    """Label attribute names from a Mulan XML header (`<labels><label name=.../>...`)."""
    path = Path(xml_path)
    if not path.is_file():
        raise DspError(f"Mulan label file not found: {path}. {DOWNLOAD_HINT}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DspError(f"malformed Mulan XML {path} (line {err.position[0]}): {err}") from None
    names = [el.attrib["name"] for el in root.iter() if el.tag.split("}")[-1] == "label"]
    if not names:
        raise DspError(f"Mulan XML {path} names no <label> elements")
    return names


def _first_data_row(text: str) -> str:
    after = text.split("@data", 1)[-1] if "@data" in text else text.split("@DATA", 1)[-1]
    for line in after.splitlines():
        line = line.strip()
        if line and not line.startswith("%"):
            return line
    return ""


def _to_number(value, attr_values, path, column):
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        if isinstance(attr_values, list) and value in attr_values:
            return float(attr_values.index(value))
        raise DspError(f"{path}: non-numeric value {value!r} in attribute column {column}") from None


def parse_arff(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Parse a sparse or dense ARFF file into a dense float32 matrix `[N, A]` and attribute names."""
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
    names = [a[0] for a in attrs]
    if sparse:
        values, rows, cols = obj["data"]
        n_rows = (max(rows) + 1) if len(rows) else 0
        # liac-arff drops trailing empty rows in COO mode; count data rows to keep them.
        n_rows = max(n_rows, _count_data_rows(text))
        mat = np.zeros((n_rows, len(attrs)), dtype=np.float32)
        try:  # fast path: every value is numeric or a numeric string such as '1'
            mat[np.asarray(rows), np.asarray(cols)] = np.asarray(values, dtype=np.float32)
        except ValueError:
            for v, r, c in zip(values, rows, cols):
                mat[r, c] = _to_number(v, attrs[c][1], path, c)
    else:
        mat = np.array(
            [[_to_number(v, attrs[c][1], path, c) for c, v in enumerate(row)] for row in obj["data"]],
            dtype=np.float32,
        ).reshape(-1, len(attrs))
    return mat, names


def _count_data_rows(text: str) -> int:
    lower = text.lower()
    body = text[lower.index("@data") + 5 :] if "@data" in lower else ""
    return sum(1 for line in body.splitlines() if line.strip() and not line.strip().startswith("%"))


def _split_features_labels(mat, names, path, label_names, num_labels, label_position):
    if label_names:
        missing = [n for n in label_names if n not in names]
        if missing:
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
    standardize: bool = False,
) -> MultiLabelSplits:
    """Load a Mulan dataset: official train/test files, validation carved from train.

    A dataset that Mulan ships as one file (bookmarks) gives `test=None` and `test_size`: a count
    or a fraction of the examples held out as the test split with a fixed seed.
    `standardize=True` shifts and scales every feature by its mean and standard deviation over the
    training split (validation and test use the training statistics), as the DVN authors' released
    code does.
    """
    if not isinstance(standardize, bool):
        raise DspError(f"data.standardize={standardize!r}: choose true or false")
    label_names = read_label_names(labels_xml) if labels_xml else None
    arrays = {}
    files = (("train", train),) if test is None else (("train", train), ("test", test))
    for split, path in files:
        mat, names = cached_arrays(path, parse_arff, cache_dir)
        x, y, lnames = _split_features_labels(mat, names, path, label_names, num_labels, label_position)
        if not np.isin(y, (0.0, 1.0)).all():
            raise DspError(f"{path}: label columns hold values other than 0/1; check the label attributes")
        arrays[split] = (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)))
    if test is None:
        if test_size is None:
            raise DspError("data.test is null, so data.test_size (a count or a fraction) must be set")
        n = arrays["train"][0].shape[0]
        fraction = test_size / n if test_size >= 1 else test_size
        rest, held_out = holdout(*arrays["train"], fraction, split_seed + 1)
        arrays["train"], arrays["test"] = rest.tensors, held_out.tensors
    if arrays["train"][0].shape[1] != arrays["test"][0].shape[1]:
        raise DspError(
            f"{train} has {arrays['train'][0].shape[1]} features but {test} has "
            f"{arrays['test'][0].shape[1]}; they must come from the same dataset"
        )
    train_ds, val_ds = holdout(*arrays["train"], val_fraction, split_seed)
    test_ds = TensorDataset(*arrays["test"])
    if standardize:
        train_ds, val_ds, test_ds = standardized(train_ds, val_ds, test_ds)
    return MultiLabelSplits(train_ds, val_ds, test_ds, lnames)


def standardized(train, *others):
    """(x - mean) / std per feature with the statistics of `train` (population std); labels unchanged.
    A feature constant on train is only centred: the released code's std + 1e-6 would multiply a
    value it takes elsewhere (a word never seen in training) by a million."""
    x = train.tensors[0]  # [N, D]
    mean = x.mean(0, keepdim=True)  # [1, D]
    std = x.std(0, unbiased=False, keepdim=True)  # [1, D]
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(TensorDataset((d.tensors[0] - mean) / std, *d.tensors[1:]) for d in (train, *others))
