import gc

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from dsp.data.hdf5_stream import PrefetchBatches, cache_to_hdf5, write_splits_h5
from dsp.data.splits import MultiLabelSplits
from dsp.errors import DspError


@pytest.fixture
def stored(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train": {"x": rng.integers(0, 256, (37, 2, 3), dtype=np.uint8), "y": rng.integers(0, 5, (37, 2))},
        "val": {"x": rng.normal(size=(300, 2)).astype(np.float32), "y": np.arange(300)},
    }
    path = write_splits_h5(tmp_path / "d.h5", arrays, {"words": ["ab", "cd"]})
    return path, arrays


def test_write_splits_h5_layout(stored):
    path, arrays = stored
    assert not list(path.parent.glob("*.tmp*"))  # written atomically, nothing left behind
    with h5py.File(path) as f:
        assert list(f.attrs["words"]) == ["ab", "cd"]
        assert f["train/x"].chunks[1:] == (2, 3)  # chunked along the first axis only
        np.testing.assert_array_equal(f["val/y"][()], arrays["val"]["y"])


@pytest.mark.parametrize("split, batch, start", [("train", 8, 3), ("val", 7, 0)])
def test_prefetch_matches_plain_indexing(stored, split, batch, start):
    """Random permutation with repeats, uneven last batch, start offset, several dtypes."""
    path, arrays = stored
    n = len(arrays[split]["y"])
    order = torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(1)), torch.tensor([4, 4, 0])])
    loader = PrefetchBatches(path, split, order, batch, start=start, depth=2)
    got = list(loader)
    assert len(got) == len(loader) == -(-(len(order) - start) // batch)
    assert got[-1][1].shape[0] == ((len(order) - start) % batch or batch)
    x, y = arrays[split]["x"], arrays[split]["y"]
    want_x = x.astype(np.float32) / 255 if x.dtype == np.uint8 else x
    for k, (xb, yb) in enumerate(got):
        idx = order[start + k * batch : start + (k + 1) * batch].numpy()
        assert xb.dtype == torch.float32
        np.testing.assert_allclose(xb.numpy(), want_x[idx], rtol=0, atol=1e-7)
        np.testing.assert_array_equal(yb.numpy(), y[idx])
    assert list(loader) == []  # one pass only; the reader is gone
    assert not loader._thread.is_alive()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_prefetch_pins_batches_for_asynchronous_copies(stored):
    path, arrays = stored
    plain = list(PrefetchBatches(path, "train", torch.arange(37), 8))
    pinned = list(PrefetchBatches(path, "train", torch.arange(37), 8, pin_memory=True))
    assert all(t.is_pinned() for batch in pinned for t in batch)
    assert all(torch.equal(a, b) for pb, qb in zip(plain, pinned) for a, b in zip(pb, qb))


def test_prefetch_early_break_and_gc_stop_the_reader(stored):
    path, _ = stored
    order = np.arange(37)
    with PrefetchBatches(path, "train", order, 2, depth=1) as loader:
        for _ in loader:
            break  # the reader is blocked on a full queue here
    assert not loader._thread.is_alive()
    loader = PrefetchBatches(path, "train", order, 2, depth=1)
    next(loader)
    thread = loader._thread
    del loader
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()


def test_prefetch_reader_errors_surface(stored, tmp_path):
    path, _ = stored

    calls = []

    def transform(x, y):  # fails on the second batch
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("bad batch")
        return torch.from_numpy(x), torch.from_numpy(y)

    order = np.arange(37)
    loader = PrefetchBatches(path, "train", order, 10, transform=transform)
    assert next(loader)[0].shape == (10, 2, 3)
    with pytest.raises(ValueError, match="bad batch"):
        next(loader)
    assert not loader._thread.is_alive()
    loader = PrefetchBatches(path, "train", order, 10)
    path.unlink()  # the reader opens the file only when iteration starts
    with pytest.raises(OSError):
        next(loader)
    with pytest.raises(DspError, match="cannot read split"):
        PrefetchBatches(tmp_path / "missing.h5", "train", order, 10)
    with pytest.raises(ValueError, match="outside"):
        PrefetchBatches(write_splits_h5(tmp_path / "e.h5", {"train": {"x": np.zeros((3, 1)), "y": np.zeros(3)}}),
                        "train", [0, 3], 1)


def test_cache_to_hdf5_round_trip(tmp_path):
    x, y = torch.rand(9, 4), (torch.rand(9, 3) > 0.5).float()
    data = MultiLabelSplits(TensorDataset(x[:5], y[:5]), TensorDataset(x[5:7], y[5:7]),
                            TensorDataset(x[7:], y[7:]), label_names=["a", "b", "c"])
    path = cache_to_hdf5(data, tmp_path / "c.h5")
    with h5py.File(path) as f:
        assert list(f.attrs["label_names"]) == ["a", "b", "c"]
    for name in ("train", "val", "test"):
        xs, ys = data.split(name).tensors
        (xb, yb), = PrefetchBatches(path, name, torch.arange(len(xs)), 100)
        assert torch.equal(xb, xs) and torch.equal(yb, ys)
