"""dsp-predict and dsp.load_run(...).predict: a trained run's predictions for new, unlabelled inputs
equal dsp-eval's on the same inputs, for multi-label, chain-CRF (image sequences and text) and mask
runs; bad inputs are one clear error."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from pathlib import Path
from hydra import compose, initialize_config_dir

import dsp
from conftest import REPO, write_mulan, write_ocr
from fixtures_images import write_image_folder
from fixtures_text import write_conll
from dsp.cli.common import config_dir
from dsp.cli.evaluate import evaluate_run
from dsp.cli.predict import predict_file
from dsp.cli.train import train
from dsp.errors import DspError

QUICK = ["trainer=default", "trainer.max_steps=3", "trainer.max_epochs=1", "trainer.progress=false",
         "trainer.batch_size=16", "logger=none"]


def _train(run, overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, *QUICK])
    train(cfg, run)
    return run


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dsp.cli.predict", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd or REPO)


@pytest.fixture(scope="module")
def mulan_run(tmp_path_factory):
    """A multi-label MLP on Mulan ARFF files, features standardised (statistics from the training split)."""
    root = tmp_path_factory.mktemp("mulan")
    tr, te, xml = write_mulan(root / "tiny", n_train=40, n_test=20)
    run = _train(root / "run", ["data=mulan", f"data.train={tr}", f"data.test={te}", f"data.labels_xml={xml}",
                                "data.standardize=true", "data.cache_dir=''", "model=mlp", "objective=local"])
    return run, tr, te


@pytest.fixture(scope="module")
def ocr_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ocr")
    path = write_ocr(root / "letter.data.gz", words_per_fold=3)
    return _train(root / "run", ["experiment=crf_ocr_joint", f"data.path={path}", "model.unary_net.net.hidden=8",
                                 "trainer.batch_size=8"])


@pytest.fixture(scope="module")
def conll_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("conll")
    train_txt, test_txt = write_conll(root / "conll", n_train=16, n_test=6)
    run = _train(root / "run", ["experiment=crf_chunking_joint", f"data.train={train_txt}", f"data.test={test_txt}",
                                "model.unary_net.word_dim=8", "model.unary_net.char_hidden=8",
                                "model.unary_net.hidden=16", "model.unary_net.char_layers=1", "trainer.batch_size=8"])
    return run, test_txt


# ------------------------------------------------------------------------------ multi-label
def test_multilabel_predict_equals_dsp_eval_from_arff_with_and_without_labels(mulan_run, tmp_path):
    run, _, test_arff = mulan_run
    _, arrays = evaluate_run(run)
    out = predict_file(run, test_arff, tmp_path / "p.npz")  # the labelled test file: its labels are dropped
    saved = np.load(tmp_path / "p.npz")
    assert (saved["labels"] == arrays["pred"]).all() and np.allclose(saved["scores"], arrays["score"], atol=1e-6)
    assert list(saved["label_names"]) == [f"lab{j}" for j in range(5)] and out["threshold"] == saved["threshold"]
    # the same inputs without the label attributes, through the command line, as CSV
    lines = test_arff.read_text().splitlines()
    header = [ln for ln in lines if not ln.startswith("@attribute lab")]
    data_at = header.index("@data")
    rows = []
    for row in header[data_at + 1:]:  # sparse rows: drop the label entries (indices >= 12)
        rows.append("{" + ",".join(e for e in row.strip("{}").split(",") if e and int(e.split()[0]) < 12) + "}")
    unlabelled = tmp_path / "new.arff"
    unlabelled.write_text("\n".join(header[:data_at + 1] + rows) + "\n")
    proc = _cli(f"run_dir={run}", f"input={unlabelled}", f"out={tmp_path / 'p.csv'}")
    assert proc.returncode == 0, proc.stderr
    table = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1)
    assert (tmp_path / "p.csv").read_text().splitlines()[0].startswith("lab0,lab1")
    assert (table[:, :5] == arrays["pred"]).all() and np.allclose(table[:, 5:], arrays["score"], atol=1e-5)


def test_multilabel_python_predict_on_arrays_and_tensors(mulan_run):
    import torch

    from dsp.data.mulan import parse_arff

    run_dir, _, test_arff = mulan_run
    _, arrays = evaluate_run(run_dir)
    mat, _ = parse_arff(test_arff)
    run = dsp.load_run(run_dir)
    for x in (mat[:, :12], torch.from_numpy(mat[:, :12])):
        result = run.predict(x, batch_size=7)
        assert (result["labels"] == arrays["pred"]).all() and np.allclose(result["scores"], arrays["score"], atol=1e-6)


def test_standardised_runs_predict_without_their_training_files(mulan_run, tmp_path):
    """The fitted standardisation is in the checkpoint: moving the training file away changes nothing."""
    import shutil

    run_dir, train_arff, test_arff = mulan_run
    x = np.random.default_rng(0).normal(size=(3, 12)).astype(np.float32)
    before = dsp.load_run(run_dir).predict(x)
    moved = tmp_path / "elsewhere.arff"
    shutil.move(train_arff, moved)
    try:
        after = dsp.load_run(run_dir).predict(x)
    finally:
        shutil.move(moved, train_arff)
    assert np.array_equal(before["scores"], after["scores"]) and np.array_equal(before["labels"], after["labels"])
    state = torch.load(Path(run_dir) / "checkpoints" / "best.pt", weights_only=False)
    assert state["input_transform"]["scale"].shape == (12,) and (state["input_transform"]["scale"] != 1).any()


@pytest.mark.parametrize("make, message", [
    (lambda d: np.savez(d / "bad.npz", x=np.zeros((3, 7))), "x has 7 features per example, but the run's model reads 12"),
    (lambda d: np.savez(d / "bad.npz", z=np.zeros((3, 12))), "no array 'x'"),
    (lambda d: np.savez(d / "bad.npz", x=np.r_[np.zeros((2, 12)), np.full((1, 12), np.nan)]), "row 2 holds a NaN"),
    (lambda d: None, "input file not found"),
])
def test_bad_multilabel_inputs_are_one_clear_error(mulan_run, tmp_path, make, message):
    run_dir, _, _ = mulan_run
    make(tmp_path)
    with pytest.raises(DspError, match=message):
        predict_file(run_dir, tmp_path / "bad.npz", tmp_path / "p.npz")
    assert not (tmp_path / "p.npz").exists()


def _cli_here(monkeypatch, capsys, *args) -> tuple[int, str]:
    """dsp-predict in this process: (exit status, stderr)."""
    from dsp.cli.predict import main

    monkeypatch.setattr(sys, "argv", ["dsp-predict", *args])
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def test_the_command_line_refuses_in_one_line(mulan_run, tmp_path, monkeypatch, capsys):
    run_dir, _, test_arff = mulan_run
    code, err = _cli_here(monkeypatch, capsys, f"run_dir={run_dir}", f"input={tmp_path / 'missing.npz'}",
                          f"out={tmp_path / 'p.npz'}")
    assert code == 2 and err.count("\n") == 1 and "input file not found" in err
    code, err = _cli_here(monkeypatch, capsys, f"run_dir={run_dir}", f"input={test_arff}", f"out={tmp_path / 'p.conll'}")
    assert code == 2 and "a multi-label run writes .npz, .csv" in err
    (tmp_path / "held.npz").write_bytes(b"x")
    code, err = _cli_here(monkeypatch, capsys, f"run_dir={run_dir}", f"input={test_arff}", f"out={tmp_path / 'held.npz'}")
    assert code == 2 and "overwrite=true" in err and (tmp_path / "held.npz").read_bytes() == b"x"
    code, err = _cli_here(monkeypatch, capsys, f"run_dir={run_dir}", f"input={test_arff}", f"out={tmp_path / 'held.npz'}",
                          "overwrite=true")
    assert code == 0 and np.load(tmp_path / "held.npz")["labels"].shape == (20, 5)
    code, err = _cli_here(monkeypatch, capsys, f"input={test_arff}", f"out={tmp_path / 'p.npz'}")
    assert code == 2 and "pass run_dir=" in err


# -------------------------------------------------------------------------------- sequences
def test_ocr_predict_equals_dsp_eval_from_unlabelled_arrays(ocr_run, tmp_path):
    metrics, arrays = evaluate_run(ocr_run)
    run = dsp.load_run(ocr_run)
    x = run.data().split("test").tensors[0].numpy()  # [N, T, 16, 8], zero-padded
    lengths = arrays["lengths"]
    np.savez(tmp_path / "words.npz", x=(x * 255).astype(np.uint8), lengths=lengths)  # images as uint8
    result = predict_file(ocr_run, tmp_path / "words.npz", tmp_path / "tags.npz")
    saved = np.load(tmp_path / "tags.npz")
    assert (saved["tags"] == arrays["pred"]).all() and (saved["lengths"] == lengths).all()
    assert list(saved["label_names"]) == list("abcdefghijklmnopqrstuvwxyz")
    assert result["tag_names"][0] == [chr(97 + k) for k in arrays["pred"][0][: lengths[0]]]
    assert (run.predict(x, lengths=lengths)["tags"] == arrays["pred"]).all()  # in Python, float arrays
    predict_file(ocr_run, tmp_path / "words.npz", tmp_path / "tags.txt")
    first = (tmp_path / "tags.txt").read_text().split("\n\n")[0].splitlines()
    assert first == [f"{j + 1} {t}" for j, t in enumerate(result["tag_names"][0])]


def test_ocr_bad_inputs_are_one_clear_error(ocr_run, tmp_path):
    np.savez(tmp_path / "flat.npz", x=np.zeros((2, 3, 100), np.float32))
    with pytest.raises(DspError, match=r"128 numbers per position"):
        predict_file(ocr_run, tmp_path / "flat.npz", tmp_path / "p.npz")
    np.savez(tmp_path / "long.npz", x=np.zeros((2, 3, 16, 8), np.float32), lengths=np.array([2, 4]))
    with pytest.raises(DspError, match="sequence 1 has length 4; lengths must be 1..3"):
        predict_file(ocr_run, tmp_path / "long.npz", tmp_path / "p.npz")
    (tmp_path / "words.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DspError, match="image sequences predicts from .npz, .h5, .hdf5"):
        predict_file(ocr_run, tmp_path / "words.csv", tmp_path / "p.npz")


def test_conll_predict_equals_dsp_eval_from_words_and_pos_without_tags(conll_run, tmp_path):
    run_dir, test_txt = conll_run
    _, arrays = evaluate_run(run_dir)
    untagged = tmp_path / "new.txt"  # `word POS` lines: the chunk tags removed
    untagged.write_text("\n".join(" ".join(line.split()[:2]) for line in test_txt.read_text().splitlines()) + "\n")
    result = predict_file(run_dir, untagged, tmp_path / "tags.conll")
    pred = arrays["pred"][:, : result["tags"].shape[1]]
    assert (result["tags"] == pred).all() and (arrays["pred"][:, result["tags"].shape[1]:] == -1).all()
    names = list(arrays["labels"])
    out_lines = (tmp_path / "tags.conll").read_text().splitlines()
    in_lines = untagged.read_text().splitlines()
    assert len(out_lines) == len(in_lines) + 1 or len(out_lines) == len(in_lines)
    sentence = [ln for ln in out_lines[: int(arrays["lengths"][0])]]
    assert [ln.split()[:2] for ln in sentence] == [ln.split() for ln in in_lines[: len(sentence)]]
    assert [ln.split()[2] for ln in sentence] == [names[k] for k in pred[0][: len(sentence)]]
    # tagged input works too (the tags are ignored), and so does Python with (word, POS) pairs
    assert (predict_file(run_dir, test_txt, tmp_path / "t.npz")["tags"] == pred).all()
    sentences = [[tuple(ln.split()) for ln in block.splitlines()] for block in untagged.read_text().split("\n\n") if block.strip()]
    assert (dsp.load_run(run_dir).predict(sentences)["tags"] == pred).all()


def test_conll_bad_inputs_are_one_clear_error(conll_run, tmp_path):
    run_dir, _ = conll_run
    (tmp_path / "words.txt").write_text("The\ndog\n")
    with pytest.raises(DspError, match="line 1: only a word; this run's model reads a POS tag"):
        predict_file(run_dir, tmp_path / "words.txt", tmp_path / "p.npz")
    with pytest.raises(DspError, match=r"a sequence \(text\) run writes .npz, .txt, .conll, .tsv"):
        predict_file(run_dir, tmp_path / "words.txt", tmp_path / "p.csv")


# ------------------------------------------------------------------------------------ masks
def test_mask_predict_equals_dsp_eval_from_a_folder_of_images(tmp_path):
    root = write_image_folder(tmp_path / "horses", n=6)
    run = _train(tmp_path / "run", ["experiment=fcn_horses", f"data.root={root}", "data.size=16", "data.train=[1,4]",
                                    "data.val=[3,4]", "data.test=[5,6]", "data.crop=8", "data.test_crops=4",
                                    "model.unary.base_width=4", "model.unary.depth=2"])
    _, arrays = evaluate_run(run)
    new = tmp_path / "new"
    new.mkdir()
    for k in (5, 6):  # the test images, as new unlabelled inputs
        (new / f"img{k:03d}.jpg").write_bytes((root / "rgb" / f"img{k:03d}.jpg").read_bytes())
    result = predict_file(run, new, tmp_path / "masks")
    assert (result["masks"] == arrays["pred"]).all() and np.allclose(result["scores"], arrays["score"], atol=1e-6)
    from PIL import Image

    png = np.asarray(Image.open(tmp_path / "masks" / "img005.png"))
    assert png.shape == (16, 16) and ((png == 255) == (arrays["pred"][0] == 1)).all()
    saved = predict_file(run, new, tmp_path / "masks.npz")
    assert list(np.load(tmp_path / "masks.npz")["names"]) == ["img005", "img006"] and saved["masks"].shape == (2, 16, 16)
    with pytest.raises(DspError, match="img005.png exists"):
        predict_file(run, new, tmp_path / "masks")
    with pytest.raises(DspError, match="trained on 16×16"):
        dsp.load_run(run).predict(np.zeros((1, 3, 8, 8), np.float32))


def test_unsupported_families_are_refused_in_one_line(tmp_path):
    from fixtures_images import tiny_denoise_overrides

    run = _train(tmp_path / "run", ["experiment=denoise_cnn", *tiny_denoise_overrides(tmp_path / "d"),
                                    "trainer.max_steps=1"])
    with pytest.raises(DspError, match="predicts image outputs from images; predictions for new inputs cover"):
        predict_file(run, tmp_path / "d" / "rgb", tmp_path / "p.npz")
