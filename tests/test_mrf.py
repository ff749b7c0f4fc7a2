"""MRFs on region graphs: message passing against brute-force enumeration, the dual's monotone
descent, the ε → 0 hinge limit, blended learning and the model's potentials."""
import itertools

import pytest
import torch

from dsp.errors import DspError
from dsp.inference import chain
from dsp.inference.message_passing import (CountingNumbers, MessagePassing, MRFPotentials, dual, score_labels,
                                           sweep, variable_beliefs, zero_messages)
from dsp.inference.region_graph import build_graph
from dsp.models.mrf import MRF
from dsp.nn.mlp import MLP
from dsp.objectives.mrf import BlendedMRFLoss, MRFUnaryLoss


def random_potentials(graph, batch=3, k=3, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    unary = torch.randn(batch, graph.num_variables, k, generator=gen, dtype=torch.float64) * scale
    factors = [torch.randn(batch, g.size, *([k] * g.arity), generator=gen, dtype=torch.float64) * scale
               for g in graph.groups]
    return MRFPotentials(unary, factors, graph)


def enumerate_all(pot):
    """Scores of every labelling -> (labellings [S, N], scores [B, S])."""
    n, k = pot.graph.num_variables, pot.unary.shape[-1]
    ys = torch.tensor(list(itertools.product(range(k), repeat=n)))  # [S, N]
    b = pot.batch_size
    scores = torch.stack([score_labels(pot, y.expand(b, n)) for y in ys], 1)  # [B, S]
    return ys, scores


def brute_marginals(pot):
    ys, scores = enumerate_all(pot)
    p = torch.softmax(scores, 1)  # [B, S]
    k = pot.unary.shape[-1]
    onehot = torch.nn.functional.one_hot(ys, k).to(p.dtype)  # [S, N, K]
    return torch.einsum("bs,snk->bnk", p, onehot)


def counts(graph, variables="1.0", epsilon=1.0):
    return CountingNumbers.make(graph, variables, 1.0, epsilon)


def test_graph_builders_and_colouring():
    g = build_graph(5, "chain2")
    assert [tuple(f) for f in g.groups[0].variables.tolist()] == [(0, 1), (1, 2), (2, 3), (3, 4), (0, 2), (1, 3), (2, 4)]
    assert g.groups[0].types.tolist() == [0, 0, 0, 0, 1, 1, 1]  # one table per distance
    assert g.degree.tolist() == [2, 3, 4, 3, 2]
    for graph in (g, build_graph(6, "full"), build_graph(5, "list", [[0, 1, 2], [2, 3], [3, 4, 0]])):
        for blocks in graph.colours:  # no factor sees two variables of one colour
            touched = torch.cat([b.factors + 1000 * b.group for b in blocks])
            assert touched.unique().numel() == touched.numel()
        covered = sorted(v for blocks in graph.colours for b in blocks for v in b.variables.unique().tolist())
        assert set(covered) == set(range(graph.num_variables))
    assert len(build_graph(6, "full").colours) == 6
    with pytest.raises(DspError, match="distinct variables"):
        build_graph(3, "list", [[0, 0]])


@pytest.mark.parametrize("kind,factors", [("chain", None), ("list", [[0, 1], [1, 2], [1, 3], [3, 4]]),
                                          ("list", [[0, 1, 2], [2, 3]])])
def test_bethe_message_passing_is_exact_on_trees(kind, factors):
    graph = build_graph(5 if factors is None or len(factors) > 2 else 4, kind, factors)
    pot = random_potentials(graph, k=3, scale=1.5)
    c = counts(graph, "bethe")
    lam = sweep(pot, zero_messages(pot), c, iterations=30)
    assert torch.allclose(variable_beliefs(pot, lam, c), brute_marginals(pot), atol=1e-8)


def test_convex_counting_numbers_give_an_upper_bound_and_chain_log_partition_checks_enumeration():
    graph = build_graph(4, "chain")
    pot = random_potentials(graph)
    _, scores = enumerate_all(pot)
    log_z = torch.logsumexp(scores, 1)
    lengths = torch.full((3,), 4)
    assert torch.allclose(chain.log_partition(pot.unary, pot.factors[0], lengths), log_z)
    c = counts(graph)  # c_r = 1: fractional entropy over-counts, so the bound is above log Z
    lam = sweep(pot, zero_messages(pot), c, iterations=200)
    assert (dual(pot, lam, c) >= log_z - 1e-9).all()


def test_dual_decreases_monotonically_on_a_loopy_graph():
    graph = build_graph(5, "full")
    pot = random_potentials(graph, k=3, scale=2.0, seed=1)
    c = counts(graph)
    lam, values = zero_messages(pot), []
    for _ in range(15):
        for blocks in graph.colours:  # every block update is an exact minimisation
            lam = sweep(MRFPotentials(pot.unary, pot.factors, one_colour(graph, blocks)), lam, c)
            values.append(dual(pot, lam, c))
    v = torch.stack(values)  # [steps, B]
    assert (v[1:] <= v[:-1] + 1e-10).all()
    assert (v[0] - v[-1] > 1e-3).all()  # and it does move


def one_colour(graph, blocks):
    """The same graph with a schedule of one colour, so a sweep is a single block update."""
    from dataclasses import replace

    return replace(graph, colours=[blocks])


def test_epsilon_to_zero_recovers_the_structured_hinge():
    graph = build_graph(4, "chain")
    pot = random_potentials(graph, batch=2, k=3)
    y = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]])
    ys, scores = enumerate_all(pot)
    hamming = (ys.unsqueeze(0) != y.unsqueeze(1)).sum(-1).double()  # [B, S]
    hinge = (scores + hamming).amax(1) - score_labels(pot, y)
    for eps, tol in ((1e-3, 1e-2), (1e-4, 1e-3)):
        loss = BlendedMRFLoss(epsilon=eps, margin=1.0, iterations=300, persistent=False)
        model = FixedPotentials(pot)
        value, _ = loss.loss(model, None, None, y)
        # The relaxation is tight on a chain: the bound tends to the exact hinge as ε -> 0.
        assert abs(float(value) - float(hinge.mean())) < tol


