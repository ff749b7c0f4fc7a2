"""Binary segmentation: IoU metrics on hand cases, the image/mask folder loader, the task, the UNet."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from dsp import interfaces as I

from dsp.data.images import ImageMaskSplits, load_horses
from dsp.errors import DspError
from dsp.nn.unet import UNet
from dsp.tasks import task_for
from dsp.tasks.segmentation import SegmentationTask, global_iou, mean_iou
from fixtures_images import write_image_folder


def masks(*rows):
    return torch.tensor(rows, dtype=torch.uint8).reshape(len(rows), 2, 2)


def test_iou_hand_cases():
    pred = masks([1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0])
    target = masks([1, 0, 0, 0], [1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0])
    # per image: 1/2, 1/3, empty & empty = 1, 0/1 = 0  -> mean 11/24
    assert mean_iou(pred, target) == pytest.approx(100 * (0.5 + 1 / 3 + 1 + 0) / 4)
    # over all pixels: intersections 1 + 1 + 0 + 0 = 2, unions 2 + 3 + 0 + 1 = 6
    assert global_iou(pred, target) == pytest.approx(100 * 2 / 6)
    assert mean_iou(target, target) == global_iou(target, target) == 100.0
    empty = masks([0, 0, 0, 0])
    assert mean_iou(empty, empty) == global_iou(empty, empty) == 100.0


def test_task_decodes_at_one_half_and_saves_arrays():
    task = SegmentationTask()
    probs = torch.tensor([[[0.9, 0.5], [0.49, 0.1]]])  # [1, 2, 2]
    y = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert task.calibrate(probs, y, "tune") is None
    # prediction {(0,0), (0,1)}, target {(0,0), (1,0)}: IoU 1/3
    # soft IoU before rounding: Σ min = 0.9 + 0 + 0.49 + 0 = 1.39, Σ max = 1 + 0.5 + 1 + 0.1 = 2.6
    assert task.evaluate(probs, y) == pytest.approx({"mean_iou": 100 / 3, "global_iou": 100 / 3,
                                                     "soft_mean_iou": 100 * 1.39 / 2.6})
    arrays = task.arrays(probs, y)
    assert arrays["pred"].tolist() == [[[1, 1], [0, 0]]] and arrays["pred"].dtype.name == "uint8"
    assert arrays["target"].dtype.name == "uint8" and arrays["score"].dtype.name == "float32"


def test_loader_shapes_ranges_and_task(tmp_path):
    root = write_image_folder(tmp_path / "imgs", n=8)
    data = load_horses(root, size=12, train=(1, 6), val=(5, 6), test=(7, 8))
    assert isinstance(data, ImageMaskSplits) and isinstance(task_for(data), SegmentationTask)
    assert data.names == {"train": ["img001", "img002", "img003", "img004"], "val": ["img005", "img006"],
                          "test": ["img007", "img008"]}
    x, y = data.split("train").tensors
    assert x.shape == (4, 3, 12, 12) and y.shape == (4, 12, 12)
    assert x.dtype == y.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert data.num_features == 3 and data.num_labels == 2
    # the ellipse is the bright part of the image: the mask and the image agree
    bright = x.mean(1) > 0.4
    assert (bright == y.bool()).float().mean() > 0.9
    gray = load_horses(root, size=10, train=(1, 6), val=None, test=(7, 8), grayscale=True)
    assert gray.split("train").tensors[0].shape == (6, 1, 10, 10)
    assert torch.equal(gray.split("val").tensors[1], gray.split("train").tensors[1])  # val=None: train


def test_loader_errors_name_the_file_and_the_fix(tmp_path):
    root = write_image_folder(tmp_path / "imgs", n=4)
    with pytest.raises(DspError, match=r"image folder not found: .*nowhere.*data.root"):
        load_horses(tmp_path / "nowhere")
    with pytest.raises(DspError, match=r"data.train=\[1, 200\] is out of range.*1..4"):
        load_horses(root)
    with pytest.raises(DspError, match="overlap"):
        load_horses(root, train=(1, 3), test=(3, 4), val=(3, 3))
    with pytest.raises(DspError, match="must be a part of data.train"):
        load_horses(root, train=(1, 2), test=(3, 4), val=(2, 3))
    with pytest.raises(DspError, match="range"):
        load_horses(root, train="abc", test=(3, 4))
    (root / "figure_ground" / "img002.jpg").unlink()
    with pytest.raises(DspError, match=r"img002.jpg has no mask .*figure_ground"):
        load_horses(root, train=(1, 2), test=(3, 4), val=None)
    (root / "rgb" / "img002.jpg").unlink()
    (root / "rgb" / "img003.jpg").write_bytes(b"not an image")
    with pytest.raises(DspError, match=r"cannot read image .*img003.jpg"):
        load_horses(root, train=(1, 2), test=(3, 3), val=None)


@pytest.mark.parametrize("size", [(16, 16), (15, 9)])
def test_unet_keeps_the_resolution(size):
    x = torch.rand(2, 3, *size)
    assert UNet(3, 1, base_width=4, depth=2)(x).shape == (2, 1, *size)
    assert UNet(3, None, base_width=4, depth=2)(x, lengths=None).shape == (2, 4, *size)
    assert UNet(3, 1, base_width=4, depth=0)(x).shape == (2, 1, *size)


@pytest.mark.parametrize("ema", [[], ["trainer.ema_decay=0.9"]], ids=["live", "ema"])
def test_online_preset_trains_and_evaluates_on_the_fixture(tmp_path, ema):
    """experiment=gcrf_horses_online end to end on the tiny folder: online scaling, checkpoints,
    dsp-eval's metrics and predictions.npz arrays; with a weight average, α is chosen for the
    average and the live weights train with the same α."""
    from hydra import compose, initialize_config_dir

    from dsp.cli.common import config_dir
    from dsp.cli.evaluate import evaluate_run
    from dsp.cli.train import train
    from fixtures_images import tiny_images_overrides

    root = write_image_folder(tmp_path / "imgs", n=8)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=gcrf_horses_online", *tiny_images_overrides(root),
                                           "model.pairwise.base_width=4", "model.pairwise.depth=1", *ema])
    metrics = train(cfg, tmp_path / "run")
    if ema:
        last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
        assert last["ema_updates"] > 0
        assert last["train_model"]["unary_scale"] == last["model"]["unary_scale"]
    assert metrics.monitor == "mean_iou" and {"val/mean_iou", "test/global_iou"} <= set(metrics)
    evaluated, arrays = evaluate_run(tmp_path / "run", split="test")
    assert evaluated["test/mean_iou"] == pytest.approx(metrics["test/mean_iou"])
    assert arrays["pred"].shape == arrays["target"].shape == arrays["score"].shape == (2, 32, 32)
    # predict=local: the CRF's unaries alone, σ(α u), with no linear solve
    from dsp.build import load_run

    local, local_arrays = evaluate_run(tmp_path / "run", split="test", predict="local")
    run = load_run(tmp_path / "run")
    x, _ = run.data().split("test").tensors
    with torch.no_grad():
        unary_only = torch.sigmoid(run.model.features(x).unary)
    assert local["test/inference_iters"] == 0 and metrics["test/inference_iters"] > 0
    assert np.allclose(local_arrays["score"], unary_only.numpy(), atol=1e-6)
    assert not np.allclose(local_arrays["score"], arrays["score"], atol=1e-3)
    with pytest.raises(DspError, match="choose inference or local"):
        evaluate_run(tmp_path / "run", predict="unary")


def test_stage_preset_builds_on_a_trained_unet_and_keeps_it_frozen(tmp_path, capsys):
    """experiment=gcrf_horses_stage warm-started from a unet_horses run with its unary stage
    skipped: only the pairwise stage runs, and it leaves every unary tensor (BatchNorm statistics
    included) as the UNet left it."""
    from hydra import compose, initialize_config_dir

    from dsp.cli.common import config_dir
    from dsp.cli.train import train
    from fixtures_images import tiny_images_overrides

    root = write_image_folder(tmp_path / "imgs", n=8)
    small_pairwise = ["model.pairwise.base_width=4", "model.pairwise.depth=1"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        unet = compose("config", overrides=["experiment=unet_horses", *tiny_images_overrides(root)])
        stage = compose("config", overrides=["experiment=gcrf_horses_stage", *tiny_images_overrides(root),
                                             *small_pairwise, f"trainer.init_from={tmp_path / 'unet'}",
                                             "trainer.init_parts=[unary]", "trainer.stages.unary=null",
                                             "trainer.stages.joint=null", "trainer.ema_decay=null"])
    train(unet, tmp_path / "unet")
    capsys.readouterr()
    metrics = train(stage, tmp_path / "stage")
    log = capsys.readouterr().out
    assert "test/mean_iou" in metrics
    before = torch.load(tmp_path / "unet" / "checkpoints" / "best.pt", weights_only=True)["model"]
    after = torch.load(tmp_path / "stage" / "checkpoints" / "last.pt", weights_only=True)["model"]
    unary = [k for k in before if k.startswith("unary.")]
    assert unary and all(torch.equal(before[k], after[k]) for k in unary)
    assert any(k.endswith("running_mean") for k in unary)
    assert "warm start:" in log and "stage pairwise:" in log and "stage unary:" not in log


@pytest.mark.parametrize("split", ["train", "val"])
def test_online_scaling_chooses_alpha_on_the_configured_split(tmp_path, monkeypatch, split):
    """trainer.online_scaling.split: Algorithm 1 scores α on training images; split=val (the ablation)
    on the validation images, and the α it returns is the model's."""
    from hydra import compose, initialize_config_dir

    import dsp.training.scaling as scaling_module
    from dsp.cli.common import config_dir
    from dsp.cli.train import train
    from fixtures_images import tiny_images_overrides

    seen = []

    def spy(model, objective, x, y, **kwargs):
        seen.append(x.shape[0])
        model.unary_scale.fill_(0.25)
        return {"scaling/alpha": 0.25}

    monkeypatch.setattr(scaling_module, "choose_unary_scale", spy)  # (called by the OnlineScaling hook)
    root = write_image_folder(tmp_path / "imgs", n=8)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=gcrf_horses_online", *tiny_images_overrides(root),
                                           "model.pairwise.base_width=4", "model.pairwise.depth=1",
                                           "trainer.max_epochs=2", "trainer.ema_decay=null",
                                           f"trainer.online_scaling.split={split}"])
    train(cfg, tmp_path / "run")
    from dsp.build import load_run

    data = load_run(tmp_path / "run").data()
    sizes = {s: data.split(s).tensors[0].shape[0] for s in ("train", "val")}
    assert sizes["train"] != sizes["val"]
    assert seen == [sizes[split]] * 2  # once after every epoch, on the configured split
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert last["model"]["unary_scale"].item() == 0.25


