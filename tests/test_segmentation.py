"""Binary segmentation: IoU metrics on hand cases, the image/mask folder loader, the task, the UNet."""
from __future__ import annotations

import pytest
import torch

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
    assert task.evaluate(probs, y) == pytest.approx({"mean_iou": 100 / 3, "global_iou": 100 / 3})
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


def test_online_preset_trains_and_evaluates_on_the_fixture(tmp_path):
    """experiment=gcrf_horses_online end to end on the tiny folder: online scaling, checkpoints,
    dsp-eval's metrics and predictions.npz arrays."""
    from hydra import compose, initialize_config_dir

    from dsp.cli.common import config_dir
    from dsp.cli.evaluate import evaluate_run
    from dsp.cli.train import train
    from fixtures_images import tiny_images_overrides

    root = write_image_folder(tmp_path / "imgs", n=8)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=gcrf_horses_online", *tiny_images_overrides(root),
                                           "model.pairwise.base_width=4", "model.pairwise.depth=1"])
    metrics = train(cfg, tmp_path / "run")
    assert metrics.monitor == "mean_iou" and {"val/mean_iou", "test/global_iou"} <= set(metrics)
    evaluated, arrays = evaluate_run(tmp_path / "run", split="test")
    assert evaluated["test/mean_iou"] == pytest.approx(metrics["test/mean_iou"])
    assert arrays["pred"].shape == arrays["target"].shape == arrays["score"].shape == (2, 16, 16)
