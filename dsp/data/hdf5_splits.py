"""Data of any of the array tasks from one HDF5 file: multi-label vectors (data=hdf5), sequences of
images or feature vectors (data=hdf5_sequences) and binary image masks (data=hdf5_masks).

Layout (the one dsp.data.hdf5_stream writes and streams from):

    /train/x, /train/y      the training examples (required)
    /test/x,  /test/y       the test examples (required)
    /val/x,   /val/y        optional: the validation examples; without them validation is carved
                            from /train with data.val_fraction and data.split_seed, as every loader does
    file attribute label_names   optional: the labels' (hdf5) or tags' (hdf5_sequences) names, a list of strings

    data=hdf5            x [N, D] numbers; y [N, L], every value 0 or 1
    data=hdf5_sequences  x [N, T, ...] one image or feature vector per position (uint8: an image,
                         read as float in [0, 1] by dividing by 255; anything else: read as float32);
                         y [N, T] integer tag ids 0..K-1, -1 after each sequence's end (its length);
                         K: len(label_names), else the largest tag id + 1
    data=hdf5_masks      x [N, C, H, W] or [N, H, W] images (uint8: divided by 255; float: values in
                         [0, 1]); y [N, H, W], every value 0 or 1

A problem with the file is one DspError naming the file and the dataset: a missing file, group or
dataset, x and y of different lengths or shapes, labels other than 0/1 (or tag ids out of range),
NaN or infinite inputs (the first such row), a split without rows.

Memory: every split is read into memory, as the other loaders do. With trainer.stream=true the
trainer reads training batches from an HDF5 file in a second thread (hdf5_stream.PrefetchBatches);
this file itself is that source (no copy is written) when its /train rows are exactly the training
split and store what training reads: /val present (nothing carved from /train), standardize off,
x float32 (or uint8 images), y float32 (hdf5, hdf5_masks) or int64 (hdf5_sequences), and, for
sequences, /train as long as the longest split. Otherwise the trainer writes run_dir/data.h5 first.
Either way the splits are also held in memory (the trainer evaluates from them), so a file larger
than memory cannot be trained on yet.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch
from torch.utils.data import TensorDataset

from dsp.data.images import ImageMaskSplits, _crop_settings
from dsp.data.sequences import SequenceSplits, pad_sequences
from dsp.data.splits import MultiLabelSplits, holdout
from dsp.data.tables import check_features, check_labels01, multilabel_splits
from dsp.data.preprocessing import Standardize
from dsp.errors import DspError
from dsp.schema import Count, OpenFraction, Size

SPLITS = ("train", "val", "test")


def read_h5_splits(path: str | os.PathLike) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict, dict]:
    """{split: (x, y)} of the splits an HDF5 file holds (train and test required, val optional), its
    file attributes and {split: (x dtype, y dtype)} as stored."""
    path = Path(path)
    if not path.is_file():
        raise DspError(f"data file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DspError(f"{path} is not a readable HDF5 file ({err})") from None
    out, dtypes = {}, {}
    with f:
        for split in SPLITS:
            if split not in f:
                if split == "val":
                    continue
                raise DspError(f"{path}: no group /{split} (the file holds {', '.join('/' + k for k in f) or 'nothing'}); "
                               f"the layout is /train/x, /train/y, /test/x, /test/y and optionally /val/x, /val/y")
            group = f[split]
            if not isinstance(group, h5py.Group):
                raise DspError(f"{path}: /{split} is a dataset; it must be a group holding x and y")
            arrays = []
            for key in ("x", "y"):
                ds = group.get(key)
                if not isinstance(ds, h5py.Dataset):
                    raise DspError(f"{path}: no dataset /{split}/{key} (the group holds "
                                   f"{', '.join(group) or 'nothing'})")
                if ds.ndim < 1 or not (np.issubdtype(ds.dtype, np.number) or ds.dtype == bool):
                    raise DspError(f"{path}: /{split}/{key} must be a numeric array [examples, ...], found "
                                   f"{ds.dtype} of shape {ds.shape}")
                arrays.append(ds[()])
            x, y = arrays
            if x.shape[0] != y.shape[0]:
                raise DspError(f"{path}: /{split}/x has {x.shape[0]} rows but /{split}/y has {y.shape[0]}; they "
                               f"must hold one row per example each")
            if x.shape[0] == 0:
                raise DspError(f"{path}: /{split}/x and /{split}/y hold no rows (zero examples)")
            out[split], dtypes[split] = (x, y), (x.dtype, y.dtype)
        attrs = dict(f.attrs)
    return out, attrs, dtypes


def _names(attrs: dict, path, key: str = "label_names") -> list[str] | None:
    raw = attrs.get(key)
    if raw is None:
        return None
    return [n.decode() if isinstance(n, bytes) else str(n) for n in np.asarray(raw).reshape(-1).tolist()]


def _as_float(x: np.ndarray) -> torch.Tensor:
    """uint8 images as float32 / 255 (as hdf5_stream.to_tensors reads streamed batches); the rest as float32."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