@pytest.mark.parametrize("setting, message", [("+trainer.online_scaling.spilt=val", "unknown key(s) ['spilt']"),
                                              ("trainer.online_scaling.split=test", "use train (Algorithm 1) or val"),
                                              ("trainer.online_scaling.min_exp=3", "min_exp must not exceed max_exp")])
def test_bad_online_scaling_settings_are_named_before_training(tmp_path, setting, message):
    from hydra import compose, initialize_config_dir

    from dsp.cli.common import config_dir
    from dsp.cli.train import train
    from fixtures_images import tiny_images_overrides

    root = write_image_folder(tmp_path / "imgs", n=8)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=gcrf_horses_online", *tiny_images_overrides(root),
                                           "trainer.online_scaling.max_exp=-3", setting])
    with pytest.raises(DspError, match=re.escape(message)):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_horses64_keeps_the_horses32_protocol_at_four_times_the_pixels(tmp_path):
    """data=horses64 (the issue's higher-resolution config) under a preset: the split and crop keys
    of horses32, size 64, and training, metrics and predictions at 64×64."""
    from hydra import compose, initialize_config_dir

    from dsp.cli.common import config_dir
    from dsp.cli.evaluate import evaluate_run
    from dsp.cli.train import train
    from fixtures_images import tiny_images_overrides

    root = write_image_folder(tmp_path / "imgs", n=8)
    tiny = [o for o in tiny_images_overrides(root) if not o.startswith("data.size=")]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        base = compose("config", overrides=["experiment=unet_horses"])
        cfg = compose("config", overrides=["experiment=unet_horses", "data=horses64", *tiny])
        plain = compose("config", overrides=["experiment=unet_horses", "data=horses64"])
    assert plain.data.size == 64 and base.data.size == 32
    assert {k: v for k, v in plain.data.items() if k != "size"} == {k: v for k, v in base.data.items() if k != "size"}
    train(cfg, tmp_path / "run")
    _, arrays = evaluate_run(tmp_path / "run", split="test")
    assert arrays["pred"].shape == arrays["target"].shape == (2, 64, 64)


