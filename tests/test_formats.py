"""Data formats beyond ARFF: multi-label .npz and CSV (dsp.data.tables), and any array task from one
HDF5 file (dsp.data.hdf5_splits). Each round-trips into a training run of a few steps; each problem
with a file is one DspError naming the file and the array or column.

The write_* helpers and `tiny_overrides(family, folder)` also serve other tests (the compatibility
matrix's tiny data per family)."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from dsp.cli.common import config_dir
from dsp.cli.train import train
from dsp.compat import check_config
from dsp.data.hdf5_splits import load_hdf5, load_hdf5_masks, load_hdf5_sequences
from dsp.data.tables import load_csv, load_npz
from dsp.errors import DspError

QUICK = ["trainer=default", "trainer.max_steps=3", "trainer.max_epochs=1", "trainer.progress=false",
         "trainer.batch_size=8", "logger=none"]


# ------------------------------------------------------------------------------- writers
def _multilabel(n: int, d: int = 10, labels: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(99).normal(size=(d, labels))
    x = (rng.random((n, d)) < 0.3).astype(np.float32) + rng.normal(0, 0.1, (n, d)).astype(np.float32)
    return x, (x @ w > 0.2).astype(np.float32)


def write_npz_data(folder: Path, n_train: int = 40, n_test: int = 16) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = _multilabel(n, seed=seed)
        np.savez(folder / f"{name}.npz", x=x, y=y.astype(np.uint8), label_names=np.array(["a", "b", "c", "d"]))
    return folder / "train.npz", folder / "test.npz"


def write_csv_data(folder: Path, n_train: int = 40, n_test: int = 16, labels_first: bool = False) -> tuple[Path, Path]:
    """train.csv and test.csv with label columns tag_a..tag_d (first or last); the test file's columns
    come in another order."""
    folder.mkdir(parents=True, exist_ok=True)
    features, labels = [f"f{i}" for i in range(10)], [f"tag_{c}" for c in "abcd"]
    for name, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = _multilabel(n, seed=seed)
        columns = (labels + features) if labels_first else (features + labels)
        values = np.c_[y, x] if labels_first else np.c_[x, y]
        if name == "test":
            columns, values = columns[::-1], values[:, ::-1]
        rows = [",".join(columns)] + [",".join(f"{v:g}" for v in row) for row in values]
        (folder / f"{name}.csv").write_text("\n".join(rows) + "\n")
    return folder / "train.csv", folder / "test.csv"


def write_h5(path: Path, splits: dict, attrs: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
        for split, arrays in splits.items():
            for name, arr in arrays.items():
                f[f"{split}/{name}"] = arr
    return path


def write_h5_multilabel(path: Path, val: bool = False) -> Path:
    splits = {s: dict(zip("xy", _multilabel(n, seed=k))) for k, (s, n) in
              enumerate((("train", 40), ("test", 16), *((("val", 12),) if val else ())))}
    return write_h5(path, splits, {"label_names": ["a", "b", "c", "d"]})


def _sequences(n: int, t: int = 5, seed: int = 0):
    """OCR-like words: per position a noisy 16×8 template image (uint8) of its letter 0..3."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(7).random((4, 16, 8)) < 0.3
    lengths = rng.integers(2, t + 1, n)
    y = np.full((n, t), -1, np.int64)
    x = np.zeros((n, t, 16, 8), np.uint8)
    for i, m in enumerate(lengths):
        y[i, :m] = rng.integers(0, 4, m)
        x[i, :m] = (templates[y[i, :m]] ^ (rng.random((m, 16, 8)) < 0.05)) * 255
    return x, y


def write_h5_sequences(path: Path, val: bool = False) -> Path:
    splits = {s: dict(zip("xy", _sequences(n, seed=k))) for k, (s, n) in
              enumerate((("train", 24), ("test", 8), *((("val", 6),) if val else ())))}
    return write_h5(path, splits, {"label_names": ["a", "b", "c", "d"]})


def _masks(n: int, size: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    y = np.zeros((n, size, size), np.float32)
    x = np.zeros((n, 3, size, size), np.float32)
    for i in range(n):
        cy, cx, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.2, 0.3)
        y[i] = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
        x[i] = np.clip(0.25 + 0.5 * y[i] + rng.normal(0, 0.05, (3, size, size)), 0, 1)
    return x, y


def write_h5_masks(path: Path) -> Path:
    return write_h5(path, {s: dict(zip("xy", _masks(n, seed=k))) for k, (s, n) in enumerate((("train", 8), ("test", 4)))})