class FixedPotentials(torch.nn.Module):
    def __init__(self, pot):
        super().__init__()
        self.pot = pot

    def features(self, x, lengths=None):
        return self.pot


def tiny_mrf(kind="chain2", pairwise="table", n=4, k=3, d=6):
    torch.manual_seed(0)
    from dsp.nn.lenet import PerPosition

    unary = PerPosition(MLP(d, [5], k, flatten=True))
    return MRF(n, k, unary, {"kind": kind}, pairwise=pairwise, pairwise_hidden=4, in_features=d, init_std=0.5)


def test_blended_gradient_is_beliefs_minus_ground_truth():
    """∂L/∂W_type = Σ_edges (b_edge − δ(y*)) for tables: the gradient of Fig. 3, step 3."""
    model = tiny_mrf(kind="chain")
    x, y = torch.randn(2, 4, 2, 3), torch.tensor([[0, 1, 2, 0], [1, 1, 0, 2]])
    loss_fn = BlendedMRFLoss(iterations=50, persistent=False)
    loss, _ = loss_fn.loss(model, None, x, y)
    loss.backward()
    pot = model.features(x)
    c = loss_fn.counts(pot)
    lam = sweep(pot, zero_messages(pot), c, 50)
    from dsp.inference.message_passing import reparameterised

    phi = reparameterised(pot.factors[0], lam[0])  # factor beliefs b_p ∝ exp(f̂_p / εc_p)
    b = torch.softmax(phi.flatten(2), -1).view_as(phi)  # [B, M, K, K]
    truth = torch.zeros_like(b)
    for i in range(2):
        for m, (u, v) in enumerate(pot.graph.groups[0].variables.tolist()):
            truth[i, m, y[i, u], y[i, v]] = 1
    expected = (b - truth).sum((0, 1)) / 2
    assert torch.allclose(model.pairwise.tables["2"].grad.view(3, 3), expected, atol=1e-5)