# ------------------------------------------------------------------ the crop protocol (DVN §5.2, §5.4)
from dataclasses import dataclass  # noqa: E402

from dsp.tasks.segmentation import average_crops, crop_grid, take_crops  # noqa: E402


def position_images(b=3, c=2, h=7, w=9):
    """x [b, c, h, w] whose every value is unique and tells its place: b·1000 + c·100 + row·10 + col,
    and masks y [b, h, w] = channel 0 of x."""
    bb, cc, rr, qq = torch.meshgrid(*(torch.arange(n) for n in (b, c, h, w)), indexing="ij")
    x = (bb * 1000 + cc * 100 + rr * 10 + qq).float()
    return x, x[:, 0].clone()


def test_training_crops_are_windows_inside_the_image_and_vary():
    x, y = position_images()
    task = SegmentationTask(crop=4)
    corners = set()
    torch.manual_seed(0)
    for _ in range(100):
        xc, yc = task.batch(x, y)
        assert xc.shape == (3, 2, 4, 4) and yc.shape == (3, 4, 4)
        for b in range(3):
            r, q = int(xc[b, 0, 0, 0]) % 100 // 10, int(xc[b, 0, 0, 0]) % 10  # the window's top-left pixel
            assert 0 <= r <= 7 - 4 and 0 <= q <= 9 - 4
            assert torch.equal(xc[b], x[b, :, r : r + 4, q : q + 4]) and torch.equal(yc[b], y[b, r : r + 4, q : q + 4])
            corners.add((r, q))
    assert len(corners) == 4 * 6  # every position of a 4×4 window in 7×9 is drawn
    assert task.batch(x, y)[0] is not task.batch(x, y)[0]
    whole = SegmentationTask()
    assert whole.batch(x, y)[0] is x  # no crop: the batch as it is


