import pytest
import torch

from conftest import write_mulan
from dsp.data.mulan import load_mulan, parse_arff
from dsp.data.synthetic import block_exclusive_labels, make_block_exclusive
from dsp.errors import DspError


@pytest.mark.parametrize("sparse", [True, False])
def test_mulan_sparse_and_dense_give_same_arrays(tmp_path, sparse):
    tr, te, xml = write_mulan(tmp_path / "d", sparse=sparse)
    ref_tr, ref_te, _ = write_mulan(tmp_path / "ref", sparse=not sparse)
    a, names = parse_arff(tr)
    b, _ = parse_arff(ref_tr)
    assert a.shape == (60, 17) and names[-1] == "lab4"
    assert (a == b).all()
    data = load_mulan(str(tr), str(te), str(xml), val_fraction=0.25, cache_dir="")
    assert data.num_features == 12 and data.num_labels == 5
    assert len(data.train) == 45 and len(data.val) == 15 and len(data.test) == 30
    assert set(data.train.tensors[1].unique().tolist()) <= {0.0, 1.0}


def test_sparse_parse_by_hand(tmp_path):
    f = tmp_path / "h.arff"
    f.write_text("@relation h\n@attribute a numeric\n@attribute b numeric\n@attribute l {0,1}\n@data\n"
                 "{0 2.5,2 1}\n{1 -1}\n{}\n")
    mat, _ = parse_arff(f)
    assert mat.tolist() == [[2.5, 0, 1], [0, -1, 0], [0, 0, 0]]


def test_split_is_deterministic_and_cache_round_trips(tiny_mulan, tmp_path):
    a = load_mulan(*map(str, tiny_mulan), cache_dir=str(tmp_path / "c"))
    b = load_mulan(*map(str, tiny_mulan), cache_dir=str(tmp_path / "c"))  # read from the cache
    assert list((tmp_path / "c").glob("*.h5"))
    for s in ("train", "val", "test"):
        for ta, tb in zip(a.split(s).tensors, b.split(s).tensors):
            assert torch.equal(ta, tb)


def test_labels_by_position_without_xml(tiny_mulan):
    tr, te, _ = tiny_mulan
    data = load_mulan(str(tr), str(te), None, num_labels=5, cache_dir="")
    assert data.num_labels == 5 and data.label_names[0] == "lab0"


def test_malformed_arff_names_file_and_line(tmp_path):
    tr, te, xml = write_mulan(tmp_path / "m", sparse=False)
    lines = tr.read_text().splitlines()
    lines[25] = "1,2,oops"
    tr.write_text("\n".join(lines) + "\n")
    with pytest.raises(DspError, match=r"m/tiny-train.arff.*line 26"):
        load_mulan(str(tr), str(te), str(xml), cache_dir="")


def test_label_count_mismatch_names_both_numbers(tiny_mulan):
    with pytest.raises(DspError, match=r"num_labels=7.*names 5 labels"):
        load_mulan(*map(str, tiny_mulan), num_labels=7, cache_dir="")


def test_missing_file_says_where_it_looked(tmp_path):
    with pytest.raises(DspError, match=r"nowhere/x-train.arff.*DSP_DATA_DIR"):
        load_mulan(str(tmp_path / "nowhere/x-train.arff"), str(tmp_path / "nowhere/x-test.arff"), num_labels=3)


def test_synthetic_is_deterministic_and_block_exclusive():
    a, b = make_block_exclusive(num_train=50, num_val=10, num_test=20), make_block_exclusive(50, 10, 20)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    y = a.train.tensors[1].reshape(50, 4, 4)
    assert (y.sum(-1) == 1).all()
    z = torch.tensor([[0.1, 0.5, -1.0, 0.2, 3.0, 2.0, 1.0, 0.0]])
    assert block_exclusive_labels(z, 4).tolist() == [[0, 1, 0, 0, 1, 0, 0, 0]]
    assert not torch.equal(make_block_exclusive(50, 10, 20, seed=1).train.tensors[0], a.train.tensors[0])


def test_single_file_dataset_gets_a_fixed_test_split(tiny_mulan):
    tr, _, xml = tiny_mulan
    a = load_mulan(str(tr), None, str(xml), test_size=20, val_fraction=0.25, cache_dir="")
    b = load_mulan(str(tr), None, str(xml), test_size=20, val_fraction=0.25, cache_dir="")
    assert (len(a.train), len(a.val), len(a.test)) == (30, 10, 20)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    with pytest.raises(DspError, match="test_size"):
        load_mulan(str(tr), None, str(xml), cache_dir="")


def test_standardize_uses_training_statistics_by_hand():
    from torch.utils.data import TensorDataset

    from dsp.data.preprocessing import fit_input_transform, transformed

    y = torch.zeros(2, 1)
    train = TensorDataset(torch.tensor([[1.0, 5.0, 1.0], [3.0, 5.0, 0.0]]), y)  # means 2, 5, .5; stds 1, 0, .5
    test = TensorDataset(torch.tensor([[4.0, 6.0, 1.0]]), y[:1])
    tr, te = transformed(fit_input_transform(train.tensors[0], True), train, test)
    assert torch.allclose(tr.tensors[0], torch.tensor([[-1.0, 0.0, 1.0], [1.0, 0.0, -1.0]]), atol=1e-5)
    # test features use the training mean and std; the feature constant on train is only centred
    assert torch.allclose(te.tensors[0], torch.tensor([[2.0, 1.0, 1.0]]), atol=1e-5)
    assert te.tensors[1] is test.tensors[1]
    # auto: the 0/1 column stays as it is; so does a constant 5 (not 0/1: centred only)
    tr, te = transformed(fit_input_transform(train.tensors[0], "auto"), train, test)
    assert torch.allclose(te.tensors[0], torch.tensor([[2.0, 1.0, 1.0]]), atol=1e-5)
    assert torch.equal(tr.tensors[0][:, 2], train.tensors[0][:, 2])
    # nothing to do: no transform at all; a missing value is filled with the training mean first
    assert fit_input_transform(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), "auto") is None
    t = fit_input_transform(torch.tensor([[1.0, float("nan")], [3.0, 4.0]]), False)
    assert torch.equal(t(torch.tensor([[float("nan"), float("nan")]])), torch.tensor([[2.0, 4.0]]))


def test_load_mulan_standardize(tiny_mulan):
    plain = load_mulan(*map(str, tiny_mulan), cache_dir="")
    std = load_mulan(*map(str, tiny_mulan), cache_dir="", standardize=True)
    x = std.train.tensors[0]
    assert torch.allclose(x.mean(0), torch.zeros(x.shape[1]), atol=1e-5)
    varying = plain.train.tensors[0].std(0) > 0
    assert torch.allclose(x.std(0, unbiased=False)[varying], torch.ones(int(varying.sum())), atol=1e-4)
    assert torch.equal(std.test.tensors[1], plain.test.tensors[1])
    with pytest.raises(DspError, match="data.standardize"):
        load_mulan(*map(str, tiny_mulan), cache_dir="", standardize="yes")
