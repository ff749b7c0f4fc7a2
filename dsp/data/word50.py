"""Word50 (Chen et al. 2015, §3.1): five-letter words as five 28×28 perturbed glyphs on natural
image patches, regenerated from data available here.

The paper took 50 random five-letter words and Chars74K lower-case characters, alpha-matted onto
random background patches (as Larochelle et al. 2007) after random scaling, rotation and
translation; 10000 / 2000 / 2000 words for train / val / test. Here:
  words       `num_words` distinct strings of `word_length` letters picked by a seeded RNG from
              the Taskar OCR words (exactly that long; if there are too few, windows of that
              length from longer words; the real file has only 4 five-letter words, so windows),
              so letter pairs are those of real words. Every example is one of them, uniformly.
  glyphs      every character is a random Taskar OCR glyph (16×8 binary) of its letter, drawn
              GLYPH_HEIGHT px tall in the 28×28 frame and then rotated by ±max_rotation degrees,
              scaled by a factor in `scale` and shifted by ±max_shift px (one bilinear resampling).
  background  a random 28×28 crop of a greyscale Weizmann horse photo (rgb/*) at a random
              resolution (shorter side 64, 128 or 256 px), its intensities scaled into
              [0, background_max]; the glyph is alpha-matted on top in white with opacity uniform
              in `opacity`, so ink always contrasts with the patch and keeps one polarity (as the
              digits of Larochelle et al.'s mnist-back-image).
The defaults are tuned to the paper's difficulty: a one-hidden-layer MLP (256 units, SGD with
momentum, 30 epochs) on single characters reaches 62% test character / 9% word accuracy (paper,
unary only, H1 = 256: 64.4% / 10.8%), while picking the best of the 50 words from its scores gives
96% / 95%, so structure pays. Taskar's glyphs are harder than Chars74K's, hence milder
perturbations than the paper's Fig. 4: with ±30° / 0.8-1.2 / ±3 px the MLP reaches ~51% (5000
training words), and with ink flipping between white and black by patch brightness 31-44%.
Splits share nothing: train glyphs come from OCR folds other than val_fold / test_fold (default
2-9), val glyphs from val_fold (1), test glyphs from test_fold (0); the photos are split 70/15/15
by a seeded permutation. Only the word list is common to all splits, as in the paper.

The result is stored as uint8 HDF5 (`hdf5_stream.write_splits_h5`: /<split>/x [N, 5, 28, 28],
/<split>/y [N, 5] int64, the words in the file attributes) in
`cache_dir/word50/word50-<key>.h5`, the key hashing every setting and the source files' sizes and
modification times, so a second call reads the file (~0.5 s) instead of generating (~5 s for
14000 words on one core; 56 MB). Generation is deterministic for a given seed and source data.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from dsp.data.cache import default_cache_dir
from dsp.data.hdf5_stream import SPLITS, write_splits_h5
from dsp.data.ocr import DOWNLOAD_HINT, HEIGHT, LETTERS, WIDTH, parse_letters
from dsp.data.sequences import SequenceSplits
from dsp.errors import DiskError, DspError
from dsp.schema import Count, Fraction, NonNegative, Positive, Range, Size

FORMAT_VERSION = 1  # bump when the generator changes: old cache entries are then ignored
SIZE = 28
GLYPH_HEIGHT = 20  # px a 16-row glyph spans before random scaling (width 10: aspect kept)
PHOTO_SIDES = (64, 128, 256)  # shorter side of the photo resolutions crops are taken from
PHOTO_SPLIT = (0.70, 0.15, 0.15)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
CHUNK = 4096  # glyphs resampled at once (grid memory ~25 MB)


@dataclass
class Word50Splits(SequenceSplits):
    """SequenceSplits with x float32 [N, 5, 28, 28] in [0, 1] and y int64 [N, 5] (letters 0..25).

    `source` is the HDF5 file the splits were read from ('' when not cached). `stream` asks the
    trainer to read training batches from it with `hdf5_stream.PrefetchBatches` (the tensors are
    still loaded: Word50 fits in memory).
    """

    source: str = ""
    words: list[str] = field(default_factory=list)
    stream: bool = False


def _photo_files(horses_dir: Path) -> list[Path]:
    folder = horses_dir / "rgb"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS) if folder.is_dir() else []
    if len(files) < 3:
        raise DspError(
            f"Word50 background photos not found: {folder} must hold at least 3 images ({', '.join(EXTENSIONS)}), "
            f"found {len(files)}. Fetch the Weizmann horses with "
            f"`python scripts/download.py horses --data-dir DIR` and point paths.data_dir (or the "
            f"DSP_DATA_DIR environment variable) at DIR, or set data.horses_dir"
        )
    return files


def _read_photo(path: Path) -> list[np.ndarray]:
    """A greyscale photo as uint8 arrays at each PHOTO_SIDES resolution (never upscaled past 2×)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.draft("L", (PHOTO_SIDES[-1], PHOTO_SIDES[-1]))  # JPEG: decode at a reduced scale
            im = im.convert("L")
            out = []
            for side in PHOTO_SIDES:
                s = min(side / min(im.size), 2.0)
                w, h = max(SIZE, round(im.width * s)), max(SIZE, round(im.height * s))
                out.append(np.asarray(im.resize((w, h), Image.BILINEAR)))
            return out
    except (UnidentifiedImageError, OSError) as err:
        raise DspError(f"cannot read image {path}: {err}; replace or remove the file") from None