def test_flipped_training_crops_mirror_image_and_mask_together():
    x, y = position_images(b=64)
    torch.manual_seed(0)
    xc, yc = SegmentationTask(crop=4, flip=True).batch(x, y)
    mirrored = xc[:, 0, 0, 0] > xc[:, 0, 0, -1]  # columns run backwards
    assert 0 < mirrored.sum() < 64
    assert torch.equal(xc[:, 0], yc)  # the mask follows its image
    unflipped = torch.where(mirrored[:, None, None, None], xc.flip(-1), xc)
    assert ((unflipped[..., 1:] - unflipped[..., :-1]) == 1).all()  # a plain window again


def test_crop_grid_places_36_crops_evenly_and_take_crops_cuts_them():
    grid = crop_grid((32, 32), 24, 36)
    assert grid.shape == (36, 2)
    assert grid[:6, 1].tolist() == [0, 2, 3, 5, 6, 8] and grid[::6, 0].tolist() == [0, 2, 3, 5, 6, 8]
    assert crop_grid((32, 32), 24, 9)[:3, 1].tolist() == [0, 4, 8]
    assert crop_grid((32, 30), 24, 1).tolist() == [[4, 3]]  # one crop: centred
    x, y = position_images(h=32, w=32)
    crops = take_crops(x, grid, 24)
    assert crops.shape == (3, 36, 2, 24, 24) and take_crops(y, grid, 24).shape == (3, 36, 24, 24)
    assert torch.equal(crops[2, 6 + 3], x[2, :, 2:26, 5:29])  # row offset 2, column offset 5


@dataclass
class Feats:
    features: torch.Tensor  # [B, C, h, w] the crops
    logits: torch.Tensor  # [B, h, w] zeros: the shape of ȳ
    unary: torch.Tensor  # [B, h, w] logits of the local prediction

    def detach(self):
        return self


class CropConstant(I.Model):
    """A 'model' that predicts, for each crop, a constant mask: the crop's top-left value of
    channel 0 (the task reads its local prediction σ(feats.unary))."""

    structured = classmethod(lambda cls, config: False)

    def local_probs(self, feats):
        return torch.sigmoid(feats.unary)

    def prediction(self, x):
        return x[:, 0, :1, :1].expand(x.shape[0], *x.shape[-2:])  # [B, h, w]

    def features(self, x):
        unary = torch.logit(self.prediction(x).double()).float()  # σ(unary) = the prediction
        return Feats(x, x.new_zeros(x.shape[0], *x.shape[-2:]), unary)


def test_mask_averaging_by_hand_on_four_crops():
    """4×4 image, 3×3 crops at (0,0) (0,1) (1,0) (1,1) predicting a, b, c, d: each pixel is the mean
    over the crops that hold it."""
    a, b, c, d = 0.1, 0.2, 0.4, 0.8
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0], x[0, 0, 0, 1], x[0, 0, 1, 0], x[0, 0, 1, 1] = a, b, c, d
    corners = crop_grid((4, 4), 3, 4)
    assert corners.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    model = CropConstant()
    crops = take_crops(x, corners, 3).flatten(0, 1)  # [4, 1, 3, 3]
    out = average_crops(model.prediction(crops).view(1, 4, 3, 3), corners, (4, 4))[0]
    expected = torch.tensor([[a, (a + b) / 2, (a + b) / 2, b],
                             [(a + c) / 2, (a + b + c + d) / 4, (a + b + c + d) / 4, (b + d) / 2],
                             [(a + c) / 2, (a + b + c + d) / 4, (a + b + c + d) / 4, (b + d) / 2],
                             [c, (c + d) / 2, (c + d) / 2, d]])
    assert torch.allclose(out, expected)


