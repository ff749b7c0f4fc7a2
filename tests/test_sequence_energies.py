"""Energies over relaxed label sequences (the chain CRF's, the MRF's, the sequence SPEN's), inference
on the simplex of each position, and the losses and oracle that train them."""
from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch
from torch import nn

from dsp.inference import chain
from dsp.inference.gradient import GradientInference, project_simplex
from dsp.inference.message_passing import score_labels
from dsp.inference.unrolled import UnrolledGradientDescent
from dsp.models.chain_crf import ChainCRF
from dsp.models.mrf import MRF
from dsp.models.sequence_spen import SequenceSPEN, WindowEnergy
from dsp.objectives.ssvm import SSVMLoss
from dsp.objectives.unrolled import UnrolledLoss, sequence_loss
from dsp.objectives.value import ValueObjective
from dsp.tasks.oracles import soft_accuracy


class Identity(nn.Module):
    """Unaries are the inputs themselves: x [B, T, K] -> U [B, T, K]."""

    def forward(self, x, lengths=None):
        return x


def one_hot(y: torch.Tensor, k: int) -> torch.Tensor:
    return nn.functional.one_hot(y.clamp_min(0), k).double() * (y >= 0).unsqueeze(-1)


def padded_labels(lengths: torch.Tensor, t: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (lengths.shape[0], t), generator=gen)
    return torch.where(torch.arange(t) < lengths[:, None], y, torch.full_like(y, -1))


def test_the_crf_energy_at_one_hot_labels_is_minus_the_score_and_has_a_true_gradient():
    torch.manual_seed(0)
    model = ChainCRF(3, Identity()).double()
    with torch.no_grad():
        model.pairwise.weight.normal_()
    x, lengths = torch.randn(4, 5, 3, dtype=torch.float64), torch.tensor([5, 3, 1, 4])
    feats = model.features(x, lengths)
    y = padded_labels(lengths, 5, 3)
    assert torch.allclose(-model.energy(one_hot(y, 3), feats), chain.sequence_score(y, feats.unary, feats.pairwise, lengths))
    q = torch.softmax(torch.randn(4, 5, 3, dtype=torch.float64), -1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: model.energy(q, feats), (q,))


def test_the_mrf_energy_is_the_multilinear_extension_of_its_score():
    torch.manual_seed(0)
    model = MRF(4, 3, nn.Flatten(), graph={"kind": "chain2"}, init_std=1.0).double()  # arity 2 and 3 factors
    x = torch.randn(2, 12, dtype=torch.float64)  # unaries: 4 variables × 3 states
    pot = model.features(x)
    for labels in itertools.islice(itertools.product(range(3), repeat=4), 0, 81, 7):
        y = torch.tensor([labels, labels[::-1]])
        assert torch.allclose(-model.energy(one_hot(y, 3), pot), score_labels(pot, y))
    q = torch.softmax(torch.randn(2, 4, 3, dtype=torch.float64), -1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: model.energy(q, pot), (q,))


def test_the_sequence_spen_energy_ignores_padding_and_has_a_true_gradient():
    torch.manual_seed(0)
    model = SequenceSPEN(3, Identity(), partial(WindowEnergy, window=2, measurements=4)).double()
    x, lengths = torch.randn(3, 4, 3, dtype=torch.float64), torch.tensor([4, 2, 1])
    feats = model.features(x, lengths)
    q = torch.softmax(torch.randn(3, 4, 3, dtype=torch.float64), -1)
    changed = q.clone()
    changed[1, 2:] = torch.tensor([1.0, 0.0, 0.0])  # past the second sequence's end
    assert torch.allclose(model.energy(q, feats), model.energy(changed, feats))
    q.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: model.energy(q, feats), (q,))


def test_project_simplex_by_hand():
    v = torch.tensor([[0.5, 0.5, 0.5], [2.0, 0.0, 0.0], [0.6, 0.6, -1.0], [0.2, 0.3, 0.5]])
    expected = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    assert torch.allclose(project_simplex(v), expected)


