import gzip

import pytest
import torch

from dsp.data.conll import load_conll2000
from dsp.data.ocr import load_ocr
from dsp.data.sequences import SequenceSplits, pad_sequences
from dsp.errors import DspError
from dsp.tasks.sequence import SequenceTask

# (word_id, fold, letters): two training words (folds 2, 3), one validation, one test word
WORDS = [(1, 0, "ab"), (2, 2, "xyz"), (3, 1, "q"), (4, 3, "hello")]


def letter_lines(words=WORDS) -> list[str]:
    """letter.data lines, written in reverse order so the loader must sort by position itself.
    Letter k of the alphabet lights pixel k, so images can be checked against labels."""
    lines, next_id = [], 1
    for word_id, fold, text in words:
        for pos, ch in enumerate(text, 1):
            pixels = ["0"] * 128
            pixels[ord(ch) - ord("a")] = "1"
            nxt = next_id + 1 if pos < len(text) else -1
            # the original file ends every line with a tab
            lines.append("\t".join([str(next_id), ch, str(nxt), str(word_id), str(pos), str(fold), *pixels]) + "\t")
            next_id += 1
    return lines[::-1]


@pytest.fixture(params=["plain", "gzip"])
def letter_file(request, tmp_path):
    text = "\n".join(letter_lines()) + "\n"
    if request.param == "gzip":
        path = tmp_path / "letter.data.gz"
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path = tmp_path / "letter.data"
        path.write_text(text)
    return path


def decode(y_row):
    return "".join(chr(ord("a") + i) for i in y_row.tolist() if i >= 0)


def test_pad_sequences():
    out = pad_sequences([torch.tensor([1, 2]), torch.tensor([3])], -1)
    assert out.tolist() == [[1, 2], [3, -1]]
    assert pad_sequences([torch.ones(1, 2)], 0.0, length=3).shape == (1, 3, 2)
    with pytest.raises(ValueError):
        pad_sequences([torch.ones(4)], 0, length=2)


def test_ocr_folds_shapes_and_order(letter_file):
    data = load_ocr(letter_file, test_fold=1, val_fold=0)
    assert isinstance(data, SequenceSplits)
    assert data.num_labels == 26 and data.label_names[:2] == ["a", "b"] and data.num_features == 128
    assert [decode(y) for y in data.split("train").tensors[1]] == ["xyz", "hello"]
    assert [decode(y) for y in data.val.tensors[1]] == ["ab"]
    assert [decode(y) for y in data.test.tensors[1]] == ["q"]
    x, y = data.train.tensors
    # every split is padded to the longest word in the file (5)
    assert x.shape == (2, 5, 16, 8) and x.dtype == torch.float32 and y.shape == (2, 5) and y.dtype == torch.int64
    assert y[0].tolist() == [23, 24, 25, -1, -1] and (y >= 0).sum(1).tolist() == [3, 5]
    assert (x[y < 0] == 0).all()
    # pixels are row-major 16x8: pixel 9 ('j') is row 1, column 1; 'x' (23) is row 2, column 7
    assert x[0, 0, 2, 7] == 1 and x[0, 0].sum() == 1
    assert torch.equal(x.flatten(2).argmax(-1)[y >= 0], y[y >= 0])


def test_ocr_other_folds(letter_file):
    data = load_ocr(letter_file, test_fold=2, val_fold=3)
    assert [decode(y) for y in data.train.tensors[1]] == ["ab", "q"]
    assert [decode(y) for y in data.test.tensors[1]] == ["xyz"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"test_fold": 10}, r"test_fold=10 is out of range"),
        ({"test_fold": 0, "val_fold": 0}, r"both 0"),
        ({"test_fold": 5}, r"no words in fold 5 for the test split.*folds \[0, 1, 2, 3\]"),
    ],
)
def test_ocr_fold_errors(letter_file, kwargs, message):
    with pytest.raises(DspError, match=message):
        load_ocr(letter_file, **kwargs)


@pytest.mark.parametrize(
    "line_index, edit, message",
    [
        (2, lambda l: l.replace("\t", " ", 3), r"expected 6 tab-separated fields"),
        (2, lambda l: l[:-2] + "7\t", r"pixel values must be 0 or 1"),
        (2, lambda l: "\t".join([l.split("\t")[0], "Q", *l.split("\t")[2:]]), r"letter field is 'Q'"),
        (2, lambda l: "x" + l, r"id, next_id, word_id, position and fold must be integers"),
    ],
)
def test_ocr_malformed_line_names_file_and_line(tmp_path, line_index, edit, message):
    lines = letter_lines()
    lines[line_index] = edit(lines[line_index])
    path = tmp_path / "bad" / "letter.data"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DspError, match=rf"bad/letter.data, line 3: {message}"):
        load_ocr(path)