def _distinct_words(fields: np.ndarray) -> set[str]:
    _, letters, _, word_ids, positions, _ = fields.T
    order = np.lexsort((positions, word_ids))
    w = word_ids[order]
    starts = np.flatnonzero(np.r_[True, w[1:] != w[:-1]])
    text = "".join(LETTERS[k] for k in letters[order])
    return {text[a:b] for a, b in zip(starts, np.r_[starts[1:], len(text)])}


def _choose_words(fields, available: list[set[int]], num_words, length, rng, path) -> list[str]:
    words = _distinct_words(fields)
    pool = {w for w in words if len(w) == length}
    if len(pool) < num_words:  # too few whole words: add every window of longer ones
        pool |= {w[i : i + length] for w in words if len(w) > length for i in range(len(w) - length + 1)}
    # Every letter needs glyphs in every split's folds.
    pool = sorted(w for w in pool if all({LETTERS.index(c) for c in w} <= a for a in available))
    if len(pool) < num_words:
        raise DspError(
            f"{path} yields only {len(pool)} distinct {length}-letter strings whose letters occur in every "
            f"split's folds; lower data.num_words ({num_words}) or data.word_length"
        )
    return sorted(pool[i] for i in rng.choice(len(pool), num_words, replace=False))


def _poses(m: int, rng: np.random.Generator, max_rotation, scale, max_shift) -> torch.Tensor:
    """Random rotation, scale and shift of m glyphs as affine_grid matrices [m, 2, 3]: they map
    output coordinates to glyph ones, so they invert q = s·R·p + t, with q in output px from the
    centre (q = 14·n for normalised n) and p in the glyph frame, whose normalised coordinates are
    p / (half the drawn width, height)."""
    angle = np.deg2rad(rng.uniform(-max_rotation, max_rotation, m))
    s = rng.uniform(scale[0], scale[1], m)
    shift = rng.uniform(-max_shift, max_shift, (m, 2))
    cos, sin = np.cos(angle) / s, np.sin(angle) / s
    inv = np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], 1)  # R^T / s, [m, 2, 2]
    half = np.array([GLYPH_HEIGHT * WIDTH / HEIGHT / 2, GLYPH_HEIGHT / 2])[None, :, None]  # (x, y)
    theta = np.concatenate([inv * (SIZE / 2), -inv @ shift[:, :, None]], 2) / half
    return torch.from_numpy(theta.astype(np.float32))


# Output pixel centres in normalised (x, y, 1) coordinates (align_corners=False), [28·28, 3].
_c = (torch.arange(SIZE, dtype=torch.float32) * 2 + 1) / SIZE - 1
BASE_GRID = torch.stack([_c.repeat(SIZE), _c.repeat_interleave(SIZE), torch.ones(SIZE * SIZE)], 1)


def _render(glyphs: np.ndarray, theta: torch.Tensor) -> torch.Tensor:
    """Binary 16×8 glyphs [M, 128] -> coverage [M, 28, 28] in [0, 1], resampled through theta.
    Same as F.affine_grid, which is several times slower on CPU."""
    grid = (theta.reshape(-1, 3) @ BASE_GRID.T).view(-1, 2, SIZE, SIZE).permute(0, 2, 3, 1)  # [M, 28, 28, (x, y)]
    src = torch.from_numpy(glyphs.reshape(-1, 1, HEIGHT, WIDTH).astype(np.float32))
    return F.grid_sample(src, grid, align_corners=False)[:, 0]


