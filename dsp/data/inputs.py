"""Unlabelled inputs for a trained run's predictions (dsp-predict, dsp.load_run(...).predict):
files read into the arrays the run's model was trained on, labels dropped where a file has them.

    multi-label runs   .arff (with or without the label attributes), .npz (array x [N, D]; y and
                       anything else ignored), .csv (a header row, then the D feature columns in
                       the training order; label columns are dropped when the header names the
                       run's labels, or when there are D + L columns: by the run's
                       data.label_position), .h5/.hdf5 (dataset /x, else /test/x)
    image sequences    .npz or .h5/.hdf5 with x [N, T, ...] zero-padded (uint8 images are divided
    (OCR-like runs)    by 255) and optional lengths [N] (default: every sequence T long)
    token sequences    a CoNLL-format text file: one `word POS` or `word POS tag` line per token
    (conll2000 runs)   (the tag is ignored), a blank line between sentences
    mask runs          a folder of images (or one image file): .jpg, .jpeg, .png, .bmp, read as
                       the run's data loader reads them (resized to data.size, RGB or greyscale)

Every problem is one DspError naming the file: a missing file, a missing array or column, a wrong
number of features, NaN or infinite values (the first such row), a file without rows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dsp.data.conll import TAG, UNK_ID
from dsp.data.images import EXTENSIONS, read_resized
from dsp.data.mulan import parse_arff
from dsp.data.tables import check_features, read_csv_table, read_npz
from dsp.errors import DspError

VECTOR_SUFFIXES = (".arff", ".npz", ".csv", ".h5", ".hdf5")
ARRAY_SUFFIXES = (".npz", ".h5", ".hdf5")


def _existing(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DspError(f"input file not found: {path}")
    return path


def _drop_labels(values: np.ndarray, names: list[str], path, num_features: int, num_labels: int,
                 label_names: list[str] | None, label_position: str, what: str) -> np.ndarray:
    """The feature columns of a table of `values` [N, A] with column `names`: all of them, or all but
    the run's label columns (by name when the file names them, else by position)."""
    a = values.shape[1]
    if label_names and all(n in names for n in label_names):
        keep = [j for j, n in enumerate(names) if n not in set(label_names)]
        values, a = values[:, keep], len(keep)
    elif a == num_features + num_labels:
        values = values[:, num_labels:] if label_position == "start" else values[:, :num_features]
        a = num_features
    if a != num_features:
        raise DspError(f"{path}: {a} {what}, but the run's model reads {num_features} features per example "
                       f"({num_features + num_labels} with its {num_labels} labels); give inputs of the data it "
                       f"was trained on")
    return values


def read_vectors(path, num_features: int, num_labels: int, label_names: list[str] | None = None,
                 label_position: str = "end") -> np.ndarray:
    """Feature vectors x float32 [N, D] of a multi-label input file (module docstring)."""
    path = _existing(path)
    suffix = path.suffix.lower()
    row_name = lambda i: f"row {i}"  # noqa: E731
    if suffix == ".arff":
        mat, names = parse_arff(path)
        x = _drop_labels(mat, names, path, num_features, num_labels, label_names, label_position, "attributes")
    elif suffix == ".npz":
        x = read_npz(path, need=("x",))["x"]
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.number) and x.dtype != bool:
            raise DspError(f"{path}: x must be a numeric array [examples, features], found {x.dtype} of shape {x.shape}")
        if x.shape[1] != num_features:
            raise DspError(f"{path}: x has {x.shape[1]} features per example, but the run's model reads "
                           f"{num_features}; give inputs of the data it was trained on")
    elif suffix == ".csv":
        values, header, lines = read_csv_table(path)
        x = _drop_labels(values, header, path, num_features, num_labels, label_names, label_position, "columns")
        row_name = lambda i: f"line {lines[i]}"  # noqa: E731
    elif suffix in (".h5", ".hdf5"):
        x = _read_h5_x(path)
        if x.ndim != 2 or x.shape[1] != num_features:
            raise DspError(f"{path}: x has shape {x.shape}, but the run's model reads [examples, {num_features}]")
    else:
        raise DspError(f"input={path}: a multi-label run predicts from feature files: {', '.join(VECTOR_SUFFIXES)}")
    if x.shape[0] == 0:
        raise DspError(f"{path} holds no examples (zero rows)")
    x = np.asarray(x, dtype=np.float32)
    check_features(x, str(path), row_name)
    return x


def _read_h5_x(path: Path, need_lengths: bool = False):
    import h5py

    try:
        with h5py.File(path, "r") as f:
            ds = f.get("x") if isinstance(f.get("x"), h5py.Dataset) else f.get("test/x")
            if not isinstance(ds, h5py.Dataset):
                raise DspError(f"{path}: no dataset /x (or /test/x) of inputs")
            x = ds[()]
            lengths = f["lengths"][()] if need_lengths and isinstance(f.get("lengths"), h5py.Dataset) else None
    except OSError as err:
        raise DspError(f"{path} is not a readable HDF5 file ({err})") from None
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DspError(f"{path}: x holds {x.dtype} values; it must be numeric")
    return (x, lengths) if need_lengths else x