def _streamable(path, dtypes: dict, x_dtypes: tuple, y_dtype, carved: bool, extra: bool = True) -> str:
    """The file as the trainer's streaming source, or '' when its /train is not what training reads."""
    x_dtype, stored_y = dtypes["train"]
    ok = not carved and extra and x_dtype in x_dtypes and stored_y == y_dtype
    return str(Path(path).resolve()) if ok else ""


def load_hdf5(
    path: str,
    val_fraction: OpenFraction = 0.2,
    split_seed: Count = 0,
    standardize: Standardize = False,
) -> MultiLabelSplits:
    """Multi-label data from one HDF5 file (module docstring): x [N, D], y [N, L] 0/1 per split."""
    splits, attrs, dtypes = read_h5_splits(path)
    for split, (x, y) in splits.items():
        where = f"{path}: /{split}"
        if x.ndim != 2:
            raise DspError(f"{where}/x must be a 2-d array [examples, features], found shape {x.shape}")
        if y.ndim != 2:
            raise DspError(f"{where}/y must be a 2-d array [examples, labels], found shape {y.shape}")
        check_labels01(y, f"{where}/y")
        check_features(x, f"{where}/x")
    arrays = {k: (x.astype(np.float32), y.astype(np.float32)) for k, (x, y) in splits.items()}
    num_labels = arrays["train"][1].shape[1]
    names = _names(attrs, path) or [f"label{j}" for j in range(num_labels)]
    if len(names) != num_labels:
        raise DspError(f"{path}: attribute label_names names {len(names)} labels but /train/y has {num_labels}")
    paths = {split: f"{path} (/{split})" for split in SPLITS}
    data = multilabel_splits(arrays, names, paths, val_fraction, split_seed, None, standardize)
    data.source = _streamable(path, dtypes, (np.dtype(np.float32),), np.dtype(np.float32), "val" not in splits,
                              data.input_transform is None)
    return data


