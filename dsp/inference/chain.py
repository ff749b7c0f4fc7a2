"""Exact inference for the linear-chain CRF (Shevchenko & Osokin 2019, §4.1, Eq. 1-8).

Score of a labelling (Eq. 1): s(y) = Σ_j U[j, y_j] + Σ_j W(y_j, y_{j+1}).

Conventions (shared with every caller):
  unary     [B, T, K]  float; positions j >= lengths[b] are padding and hold anything.
  pairwise  [K, K] shared by all edges, or [B, T-1, K, K] per edge (edge j links j and j+1).
  lengths   [B] int64 with 1 <= lengths[b] <= T.
  labels    [B, T] int64 with -1 at padded positions.

One primitive, the forward algorithm (`log_partition`, matrix products in exp space), is written
by hand; unary and pairwise marginals are its gradients w.r.t. unary and pairwise (the
pytorch-struct idea), so they are exact, batched and differentiable for free. Every function
loops over time only and is vectorised over batch and labels; padded steps are skipped with
`torch.where` on the mask, which makes mixed lengths in one batch exact.
"""
from __future__ import annotations

import torch

from dsp.inference.full_precision import full_precision


def mask_from_lengths(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """True at valid positions -> [B, T] bool."""
    return torch.arange(T, device=lengths.device) < lengths[:, None]  # [B, T]


def _check(unary: torch.Tensor, pairwise: torch.Tensor, lengths: torch.Tensor):
    """Validate shapes/lengths; return (lengths on unary's device, mask [B, T])."""
    if unary.dim() != 3:
        raise ValueError(f"unary must have shape [B, T, K], got {tuple(unary.shape)}")
    B, T, K = unary.shape
    if pairwise.dim() == 2:
        if pairwise.shape != (K, K):
            raise ValueError(f"pairwise must have shape [K, K] = [{K}, {K}] (K from unary), "
                             f"got {tuple(pairwise.shape)}")
    elif pairwise.dim() == 4:
        if pairwise.shape != (B, T - 1, K, K):
            raise ValueError(f"pairwise must have shape [B, T-1, K, K] = [{B}, {T - 1}, {K}, {K}] "
                             f"(from unary), got {tuple(pairwise.shape)}")
    else:
        raise ValueError(f"pairwise must have shape [K, K] or [B, T-1, K, K], got {tuple(pairwise.shape)}")
    return _check_lengths(lengths, unary)


def _check_lengths(lengths: torch.Tensor, unary: torch.Tensor):
    B, T = unary.shape[:2]
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"lengths must have shape [B] = [{B}], got {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
    lo, hi = int(lengths.min()), int(lengths.max())  # one host sync; cheap next to the T-loop
    if lo < 1 or hi > T:
        raise ValueError(f"lengths must lie in [1, T={T}], got min {lo} and max {hi}")
    lengths = lengths.to(unary.device)
    return lengths, mask_from_lengths(lengths, T)


def _check_labels(labels: torch.Tensor, unary: torch.Tensor) -> None:
    if labels.shape != unary.shape[:2]:
        raise ValueError(f"labels must have shape [B, T] = {list(unary.shape[:2])}, got {tuple(labels.shape)}")


def _clean(unary, pairwise, mask):
    """Zero the padding so that garbage there (even inf/nan) cannot leak into values or gradients."""
    unary = unary.masked_fill(~mask[..., None], 0.0)  # [B, T, K]
    if pairwise.dim() == 4:
        pairwise = pairwise.masked_fill(~mask[:, 1:, None, None], 0.0)  # [B, T-1, K, K]
    return unary, pairwise


def _edge(pairwise: torch.Tensor, j: int) -> torch.Tensor:
    """Pairwise potentials of edge j (j, j+1): [K, K] or [B, K, K], both broadcast against [B, K, 1]."""
    return pairwise if pairwise.dim() == 2 else pairwise[:, j]


@full_precision  # fp32 under bf16/fp16 autocast: a sum of T scores loses whole units in bfloat16
def sequence_score(labels, unary, pairwise, lengths) -> torch.Tensor:
    """s(y) of the given labellings (Eq. 1), padding ignored -> [B]."""
    lengths, mask = _check(unary, pairwise, lengths)
    _check_labels(labels, unary)
    unary, pairwise = _clean(unary, pairwise, mask)
    K = unary.shape[-1]
    y = labels.clamp_min(0)  # [B, T]; -1 padding becomes a harmless index, masked below
    u = unary.gather(2, y[..., None]).squeeze(-1)  # [B, T]
    if pairwise.dim() == 2:
        w = pairwise[y[:, :-1], y[:, 1:]]  # [B, T-1]
    else:
        w = pairwise.flatten(2).gather(2, (y[:, :-1] * K + y[:, 1:])[..., None]).squeeze(-1)  # [B, T-1]
    zero = unary.new_zeros(())
    return torch.where(mask, u, zero).sum(1) + torch.where(mask[:, 1:], w, zero).sum(1)  # [B]


# Pairwise tables whose entries span less than this take the matrix-product forward pass: each
# column of exp(W - max) then keeps an entry of 1 and nothing below exp(-60), far from float32's
# underflow (1e-38), so no sum can vanish. Wider tables take the logsumexp recursion.
MATMUL_RANGE = 60.0


def _log_matmul_step(alpha: torch.Tensor, exp_edge: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """log Σ_i exp(alpha[b, i] + W[i, j]) as a matrix product: exp_edge = exp(W - shift) with shift
    the column maxima ([K] or [B, K]); maxima are constants of the identity, so they are detached."""
    top = alpha.amax(-1, keepdim=True).detach()  # [B, 1]
    p = torch.exp(alpha - top)  # [B, K], max entry 1
    if exp_edge.dim() == 2:
        s = p @ exp_edge  # [B, K]
    else:
        s = torch.bmm(p.unsqueeze(1), exp_edge).squeeze(1)  # [B, K]
    return torch.log(s) + top + shift


@full_precision  # fp32 under bf16/fp16 autocast: the exp-space products and log Z - s(y) need float32
def log_partition(unary, pairwise, lengths) -> torch.Tensor:
    """log Z = log Σ_y exp s(y) by the forward algorithm -> [B].

    Each step is a [B, K] × [K, K] matrix product in exp space, stabilised by the row maxima of
    alpha and the column maxima of W (exact, not an approximation); tables spanning MATMUL_RANGE
    or more fall back to logsumexp over [B, K, K], which never underflows."""
    lengths, mask = _check(unary, pairwise, lengths)
    unary, pairwise = _clean(unary, pairwise, mask)
    alpha = unary[:, 0]  # [B, K]: log-sum over prefixes ending in each label
    T = unary.shape[1]
    if T > 1 and float(pairwise.detach().amax() - pairwise.detach().amin()) < MATMUL_RANGE:
        shift = pairwise.detach().amax(-2)  # [K] or [B, T-1, K]: column maxima
        exp_pairwise = torch.exp(pairwise - shift.unsqueeze(-2))  # once for all steps
        for t in range(1, T):
            edge_shift = shift if pairwise.dim() == 2 else shift[:, t - 1]
            nxt = _log_matmul_step(alpha, _edge(exp_pairwise, t - 1), edge_shift) + unary[:, t]  # [B, K]
            alpha = torch.where(mask[:, t, None], nxt, alpha)  # finished sequences keep their alpha
    else:
        for t in range(1, T):
            nxt = torch.logsumexp(alpha[:, :, None] + _edge(pairwise, t - 1), dim=1) + unary[:, t]  # [B, K]
            alpha = torch.where(mask[:, t, None], nxt, alpha)
    return torch.logsumexp(alpha, dim=-1)  # [B]


@full_precision  # fp32 leaves, so the marginals (gradients of log Z) are float32 too
def _grad_log_partition(unary, pairwise, lengths, wrt_unary: bool):
    """∂ log Z / ∂unary (or ∂pairwise): exact marginals.

    Works under torch.no_grad() at the call site (grad is re-enabled on detached leaf copies) and
    keeps the graph (create_graph=True) when the caller can backpropagate through the result.
    """
    keep_graph = torch.is_grad_enabled() and (unary.requires_grad or pairwise.requires_grad)
    with torch.enable_grad():
        # A leaf copy for any input we differentiate w.r.t. that is not already in a graph.
        if not (keep_graph and unary.requires_grad):
            unary = unary.detach().requires_grad_(wrt_unary)
        if not (keep_graph and pairwise.requires_grad):
            pairwise = pairwise.detach().requires_grad_(not wrt_unary)
        logz = log_partition(unary, pairwise, lengths)  # [B]
        target = unary if wrt_unary else pairwise
        # Summing over the batch is fine: example b's log Z depends only on example b's potentials.
        (grad,) = torch.autograd.grad(logz.sum(), target, create_graph=keep_graph)
    return grad


def marginals(unary, pairwise, lengths) -> torch.Tensor:
    """Unary marginals p_j(y_j) (Eq. 3) -> [B, T, K]; zero at padded positions."""
    return _grad_log_partition(unary, pairwise, lengths, wrt_unary=True)  # [B, T, K]


def pairwise_marginals(unary, pairwise, lengths) -> torch.Tensor:
    """Edge marginals p(y_j, y_{j+1}) -> [B, T-1, K, K]; zero on padded edges."""
    _check(unary, pairwise, lengths)
    B, T, K = unary.shape
    if T == 1:  # no edges: pairwise takes no part in log Z, so there is nothing to differentiate
        return unary.new_zeros(B, 0, K, K)
    if pairwise.dim() == 2:
        # Differentiate w.r.t. a per-edge view: the gradient of the shared matrix would sum the edges.
        pairwise = pairwise.expand(B, T - 1, K, K)  # [B, T-1, K, K]
    return _grad_log_partition(unary, pairwise, lengths, wrt_unary=False)  # [B, T-1, K, K]


@full_precision  # fp32 under bf16/fp16 autocast: max-sums over T positions, ties broken by rounding otherwise
def viterbi(unary, pairwise, lengths):
    """MAP labelling by max-product -> (labels [B, T] int64, -1 padded; score [B]).

    Laid out label-major ([K, B], [K_old, K_new, B]) so that every max runs over the outermost
    axis: an element-wise maximum of contiguous slabs, several times faster than a max over a
    short innermost axis. The forward pass keeps only the max-marginals δ_t (no argmax, the
    costly part of a max); the backtrack recomputes argmax_i δ_t[i] + W[i, y_{t+1}] for the one
    label chosen at t+1, from the same floats, so it picks what back-pointers would have."""
    lengths, mask = _check(unary, pairwise, lengths)
    unary, pairwise = _clean(unary, pairwise, mask)
    B, T, K = unary.shape
    u = unary.permute(1, 2, 0)  # [T, K, B]
    valid = mask.t()[:, None, :]  # [T, 1, B]
    # edge t-1 as [K_old, K_new, 1] (shared) or [K_old, K_new, B] (per example)
    edges = pairwise[:, :, None] if pairwise.dim() == 2 else pairwise.permute(1, 2, 3, 0)
    delta = u[0]  # [K, B]: best prefix score ending in each label
    deltas = [delta]
    for t in range(1, T):
        edge = edges if pairwise.dim() == 2 else edges[t - 1]
        nxt = (delta[:, None, :] + edge).amax(0) + u[t]  # [K, B]
        delta = torch.where(valid[t], nxt, delta)  # finished sequences keep their δ
        deltas.append(delta)
    score, y = delta.max(0)  # [B], [B]
    path = [y]
    for t in range(T - 2, -1, -1):
        if pairwise.dim() == 2:
            w = pairwise.index_select(1, y)  # [K, B]: W[i, y_b]
        else:
            w = edges[t].gather(1, y.view(1, 1, B).expand(K, 1, B)).squeeze(1)  # [K, B]
        best = (deltas[t] + w).max(0).indices  # [B]
        # past a sequence's end the label is carried down unchanged to position lengths-1
        y = torch.where(valid[t + 1, 0], best, y)
        path.append(y)
    labels = torch.stack(path[::-1], dim=1).masked_fill(~mask, -1)  # [B, T]
    return labels, score


def nll(labels, unary, pairwise, lengths) -> torch.Tensor:
    """Negative log-likelihood -log P(y | x) = log Z - s(y) (Eq. 4) -> [B]."""
    return log_partition(unary, pairwise, lengths) - sequence_score(labels, unary, pairwise, lengths)


def hamming_augment(unary, labels, lengths, weight: float = 1.0, normalise: bool = True) -> torch.Tensor:
    """unary + weight·Δ-per-position: adds weight/len (Eq. 8; weight if not normalise) to every
    wrong label at valid positions, so that s'(y) = s(y) + weight·Δ(y, y*) for loss-augmented Viterbi."""
    if unary.dim() != 3:
        raise ValueError(f"unary must have shape [B, T, K], got {tuple(unary.shape)}")
    _check_labels(labels, unary)
    B, T, K = unary.shape
    lengths, mask = _check_lengths(lengths, unary)  # [B], [B, T]
    wrong = torch.ones_like(unary).scatter(2, labels.clamp_min(0)[..., None], 0.0)  # [B, T, K]
    scale = weight / lengths.to(unary) if normalise else unary.new_full((B,), weight)  # [B]
    return unary + wrong * mask[..., None] * scale[:, None, None]  # [B, T, K]


def ssvm_loss(labels, unary, pairwise, lengths, weight: float = 1.0) -> torch.Tensor:
    """Structured hinge (Eq. 7): max_y [s(y) + weight·Δ(y, y*)] - s(y*) -> [B], >= 0.

    The maximiser comes from loss-augmented Viterbi without a graph; the gradient then flows
    through the scores of the two labellings (a subgradient of the hinge).
    """
    augmented = hamming_augment(unary, labels, lengths, weight)  # [B, T, K]
    with torch.no_grad():
        y_hat, _ = viterbi(augmented.detach(), pairwise.detach(), lengths)  # [B, T]
    loss = sequence_score(y_hat, augmented, pairwise, lengths) - sequence_score(labels, unary, pairwise, lengths)
    # Mathematically >= 0 (y* is a candidate); clamp only removes rounding below zero.
    return loss.clamp_min(0.0)  # [B]
