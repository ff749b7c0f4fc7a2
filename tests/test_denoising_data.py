"""Denoising data (dsp.data.denoise), task (dsp.tasks.denoising) and PSNR, on tiny image folders."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dsp.data.denoise import DenoiseSplits, load_denoise_images
from dsp.errors import DspError
from dsp.metrics import psnr
from dsp.tasks import task_for
from dsp.tasks.denoising import DenoisingTask
from fixtures_images import write_plain_images

CROP = (8, 12)
SIGMA = 0.1
# (height, width): exact crop size, larger, one smaller than the crop (upscaled to 8×12), wide, tall
SIZES = [(10, 14), (8, 12), (20, 16), (6, 9), (12, 30), (9, 13), (16, 16), (11, 20)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_plain_images(tmp_path_factory.mktemp("plain") / "rgb", SIZES)


def load(folder, **kw):
    args = dict(subdir="rgb", crop=CROP, train=(1, 6), val=(5, 6), test=(7, 8), sigma=SIGMA)
    return load_denoise_images(folder.parent, **{**args, **kw})


def test_split_shapes(folder):
    data = load(folder)
    assert isinstance(data, DenoiseSplits) and data.crop == CROP and data.sigma == SIGMA
    assert (data.num_features, data.num_labels) == (1, 1)
    offsets, sizes = data.split("train").tensors
    assert sizes.dtype == torch.int64 and sizes.tolist() == [[10, 14], [8, 12], [20, 16], [8, 12], [12, 30], [9, 13]]
    counts = [h * w for h, w in sizes.tolist()]
    assert offsets.tolist() == [sum(counts[:i]) for i in range(6)]  # packed, no padding
    assert data.pixels.dtype == torch.uint8 and data.pixels.numel() == sum(counts)
    images = [data.train_image(i) for i in range(6)]
    assert images[0].shape == (10, 14) and images[0].dtype == torch.float32 and 0 < images[0].min()
    for split in ("val", "test"):
        noisy, clean = data.split(split).tensors
        assert noisy.shape == clean.shape == (2, *CROP) and noisy.dtype == clean.dtype == torch.float32
        assert 0 <= clean.min() and clean.max() <= 1
    # the central crop of image 5 (12×30): rows 2..9, columns 9..20
    assert torch.equal(data.val.tensors[1][0], images[4][2:10, 9:21])
    assert data.names == {"train": [f"img{k:03d}" for k in range(1, 7)], "val": ["img005", "img006"],
                          "test": ["img007", "img008"]}
    held = load(folder, val_holdout=True)
    assert held.train.tensors[0].shape[0] == 4 and held.names["train"][-1] == "img004"
    assert torch.equal(held.val.tensors[0], data.val.tensors[0])
    no_val = load(folder, val=None)
    assert no_val.val.tensors[0].shape == (6, *CROP) and no_val.names["val"] == no_val.names["train"]
    task = task_for(data)
    assert isinstance(task, DenoisingTask) and task.crop == CROP and task.sigma == SIGMA


def _offset(crop: torch.Tensor, image: torch.Tensor, size) -> tuple[int, int]:
    """Where crop [ch, cw] lies inside image[:h, :w]; fails if nowhere."""
    (h, w), (ch, cw) = size, crop.shape
    for top in range(h - ch + 1):
        for left in range(w - cw + 1):
            if torch.equal(image[top : top + ch, left : left + cw], crop):
                return top, left
    raise AssertionError("crop is not a window of the image's valid region")


def test_batch_crops_lie_inside_and_vary(folder):
    data = load(folder)
    task = task_for(data)
    x, y = data.split("train").tensors
    torch.manual_seed(0)
    seen = {i: set() for i in range(x.shape[0])}
    for _ in range(60):
        noisy, clean = task.batch(x, y)
        assert noisy.shape == clean.shape == (6, *CROP)
        assert (clean > 0).all()  # the images have no zeros: a zero would come from outside them
        for i in range(x.shape[0]):
            seen[i].add(_offset(clean[i], data.train_image(i), y[i].tolist()))
    rooms = [(h - CROP[0] + 1) * (w - CROP[1] + 1) for h, w in y.tolist()]
    for i, room in enumerate(rooms):  # _offset: never outside; small rooms: every offset drawn
        assert len(seen[i]) == room if room <= 9 else len(seen[i]) > 20
    noisy, clean = task.batch(x.repeat(50), y.repeat(50, 1))
    assert abs((noisy - clean).std().item() - SIGMA) < 0.01  # fresh Gaussian noise σ
    again = task.batch(x, y)
    assert not torch.equal(again[0], noisy[:6])


def test_eval_noise_is_fixed_per_image(folder):
    a, b = load(folder), load(folder)
    for split in ("val", "test"):
        assert torch.equal(a.split(split).tensors[0], b.split(split).tensors[0])
    noise = a.test.tensors[0] - a.test.tensors[1]
    assert abs(noise.std().item() - SIGMA) < 0.03 and (a.test.tensors[0] > 1).any()  # not clipped
    # image 8's noise does not depend on which other images are loaded, nor on the split
    alone = load(folder, train=(1, 3), val=(8, 8), test=(7, 7))
    assert torch.equal(alone.val.tensors[0][0], a.test.tensors[0][1])
    assert torch.equal(load(folder, test=(8, 8)).test.tensors[0][0], a.test.tensors[0][1])
    assert not torch.equal(load(folder, noise_seed=1).test.tensors[0], a.test.tensors[0])


def test_psnr_hand_case():
    target = torch.zeros(2, 2, 2)
    target[0] = 0.1  # MSE 0.01 -> 20 dB
    target[1, 0, 0] = 0.5  # MSE 0.25 / 4 = 0.0625 -> 10 log10 16 = 12.0412 dB
    pred = torch.zeros(2, 2, 2)
    pred[1, 1, 1] = -0.3  # clamped to 0 before scoring
    assert psnr(pred, target) == pytest.approx((20 + 10 * math.log10(16)) / 2, abs=1e-6)  # float32 0.1
    assert psnr(target, target) == pytest.approx(100.0)  # MSE floored at 1e-10
    assert psnr(torch.full((1, 5), 1.7), torch.ones(1, 5)) == pytest.approx(100.0)


def test_arrays_and_figures(folder):
    data = load(folder, val=None)
    task = task_for(data)
    x, y = data.val.tensors  # 6 examples
    out = x * 0.5 + 0.6  # some predictions above 1
    metrics = task.evaluate(out, y)
    assert set(metrics) == {"psnr", "mse"} and metrics["psnr"] == pytest.approx(psnr(out, y))
    assert metrics["mse"] == pytest.approx((out.clamp(0, 1) - y).pow(2).mean().item())
    arrays = task.arrays(out, y, None, x=x)
    assert set(arrays) == {"pred", "target", "noisy"}
    for v in arrays.values():
        assert v.dtype == np.float32 and v.shape == (6, *CROP) and 0 <= v.min() and v.max() <= 1
    assert set(task.arrays(out, y)) == {"pred", "target"}
    grid = task.figures(out, y, x)["denoising"]
    h, w = CROP
    assert grid.dtype == np.uint8 and grid.shape == (3 * h + 4, 4 * w + 6)  # 4 examples, 2-pixel gutters
    assert (grid[h : h + 2] == 255).all() and (grid[:, w : w + 2] == 255).all()
    assert np.array_equal(grid[:h, :w], (x[0].clamp(0, 1) * 255).round().numpy().astype(np.uint8))
    assert np.array_equal(grid[2 * h + 4 :, w + 2 : 2 * w + 2], (y[1] * 255).round().numpy().astype(np.uint8))
    assert task.figures(out[:1], y[:1], x[:1])["denoising"].shape == (3 * h + 4, w)


class _Model(torch.nn.Module):
    is_structured = True

    def features(self, x):
        return x

    def local_probs(self, feats):
        return feats.clamp(0, 1)


def test_predict_modes(folder):
    data = load(folder)
    task = task_for(data)
    x, y = data.test.tensors
    grad_modes = []

    def inference(model, feats):
        grad_modes.append(torch.is_grad_enabled())  # gradient-based inference needs autograd
        z = feats.clone().requires_grad_(True)
        return SimpleNamespace(y=z * 0.5, iterations=3)

    out, iters = task.predict(_Model(), inference, x, y, batch_size=1, mode="inference")
    assert torch.allclose(out, x * 0.5) and not out.requires_grad and iters == 3 and grad_modes == [True, True]
    out, iters = task.predict(_Model(), inference, x, y, batch_size=1, mode="local")
    assert torch.equal(out, x.clamp(0, 1)) and iters == 0 and len(grad_modes) == 2
    with pytest.raises(DspError, match="split=val or split=test"):
        task.predict(_Model(), inference, *data.train.tensors, batch_size=4, mode="local")


def test_save_png_roundtrip(tmp_path):
    from PIL import Image

    from dsp.cli.evaluate import save_png

    img = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    save_png(img, tmp_path / "eval" / "denoising.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "eval" / "denoising.png")), img)
    assert [p.name for p in (tmp_path / "eval").iterdir()] == ["denoising.png"]  # no temp file left


def test_errors(folder, tmp_path):
    with pytest.raises(DspError, match="image folder not found: .*nowhere"):
        load_denoise_images(tmp_path / "nowhere")
    (tmp_path / "empty" / "rgb").mkdir(parents=True)
    with pytest.raises(DspError, match="holds no images"):
        load_denoise_images(tmp_path / "empty")
    with pytest.raises(DspError, match=r"data.test=\[7, 9\] is out of range: .*images 1..8"):
        load(folder, test=(7, 9))
    with pytest.raises(DspError, match=r"data.val=\[6, 5\] is empty"):
        load(folder, val=(6, 5))
    with pytest.raises(DspError, match="data.train must be a range"):
        load(folder, train="abc")
    with pytest.raises(DspError, match="overlap"):
        load(folder, train=(1, 7))
    with pytest.raises(DspError, match="overlap"):
        load(folder, val=(6, 7))
    with pytest.raises(DspError, match="leaves no training images"):
        load(folder, train=(1, 2), val=(1, 2), val_holdout=True)
    with pytest.raises(DspError, match=r"data.crop=\[8, 40\].*larger than every image"):
        load(folder, crop=(8, 40))
    with pytest.raises(DspError, match=r"data.crop=\[0, 12\] must be positive"):
        load(folder, crop=(0, 12))
    for sigma in (0, -0.1, "x"):
        with pytest.raises(DspError, match="data.sigma must be a number > 0"):
            load(folder, sigma=sigma)