class Identity(CropConstant):
    """Predicts its input's channel 0 (local), or has E(ȳ) = ||ȳ - x_0||² (inference)."""

    is_structured = True

    def prediction(self, x):
        return x[:, 0]

    def energy(self, y, feats):
        return (y.view_as(feats.logits) - feats.features[:, 0]).pow(2).flatten(1).sum(-1)  # [B]


def test_36_crop_prediction_of_constant_and_identity_models_gives_the_full_mask():
    from dsp.inference.gradient import GradientInference

    x = torch.rand(5, 3, 32, 32).clamp(0.01, 0.99)
    y = (x[:, 0] > 0.5).float()
    task = SegmentationTask(crop=24, test_crops=36)
    const = CropConstant()
    probs, iters = task.predict(const, None, x.new_full(x.shape, 0.3), y, batch_size=40, mode="local")
    assert probs.shape == (5, 32, 32) and torch.allclose(probs, torch.full_like(probs, 0.3)) and iters == 0
    probs, _ = task.predict(Identity(), None, x, y, batch_size=72, mode="local")  # 2 images per chunk
    assert torch.allclose(probs, x[:, 0], atol=1e-5)
    # joint inference: one 32×32 mask, every pixel steps by the mean gradient of its crops -> x_0
    ascent = GradientInference(method="projected", lr=0.25, momentum=0.0, max_iter=60, rel_tol=0.0, abs_tol=0.0,
                               init="constant", init_value=0.0)
    joint = SegmentationTask(crop=24, test_crops=36, combine="joint")
    probs, iters = joint.predict(Identity(), ascent, x, y, batch_size=100, mode="inference")
    assert probs.shape == (5, 32, 32) and iters == 60 and torch.allclose(probs, x[:, 0], atol=1e-4)
    probs, _ = task.predict(Identity(), ascent, x, y, batch_size=100, mode="inference")  # averaging, per crop
    assert torch.allclose(probs, x[:, 0], atol=1e-4)
    with pytest.raises(DspError, match="combine=average"):
        joint.predict(const, None, x, y, batch_size=100, mode="local")


def test_loader_carries_the_crop_protocol_to_the_task_and_checks_it(tmp_path):
    root = write_image_folder(tmp_path / "imgs", n=8)
    data = load_horses(root, size=12, train=(1, 6), val=(5, 6), test=(7, 8), crop=8, test_crops=9, combine="joint")
    task = task_for(data)
    assert (task.crop, task.flip, task.test_crops, task.combine) == (8, False, 9, "joint")
    assert task_for(load_horses(root, size=12, train=(1, 6), val=(5, 6), test=(7, 8))).crop is None
    kept = load_horses(root, size=12, train=(1, 6), val=(5, 6), test=(7, 8), val_holdout=False)
    assert kept.names["train"] == [f"img00{k}" for k in range(1, 7)] and kept.names["val"] == ["img005", "img006"]
    for bad, match in [({"crop": 13}, "data.crop=13"), ({"test_crops": 9}, "needs data.crop"),
                       ({"crop": 8, "test_crops": 10}, "square"), ({"crop": 10, "test_crops": 16}, "positions"),
                       ({"crop": 8, "combine": "max"}, "data.combine")]:
        with pytest.raises(DspError, match=match):
            load_horses(root, size=12, train=(1, 6), val=(5, 6), test=(7, 8), **bad)


# ------------------------------------------------------------- training augmentation (data.augment)
import math  # noqa: E402

from dsp.data.augment import (affine_matrices, augment_batch, augment_settings, warp, warp_from_source,  # noqa: E402
                               warp_matrices)


def one_warp(x, y, zoom=1.0, angle=0.0, shift=(0.0, 0.0)):
    theta = affine_matrices(torch.tensor([zoom]), torch.tensor([angle]), torch.tensor([shift]))
    return warp(x, y, theta)


