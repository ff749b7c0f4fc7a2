import torch

from dsp.metrics import example_f1, hamming


def test_example_f1_hand_computed():
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    target = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]])
    # example 1: 2*1/(2+2) = 0.5; example 2: both empty -> 1; example 3: 0; example 4: 0
    assert abs(example_f1(pred, target) - 100 * (0.5 + 1 + 0 + 0) / 4) < 1e-9


def test_example_f1_perfect_and_disjoint():
    y = torch.tensor([[1, 0, 1], [0, 1, 0]])
    assert example_f1(y, y) == 100.0
    assert example_f1(1 - y, y) == 0.0


def test_hamming_hand_computed():
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 1]])
    target = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]])
    assert abs(hamming(pred, target) - 100 * 2 / 8) < 1e-9


def test_empty_rate_hand_computed():
    from dsp.metrics import empty_rate

    pred = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]])
    assert empty_rate(pred) == 50.0  # rows 2 and 4 name no label
    assert empty_rate(torch.zeros(0, 3)) == 0.0