def tiny_overrides(family: str, folder: Path) -> list[str]:
    """Overrides that load a tiny, self-written file of each new data family (data=npz, csv, hdf5,
    hdf5_sequences, hdf5_masks)."""
    folder = Path(folder)
    if family == "npz":
        tr, te = write_npz_data(folder / "npz")
        return [f"data.train={tr}", f"data.test={te}"]
    if family == "csv":
        tr, te = write_csv_data(folder / "csv")
        return [f"data.train={tr}", f"data.test={te}", "data.num_labels=4"]
    if family == "hdf5":
        return [f"data.path={write_h5_multilabel(folder / 'ml.h5')}"]
    if family == "hdf5_sequences":
        return [f"data.path={write_h5_sequences(folder / 'seq.h5')}"]
    if family == "hdf5_masks":
        return [f"data.path={write_h5_masks(folder / 'masks.h5')}"]
    raise AssertionError(f"no tiny data for the family {family}")


def _train(run: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, *QUICK])
    check_config(cfg)
    return train(cfg, run)


# ------------------------------------------------------------------------ round trips
def test_npz_round_trips_into_a_training_run(tmp_path):
    tr, te = write_npz_data(tmp_path / "data")
    data = load_npz(str(tr), str(te), val_fraction=0.25, split_seed=3, standardize=False)
    x, y = _multilabel(40, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 16) and data.label_names == list("abcd")
    assert data.train.tensors[0].dtype == torch.float32 and data.train.tensors[1].dtype == torch.float32
    rows = torch.cat([data.train.tensors[0], data.val.tensors[0]])  # carved from train, nothing lost
    assert torch.allclose(rows.sum(0), torch.from_numpy(x).sum(0), atol=1e-4)
    metrics = _train(tmp_path / "run", ["data=npz", f"data.train={tr}", f"data.test={te}", "data.standardize=true",
                                        "model=mlp", "objective=local"])
    assert np.isfinite(metrics["test/example_f1"])


def test_npz_standardize_and_held_out_test_follow_load_mulan(tmp_path):
    tr, _ = write_npz_data(tmp_path / "data")
    data = load_npz(str(tr), None, test_size=8, standardize=True)
    assert (len(data.train), len(data.val), len(data.test)) == (26, 6, 8)
    x = data.train.tensors[0]
    assert torch.allclose(x.mean(0), torch.zeros(10), atol=1e-5)
    with pytest.raises(DspError, match="data.test is null, so data.test_size"):
        load_npz(str(tr), None)


def test_csv_round_trips_with_labels_by_name_or_count(tmp_path):
    tr, te = write_csv_data(tmp_path / "data", labels_first=True)
    by_name = load_csv(str(tr), str(te), labels=[f"tag_{c}" for c in "abcd"], standardize=False)
    by_count = load_csv(str(tr), str(te), num_labels=4, label_position="start", standardize=False)
    assert by_name.label_names == by_count.label_names == ["tag_a", "tag_b", "tag_c", "tag_d"]
    x, y = _multilabel(16, seed=1)  # the test file's columns are reversed: read back by name
    assert torch.allclose(by_name.test.tensors[0], torch.from_numpy(x), atol=1e-5)
    assert torch.equal(by_count.test.tensors[1], torch.from_numpy(y))
    metrics = _train(tmp_path / "run", ["data=csv", f"data.train={tr}", f"data.test={te}", "data.num_labels=4",
                                        "data.label_position=start", "model=mlp", "objective=local"])
    assert np.isfinite(metrics["test/example_f1"])


def test_hdf5_multilabel_round_trips_and_streams_from_the_file_itself(tmp_path):
    with_val = write_h5_multilabel(tmp_path / "val.h5", val=True)
    data = load_hdf5(str(with_val))
    assert (len(data.train), len(data.val), len(data.test)) == (40, 12, 16)
    assert data.source == str(with_val.resolve()) and data.label_names == list("abcd")
    run = tmp_path / "run"
    _train(run, ["data=hdf5", f"data.path={with_val}", "model=mlp", "objective=local", "trainer.stream=true"])
    assert not (run / "data.h5").exists()  # batches came from the file itself
    carved = write_h5_multilabel(tmp_path / "carved.h5")
    data = load_hdf5(str(carved), val_fraction=0.25)
    assert (len(data.train), len(data.val)) == (30, 10) and data.source == ""  # /train is not the training split
    _train(tmp_path / "run2", ["data=hdf5", f"data.path={carved}", "model=mlp", "objective=local",
                               "trainer.stream=true"])
    assert (tmp_path / "run2" / "data.h5").is_file()  # the trainer's own copy