def _crops(photos: list[list[np.ndarray]], m: int, rng: np.random.Generator) -> np.ndarray:
    """m random 28×28 uint8 patches, each from a random photo at a random resolution."""
    which = rng.integers(len(photos), size=m)
    level = rng.integers(len(PHOTO_SIDES), size=m)
    u = rng.random((m, 2))
    out = np.empty((m, SIZE, SIZE), np.uint8)
    span = np.arange(SIZE)
    key = which * len(PHOTO_SIDES) + level
    for k in np.unique(key):  # all patches of one image at once
        at = np.flatnonzero(key == k)
        img = photos[k // len(PHOTO_SIDES)][k % len(PHOTO_SIDES)]
        r = (u[at, 0] * (img.shape[0] - SIZE + 1)).astype(np.int64)
        c = (u[at, 1] * (img.shape[1] - SIZE + 1)).astype(np.int64)
        out[at] = img[(r[:, None] + span)[:, :, None], (c[:, None] + span)[:, None, :]]
    return out


def _generate_split(n, words, glyph_pools, photos, rng, cfg) -> tuple[np.ndarray, np.ndarray]:
    length = len(words[0])
    codes = np.array([[LETTERS.index(c) for c in w] for w in words], dtype=np.int64)
    y = codes[rng.integers(len(words), size=n)]  # [n, L]
    flat = y.reshape(-1)
    m = len(flat)
    glyph = np.empty(m, np.int64)
    for k in np.unique(flat):  # a random glyph of the right letter for every character
        at = np.flatnonzero(flat == k)
        glyph[at] = glyph_pools[k][rng.integers(len(glyph_pools[k]), size=len(at))]
    theta = _poses(m, rng, cfg["max_rotation"], cfg["scale"], cfg["max_shift"])
    opacity = torch.from_numpy(rng.uniform(cfg["opacity"][0], cfg["opacity"][1], (m, 1, 1)).astype(np.float32))
    crops = torch.from_numpy(_crops(photos, m, rng))
    x = torch.empty(m, SIZE, SIZE, dtype=torch.uint8)
    for a in range(0, m, CHUNK):  # chunks keep the float temporaries small
        b = min(a + CHUNK, m)
        alpha = _render(cfg["pixels"][glyph[a:b]], theta[a:b]) * opacity[a:b]
        bg = crops[a:b].float() * (cfg["background_max"] / 255.0)
        ink = bg * (1 - alpha) + alpha  # white ink, alpha-matted
        x[a:b] = ink.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    return x.numpy().reshape(n, length, SIZE, SIZE), y


def generate_word50(ocr_path, photo_files, seed, num_words, word_length, sizes, val_fold, test_fold,
                    max_rotation, scale, max_shift, opacity, background_max) -> tuple[dict, list[str]]:
    """Arrays {split: {"x": uint8 [N, L, 28, 28], "y": int64 [N, L]}} and the word list."""
    fields, pixels, _ = parse_letters(ocr_path)
    letters, folds = fields[:, 1], fields[:, 5]
    in_split = {"train": ~np.isin(folds, (val_fold, test_fold)), "val": folds == val_fold,
                "test": folds == test_fold}
    # glyph indices per split and letter
    pools = {s: [np.flatnonzero(m & (letters == k)) for k in range(len(LETTERS))] for s, m in in_split.items()}
    available = [{k for k, p in enumerate(pools[s]) if len(p)} for s in SPLITS]
    words = _choose_words(fields, available, num_words, word_length, np.random.default_rng([seed, 0]), ocr_path)

    perm = np.random.default_rng([seed, 1]).permutation(len(photo_files))
    n_val = max(1, round(PHOTO_SPLIT[1] * len(perm)))
    n_test = max(1, round(PHOTO_SPLIT[2] * len(perm)))
    photo_idx = {"train": perm[n_val + n_test :], "val": perm[:n_val], "test": perm[n_val : n_val + n_test]}
    cfg = dict(pixels=pixels, max_rotation=max_rotation, scale=scale, max_shift=max_shift, opacity=opacity,
               background_max=background_max)
    out = {}
    for i, split in enumerate(SPLITS):
        photos = [_read_photo(photo_files[j]) for j in sorted(photo_idx[split])]
        rng = np.random.default_rng([seed, 2 + i])  # one stream per split: sizes don't change other splits
        x, y = _generate_split(sizes[split], words, pools[split], photos, rng, cfg)
        out[split] = {"x": x, "y": y}
    return out, words


def _read_cached(path: Path):
    try:
        with h5py.File(path, "r") as f:
            arrays = {s: {"x": f[s]["x"][()], "y": f[s]["y"][()]} for s in SPLITS}
            return arrays, [str(w) for w in f.attrs["words"]]
    except (OSError, KeyError):
        return None  # missing or unreadable entry: generate again and overwrite it


def load_word50(
    ocr_path: str | os.PathLike,
    horses_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    seed: Count = 0,
    num_words: Size = 50,
    word_length: Size = 5,
    train_size: Size = 10000,
    val_size: Size = 2000,
    test_size: Size = 2000,
    stream: bool = False,
    val_fold: Annotated[int, Range(0, 9)] = 1,  # an OCR fold
    test_fold: Annotated[int, Range(0, 9)] = 0,
    max_rotation: NonNegative = 20.0,
    scale: tuple[Positive, Positive] = (0.85, 1.15),
    max_shift: NonNegative = 2.0,
    opacity: tuple[Fraction, Fraction] = (0.6, 1.0),
    background_max: Fraction = 0.6,
) -> Word50Splits:
    """Generate (or read from the cache) Word50; see the module docstring. cache_dir None: the
    default cache folder; '': generate in memory every time (then `stream` is unavailable)."""
    ocr_path, horses_dir = Path(ocr_path), Path(horses_dir)
    if not ocr_path.is_file():
        raise DspError(f"OCR data file not found: {ocr_path} (Word50 takes its glyphs from it). {DOWNLOAD_HINT}")
    photo_files = _photo_files(horses_dir)
    sizes = {"train": int(train_size), "val": int(val_size), "test": int(test_size)}
    counts = {f"{s}_size": n for s, n in sizes.items()} | {"num_words": num_words, "word_length": word_length}
    for key, value in counts.items():
        if int(value) < 1:
            raise DspError(f"data.{key} must be at least 1, got {value}")
    if val_fold == test_fold or not (0 <= val_fold < 10 and 0 <= test_fold < 10):
        raise DspError(f"data.val_fold={val_fold} and data.test_fold={test_fold} must be two different "
                       f"OCR folds 0..9")
    scale, opacity = tuple(float(v) for v in scale), tuple(float(v) for v in opacity)
    settings = dict(seed=int(seed), num_words=int(num_words), word_length=int(word_length), sizes=sizes,
                    val_fold=int(val_fold), test_fold=int(test_fold), max_rotation=float(max_rotation),
                    scale=scale, max_shift=float(max_shift), opacity=opacity,
                    background_max=float(background_max))

    def generate():
        return generate_word50(ocr_path, photo_files, **settings)

    if cache_dir == "":
        if stream:
            raise DspError("data.stream=true reads from the HDF5 cache: set paths.cache_dir (not '')")
        arrays, words, source = *generate(), ""
    else:
        sources = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (ocr_path, *photo_files)]
        raw = json.dumps({"version": FORMAT_VERSION, **settings, "sources": sources}, sort_keys=True)
        key = hashlib.sha1(raw.encode()).hexdigest()[:16]
        entry = Path(cache_dir or default_cache_dir()) / "word50" / f"word50-{key}.h5"
        cached = _read_cached(entry) if entry.is_file() else None
        if cached is None:
            cached = generate()
            try:
                write_splits_h5(entry, cached[0], {"words": cached[1], "settings": raw})
            except DiskError:  # names the path, the cause and the free space already
                raise
            except OSError as err:
                raise DspError(
                    f"cannot write the generated Word50 data to {entry} ({err}); point paths.cache_dir "
                    f"(or the DSP_CACHE_DIR environment variable) at a writable folder"
                ) from None
        (arrays, words), source = cached, str(entry)

    splits = {
        s: TensorDataset(torch.from_numpy(a["x"]).float().div_(255.0), torch.from_numpy(a["y"]).long())
        for s, a in arrays.items()
    }
    return Word50Splits(**splits, label_names=list(LETTERS), num_features=SIZE * SIZE,
                        source=source, words=words, stream=bool(stream))
