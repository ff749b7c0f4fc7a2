"""Real data files' quirks: each is read correctly or refused in one line naming the file (and
line) and what to do. Tiny fixtures written here; none needs ../shared/data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_mulan
from dsp.data import mulan
from dsp.data.cache import cached_arrays
from dsp.data.conll import load_conll, load_conll2000, read_conll
from dsp.data.images import load_horses, load_masks, read_resized
from dsp.data.mulan import load_mulan, parse_arff, read_label_names
from dsp.errors import DspError
from fixtures_images import write_image_folder
from fixtures_text import write_conll


def refused(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(DspError, match=match) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)  # one line
    return str(err.value)


def arff(path: Path, attributes: list[str], rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("@relation q\n\n" + "".join(f"@attribute {a}\n" for a in attributes) + "\n@data\n"
                    + "".join(r + "\n" for r in rows))
    return path


def labels_xml(path: Path, names: list[str]) -> Path:
    path.write_text('<?xml version="1.0" encoding="utf-8"?>\n<labels xmlns="http://mulan.sourceforge.net/labels">\n'
                    + "".join(f'<label name="{n}"></label>\n' for n in names) + "</labels>\n")
    return path


def dense_pair(tmp_path: Path, train_rows: list[str], test_rows: list[str] | None = None,
               attributes: list[str] | None = None) -> tuple[str, str, str]:
    """A dense dataset: features a, b (numeric), labels l1, l2."""
    attributes = attributes or ["a numeric", "b numeric", "l1 {0,1}", "l2 {0,1}"]
    rows = ["1,2,0,1", "3,4,1,0", "5,6,1,1", "7,8,0,0"]
    tr = arff(tmp_path / "q-train.arff", attributes, train_rows)
    te = arff(tmp_path / "q-test.arff", attributes, rows if test_rows is None else test_rows)
    return str(tr), str(te), str(labels_xml(tmp_path / "q.xml", ["l1", "l2"]))


# ------------------------------------------------------------------------------------------- Mulan

@pytest.mark.parametrize("xml_name", ["Swainson's Thrush", "Swainson\\'s Thrush"])
def test_escaped_quotes_in_attribute_names_match_the_xml(tmp_path, xml_name):
    attributes = ["a numeric", "'Swainson\\'s Thrush' {0,1}", "'Hammond\\'s Flycatcher' {0,1}"]
    rows = ["1,0,1", "2,1,0", "3,1,1", "4,0,0"]
    tr = arff(tmp_path / "b-train.arff", attributes, rows)
    te = arff(tmp_path / "b-test.arff", attributes, rows)
    xml = labels_xml(tmp_path / "b.xml", [xml_name, "Hammond&apos;s Flycatcher"])
    assert parse_arff(tr)[1] == ["a", "Swainson's Thrush", "Hammond's Flycatcher"]
    data = load_mulan(str(tr), str(te), str(xml), cache_dir="")
    assert data.label_names == ["Swainson's Thrush", "Hammond's Flycatcher"] and data.num_features == 1


@pytest.mark.parametrize("sparse", [False, True])
def test_nominal_attributes_with_more_than_two_values_are_one_hot(tmp_path, sparse):
    attributes = ["size numeric", "colour {red,green,blue}", "flag {no,yes}", "bit {0,1}", "l {0,1}"]
    dense = ["1.5,green,yes,1,1", "2,red,no,0,0", "3,blue,no,1,1"]
    sparse_rows = ["{0 1.5,1 green,2 yes,3 1,4 1}", "{0 2}", "{0 3,1 blue,3 1,4 1}"]  # omitted: first value
    path = arff(tmp_path / "n.arff", attributes, sparse_rows if sparse else dense)
    mat, names = parse_arff(path)
    assert names == ["size", "colour=red", "colour=green", "colour=blue", "flag", "bit", "l"]
    assert mat.tolist() == [[1.5, 0, 1, 0, 1, 1, 1], [2, 1, 0, 0, 0, 0, 0], [3, 0, 0, 1, 0, 1, 1]]


def test_missing_features_are_imputed_with_training_means_and_missing_labels_refused(tmp_path):
    # dense and sparse `?`: feature a is missing in train row 2, b in the test row
    tr, te, xml = dense_pair(tmp_path, ["1,2,0,1", "?,4,1,0", "5,6,1,1", "7,8,0,0", "9,10,1,0", "11,12,0,1"],
                             ["1,?,0,1"])
    data = load_mulan(tr, te, xml, cache_dir="", val_fraction=0.2, standardize=False)
    x_fit = data.train.tensors[0]
    assert not any(torch.isnan(d.tensors[0]).any() for d in (data.train, data.val, data.test))
    known_b = torch.tensor([2.0, 4, 6, 8, 10, 12])
    b_fit = x_fit[:, 1]
    assert torch.isin(b_fit, known_b).all()  # b is never missing in train
    assert data.test.tensors[0][0, 1].item() == pytest.approx(b_fit.mean().item())  # test: the training mean
    refused(r"q-train.arff, line 10: a feature is missing.*data.missing=refuse", load_mulan, tr, te, xml,
            cache_dir="", missing="refuse")
    tr, te, xml = dense_pair(tmp_path, ["1,2,0,1", "3,4,?,0", "5,6,1,1"])
    refused(r"q-train.arff, line 10: the label 'l1' is missing \(\?\)", load_mulan, tr, te, xml, cache_dir="")
    sp = arff(tmp_path / "s-train.arff", ["a numeric", "b numeric", "l1 {0,1}", "l2 {0,1}"],
              ["{0 1,2 1}", "{1 ?,3 1}", "{0 3}", "{0 2, 1 5}"])
    data = load_mulan(str(sp), str(sp), xml, cache_dir="", val_fraction=0.25, standardize=False)
    assert data.test.tensors[0][1, 1].item() == pytest.approx(data.train.tensors[0][:, 1].mean().item())


@pytest.mark.parametrize("value, what", [("NaN", "not a number"), ("inf", "not a number"), ("-Infinity", "not a number"),
                                         ("1e39", "too large for float32")])
@pytest.mark.parametrize("split", ["train", "test"])
def test_nan_and_inf_in_features_are_refused_with_file_and_line(tmp_path, value, what, split):
    rows = ["1,2,0,1", f"3,{value},1,0", "5,6,1,1"]
    tr, te, xml = dense_pair(tmp_path, rows if split == "train" else ["1,2,0,1", "3,4,1,0", "5,6,1,1"],
                             rows if split == "test" else None)
    refused(rf"q-{split}.arff, line 10: attribute 'b' is .*{what}.*write \?", load_mulan, tr, te, xml, cache_dir="")
    sp = arff(tmp_path / "sp.arff", ["a numeric", "b numeric"], ["{0 1}", f"{{1 {value}}}"])
    refused(r"sp.arff, line 8: attribute 'b'", parse_arff, sp)


def test_a_label_twice_in_the_xml_is_refused(tmp_path):
    xml = labels_xml(tmp_path / "twice.xml", ["l1", "l2", "l1"])
    refused(r"twice.xml names the label 'l1' twice; remove the repeated <label>", read_label_names, xml)
    tr, te, _ = dense_pair(tmp_path, ["1,2,0,1", "3,4,1,0", "5,6,1,1"])
    refused(r"twice.xml names the label 'l1' twice", load_mulan, tr, te, str(xml), cache_dir="")


@pytest.mark.parametrize("empty", ["train", "test"])
def test_a_file_with_a_header_and_no_rows_is_refused_at_load(tmp_path, empty):
    rows = ["1,2,0,1", "3,4,1,0", "5,6,1,1"]
    tr, te, xml = dense_pair(tmp_path, [] if empty == "train" else rows, [] if empty == "test" else None)
    refused(rf"q-{empty}.arff declares its attributes but holds no data rows", load_mulan, tr, te, xml, cache_dir="")


def test_a_training_file_too_small_for_a_validation_split_is_refused(tmp_path):
    tr, te, xml = dense_pair(tmp_path, ["1,2,0,1"])
    refused(r"q-train.arff: 1 example\(s\) are too few to hold out data.val_fraction=0.2: at least 2 are needed",
            load_mulan, tr, te, xml, cache_dir="")
    tr, te, xml = dense_pair(tmp_path, ["1,2,0,1", "3,4,1,0"])
    refused(r"2 example\(s\) are too few to hold out data.val_fraction=0.9: at least 5", load_mulan, tr, te, xml,
            cache_dir="", val_fraction=0.9)
    assert len(load_mulan(tr, te, xml, cache_dir="").train) == 1  # two rows: one trains, one validates


def test_a_sparse_row_with_a_repeated_index_is_refused(tmp_path):
    path = arff(tmp_path / "rep.arff", ["a numeric", "b numeric", "l {0,1}"], ["{0 1,2 1}", "% a comment", "{1 2,0 3,1 4}"])
    refused(r"rep.arff, line 10: this sparse row gives index 1 \('b'\) twice", parse_arff, path)


def test_stale_cache_entries_of_an_older_parse_are_never_served(tmp_path, monkeypatch):
    attributes = ["colour {red,green,blue}", "a numeric", "l1 {0,1}", "l2 {0,1}"]
    rows = ["green,1,0,1", "red,2,1,0", "blue,3,1,1", "red,4,0,0"]
    tr, te = arff(tmp_path / "c-train.arff", attributes, rows), arff(tmp_path / "c-test.arff", attributes, rows)
    xml = labels_xml(tmp_path / "c.xml", ["l1", "l2"])
    cache = tmp_path / "cache"
    for f in (tr, te):  # what the older parser cached: the colour as one column of codes
        cached_arrays(f, lambda p: (np.array([[1, 1, 0, 1], [0, 2, 1, 0], [2, 3, 1, 1], [0, 4, 0, 0]], np.float32),
                                    ["colour", "a", "l1", "l2"]), cache)
    data = load_mulan(str(tr), str(te), str(xml), cache_dir=str(cache))
    assert data.num_features == 4  # colour one-hot (3) + a
    calls = []
    monkeypatch.setattr(mulan, "parse_arff", lambda p: calls.append(p) or parse_arff(p))
    again = load_mulan(str(tr), str(te), str(xml), cache_dir=str(cache))
    assert calls == [] and torch.equal(again.test.tensors[0], data.test.tensors[0])  # served from the cache now
    fresh = tmp_path / "fresh"
    load_mulan(str(tr), str(te), str(xml), cache_dir=str(fresh))
    assert list(fresh.glob("*.h5"))  # a new cache keeps its entries at the top of the folder
    assert torch.equal(load_mulan(str(tr), str(te), str(xml), cache_dir=str(fresh)).test.tensors[0], data.test.tensors[0])


# ------------------------------------------------------------------------------------------- CoNLL

def _without_blank_lines(path: Path, tokens: int = 1500) -> Path:
    path.write_text("".join(f"w{i} NN {'B' if i % 3 == 0 else 'I'}-NP\n" for i in range(tokens)))
    return path


def test_conll_without_blank_lines_between_sentences_is_refused(tmp_path):
    train, test = write_conll(tmp_path / "c")
    glued = _without_blank_lines(tmp_path / "glued.txt")
    message = refused(r"glued.txt, lines 1-1500: 1500 token lines with no blank line between them, more than "
                      r"data.max_sentence_length=1000 .* blank lines must separate sentences", load_conll2000, glued, test)
    assert "raise data.max_sentence_length" in message
    refused(r"glued.txt, lines 1-1500", load_conll, train, glued, label_column=1)
    assert len(read_conll(glued, max_length=2000)) == 1  # a long sentence is fine when it is allowed
    # a run in the middle: its own line range
    text = train.read_text() + "\n" + "".join(f"x{i} NN O\n" for i in range(30)) + "\nlast NN O\n"
    (tmp_path / "mid.txt").write_text(text)
    first = len(train.read_text().splitlines()) + 2
    refused(rf"mid.txt, lines {first}-{first + 29}: 30 token lines", load_conll, tmp_path / "mid.txt", test,
            max_sentence_length=20)


def test_conll_line_with_another_column_count_is_named(tmp_path):
    train, test = write_conll(tmp_path / "c")
    lines = train.read_text().splitlines()
    lines[4] = "word NN"
    (tmp_path / "bad.txt").write_text("\n".join(lines) + "\n")
    refused(r"bad.txt, line 5: 2 column\(s\), but the file's first token line \(line 1\) has 3", load_conll,
            tmp_path / "bad.txt", test)
    refused(r"bad.txt, line 5: expected `word POS chunk-tag`", load_conll2000, tmp_path / "bad.txt", test)


# ------------------------------------------------------------------------------------------- images

def test_an_image_too_large_to_decode_safely_is_refused_naming_the_file(tmp_path, monkeypatch):
    from PIL import Image

    root = write_image_folder(tmp_path / "horses", n=6, size=(16, 12))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)
    # 16×12 = 192 pixels: above the limit, under twice it (PIL itself only warns)
    refused(r"image .*img001.jpg is too large to decode safely \(192 pixels, PIL's limit is 150\)",
            read_resized, root / "rgb" / "img001.jpg", "RGB", 8)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "rgb" / "img002.jpg")  # 1600 > 2 × 150: PIL refuses
    refused(r"image .*img002.jpg is too large to decode safely \(1600 pixels, PIL's limit is 150\)",
            read_resized, root / "rgb" / "img002.jpg", "RGB", 8)
    refused(r"img001.jpg is too large to decode safely", load_horses, root, size=8, train=(1, 4), val=(3, 4),
            test=(5, 6))
    images, masks = tmp_path / "i", tmp_path / "m"
    for folder in (images, masks):
        folder.mkdir()
    for k in range(5):
        Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(images / f"p{k}.png")
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / f"p{k}.png")
    Image.fromarray(np.zeros((13, 13), np.uint8)).save(masks / "p3.png")  # 169 pixels: the mask is the bomb
    refused(r"image .*m/p3.png is too large to decode safely", load_masks, images, masks, size=8)