def test_ocr_broken_chain_and_missing_file(tmp_path):
    lines = letter_lines()
    fields = lines[-1].split("\t")  # first letter of word 1 ('a'): point next_id elsewhere
    fields[2] = "7"
    lines[-1] = "\t".join(fields)
    path = tmp_path / "letter.data"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DspError, match=rf"line {len(lines)}: letter 1 of word 1 has next_id 7"):
        load_ocr(path)
    with pytest.raises(DspError, match=r"nowhere/letter.data.gz.*download.py ocr.*DSP_DATA_DIR"):
        load_ocr(tmp_path / "nowhere" / "letter.data.gz")


CONLL_TRAIN = """Confidence NN B-NP
in IN B-PP
the DT B-NP
pound NN I-NP

He PRP B-NP
is VBZ B-VP
here RB B-ADVP
today NN B-NP
.   .   O

the DT B-NP
pound NN I-NP
fell VBD B-VP


Sterling NNP B-NP
rose VBD B-VP
"""
CONLL_TEST = """The DT B-NP
extraordinarily RB I-NP
pound NN I-NP
rose VBD B-VP
yesterday NN B-NP
. . O
"""


# ----------------------------------------------------- OCR letter augmentation (data.augment)
from dsp.nn.lenet import LeNet  # noqa: E402
from dsp.tasks import task_for  # noqa: E402
from dsp.data.augment import augment_letters, augment_settings  # noqa: E402


def glyphs(n=6):
    """n 16×8 letters with strokes that touch the frame (a shift must move them, not cut them)."""
    g = torch.zeros(n, 16, 8)
    g[:, :, 0] = 1  # left edge column
    g[:, 15, :] = 1  # bottom row
    g[:, 3:9, 4] = torch.linspace(0.2, 1, n).view(n, 1)
    return g


def test_letters_without_a_warp_are_the_lenet_input_unchanged():
    x = glyphs()
    out = augment_letters(x, augment_settings(None))
    assert out.shape == (6, 24, 16) and torch.equal(out[:, 4:20, 4:12], x) and out.sum() == x.sum()
    net = LeNet(26)  # it centres any size: the canvas puts the glyph where the clean letter sits
    assert torch.allclose(net(out), net(x), atol=1e-6)


def test_letter_shifts_move_strokes_without_cutting_them():
    x = glyphs()
    torch.manual_seed(0)
    out = augment_letters(x, augment_settings({"translate": 0.2}))  # up to 3.2 rows and 1.6 columns < margin 4
    # bilinear resampling of a pure shift keeps every stroke's mass when nothing leaves the canvas
    assert torch.allclose(out.sum((1, 2)), x.sum((1, 2)), atol=1e-4)
    assert not torch.equal(out[:, 4:20, 4:12], x)  # and the letters did move
    torch.manual_seed(0)
    zoomed = augment_letters(x, augment_settings({"scale": 0.3, "rotate": 20}))
    assert zoomed.min() >= 0 and zoomed.max() <= 1 + 1e-6 and (zoomed[:, 0] == 0).all()  # ground stays zero


def test_ocr_training_batches_are_augmented_and_predictions_are_not(letter_file):
    data = load_ocr(letter_file, augment={"translate": 0.2})
    task = task_for(data)
    assert task.augmenting and data.augment["translate"] == 0.2
    x, y = data.train.tensors
    xa, ya = task.batch(x, y)
    assert xa.shape == (2, 5, 24, 16) and torch.equal(ya, y)
    assert (xa[y < 0] == 0).all()  # padding positions stay empty
    assert torch.allclose(xa.sum((2, 3)), x.sum((2, 3)), atol=1e-4)  # one lit pixel per letter, moved
    xc, yc = task.cut(x, y)
    assert torch.equal(xc, x) and torch.equal(yc, y)  # the path predict() takes
    assert not task_for(load_ocr(letter_file)).augmenting  # off by default
    with pytest.raises(DspError, match="data.augment.shear"):
        load_ocr(letter_file, augment={"shear": 0.1})
    with pytest.raises(DspError, match="data.augment.brightness: OCR letters are binary"):
        load_ocr(letter_file, augment={"brightness": 0.1})


