from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dsp.data.word50 as w50
from dsp.data.hdf5_stream import PrefetchBatches
from dsp.data.sequences import SequenceSplits
from dsp.errors import DspError

EXACT = ["hello", "world", "quick"]  # the only five-letter words of the fixture
LONGER = ["zebras", "jumping"]
ALL = EXACT + LONGER + ["cat"]  # 'cat' is too short to be used
WINDOWS = {w[i : i + 5] for w in LONGER for i in range(len(w) - 4)}
SIZES = dict(train_size=20, val_size=5, test_size=5)


def write_word50_sources(folder: Path) -> tuple[Path, Path]:
    """A tiny letter.data with every word of ALL in each of the 10 folds, glyph pixels encoding
    (fold, letter) so the glyphs a split draws can be traced, and 6 random JPEG 'horse photos'.
    Returns (ocr_path, horses_dir); with data.num_words<=4 they make a tiny Word50."""
    lines, letter_id, word_id = [], 1, 1
    for fold in range(10):
        for word in ALL:
            for pos, ch in enumerate(word, 1):
                pixels = ["0"] * 128
                pixels[fold] = pixels[10 + ord(ch) - ord("a")] = "1"
                nxt = letter_id + 1 if pos < len(word) else -1
                lines.append("\t".join(map(str, [letter_id, ch, nxt, word_id, pos, fold, *pixels])) + "\t")
                letter_id += 1
            word_id += 1
    folder.mkdir(parents=True, exist_ok=True)
    ocr = folder / "letter.data"
    ocr.write_text("\n".join(lines) + "\n")
    rgb = folder / "horses" / "rgb"
    rgb.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(1, 7):
        Image.fromarray(rng.integers(0, 256, (40 + k, 60, 3), dtype=np.uint8)).save(rgb / f"horse{k:03d}.jpg")
    return ocr, folder / "horses"


@pytest.fixture
def sources(tmp_path):
    return write_word50_sources(tmp_path / "src")


def load(sources, cache, **kw):
    return w50.load_word50(*sources, cache, **{"num_words": 4, **SIZES, **kw})


def test_shapes_words_and_labels(sources, tmp_path):
    d = load(sources, tmp_path / "cache")
    assert isinstance(d, w50.Word50Splits) and isinstance(d, SequenceSplits)
    assert d.label_names == list("abcdefghijklmnopqrstuvwxyz") and d.num_features == 784 and not d.stream
    assert len(set(d.words)) == 4 and set(d.words) <= set(EXACT) | WINDOWS  # too few exact words: windows too
    for name, n in (("train", 20), ("val", 5), ("test", 5)):
        x, y = d.split(name).tensors
        assert x.shape == (n, 5, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert y.shape == (n, 5) and y.dtype == torch.int64
        assert {"".join(chr(97 + k) for k in row) for row in y.tolist()} <= set(d.words)
    assert d.train.tensors[0].std() > 0.05  # not blank
    assert set(load(sources, tmp_path / "c2", num_words=2).words) <= set(EXACT)  # enough exact words


def test_splits_use_disjoint_glyph_folds_and_photos(sources, tmp_path, monkeypatch):
    seen = []
    render, read_photo = w50._render, w50._read_photo

    def spy_render(glyphs, *args):  # pixels 0..9 encode the fold of each glyph
        seen.append(("folds", set(np.nonzero(glyphs[:, :10])[1].tolist())))
        return render(glyphs, *args)

    def spy_photo(path):
        seen.append(("photo", path.name))
        return read_photo(path)

    monkeypatch.setattr(w50, "_render", spy_render)
    monkeypatch.setattr(w50, "_read_photo", spy_photo)
    load(sources, tmp_path / "cache")
    # per split: its photos are read, then its glyphs rendered
    folds = [s for kind, s in seen if kind == "folds"]
    assert folds[0] <= set(range(2, 10)) and folds[1] == {1} and folds[2] == {0}
    photos, split_photos = set(), []
    for kind, value in seen:
        if kind == "photo":
            photos.add(value)
        else:
            split_photos.append(photos)
            photos = set()
    assert all(split_photos) and sum(map(len, split_photos)) == len(set.union(*split_photos)) == 6


def test_cache_is_reused_and_generation_deterministic(sources, tmp_path, monkeypatch):
    d = load(sources, tmp_path / "cache")
    assert d.source.startswith(str(tmp_path / "cache" / "word50" / "word50-")) and d.source.endswith(".h5")
    files = list((tmp_path / "cache" / "word50").iterdir())
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    with monkeypatch.context() as m:
        m.setattr(w50, "generate_word50", lambda *a, **k: pytest.fail("regenerated despite the cache"))
        again = load(sources, tmp_path / "cache", stream=True)
    assert again.source == d.source and again.stream and files[0].stat().st_mtime_ns == mtime
    assert again.words == d.words and torch.equal(again.train.tensors[0], d.train.tensors[0])
    fresh = load(sources, tmp_path / "other")  # same seed, new cache: the same data
    assert fresh.words == d.words
    for name in ("train", "val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(fresh.split(name).tensors, d.split(name).tensors))
    other = load(sources, tmp_path / "cache", seed=1)
    assert other.source != d.source and not torch.equal(other.train.tensors[0], d.train.tensors[0])
    memory = load(sources, "")  # no cache: generated in memory
    assert memory.source == "" and torch.equal(memory.test.tensors[0], d.test.tensors[0])
    # the cached file feeds the streaming loader
    (xb, yb), = PrefetchBatches(d.source, "val", torch.arange(5), 5)
    assert torch.allclose(xb, d.val.tensors[0]) and torch.equal(yb, d.val.tensors[1])


def test_clear_errors(sources, tmp_path):
    ocr, horses = sources
    with pytest.raises(DspError, match="OCR data file not found.*missing.data.*DSP_DATA_DIR"):
        w50.load_word50(tmp_path / "missing.data", horses, tmp_path / "cache")
    with pytest.raises(DspError, match="nohorses.*DSP_DATA_DIR"):
        w50.load_word50(ocr, tmp_path / "nohorses", tmp_path / "cache")
    with pytest.raises(DspError, match="num_words"):
        load(sources, tmp_path / "cache", num_words=50)
    with pytest.raises(DspError, match="stream"):
        load(sources, "", stream=True)