def check_lengths(lengths, n: int, t: int, where: str) -> np.ndarray:
    """Sequence lengths [N] as int64, each in 1..T."""
    if lengths is None:
        return np.full(n, t, dtype=np.int64)
    lengths = np.asarray(lengths).reshape(-1)
    if lengths.shape[0] != n or not np.issubdtype(lengths.dtype, np.integer):
        raise DspError(f"{where}: lengths must be {n} whole numbers (one per sequence), found {lengths.dtype} of "
                       f"shape {lengths.shape}")
    bad = np.flatnonzero((lengths < 1) | (lengths > t))
    if bad.size:
        raise DspError(f"{where}: sequence {bad[0]} has length {lengths[bad[0]]}; lengths must be 1..{t} (x has "
                       f"{t} positions)")
    return lengths.astype(np.int64)


def read_sequence_arrays(path) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [N, T, ...] (uint8: / 255) and lengths [N] of an image-sequence input file."""
    path = _existing(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arrays = read_npz(path, need=("x",))
        x, lengths = arrays["x"], arrays.get("lengths")
    elif suffix in (".h5", ".hdf5"):
        x, lengths = _read_h5_x(path, need_lengths=True)
    else:
        raise DspError(f"input={path}: a run over image sequences predicts from {', '.join(ARRAY_SUFFIXES)} files "
                       f"holding x [sequences, positions, ...] and optionally lengths [sequences]")
    if x.ndim < 3 or x.shape[0] == 0:
        raise DspError(f"{path}: x must be [sequences, positions, ...] with at least one sequence, found shape {x.shape}")
    lengths = check_lengths(lengths, x.shape[0], x.shape[1], str(path))
    x = torch.from_numpy(np.ascontiguousarray(x))
    x = (x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()).numpy()
    check_features(x.reshape(x.shape[0], -1), str(path))
    return x, lengths


Sentence = list[tuple[str, ...]]


def read_token_sentences(path) -> list[Sentence]:
    """Sentences of a CoNLL-format file as (word, POS) pairs: `word POS` or `word POS tag` lines (the
    same number of fields on every line), a blank line between sentences."""
    path = _existing(path)
    if path.is_dir():
        raise DspError(f"input={path} is a folder; a run over text predicts from a CoNLL-format file")
    sentences, current, width = [], [], None
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                if current:
                    sentences.append(current)
                    current = []
                continue
            if width is None:
                width = len(fields)
            if len(fields) == 1:
                raise DspError(f"{path}, line {lineno}: only a word; this run's model reads a POS tag per word, "
                               f"so give `word POS` lines (a chunk tag after them is ignored)")
            if len(fields) != width or len(fields) > 3 or (len(fields) == 3 and not TAG.fullmatch(fields[2])):
                raise DspError(f"{path}, line {lineno}: expected `word POS` or `word POS tag` (the tag O or "
                               f"B-/I-TYPE), the same fields on every line; got {line.strip()!r}")
            current.append((fields[0], fields[1]))
    if current:
        sentences.append(current)
    if not sentences:
        raise DspError(f"{path} holds no sentences (no `word POS` lines)")
    return sentences


def encode_tokens(sentences: list[Sentence], vocab: dict[str, list[str]], num_chars: int,
                  lowercase: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """x int64 [N, T, 2 + C] (word id, POS id, character ids; 0 padding, unknown tokens UNK_ID) and
    lengths [N], encoded as dsp.data.conll.load_conll2000 encodes its splits."""
    norm = str.lower if lowercase else str
    word_id, pos_id, char_id = ({t: i for i, t in enumerate(vocab[k])} for k in ("words", "pos", "chars"))
    lengths = np.array([len(s) for s in sentences], dtype=np.int64)
    x = np.zeros((len(sentences), int(lengths.max()), 2 + num_chars), dtype=np.int64)
    for i, sentence in enumerate(sentences):
        for j, (word, pos) in enumerate(sentence):
            chars = [char_id.get(c, UNK_ID) for c in word[:num_chars]]
            x[i, j, :2 + len(chars)] = [word_id.get(norm(word), UNK_ID), pos_id.get(pos, UNK_ID), *chars]
    return x, lengths


def read_images(path, size: int, grayscale: bool, jpeg_draft: bool = False) -> tuple[np.ndarray, list[str]]:
    """x float32 [N, C, size, size] in [0, 1] and the images' stems, from a folder of images (or one
    image), read as dsp.data.images.load_horses reads its images (bilinear resize, RGB or greyscale)."""
    path = _existing(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in EXTENSIONS)
        if not files:
            raise DspError(f"{path} holds no images ({', '.join(EXTENSIONS)})")
    elif path.suffix.lower() in EXTENSIONS:
        files = [path]
    else:
        raise DspError(f"input={path}: a segmentation run predicts from a folder of images or one image "
                       f"({', '.join(EXTENSIONS)})")
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        twice = next(s for s in stems if stems.count(s) > 1)
        raise DspError(f"{path} holds two images named {twice!r}; keep one (masks are written by name)")
    images = np.stack([read_resized(p, "L" if grayscale else "RGB", int(size), jpeg_draft) for p in files])
    x = images.astype(np.float32) / 255.0
    x = x[:, None] if grayscale else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), stems