def test_hdf5_sequences_round_trip_into_a_chain_crf(tmp_path):
    path = write_h5_sequences(tmp_path / "seq.h5", val=True)
    data = load_hdf5_sequences(str(path))
    x, y = data.train.tensors
    assert x.shape[1:] == (5, 16, 8) and x.dtype == torch.float32 and float(x.max()) == 1.0
    assert y.dtype == torch.int64 and data.label_names == list("abcd") and data.num_features == 128
    assert data.source == str(path.resolve())
    metrics = _train(tmp_path / "run", ["experiment=crf_ocr_joint", "data=hdf5_sequences", f"data.path={path}",
                                        "model.unary_net.net.hidden=8", "trainer.stream=true"])
    assert np.isfinite(metrics["test/char_acc"]) and not (tmp_path / "run" / "data.h5").exists()


def test_hdf5_masks_round_trip_into_a_segmentation_run(tmp_path):
    path = write_h5_masks(tmp_path / "masks.h5")
    data = load_hdf5_masks(str(path), val_fraction=0.25, crop=8, test_crops=4)
    assert data.train.tensors[0].shape == (6, 3, 16, 16) and data.num_features == 3 and data.num_labels == 2
    metrics = _train(tmp_path / "run", ["experiment=fcn_horses", "data=hdf5_masks", f"data.path={path}", "~data.val_holdout",
                                        "data.crop=8", "data.test_crops=4", "model.unary.base_width=4",
                                        "model.unary.depth=2"])
    assert np.isfinite(metrics["test/mean_iou"])


def test_the_loaders_declare_their_kind_so_misfits_are_refused_at_compose(tmp_path):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data=npz", "data.train=a.npz", "data.test=b.npz",
                                                       "experiment=crf_ocr_joint", "data=npz"])
        with pytest.raises(DspError, match="multilabel outputs"):
            check_config(cfg)
        cfg = compose(config_name="config", overrides=["experiment=crf_ocr_joint", "data=hdf5_masks", "data.path=a.h5"])
        with pytest.raises(DspError, match="mask outputs"):
            check_config(cfg)


# ------------------------------------------------------------------------------ errors
def _npz(tmp_path, **arrays) -> str:
    np.savez(tmp_path / "bad.npz", **arrays)
    return str(tmp_path / "bad.npz")


GOOD_X, GOOD_Y = _multilabel(6)


@pytest.mark.parametrize("arrays, message", [
    ({"x": GOOD_X}, r"bad.npz: no array 'y' \(the archive holds x\)"),
    ({"x": GOOD_X, "y": GOOD_Y[:5]}, "bad.npz: x has 6 rows but y has 5"),
    ({"x": GOOD_X, "y": GOOD_Y * 2}, r"bad.npz: y: labels must be 0 or 1, but row \d holds 2.0"),
    ({"x": np.r_[GOOD_X[:3], np.full((1, 10), np.inf), GOOD_X[4:]], "y": GOOD_Y}, "bad.npz: x: row 3 holds an infinite feature"),
    ({"x": np.zeros((0, 10)), "y": np.zeros((0, 4))}, "bad.npz: x and y hold no rows"),
    ({"x": GOOD_X[:, 0], "y": GOOD_Y}, r"bad.npz: x must be a 2-d array"),
    ({"x": GOOD_X, "y": GOOD_Y, "label_names": np.array(["a"])}, "label_names names 1 labels but y has 4"),
])
def test_npz_problems_are_one_line_naming_file_and_array(tmp_path, arrays, message):
    with pytest.raises(DspError, match=message) as err:
        load_npz(_npz(tmp_path, **arrays), None, test_size=2)
    assert "\n" not in str(err.value)


def test_npz_missing_file_and_mismatched_train_test(tmp_path):
    tr, _ = write_npz_data(tmp_path / "data")
    with pytest.raises(DspError, match="data file not found: .*nope.npz"):
        load_npz(str(tr), str(tmp_path / "nope.npz"))
    other = _npz(tmp_path, x=GOOD_X[:, :7], y=GOOD_Y)
    with pytest.raises(DspError, match="has 10 features but .*bad.npz has 7"):
        load_npz(str(tr), other)


