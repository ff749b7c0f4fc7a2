"""Taskar et al. (2003) handwritten words, the OCR benchmark: `letter.data`, optionally gzipped.

One letter per line, tab-separated: id, letter, next_id, word_id, position, fold, then the 128
0/1 pixels of a 16x8 image (row-major, 16 rows of 8). A word is the letters sharing word_id in
position order; next_id links each letter to the following one and is -1 at the word's end.

Splits follow Shevchenko & Osokin (2019, §6.1): fold `val_fold` is validation, fold `test_fold`
is test and the remaining eight folds are training. Parsing takes well under a second, so unlike
the Mulan loader there is no HDF5 cache.

`augment` (off by default, as in the paper) warps every training letter afresh each batch: a
random zoom, rotation and shift (dsp.data.augment.augment_letters); validation and test letters
are never touched.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dsp.data.sequences import SequenceSplits, pad_sequences
from dsp.errors import DspError
from dsp.data.augment import AugmentSettings, augment_settings
from dsp.schema import Range

LETTERS = "abcdefghijklmnopqrstuvwxyz"
HEIGHT, WIDTH = 16, 8
NUM_PIXELS = HEIGHT * WIDTH
NUM_FOLDS = 10
Fold = Annotated[int, Range(0, NUM_FOLDS - 1)]  # data.test_fold, data.val_fold
FIELDS = "id, letter, next_id, word_id, position, fold"
DOWNLOAD_HINT = (
    "Fetch it with `python scripts/download.py ocr --data-dir DIR`, or point paths.data_dir (or the "
    "DSP_DATA_DIR environment variable) at the folder that holds ocr/letter.data.gz."
)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DspError(f"OCR data file not found: {path}. {DOWNLOAD_HINT}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by the file name
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DspError(f"{path} is not a valid gzip file ({err}); download it again. {DOWNLOAD_HINT}") from None
    return raw.decode("latin-1")  # never fails; stray bytes surface as malformed lines below


def parse_letters(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse letter.data into int64 fields `[n, 6]` (letter as 0..25), uint8 pixels `[n, 128]`
    and the 1-based line number of each letter (for error messages)."""
    path = Path(path)
    header, pixels, line_numbers = [], [], []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        # The original file ends every line with a tab; rstrip drops it (and any '\r').
        parts = line.rstrip().split("\t", 6)
        # 128 single-character pixels joined by tabs are exactly 255 characters.
        if len(parts) != 7 or len(parts[6]) != 2 * NUM_PIXELS - 1 or parts[6].count("\t") != NUM_PIXELS - 1:
            raise DspError(
                f"{path}, line {lineno}: expected 6 tab-separated fields ({FIELDS}) followed by "
                f"{NUM_PIXELS} pixel values 0/1, found {len(line.split())} fields"
            )
        letter = parts[1]
        if len(letter) != 1 or letter not in LETTERS:
            raise DspError(f"{path}, line {lineno}: letter field is {letter!r}, expected one lowercase letter a-z")
        try:
            ints = [int(parts[i]) for i in (0, 2, 3, 4, 5)]
        except ValueError:
            raise DspError(f"{path}, line {lineno}: id, next_id, word_id, position and fold must be integers") from None
        header.append((ints[0], LETTERS.index(letter), *ints[1:]))
        pixels.append(parts[6][::2])
        line_numbers.append(lineno)
    if not header:
        raise DspError(f"{path} holds no letters; download it again. {DOWNLOAD_HINT}")
    # One bytes buffer for all pixels: characters '0'/'1' minus 48; anything else lands outside 0..1.
    pix = np.frombuffer("".join(pixels).encode("latin-1"), dtype=np.uint8).reshape(-1, NUM_PIXELS) - 48
    bad = np.flatnonzero((pix > 1).any(1))
    if bad.size:
        raise DspError(f"{path}, line {line_numbers[bad[0]]}: pixel values must be 0 or 1")
    return np.array(header, dtype=np.int64), pix, np.array(line_numbers)


def load_ocr(path: str | os.PathLike, test_fold: Fold = 1, val_fold: Fold = 0,
             augment: AugmentSettings = None) -> SequenceSplits:
    """Load the OCR words: x float32 `[N, T, 16, 8]` (zero-padded), y int64 `[N, T]` letters 0..25
    (-1-padded). All splits share T, the longest word in the file. `augment`: training letter
    warps (module docstring)."""
    augment = augment_settings(augment)  # checked before the file is read
    for key in ("brightness", "contrast"):
        if augment[key]:
            raise DspError(f"data.augment.{key}: OCR letters are binary strokes on a zero ground; "
                           f"only scale, rotate and translate apply")
    for key, fold in (("test_fold", test_fold), ("val_fold", val_fold)):
        if not 0 <= fold < NUM_FOLDS:
            raise DspError(f"data.{key}={fold} is out of range: the OCR data has folds 0..{NUM_FOLDS - 1}")
    if test_fold == val_fold:
        raise DspError(f"data.test_fold and data.val_fold are both {test_fold}; pick two different folds")
    path = Path(path)
    fields, pixels, lines = parse_letters(path)
    ids, letters, next_ids, word_ids, positions, folds = fields.T

    order = np.lexsort((positions, word_ids))  # by word, then position within the word
    w = word_ids[order]
    starts = np.flatnonzero(np.r_[True, w[1:] != w[:-1]])
    ends = np.r_[starts[1:], len(order)]
    # Position order must agree with the next_id chain; otherwise letters are mixed up or missing.
    expected = np.r_[ids[order][1:], -1]
    expected[ends - 1] = -1
    broken = np.flatnonzero(next_ids[order] != expected)
    if broken.size:
        k = order[broken[0]]
        raise DspError(
            f"{path}, line {lines[k]}: letter {ids[k]} of word {word_ids[k]} has next_id {next_ids[k]}, "
            f"but the next letter by position is {expected[broken[0]]}; the file is inconsistent, download it again"
        )
    word_fold = folds[order][starts]
    mixed = np.flatnonzero(folds[order] != np.repeat(word_fold, ends - starts))
    if mixed.size:
        k = order[mixed[0]]
        raise DspError(f"{path}, line {lines[k]}: word {word_ids[k]} has letters in more than one fold")

    images = torch.from_numpy(pixels[order].astype(np.float32).reshape(-1, HEIGHT, WIDTH))
    labels = torch.from_numpy(letters[order])
    max_len = int((ends - starts).max())
    splits = {}
    chosen_by_split = (
        ("train", "the folds other than val and test", ~np.isin(word_fold, (val_fold, test_fold))),
        ("val", f"fold {val_fold}", word_fold == val_fold),
        ("test", f"fold {test_fold}", word_fold == test_fold),
    )
    for name, where, mask in chosen_by_split:
        chosen = np.flatnonzero(mask)
        if not chosen.size:
            raise DspError(
                f"{path}: no words in {where} for the {name} split; the file has folds "
                f"{sorted(set(word_fold.tolist()))}; check data.test_fold and data.val_fold"
            )
        x = pad_sequences([images[starts[i] : ends[i]] for i in chosen], 0.0, max_len)
        y = pad_sequences([labels[starts[i] : ends[i]] for i in chosen], -1, max_len)
        splits[name] = TensorDataset(x, y)
    return SequenceSplits(**splits, label_names=list(LETTERS), num_features=NUM_PIXELS, augment=augment)
