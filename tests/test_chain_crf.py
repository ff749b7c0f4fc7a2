"""The chain CRF model, its objectives and the scaling fixes of Shevchenko & Osokin (2019)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from dsp.inference.chain_decoding import ChainDecoding
from dsp.models.chain_crf import ChainCRF, mean_abs
from dsp.nn.lenet import LeNet, PerPosition
from dsp.objectives.chain import ChainNLL, ChainSSVM, MarginalCrossEntropy, UnaryCrossEntropy
from dsp.training.scaling import choose_unary_scale, subset_losses


class LinearUnaries(nn.Module):
    """A per-position linear unary network for tiny tests: x [B, T, D] -> [B, T, K]."""

    def __init__(self, d, k):
        super().__init__()
        self.linear = nn.Linear(d, k)

    def forward(self, x, lengths=None):
        return self.linear(x)


def tiny_problem(seed=0, b=5, t=4, d=3, k=3, dtype=torch.float64):
    torch.manual_seed(seed)
    model = ChainCRF(k, LinearUnaries(d, k), pairwise_init_std=0.5).to(dtype)
    x = torch.randn(b, t, d, dtype=dtype)
    lengths = torch.tensor([4, 1, 3, 2, 4])[:b]
    y = torch.randint(0, k, (b, t))
    y[torch.arange(t) >= lengths[:, None]] = -1
    return model, x, y, lengths


def brute_force_log_probs(unary, pairwise, length):
    """log p(y) of every labelling of one chain, by enumeration -> {labels: log p}."""
    k = unary.shape[-1]
    scores = {}
    for ys in itertools.product(range(k), repeat=length):
        s = sum(unary[j, ys[j]] for j in range(length)) + sum(pairwise[ys[j], ys[j + 1]] for j in range(length - 1))
        scores[ys] = s
    log_z = torch.logsumexp(torch.stack(list(scores.values())), 0)
    return {ys: s - log_z for ys, s in scores.items()}


def test_nll_and_marginal_cross_entropy_match_enumeration():
    model, x, y, lengths = tiny_problem()
    feats = model.features(x, lengths)
    nll, ce, n_pos = 0.0, 0.0, 0
    for b in range(x.shape[0]):
        n = int(lengths[b])
        logp = brute_force_log_probs(feats.unary[b], feats.pairwise, n)
        truth = tuple(y[b, :n].tolist())
        nll += -logp[truth]
        for j in range(n):  # marginal of the true label at position j
            ce += -torch.logsumexp(torch.stack([v for ys, v in logp.items() if ys[j] == truth[j]]), 0)
            n_pos += 1
    assert torch.allclose(ChainNLL().loss_on(feats, y), nll / x.shape[0])
    assert torch.allclose(MarginalCrossEntropy().loss_on(feats, y), ce / n_pos)


def test_objectives_have_gradients_for_unaries_and_pairwise():
    model, x, y, lengths = tiny_problem()
    for objective in (ChainNLL(), MarginalCrossEntropy(), MarginalCrossEntropy(mean_field_sweeps=3), ChainSSVM()):
        model.zero_grad()
        loss, _ = objective.loss(model, None, x, y)
        loss.backward()
        assert model.pairwise.weight.grad.abs().sum() > 0, type(objective).__name__
        assert model.unary_net.linear.weight.grad.abs().sum() > 0, type(objective).__name__


def test_chain_nll_passes_a_finite_difference_check_in_its_parameters():
    """The CRF's energy (its score) and loss through the unary weights and the pairwise table."""
    from dsp.inference import chain

    model, x, y, lengths = tiny_problem()
    bias = model.unary_net.linear.bias.detach()

    def nll(pairwise, unary_weight):
        unary = model.potentials(torch.einsum("btd,kd->btk", x, unary_weight) + bias, lengths).unary
        return chain.nll(y, unary, pairwise, lengths).mean()

    w0 = model.pairwise.weight.detach().clone().requires_grad_(True)
    v0 = model.unary_net.linear.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(nll, (w0, v0))


def test_ssvm_is_zero_on_a_separable_toy_and_positive_otherwise():
    model, x, y, lengths = tiny_problem()
    feats = model.features(x, lengths)
    onehot = torch.nn.functional.one_hot(y.clamp_min(0), 3).to(feats.unary.dtype)
    feats.unary = 10.0 * onehot  # the truth wins every position by far more than the margin
    feats.pairwise = torch.zeros_like(feats.pairwise)
    assert ChainSSVM().loss_on(feats, y).item() == 0.0
    feats.unary = -10.0 * onehot
    assert ChainSSVM().loss_on(feats, y).item() > 0.0


def test_unary_cross_entropy_ignores_padding():
    model, x, y, lengths = tiny_problem()
    feats = model.features(x, lengths)
    valid = y >= 0
    expected = torch.nn.functional.cross_entropy(feats.unary[valid], y[valid])
    assert torch.allclose(UnaryCrossEntropy().loss_on(feats, y), expected)


def test_offline_scaling_normalises_potentials():
    model, x, y, lengths = tiny_problem()
    model.normalise = True
    model.unary_scale.fill_(4.0)
    feats = model.features(x, lengths)
    assert torch.allclose(mean_abs(feats.unary, lengths), torch.full((5,), 4.0, dtype=torch.float64))
    assert torch.allclose(feats.pairwise.abs().mean(), torch.tensor(1.0, dtype=torch.float64))