def test_augmenting_token_sequences_is_a_clear_error(conll_files):
    data = load_conll2000(*conll_files, val_fraction=0.25, split_seed=0)
    task = SequenceTask(data.label_names, {"translate": 0.1})
    with pytest.raises(DspError, match="drop data.augment"):
        task.batch(*data.train.tensors)


@pytest.fixture
def conll_files(tmp_path):
    (tmp_path / "train.txt").write_text(CONLL_TRAIN)
    (tmp_path / "test.txt").write_text(CONLL_TEST)
    return tmp_path / "train.txt", tmp_path / "test.txt"


def test_conll_shapes_vocab_and_unknowns(conll_files):
    data = load_conll2000(*conll_files, val_fraction=0.25, split_seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (3, 1, 1)
    assert data.label_names == ["B-ADVP", "B-NP", "B-PP", "B-VP", "I-NP", "O"]
    words, pos, chars = data.vocab["words"], data.vocab["pos"], data.vocab["chars"]
    assert words[:2] == pos[:2] == chars[:2] == ["<pad>", "<unk>"]
    C = 15  # "extraordinarily", the longest word in either file
    assert data.num_features == 2 + C
    x, y = data.test.tensors
    assert x.shape == (1, 6, 2 + C) and x.dtype == torch.int64 and y.dtype == torch.int64
    # every split is padded to the longest sentence (6 tokens)
    assert data.train.tensors[0].shape[1] == data.val.tensors[1].shape[1] == 6
    tokens = CONLL_TEST.split()
    for t in range(6):
        word, tag, p = tokens[3 * t], tokens[3 * t + 2], tokens[3 * t + 1]
        assert x[0, t, 0] == (words.index(word) if word in words else 1)
        assert x[0, t, 1] == (pos.index(p) if p in pos else 1)
        assert y[0, t] == data.label_names.index(tag)
        ids = x[0, t, 2:].tolist()
        assert ids[len(word):] == [0] * (C - len(word))  # characters are 0-padded
    assert x[0, 0, 0] == 1 and x[0, 1, 0] == 1  # "The" (capitalised) and "extraordinarily" are unseen


def test_conll_vocab_excludes_validation_sentences(conll_files):
    # the training sentences have distinct lengths (4, 5, 3, 2), so a length names a sentence
    sentences = [s.split()[::3] for s in CONLL_TRAIN.strip().split("\n\n") if s.strip()]
    for seed in range(3):
        data = load_conll2000(*conll_files, val_fraction=0.25, split_seed=seed)
        x, y = data.val.tensors
        held_out = next(s for s in sentences if len(s) == (y[0] >= 0).sum())
        fitted = {w for s in sentences if s is not held_out for w in s}
        assert set(data.vocab["words"][2:]) == fitted
        only_val = [t for t, w in enumerate(held_out) if w not in fitted]
        assert only_val and (x[0, only_val, 0] == 1).all()  # unknown word id
        fit_x, fit_y = data.train.tensors
        assert (fit_x[..., 0][fit_y >= 0] > 1).all()  # no unknown word in the fitted part


def test_conll_lowercase_min_count_and_split_is_seeded(conll_files):
    a = load_conll2000(*conll_files, val_fraction=0.25, split_seed=3, lowercase=True, min_count=2)
    b = load_conll2000(*conll_files, val_fraction=0.25, split_seed=3, lowercase=True, min_count=2)
    for s in ("train", "val", "test"):
        assert all(torch.equal(u, v) for u, v in zip(a.split(s).tensors, b.split(s).tensors))
    words = a.vocab["words"]
    assert all(w == w.lower() for w in words[2:])
    train_text = [w.lower() for w in CONLL_TRAIN.split()[::3]]
    assert all(train_text.count(w) >= 2 for w in words[2:])  # rarer words became unknown


def test_conll_malformed_line_and_missing_file(tmp_path, conll_files):
    bad = tmp_path / "bad.txt"
    bad.write_text("He PRP B-NP\nis VBZ\n")
    with pytest.raises(DspError, match=r"bad.txt, line 2: expected `word POS chunk-tag`"):
        load_conll2000(bad, conll_files[1])
    bad.write_text("He PRP B-NP\n\nis VBZ X-VP\n")
    with pytest.raises(DspError, match=r"bad.txt, line 3: .*tag O or B-/I-TYPE"):
        load_conll2000(conll_files[0], bad)
    with pytest.raises(DspError, match=r"nowhere/train.txt.*download.py conll2000.*DSP_DATA_DIR"):
        load_conll2000(tmp_path / "nowhere" / "train.txt", conll_files[1])