def load_hdf5_sequences(
    path: str,
    val_fraction: OpenFraction = 0.2,
    split_seed: Count = 0,
) -> SequenceSplits:
    """Sequences of images or feature vectors from one HDF5 file (module docstring): x [N, T, ...],
    y [N, T] tag ids, -1 after each sequence's end."""
    splits, attrs, dtypes = read_h5_splits(path)
    names = _names(attrs, path)
    per_position = None
    tensors = {}
    for split, (x, y) in splits.items():
        where = f"{path}: /{split}"
        if y.ndim != 2 or not (np.issubdtype(y.dtype, np.integer)):
            raise DspError(f"{where}/y must be an integer array [examples, positions] of tag ids (-1 after a "
                           f"sequence's end), found {y.dtype} of shape {y.shape}")
        if x.ndim < 3 or x.shape[1] != y.shape[1]:
            raise DspError(f"{where}/x must be [examples, positions, ...] with as many positions as {where}/y "
                           f"({y.shape[1]}), found shape {x.shape}")
        if per_position is None:
            per_position = x.shape[2:]
        elif x.shape[2:] != per_position:
            raise DspError(f"{where}/x holds inputs of shape {x.shape[2:]} per position, /train/x {per_position}")
        if (y < -1).any():
            row = int(np.argwhere(y < -1)[0][0])
            raise DspError(f"{where}/y: row {row} holds a tag id below -1 (-1 marks the positions after the end)")
        valid = y >= 0
        gaps = valid[:, 1:] & ~valid[:, :-1]  # a tag after the end mark
        if gaps.any() or not valid[:, 0].all():
            row = int(np.flatnonzero(gaps.any(1) | ~valid[:, 0])[0])
            raise DspError(f"{where}/y: row {row} is not a sequence: its tags must come first (at least one), "
                           f"then -1 to the end")
        if np.issubdtype(x.dtype, np.floating):
            check_features(x.reshape(x.shape[0], -1), f"{where}/x")
        tensors[split] = (_as_float(x), torch.from_numpy(y.astype(np.int64)))
    top = max(int(y.max()) for _, y in tensors.values())
    if names is None:
        names = [str(k) for k in range(top + 1)]
    elif top >= len(names):
        split = next(s for s, (_, y) in tensors.items() if int(y.max()) == top)
        raise DspError(f"{path}: /{split}/y holds tag id {top}, but attribute label_names names only "
                       f"{len(names)} tags (ids 0..{len(names) - 1})")
    carved = "val" not in tensors
    if carved:
        if tensors["train"][0].shape[0] < 2:
            raise DspError(f"{path}: /train holds 1 sequence: too few to carve a validation split out of")
        train, val = holdout(*tensors["train"], val_fraction, split_seed)
        tensors["train"], tensors["val"] = train.tensors, val.tensors
    longest = max(t[1].shape[1] for t in tensors.values())
    padded = {}
    for split, (x, y) in tensors.items():
        padded[split] = TensorDataset(pad_sequences(list(x), 0.0, longest), pad_sequences(list(y), -1, longest)) \
            if x.shape[1] < longest else TensorDataset(x, y)
    data = SequenceSplits(**padded, label_names=names, num_features=int(np.prod(per_position)))
    data.source = _streamable(path, dtypes, (np.dtype(np.float32), np.dtype(np.uint8)), np.dtype(np.int64), carved,
                              splits["train"][1].shape[1] == longest)
    return data


def load_hdf5_masks(
    path: str,
    val_fraction: OpenFraction = 0.2,
    split_seed: Count = 0,
    crop: Size | None = None,
    flip: bool = False,
    test_crops: Size | None = None,
    combine: Literal["average", "joint"] = "average",
) -> ImageMaskSplits:
    """Images and binary masks from one HDF5 file (module docstring): x [N, C, H, W] or [N, H, W],
    y [N, H, W] 0/1. crop, flip, test_crops and combine: the crop protocol of data=horses32."""
    splits, _, dtypes = read_h5_splits(path)
    tensors, shape = {}, None
    for split, (x, y) in splits.items():
        where = f"{path}: /{split}"
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise DspError(f"{where}/x must be images [examples, channels, height, width] or [examples, height, "
                           f"width], found shape {splits[split][0].shape}")
        if y.ndim != 3 or y.shape[1:] != x.shape[2:]:
            raise DspError(f"{where}/y must be masks [examples, height, width] of the images' size {x.shape[2:]}, "
                           f"found shape {y.shape}")
        if shape is None:
            shape = x.shape[1:]
        elif x.shape[1:] != shape:
            raise DspError(f"{where}/x holds images of shape {x.shape[1:]}, /train/x {shape}; every split needs one size")
        check_labels01(y, f"{where}/y")
        if np.issubdtype(x.dtype, np.floating):
            check_features(x.reshape(x.shape[0], -1), f"{where}/x")
        tensors[split] = (_as_float(x), torch.from_numpy(y.astype(np.float32)))
    protocol = _crop_settings(min(shape[1:]), crop, flip, test_crops, combine)
    carved = "val" not in tensors
    if carved:
        if tensors["train"][0].shape[0] < 2:
            raise DspError(f"{path}: /train holds 1 image: too few to carve a validation split out of")
        train, val = holdout(*tensors["train"], val_fraction, split_seed)
        tensors["train"], tensors["val"] = train.tensors, val.tensors
    data = ImageMaskSplits(**{k: TensorDataset(*v) for k, v in tensors.items()}, **protocol)
    data.source = _streamable(path, dtypes, (np.dtype(np.float32), np.dtype(np.uint8)), np.dtype(np.float32), carved,
                              splits["train"][0].ndim == 4)  # ([N, H, W] images gain their channel axis in memory)
    return data