@pytest.mark.parametrize("text, kwargs, message", [
    ("f0,f1,l0\n1,2,0\n", {"labels": ["l9"]}, r"bad.csv: no column 'l9' named in data.labels"),
    ("f0,f1,l0\n1,x,0\n", {"num_labels": 1}, r"bad.csv, line 2, column 'f1': 'x' is not a number"),
    ("f0,f1,l0\n1,2,0\n1,nan,1\n", {"num_labels": 1}, r"bad.csv: feature columns: line 3 holds a NaN feature \(column 'f1'\)"),
    ("f0,f1,l0\n1,2,0\n1,2,3\n", {"num_labels": 1}, r"bad.csv: label columns: labels must be 0 or 1, but line 3 holds 3.0 \(column 'l0'\)"),
    ("f0,f1,l0\n", {"num_labels": 1}, "bad.csv: feature columns and label columns hold no rows"),
    ("f0,f1,l0\n1,2\n", {"num_labels": 1}, "bad.csv, line 2: 2 values, but the header names 3 columns"),
    ("f0,f1,l0\n1,2,0\n", {}, "data.labels .* or data.num_labels .* must be set"),
    ("f0,f1,l0\n1,2,0\n", {"num_labels": 3}, "data.num_labels=3 does not fit .*bad.csv, which has 3 columns"),
])
def test_csv_problems_are_one_line_naming_file_and_column(tmp_path, text, kwargs, message):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DspError, match=message) as err:
        load_csv(str(tmp_path / "bad.csv"), None, test_size=1, **kwargs)
    assert "\n" not in str(err.value)


def test_csv_test_file_without_a_training_column(tmp_path):
    tr, _ = write_csv_data(tmp_path / "data")
    (tmp_path / "te.csv").write_text("f0,tag_a,tag_b,tag_c,tag_d\n1,0,0,0,0\n")
    with pytest.raises(DspError, match=r"te.csv: no feature column 'f1', which the training file has"):
        load_csv(str(tr), str(tmp_path / "te.csv"), num_labels=4)


def test_hdf5_problems_are_one_line_naming_file_and_dataset(tmp_path):
    x, y = _multilabel(6)
    cases = [
        ({"train": {"x": x, "y": y}}, load_hdf5, r"bad.h5: no group /test \(the file holds /train\)"),
        ({"train": {"x": x, "y": y}, "test": {"x": x}}, load_hdf5, r"bad.h5: no dataset /test/y"),
        ({"train": {"x": x, "y": y[:4]}, "test": {"x": x, "y": y}}, load_hdf5, "/train/x has 6 rows but /train/y has 4"),
        ({"train": {"x": x, "y": y}, "test": {"x": x, "y": y + 1}}, load_hdf5, "/test/y: labels must be 0 or 1"),
        ({"train": {"x": np.where(np.arange(6)[:, None] == 4, np.nan, x), "y": y}, "test": {"x": x, "y": y}},
         load_hdf5, "/train/x: row 4 holds a NaN feature"),
        ({"train": {"x": x[:0], "y": y[:0]}, "test": {"x": x, "y": y}}, load_hdf5, "/train/x and /train/y hold no rows"),
    ]
    sx, sy = _sequences(4)
    bad_tags = sy.copy()
    bad_tags[1, 0] = 7
    gap = sy.copy()
    gap[2, 0] = -1
    cases += [
        ({"train": {"x": sx, "y": sy}, "test": {"x": sx, "y": bad_tags}}, load_hdf5_sequences,
         "/test/y holds tag id 7, but attribute label_names names only 4 tags"),
        ({"train": {"x": sx, "y": gap}, "test": {"x": sx, "y": sy}}, load_hdf5_sequences,
         "/train/y: row 2 is not a sequence"),
        ({"train": {"x": sx[:, :3], "y": sy}, "test": {"x": sx, "y": sy}}, load_hdf5_sequences,
         "/train/x must be .* with as many positions as"),
    ]
    mx, my = _masks(3)
    cases += [({"train": {"x": mx, "y": my[:, :8]}, "test": {"x": mx, "y": my}}, load_hdf5_masks,
               "/train/y must be masks .* of the images' size")]
    for splits, loader, message in cases:
        path = write_h5(tmp_path / "bad.h5", splits, {"label_names": list("abcd")})
        with pytest.raises(DspError, match=message) as err:
            loader(str(path))
        assert "\n" not in str(err.value) and "bad.h5" in str(err.value), str(err.value)
    (tmp_path / "plain.h5").write_text("not hdf5")
    with pytest.raises(DspError, match="plain.h5 is not a readable HDF5 file"):
        load_hdf5(str(tmp_path / "plain.h5"))
    with pytest.raises(DspError, match="data file not found"):
        load_hdf5(str(tmp_path / "none.h5"))