@pytest.mark.parametrize("method", ["mirror", "projected"])
def test_inference_on_each_positions_simplex_finds_the_crf_map_of_a_strong_chain(method):
    """A chain CRF with decisive unaries: relaxed inference on the simplex lands on Viterbi's labels,
    rows stay distributions."""
    torch.manual_seed(1)
    model = ChainCRF(4, Identity())
    x, lengths = 4 * torch.randn(6, 5, 4), torch.tensor([5, 5, 4, 3, 2, 1])
    feats = model.features(x, lengths)
    result = GradientInference(method=method, lr=0.5, momentum=0.0, max_iter=300, rel_tol=0, abs_tol=0)(model, feats)
    valid = torch.arange(5) < lengths[:, None]
    assert torch.allclose(result.y.sum(-1)[valid], torch.ones(int(valid.sum())), atol=1e-5)
    viterbi, _ = chain.viterbi(feats.unary, feats.pairwise, lengths)
    assert torch.equal(result.y.argmax(-1)[valid], viterbi[valid])


def test_mirror_descent_on_the_simplex_reaches_the_softmax_of_the_entropy_smoothed_linear_energy():
    """min_q -θ·q - τH(q) over each row's simplex is q = softmax(θ/τ) (closed form)."""
    model = ChainCRF(3, Identity())
    theta = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]])
    with torch.no_grad():
        model.pairwise.weight.zero_()
        feats = model.features(theta, torch.tensor([2]))
    routine = GradientInference(method="mirror", lr=0.3, momentum=0.0, max_iter=500, rel_tol=0, abs_tol=0,
                                entropy_temperature=2.0)
    assert torch.allclose(routine(model, feats).y, torch.softmax(theta / 2.0, -1), atol=1e-4)


def test_sequence_losses_and_the_token_accuracy_oracle_by_hand():
    target = torch.tensor([[0, 1, -1]])  # two positions, then padding
    y = torch.tensor([[[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]]])
    assert soft_accuracy(y, one_hot(target, 2).float()).item() == pytest.approx((0.5 + 0.8) / 2)
    assert sequence_loss("bce", y, target).item() == pytest.approx(-(torch.tensor(0.5).log() + torch.tensor(0.8).log()).item() / 2)
    # squared: Σ over valid positions of ‖y_t - e_t‖², per sequence
    assert sequence_loss("squared", y, target).item() == pytest.approx((0.25 + 0.25) + (0.04 + 0.04))


def test_unrolled_ssvm_and_value_objectives_train_a_crf_on_label_sequences():
    torch.manual_seed(0)
    x, lengths = torch.randn(4, 5, 3), torch.tensor([5, 4, 2, 1])
    y = padded_labels(lengths, 5, 3, seed=2)
    cases = [(UnrolledLoss(), UnrolledGradientDescent(steps=3)),
             (SSVMLoss(), GradientInference(max_iter=5)),
             (ValueObjective(sources={"ground_truth": 1, "inference": 1, "adversarial": 1, "stratified": 1}),
              GradientInference(max_iter=5))]
    for objective, inference in cases:
        model = ChainCRF(3, Identity())
        if isinstance(inference, nn.Module):
            model.add_module("inference", inference)
        loss, _ = objective.loss(model, inference, x, y)
        loss.backward()
        assert torch.isfinite(loss) and model.pairwise.weight.grad.abs().sum() > 0, type(objective).__name__


def test_value_tuples_of_label_sequences_stay_distributions_with_zero_padding():
    torch.manual_seed(0)
    objective = ValueObjective(sources={"adversarial": 1, "stratified": 1}, stratified_max_flips=2)
    model = ChainCRF(4, Identity())
    lengths = torch.tensor([5, 3])
    target = one_hot(padded_labels(lengths, 5, 4), 4).float()
    feats = model.features(torch.randn(2, 5, 4), lengths)
    for generated in (objective.generate_adversarial(model, None, feats, target),
                      objective.generate_stratified(model, None, feats, target)):
        valid = torch.arange(5) < lengths[:, None]
        assert torch.allclose(generated.sum(-1)[valid], torch.ones(int(valid.sum())), atol=1e-5)
        assert generated[~valid].abs().sum() == 0 and (generated >= 0).all()