def test_online_scaling_picks_the_alpha_a_brute_force_grid_picks():
    model, x, y, lengths = tiny_problem(seed=3)
    with torch.no_grad():
        model.unary_net.linear.weight.mul_(25.0)  # unaries far too confident: a small α must win
    objective = MarginalCrossEntropy()
    grid = [2.0 ** t for t in range(-4, 5)]
    losses = []
    for alpha in grid:
        model.unary_scale.fill_(alpha)
        losses.append(objective.loss(model, None, x, y)[0].item())
    best = grid[min(range(len(grid)), key=losses.__getitem__)]
    logs = choose_unary_scale(model, objective, x, y, min_exp=-4, max_exp=4, subset=100, batch_size=100)
    assert logs["scaling/alpha"] == best == model.unary_scale.item()
    assert math.isclose(logs["scaling/subset_loss"], min(losses), rel_tol=1e-9)
    # in mini-batches (the loss averaged per batch, weighted by batch size) the choice is the same
    model.unary_scale.fill_(1.0)
    assert choose_unary_scale(model, objective, x, y, min_exp=-4, max_exp=4, batch_size=2)["scaling/alpha"] == best


def test_online_scaling_keeps_alpha_1_once_a_linear_top_has_converged():
    # dL_α/dα at α = 1 is <V, ∂L/∂V> + <b, ∂L/∂b> for unaries U = Vφ + b, zero wherever training
    # has converged: why Algorithm 1 keeps α = 1 on our OCR and chunking runs (docs/RESULTS.md).
    torch.manual_seed(0)
    b, t, d, k = 64, 4, 3, 3
    model = ChainCRF(k, LinearUnaries(d, k), pairwise_init_std=0.5).double()
    x = torch.randn(b, t, d, dtype=torch.float64)
    noise = -torch.log(-torch.log(torch.rand(b, t, k, dtype=torch.float64)))  # Gumbel: not separable
    y = (2 * x @ torch.randn(d, k, dtype=torch.float64) + noise).argmax(-1)  # labels that depend on x
    objective = MarginalCrossEntropy()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective.loss(model, None, x, y)[0]
        loss.backward()
        return loss

    opt.step(closure)
    h = 1e-4

    def slope_and_curvature():
        low, mid, high = subset_losses(model, objective, x, y, [1 - h, 1.0, 1 + h], subset=b, batch_size=b).tolist()
        return (high - low) / (2 * h), (low - 2 * mid + high) / h**2

    slope, curvature = slope_and_curvature()
    assert curvature > 0 and abs(slope / curvature) < 1e-4  # L_α has its minimum at α = 1
    assert choose_unary_scale(model, objective, x, y, min_exp=-3, max_exp=3, subset=b)["scaling/alpha"] == 1.0
    with torch.no_grad():
        model.unary_net.linear.weight.mul_(0.5)  # off the stationary point the slope is not zero
    slope, curvature = slope_and_curvature()
    assert slope < 0 and abs(slope / curvature) > 0.1  # now a larger α lowers the loss


@pytest.mark.parametrize("objective,method", [(ChainNLL(), "viterbi"), (ChainSSVM(), "viterbi"),
                                              (MarginalCrossEntropy(), "marginals"),
                                              (MarginalCrossEntropy(mean_field_sweeps=2), "mean_field"),
                                              (UnaryCrossEntropy(), "unary")])
def test_auto_decoding_follows_the_objective(objective, method):
    decoding = ChainDecoding("auto")
    decoding.match(objective)
    assert decoding.method == method
    model, x, y, lengths = tiny_problem()
    result = decoding(model, model.features(x, lengths))
    assert result.y.shape == y.shape and ((result.y >= 0) == (y >= 0)).all()


def test_lenet_on_padded_words_skips_padding():
    torch.manual_seed(0)
    net = PerPosition(LeNet(26))
    x = torch.rand(2, 3, 16, 8)
    lengths = torch.tensor([3, 1])
    out = net(x, lengths)
    assert out.shape == (2, 3, 26)
    assert (out[1, 1:] == 0).all()
    assert torch.allclose(out[0], net.net(x[0]), atol=1e-6)  # same as scoring the letters one by one


def test_lenet_dropout_acts_only_in_training_and_keeps_checkpoint_keys():
    torch.manual_seed(0)
    plain, dropped = LeNet(26), LeNet(26, dropout=0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()  # old checkpoints still load
    dropped.load_state_dict(plain.state_dict())
    x = torch.rand(4, 16, 8)
    plain.eval(), dropped.eval()
    assert torch.equal(plain(x), dropped(x))  # evaluation is deterministic and unchanged
    dropped.train()
    assert not torch.allclose(dropped(x), plain(x))


def test_lenet_out_bias_keeps_relu_scores_alive_at_init():
    torch.manual_seed(0)
    x = torch.rand(64, 16, 8)
    dead = (LeNet(26, out_activation="relu")(x) == 0).float().mean()
    alive = LeNet(26, out_activation="relu", out_bias=0.5)(x)
    assert dead > 0.2 and (alive > 0).all()  # the default init clips a share of the scores to zero
