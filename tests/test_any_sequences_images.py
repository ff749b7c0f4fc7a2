"""Sequences and masks from any file: a chain CRF on any CoNLL column file with the label column
chosen by key (data=conll), segmentation on any folder of image / mask pairs (data=masks)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from dsp.cli.train import train
from dsp.compat import check_config
from dsp.data.conll import UNK_ID, load_conll, load_conll2000
from dsp.data.images import load_masks
from dsp.errors import DspError
from fixtures_text import LEXICON, UNSEEN, write_conll

FEW_STEPS = ["trainer.max_epochs=1", "trainer.max_steps=2", "trainer.progress=false", "trainer.batch_size=4",
             "logger=none"]


def refused(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(DspError, match=match) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def run(overrides: list[str], folder: Path):
    with initialize_config_module("dsp.conf", version_base=None):
        cfg = compose("config", overrides=overrides)
        check_config(cfg)  # the parts fit together, as dsp-train checks before training
    return train(cfg, folder), torch.load(folder / "checkpoints" / "best.pt", weights_only=False)


# ------------------------------------------------------------------------------------------- CoNLL

@pytest.fixture
def conll(tmp_path):
    return write_conll(tmp_path / "conll")


def test_pos_tags_from_the_second_column(conll):
    data = load_conll(*conll, label_column=1)
    tags = sorted({line.split()[1] for f in conll for line in f.read_text().splitlines() if line})
    assert data.label_names == tags and data.num_labels == len(tags) == len(set(LEXICON) | {"."})
    x, y = data.train.tensors
    valid = y >= 0
    assert (x[..., 1][valid] == UNK_ID).all() and (x[..., 1][~valid] == 0).all()  # no feature column: a constant
    assert data.vocab["pos"] == ["<pad>", "<unk>"]
    chunks = load_conll2000(*conll)
    assert data.vocab["words"] == chunks.vocab["words"] and torch.equal(x[..., 0], chunks.train.tensors[0][..., 0])


def test_the_label_column_may_count_from_the_end_and_a_feature_column_reproduces_conll2000(conll):
    generic, chunks = load_conll(*conll, label_column=-1, feature_column=1), load_conll2000(*conll)
    assert generic.label_names == chunks.label_names and generic.vocab == chunks.vocab
    for split in ("train", "val", "test"):
        for a, b in zip(generic.split(split).tensors, chunks.split(split).tensors):
            assert torch.equal(a, b)
    assert load_conll(*conll, label_column=2).label_names == chunks.label_names


def test_any_column_file_tabs_utf8_and_docstart(tmp_path):
    rows = [["-DOCSTART-", "-X-", "-X-", "O"], [], ["Zürich", "NNP", "B-NP", "B-LOC"], ["liegt", "VVFIN", "B-VP", "O"],
            [], ["Anna", "NE", "B-NP", "B-PER"], ["Müller", "NE", "I-NP", "I-PER"], ["lacht", "VVFIN", "B-VP", "O"], []]
    text = "\n".join("\t".join(r) for r in rows) + "\n"
    (tmp_path / "train.txt").write_text(text * 3, encoding="utf-8")
    (tmp_path / "test.txt").write_text(text, encoding="utf-8")
    data = load_conll(tmp_path / "train.txt", tmp_path / "test.txt", feature_column=1)
    assert data.label_names == ["B-LOC", "B-PER", "I-PER", "O"]
    assert len(data.train) + len(data.val) == 6 and "Zürich" in data.vocab["words"] + ["Zürich"]
    assert "ü" in data.vocab["chars"]


def test_column_choices_are_checked(conll, tmp_path):
    refused(r"data.label_column=3: .*train.txt has 3 columns, so give 0 to 2 \(or -1 to -3", load_conll, *conll,
            label_column=3)
    refused(r"data.word_column=0 and data.label_column=-3 are the same column", load_conll, *conll, label_column=-3)
    refused(r"data.feature_column=1 is the label column \(1\); a model may not read its own labels", load_conll, *conll,
            label_column=1, feature_column=1)
    refused(r"data.feature_column=0 is the word column", load_conll, *conll, feature_column=0)
    (tmp_path / "two.txt").write_text("a DT\nb NN\n\nc DT\n")
    refused(r"has 3 columns but .*two.txt has 2; both files must have the same columns", load_conll, conll[0],
            tmp_path / "two.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    refused(r"empty.txt holds no sentences", load_conll, conll[0], tmp_path / "empty.txt")


def test_a_chain_crf_learns_pos_tags_from_the_generic_config(conll, tmp_path):
    metrics, best = run(["data=conll", "model=chain_crf_text", "inference=chain", "objective=crf_ce", "trainer=default",
                         "trainer.lr=3e-3", f"data.train={conll[0]}", f"data.test={conll[1]}", "data.label_column=1",
                         *FEW_STEPS,
                         "model.unary_net.word_dim=8", "model.unary_net.char_hidden=8", "model.unary_net.hidden=16"],
                        tmp_path / "run")
    assert np.isfinite(metrics["test/char_acc"]) and "test/chunk_f1" not in metrics  # tags, not chunks
    assert best["config"]["dims"]["num_labels"] == len(set(LEXICON) | {"."})  # the model's size came from the data
    assert best["config"]["dims"]["num_pos"] == 2


# ------------------------------------------------------------------------------------------- masks

def write_pairs(root: Path, n: int = 8, mask_values=(0, 1), mask_ext: str = "png", suffix: str = "_mask",
                palette: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """images/pNN.jpg (24×20) and masks/pNN{suffix}.{mask_ext} (12×10): a bright box on noise; the
    mask holds mask_values[0] outside the box and mask_values[1:] inside (cycling over rows)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        box = np.zeros((20, 24), bool)
        r, c = rng.integers(2, 8, 2)
        box[r:r + 10, c:c + 12] = True
        img = rng.normal(0.3, 0.05, (20, 24, 3)) + 0.5 * box[..., None]
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(images / f"p{k:02d}.jpg", quality=95)
        inside = np.array(mask_values[1:])[(np.arange(20) // 2) % len(mask_values[1:])][:, None].repeat(24, 1)
        mask = np.where(box, inside, mask_values[0]).astype(np.uint8)
        im = Image.fromarray(mask).resize((12, 10), Image.NEAREST)
        if palette:
            im = im.convert("P")
            im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        im.save(masks / f"p{k:02d}{suffix}.{mask_ext}")
    return images, masks


@pytest.mark.parametrize("values, ext, palette", [((0, 1), "png", False), ((0, 255), "png", False),
                                                  ((0, 255), "jpg", False), ((3, 7), "bmp", False),
                                                  ((0, 1), "png", True)])
def test_binary_masks_of_any_encoding(tmp_path, values, ext, palette):
    images, masks = write_pairs(tmp_path, mask_values=values, mask_ext=ext, palette=palette)
    data = load_masks(images, masks, size=16, val_fraction=0.25, test_fraction=0.25)
    assert (len(data.train), len(data.val), len(data.test)) == (4, 2, 2)
    assert data.train.tensors[0].shape == (4, 3, 16, 16) and data.num_labels == 2
    y = torch.cat([data.split(s).tensors[1] for s in ("train", "val", "test")])
    assert set(y.unique().tolist()) == {0.0, 1.0}
    fraction = y.mean().item()  # a 10×12 box in 20×24: a quarter of the pixels
    assert 0.15 < fraction < 0.35
    names = data.names["train"] + data.names["val"] + data.names["test"]
    assert sorted(names) == [f"p{k:02d}" for k in range(8)]


def test_multi_class_masks_are_refused_unless_the_foreground_is_named(tmp_path):
    images, masks = write_pairs(tmp_path, mask_values=(0, 1, 2))
    message = refused(r"the masks hold three values \(0, 1, 2; the third first in .*p00_mask.png\): a multi-class "
                      r"segmentation", load_masks, images, masks, size=16)
    assert "model=gcrf, unet, fcn, dvn_seg and dvn_seg_unet" in message and "data.foreground=" in message
    only_two = load_masks(images, masks, size=16, foreground=[2])
    both = load_masks(images, masks, size=16, foreground=[1, 2])
    assert only_two.train.tensors[1].sum() < both.train.tensors[1].sum()
    assert torch.equal(both.train.tensors[1], load_masks(images, masks, size=16, threshold=1).train.tensors[1])
    refused(r"data.foreground=\[5\], but no mask holds any of these values \(they hold 0, 1, 2\)", load_masks,
            images, masks, size=16, foreground=[5])


def test_pairs_are_matched_by_name_and_strays_refused(tmp_path):
    from PIL import Image

    images, masks = write_pairs(tmp_path / "a", suffix="")
    assert len(load_masks(images, masks, size=8).train) == 5
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(masks / "stray.png")
    refused(r"masks/stray.png has no image of the same name in .*images \(1 unmatched", load_masks, images, masks)
    images, masks = write_pairs(tmp_path / "b")
    (masks / "p03_mask.png").unlink()
    refused(r"images/p03.jpg has no mask of the same name", load_masks, images, masks)
    Image.fromarray(np.zeros((30, 5), np.uint8)).save(masks / "p03_mask.png")
    refused(r"the mask .*p03_mask.png is 5×30 but its image .*p03.jpg is 24×20, another shape", load_masks, images,
            masks)
    refused(r"data.images=.*nowhere is not a folder", load_masks, tmp_path / "nowhere", masks)
    images, masks = write_pairs(tmp_path / "c", n=2)
    refused(r"2 example\(s\) are too few to hold out data.test_fraction=0.2: at least 3 are needed|"
            r"example\(s\) are too few", load_masks, images, masks)


def test_a_test_folder_pair(tmp_path):
    images, masks = write_pairs(tmp_path / "train", n=6)
    test_images, test_masks = write_pairs(tmp_path / "test", n=3, seed=1)
    data = load_masks(images, masks, test_images=test_images, test_masks=test_masks, size=8, val_fraction=0.2)
    assert (len(data.train), len(data.val), len(data.test)) == (5, 1, 3)
    refused(r"data.test_images and data.test_masks go together", load_masks, images, masks, test_images=test_images)


def test_segmentation_trains_on_any_folder_pair(tmp_path):
    images, masks = write_pairs(tmp_path / "d", mask_values=(0, 255))
    metrics, best = run(["data=masks", "model=unet", "inference=gcrf", "objective=seg_ce", "trainer=default",
                         f"data.images={images}", f"data.masks={masks}", "data.size=16", "model.unary.base_width=4",
                         "model.unary.depth=2", *FEW_STEPS], tmp_path / "run")
    assert np.isfinite(metrics["test/mean_iou"]) and best["config"]["dims"]["num_labels"] == 2