def test_blended_learning_keeps_messages_per_example_and_restores_them():
    model = tiny_mrf()
    x, y = torch.randn(6, 4, 2, 3), torch.randint(0, 3, (6, 4))
    loss_fn = BlendedMRFLoss(iterations=1)
    loss_fn.loss(model, None, x[:3], y[:3], index=torch.tensor([0, 1, 2]))
    after_one = [g.clone() for g in loss_fn.store.groups]
    loss_fn.loss(model, None, x[3:], y[3:], index=torch.tensor([5, 4, 3]))
    assert loss_fn.store.groups[0].shape[0] == 6
    assert torch.equal(loss_fn.store.groups[0][:3], after_one[0][:3])  # untouched examples keep theirs
    assert loss_fn.store.groups[0][3:].abs().sum() > 0
    # Repeated single sweeps on the same example approach the converged bound from above.
    idx = torch.tensor([0, 1, 2])
    values = [loss_fn.loss(model, None, x[:3], y[:3], index=idx)[0].item() for _ in range(30)]
    converged = BlendedMRFLoss(iterations=200, persistent=False).loss(model, None, x[:3], y[:3])[0].item()
    assert values[0] >= values[-1] - 1e-6 and abs(values[-1] - converged) < 1e-3
    restored = BlendedMRFLoss()
    restored.load_state_dict(loss_fn.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.store.groups, loss_fn.store.groups))


@pytest.mark.parametrize("pairwise", ["table", "mlp"])
def test_mrf_energy_passes_a_finite_difference_gradient_check(pairwise):
    model = tiny_mrf(pairwise=pairwise).double()
    x, y = torch.randn(2, 4, 2, 3, dtype=torch.float64), torch.randint(0, 3, (2, 4))
    loss_fn = BlendedMRFLoss(iterations=3, persistent=False)
    params = [p for p in model.parameters()]

    def f(*ps):
        with torch.no_grad():
            for p, v in zip(params, ps):
                p.copy_(v)
        return loss_fn.loss(model, None, x, y)[0]

    # Messages depend on w but the dual is minimised in λ: at fixed λ the gradient is exact.
    # gradcheck re-runs message passing from zero at each point, so compare at convergence.
    loss_fn.iterations = 300
    base = [p.detach().clone() for p in params]
    loss = f(*base)
    grads = torch.autograd.grad(loss, params)
    for p, g, b in zip(params, grads, base):
        for i in torch.randperm(p.numel())[:3].tolist():
            e = torch.zeros_like(b).flatten()
            e[i] = 1e-5
            e = e.view_as(b)
            vals = []
            for sign in (1, -1):
                shifted = [bb + sign * e if bb is b else bb for bb in base]
                vals.append(f(*shifted).item())
            fd = (vals[0] - vals[1]) / 2e-5
            assert abs(fd - float(g.flatten()[i])) <= 1e-5 + 1e-4 * abs(fd)
    f(*base)


def test_message_passing_prediction_and_viterbi_agree_on_a_peaked_chain():
    graph = build_graph(5, "chain")
    pot = random_potentials(graph, batch=4, k=3, scale=3.0, seed=3)
    map_labels = chain.viterbi(pot.unary, pot.factors[0], torch.full((4,), 5))[0]
    ys, scores = enumerate_all(pot)
    assert torch.equal(map_labels, ys[scores.argmax(1)])
    low_temp = MessagePassing(iterations=200, epsilon=0.05)(None, pot)
    assert torch.equal(low_temp.y, map_labels)
    assert torch.equal(MessagePassing(decode="viterbi")(None, pot).y, map_labels)
    with pytest.raises(DspError, match="first-order chain"):
        MessagePassing(decode="viterbi")(None, random_potentials(build_graph(4, "chain2")))


def test_tagging_mrf_outputs_probabilities_and_unary_loss():
    torch.manual_seed(0)
    n_labels, d = 5, 7
    model = MRF(n_labels, 2, MLP(d, [8], n_labels * 2), {"kind": "full", "share": False})
    assert model.pairwise.tables["2"].shape == (10, 4)  # one 2×2 table per edge
    x = torch.randn(3, d)
    pot = model.features(x)
    out = MessagePassing(iterations=5, output="probability")(model, pot)
    assert out.y.shape == (3, n_labels) and ((out.y >= 0) & (out.y <= 1)).all()
    y = (torch.rand(3, n_labels) > 0.5).float()
    loss, _ = MRFUnaryLoss().loss(model, None, x, y)
    loss.backward()
    assert model.pairwise.tables["2"].grad is None and loss.item() > 0
    assert "pairwise_coupling" in model.images()
