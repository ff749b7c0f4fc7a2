import pytest
import torch

from dsp import metrics as M
from dsp.errors import DspError
from dsp.tasks.oracles import oracle_fn, soft_f1, soft_iou


def random_binary(seed=0, shape=(40, 7)):
    gen = torch.Generator().manual_seed(seed)
    pred = (torch.rand(shape, generator=gen) < 0.3).float()
    target = (torch.rand(shape, generator=gen) < 0.3).float()
    pred[0], target[0] = 0, 0  # an empty-empty example
    pred[1], target[1] = 1, 0  # predictions with no true label
    return pred, target


def test_soft_f1_equals_the_discrete_example_f1_on_binary_inputs():
    pred, target = random_binary()
    f1 = soft_f1(pred, target)  # [N]
    assert f1.shape == (40,)
    for i in range(40):  # per example, against the reported metric
        assert 100 * f1[i].item() == pytest.approx(M.example_f1(pred[i : i + 1], target[i : i + 1]))
    assert 100 * f1.mean().item() == pytest.approx(M.example_f1(pred, target))


def test_soft_iou_equals_the_discrete_iou_on_binary_inputs():
    pred, target = random_binary(1)
    inter = (pred.bool() & target.bool()).sum(-1).double()
    union = (pred.bool() | target.bool()).sum(-1).double()
    expected = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    assert torch.allclose(soft_iou(pred, target).double(), expected)


def test_hand_computed_soft_cases():
    y = torch.tensor([[0.5, 0.2, 0.9, 0.0], [0.0, 0.0, 0.0, 0.0], [0.3, 0.0, 0.0, 0.0]])
    t = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # row 0: Σ min = 0.5 + 0 + 0.9 = 1.4, Σ max = 1 + 0.2 + 1 = 2.2
    assert torch.allclose(soft_iou(y, t), torch.tensor([1.4 / 2.2, 1.0, 0.0]))
    assert torch.allclose(soft_f1(y, t), torch.tensor([2.8 / 3.6, 1.0, 0.0]))


def test_oracles_reduce_everything_after_the_batch_dimension_and_stay_in_unit_interval():
    y, t = torch.rand(3, 4, 5), (torch.rand(3, 4, 5) > 0.5).float()
    for fn in (soft_f1, soft_iou):
        v = fn(y, t)
        assert v.shape == (3,) and (v >= 0).all() and (v <= 1).all()
        assert torch.allclose(v, fn(y.flatten(1), t.flatten(1)))
    assert (soft_iou(y, t) <= soft_f1(y, t) + 1e-7).all()  # IoU ≤ F1 always


def test_oracle_names_and_shape_errors():
    assert oracle_fn("f1") is soft_f1 and oracle_fn("iou") is soft_iou
    with pytest.raises(DspError, match="oracle"):
        oracle_fn("accuracy")
    with pytest.raises(ValueError, match="shape"):
        soft_f1(torch.rand(2, 3), torch.rand(2, 4))


@pytest.mark.parametrize("fn", [soft_f1, soft_iou])
def test_gradient_at_binary_corners_is_the_feasible_one_sided_derivative(fn):
    """At ȳ = y (and at other 0/1 points) a coordinate can only move into [0,1]; the oracle's
    gradient must be that one-sided derivative (the DVN's adversarial search climbs it)."""
    target = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    for y in (target.clone(), torch.zeros_like(target), torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)):
        y = y.requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(y, target).sum(), y)
        h = 1e-7
        for i in range(5):
            step = torch.zeros_like(target)
            step[0, i] = -h if y[0, i] == 1 else h  # the feasible direction
            one_sided = (fn(y.detach() + step, target) - fn(y.detach(), target)) / step[0, i]
            assert grad[0, i].item() == pytest.approx(one_sided.item(), abs=1e-5)