def test_warps_by_hand_shift_rotation_and_zoom():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = torch.zeros(1, 4, 4)
    y[0, 1, 2] = 1.0
    # a shift of a quarter of the side (0.5 in normalised units) to the right: one pixel, the first
    # column repeats the border
    xs, ys = one_warp(x, y, shift=(0.5, 0.0))
    assert torch.allclose(xs[0, 0, :, 1:], x[0, 0, :, :-1]) and torch.allclose(xs[0, 0, :, 0], x[0, 0, :, 0])
    assert ys[0].nonzero().tolist() == [[1, 3]]
    # a quarter turn maps pixel centres onto pixel centres: exactly a rot90 of image and mask
    xr, yr = one_warp(x, y, angle=math.pi / 2)
    assert torch.allclose(xr[0, 0], torch.rot90(x[0, 0], -1, (0, 1)), atol=1e-5)
    assert torch.equal(yr[0], torch.rot90(y[0], -1, (0, 1)))
    # zoom 2 about the centre: output pixel (1, 1), centre (-0.25, -0.25) in normalised units, samples
    # the input at (-0.125, -0.125), i.e. pixel (1.25, 1.25): 5 + 0.25·1 + 0.25·4 between 5, 6, 9, 10
    xz, _ = one_warp(x, y, zoom=2.0)
    assert torch.allclose(xz[0, 0, 1:3, 1:3], torch.tensor([[6.25, 6.75], [8.25, 8.75]]))


def test_a_quarter_turn_of_a_tall_image_is_rigid_in_pixels():
    """H = 6, W = 2: the normalised axes differ in pixels by 3×, so the rotation needs aspect = W/H;
    the central 2×2 block then turns exactly like a rot90 (without it, it samples off the centres)."""
    x = torch.arange(12.0).view(1, 1, 6, 2)
    theta = affine_matrices(torch.tensor([1.0]), torch.tensor([math.pi / 2]), torch.zeros(1, 2), aspect=2 / 6)
    xr, _ = warp(x, torch.zeros(1, 6, 2), theta)
    assert torch.allclose(xr[0, 0, 2:4], torch.rot90(x[0, 0, 2:4], -1, (0, 1)), atol=1e-5)
    torch.manual_seed(0)  # augment_batch passes the batch's W / H
    xa, _ = augment_batch(x, torch.zeros(1, 6, 2), augment_settings({"rotate": 90}))
    torch.manual_seed(0)
    assert torch.allclose(xa, warp(x, torch.zeros(1, 6, 2), warp_matrices(1, 0.0, 90.0, 0.0, aspect=1 / 3))[0])


