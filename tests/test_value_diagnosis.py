"""dsp.tasks.value_diagnosis on hand-built value functions whose errors are known: an oracle value
(the soft IoU itself) with enough ascent is exact, with too little ascent it is a search error; a
value that prefers the all-ones mask is a value error. Also the script on a tiny trained run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsp import interfaces as I
from torch import nn

from dsp.inference.gradient import GradientInference
from dsp.models.dvn_seg import MaskValueFeatures
from dsp.tasks.oracles import soft_iou
from dsp.tasks.value_diagnosis import value_diagnosis

REPO = Path(__file__).resolve().parents[1]


class HandValue(I.Model):
    """v(x, ȳ) = soft IoU of ȳ against the mask drawn in channel 0 of x ("oracle"), or the mean of ȳ
    ("ones": the all-ones mask is its maximum)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def features(self, x):
        return MaskValueFeatures(x, x.new_zeros(x.shape[0], *x.shape[-2:]))

    def value(self, y, feats):
        if self.kind == "oracle":
            return soft_iou(y, feats.features[:, 0])
        return y.flatten(1).mean(1)

    def energy(self, y, feats):
        return -self.value(y, feats)

    def local_probs(self, feats):
        return torch.zeros_like(feats.logits)  # the ascent's start ȳ = 0


def masks():
    """Two 4×4 truths with 4 and 6 foreground pixels, drawn into channel 0 of 1-channel images."""
    y = torch.zeros(2, 4, 4)
    y[0, :2, :2] = 1
    y[1, 1:3, 1:4] = 1
    return y[:, None].clone(), y


def ascent(lr, steps):
    return GradientInference(method="projected", lr=lr, momentum=0.0, max_iter=steps, rel_tol=0.0, abs_tol=0.0,
                             init="constant", init_value=0.0, gradient="autograd")


def test_oracle_value_with_enough_ascent_is_exact():
    x, y = masks()
    d = value_diagnosis(HandValue("oracle"), ascent(lr=10.0, steps=5), x, y, batch_size=1)
    assert d["exact"] == 100 and d["value_error"] == 0 and d["search_error"] == 0
    assert d["mean_iou"] == pytest.approx(100) and d["v_truth"] == pytest.approx(100)
    assert d["v_pred_abs_error"] == pytest.approx(0) and d["iou_from_truth"] == pytest.approx(100)


def test_oracle_value_with_too_little_ascent_is_a_search_error():
    # one step of 0.1 · ∂IoU/∂ȳ_i = 0.1 / |y*| from ȳ = 0 stays below 0.5: ŷ = 0, IoU 0, v(ŷ) = 0 < v(y*) = 1;
    # the truth itself is a fixed point (its gradient points out of the box everywhere)
    x, y = masks()
    d = value_diagnosis(HandValue("oracle"), ascent(lr=0.1, steps=1), x, y)
    assert d["search_error"] == 100 and d["exact"] == 0 and d["value_error"] == 0
    assert d["mean_iou"] == pytest.approx(0) and d["v_pred"] == pytest.approx(0)
    assert d["iou_from_truth"] == pytest.approx(100)


def test_a_value_preferring_the_all_ones_mask_is_a_value_error():
    # ∂v/∂ȳ_i = 1/16, so two steps of 20 reach ŷ = 1 everywhere: IoU = |y*| / 16 = 4/16, 6/16;
    # v(ŷ) = 1 ≥ v(y*) = the same fractions
    x, y = masks()
    d = value_diagnosis(HandValue("ones"), ascent(lr=20.0, steps=2), x, y)
    assert d["value_error"] == 100 and d["exact"] == 0 and d["search_error"] == 0
    assert d["mean_iou"] == pytest.approx(100 * (4 + 6) / 32)
    assert d["v_truth"] == pytest.approx(100 * (4 + 6) / 32) and d["v_pred"] == pytest.approx(100)
    assert d["v_pred_abs_error"] == pytest.approx(100 * (12 + 10) / 32)
    assert d["iou_from_truth"] == pytest.approx(100 * (4 + 6) / 32)  # the ascent leaves y* for all ones


def test_the_script_prints_a_row_per_run_and_refuses_a_missing_run(tmp_path):
    from hydra import compose, initialize_config_dir

    from dsp.cli.common import config_dir
    from dsp.cli.train import train
    from fixtures_images import tiny_images_overrides, write_image_folder

    root = write_image_folder(tmp_path / "horses", n=8)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=dvn_horses", *tiny_images_overrides(root), "data.test_crops=4",
                                           "inference.max_iter=3"])
    train(cfg, tmp_path / "run")
    script = [sys.executable, str(REPO / "scripts" / "dvn_diagnose.py"), "--split", "train"]
    proc = subprocess.run([*script, str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    row = [c.strip() for c in proc.stdout.strip().splitlines()[-1].split("|")[1:-1]]
    assert int(row[1]) == 4 * 4  # images 1-4 train (5-6 are held out for validation), 4 crops each
    exact, value_error, search_error = (float(c) for c in row[3:6])
    # three separately counted masks: they must partition the crops (a NaN value would fall in none)
    assert exact + value_error + search_error == pytest.approx(100, abs=0.02)
    missing = subprocess.run([*script, str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