def test_augmented_masks_follow_their_images_and_stay_binary():
    torch.manual_seed(0)
    y = (torch.rand(16, 12, 12) > 0.6).float()
    x = torch.cat([y.unsqueeze(1), torch.rand(16, 2, 12, 12)], 1)  # channel 0 is the mask itself
    settings = augment_settings({"scale": 0.2, "rotate": 20, "translate": 0.2})
    xa, ya = augment_batch(x, y, settings)
    assert xa.shape == x.shape and ya.shape == y.shape and set(ya.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(ya, y)  # warped ...
    assert torch.equal((xa[:, 0] >= 0.5).float(), ya)  # ... through the same grid as the image


def test_colour_changes_touch_the_image_only_and_stay_in_range():
    torch.manual_seed(0)
    x, y = torch.rand(32, 3, 6, 6) * 0.5 + 0.25, (torch.rand(32, 6, 6) > 0.5).float()
    xb, yb = augment_batch(x, y, augment_settings({"brightness": 0.2}))
    shift = xb - x
    assert torch.equal(yb, y) and shift.abs().max() <= 0.2 + 1e-6
    assert torch.allclose(shift, shift[:, :1, :1, :1].expand_as(shift), atol=1e-6)  # one constant per image
    assert shift[:, 0, 0, 0].std() > 0.05  # drawn per example
    xc, _ = augment_batch(x, y, augment_settings({"contrast": 0.5}))
    assert torch.allclose(xc.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-5)  # contrast keeps the mean here
    assert 0.0 <= augment_batch(x * 2, y, augment_settings({"brightness": 1.0}))[0].min() <= 1.0


def test_augment_settings_are_checked_with_the_key_in_the_message(tmp_path):
    assert augment_settings(None) == augment_settings({}) == {k: 0.0 for k in
                                                               ("scale", "rotate", "translate", "brightness", "contrast")}
    for bad, match in [({"zoom": 0.1}, "data.augment.zoom"), ({"scale": 1.0}, r"data.augment.scale=1.0"),
                       ({"rotate": -5}, "data.augment.rotate"), ({"translate": "far"}, "must be a number"),
                       ([1, 2], "mapping"), ({"rotate": True}, "must be a number, got True"),
                       ({"translate": 0.6}, r"data.augment.translate=0.6 is out of range: use 0 \(off\) ≤ translate ≤ 0.5")]:
        with pytest.raises(DspError, match=match):
            augment_settings(bad)
    root = write_image_folder(tmp_path / "imgs", n=8)
    data = load_horses(root, size=12, train=(1, 6), val=(5, 6), test=(7, 8), augment={"rotate": 10})
    task = task_for(data)
    assert task.augment["rotate"] == 10.0 and task.augmenting
    x, y = data.train.tensors
    torch.manual_seed(1)
    xa, ya = task.batch(x, y)
    assert xa.shape == x.shape and not torch.equal(xa, x)
    assert task_for(load_horses(root, size=12, train=(1, 6), val=(5, 6), test=(7, 8))).batch(x, y)[0] is x  # off: as is


def test_flip_mirrors_whole_images_too():
    x, y = position_images(b=64)
    torch.manual_seed(0)
    xf, yf = SegmentationTask(flip=True).batch(x, y)
    mirrored = xf[:, 0, 0, 0] > xf[:, 0, 0, -1]
    assert 0 < mirrored.sum() < 64 and torch.equal(xf[:, 0], yf)
    assert torch.equal(torch.where(mirrored[:, None, None, None], xf.flip(-1), xf), x)


def test_warping_the_larger_source_keeps_the_sub_pixel_edge_that_the_0_1_mask_lost():
    """A 4-pixel row whose true edge sits at 2.25 pixels (9 of 16 source pixels are foreground):
    its 0/1 mask is [1, 1, 0, 0]. Shifted right by 0.4 of a pixel the edge is at 2.65, past the
    centre of pixel 2 (2.5), so pixel 2 becomes foreground; warping the 0/1 mask interpolates 0.4
    there and keeps it background, the source path gets it right."""
    ys = torch.zeros(1, 1, 16)
    ys[..., :9] = 1.0
    xs = ys.unsqueeze(1).clone()  # [1, 1, 1, 16]: the image shows the mask
    small = torch.nn.functional.interpolate(xs, size=(1, 4), mode="bilinear", antialias=True)
    assert (small[0, 0, 0] >= 0.5).tolist() == [True, True, False, False]
    shift = affine_matrices(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([[2 * 0.4 / 4, 0.0]]))
    xb, yb = warp_from_source(xs, ys, shift, (1, 4))
    assert yb[0, 0].tolist() == [1.0, 1.0, 1.0, 0.0] and xb.shape == (1, 1, 1, 4)
    assert (xb[0, 0, 0] >= 0.5).tolist() == [True, True, True, False]  # image and mask still agree
    _, yl = warp(torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]]]), torch.tensor([[[1.0, 1.0, 0.0, 0.0]]]), shift)
    assert yl[0, 0].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_the_loader_keeps_a_larger_copy_of_the_training_rows_for_the_warps(tmp_path):
    root = write_image_folder(tmp_path / "imgs", n=8, size=(64, 48))
    warps = {"scale": 0.1, "rotate": 10, "translate": 0.1}
    data = load_horses(root, size=12, train=(1, 6), val=(5, 6), test=(7, 8), augment=warps, warp_source_scale=4,
                       jpeg_draft=False)
    xs, ys = data.warp_source
    x, y = data.train.tensors
    assert xs.shape == (4, 3, 48, 48) and ys.shape == (4, 48, 48)  # the 4 training rows (5-6 held out)
    assert ((ys > 0) & (ys < 1)).any()  # soft masks: the thresholding happens after the warp
    # row i of the source is row i of train: shrunk back, it is the training image
    small = torch.nn.functional.interpolate(xs, size=(12, 12), mode="bilinear", antialias=True)
    assert (small - x).abs().mean() < 0.02
    assert not torch.allclose(small[0], x[1], atol=0.05)
    # the task warps the rows it is given: an identity warp of rows (2, 0) gives those rows back
    task = task_for(data)
    task.augment = dict(task.augment, scale=1e-12, rotate=0.0, translate=0.0)
    xb, yb = task.batch(x[[2, 0]], y[[2, 0]], index=torch.tensor([2, 0]))
    assert (xb - x[[2, 0]]).abs().mean() < 0.02
    agree = ((yb > 0) & (y[[2, 0]] > 0)).sum() / ((yb > 0) | (y[[2, 0]] > 0)).sum()
    assert agree > 0.95
    # no source without geometric warps, or with scale 1
    assert load_horses(root, size=12, train=(1, 6), val=(5, 6), test=(7, 8), warp_source_scale=4).warp_source is None
    assert load_horses(root, size=12, train=(1, 6), val=(5, 6), test=(7, 8), augment=warps).warp_source is None
    for bad in (0, 2.5, True, "4"):
        with pytest.raises(DspError, match="data.warp_source_scale must be a whole number >= 1"):
            load_horses(root, size=12, train=(1, 6), val=(5, 6), test=(7, 8), warp_source_scale=bad)


def test_full_jpeg_decoding_is_the_plain_resize_of_the_original(tmp_path):
    from PIL import Image

    root = write_image_folder(tmp_path / "imgs", n=8, size=(160, 120))
    data = load_horses(root, size=12, train=(1, 6), val=None, test=(7, 8))  # the default: full decoding
    with Image.open(root / "rgb" / "img001.jpg") as im:
        plain = torch.tensor(np.asarray(im.convert("RGB").resize((12, 12), Image.BILINEAR)), dtype=torch.float32)
    assert torch.allclose(data.train.tensors[0][0], plain.permute(2, 0, 1) / 255.0)
    drafted = load_horses(root, size=12, train=(1, 6), val=None, test=(7, 8), jpeg_draft=True)
    assert not torch.allclose(drafted.train.tensors[0][0], plain.permute(2, 0, 1) / 255.0)


def test_training_warps_the_larger_copies_of_each_batchs_own_rows(tmp_path, monkeypatch):
    """dsp-train with data.warp_source_scale: the trainer hands the task each batch's training rows,
    and the warp resamples those rows' sources (checked against the batch's own 32×32 images)."""
    from hydra import compose, initialize_config_dir

    import dsp.data.augment as augment_module
    from dsp.cli.common import config_dir
    from dsp.cli.train import train
    from fixtures_images import tiny_images_overrides

    calls = []
    real = augment_module.augment_batch

    def spy(x, y, settings, source=None):
        assert source is not None
        shrunk = torch.nn.functional.interpolate(source[0], size=x.shape[-2:], mode="bilinear", antialias=True)
        calls.append(((shrunk - x).abs().mean().item(), (shrunk.roll(1, 0) - x).abs().mean().item()))
        return real(x, y, settings, source)

    monkeypatch.setattr("dsp.tasks.segmentation.augment_batch", spy)
    root = write_image_folder(tmp_path / "imgs", n=8, size=(128, 96))
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=unet_horses", *tiny_images_overrides(root),
                                           "data.warp_source_scale=2", "data.jpeg_draft=false",
                                           "trainer.max_epochs=2", "trainer.batch_size=2"])
    metrics = train(cfg, tmp_path / "run")
    assert len(calls) == 2 * 3  # 6 training rows (val_holdout=false): 3 batches of 2 an epoch
    assert max(own for own, _ in calls) < 0.02 < min(other for _, other in calls)  # x's own rows, not others
    assert "test/mean_iou" in metrics


def test_a_run_saved_before_jpeg_draft_existed_re_evaluates_with_draft_decoding(tmp_path):
    """Old horses runs decoded their JPEGs in draft mode; their stored configs lack data.jpeg_draft,
    and load_run must not score them on today's default (full decoding) without being asked."""
    from hydra import compose, initialize_config_dir

    from dsp.build import load_run
    from dsp.cli.common import config_dir
    from dsp.cli.evaluate import evaluate_run
    from dsp.cli.train import train
    from fixtures_images import tiny_images_overrides

    root = write_image_folder(tmp_path / "imgs", n=8, size=(160, 120))
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=unet_horses", *tiny_images_overrides(root),
                                           "data.jpeg_draft=true"])
    metrics = train(cfg, tmp_path / "run")
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=False)
    del state["config"]["data"]["jpeg_draft"]  # as saved before the key existed
    torch.save(state, best)
    assert load_run(tmp_path / "run").config.data.jpeg_draft is True
    evaluated, _ = evaluate_run(tmp_path / "run", split="test")
    assert evaluated["test/mean_iou"] == pytest.approx(metrics["test/mean_iou"])
    # and it can still be scored the new way on request
    full = load_run(tmp_path / "run", overrides={"data": {"jpeg_draft": False}})
    assert full.config.data.jpeg_draft is False
