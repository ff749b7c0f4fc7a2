"""Dual message passing on the local polytope (Chen et al. 2015, Fig. 3 and Eq. 5), in log space,
vectorised over the batch and over the factors of each colour.

Notation: θ_r the variables' (unary) potentials [B, N, K], θ_p the factors' [B, M, K, …, K];
λ_{r→p} the messages, one [K] vector per (factor, slot), stored as [B, M, a, K] per factor group.
With counting numbers c_r (variables) and c_p (factors) and temperature ε:

    f̂_p = θ_p + Σ_{r∈C(p)} λ_{r→p}          f̂_r = θ_r − Σ_{p∈P(r)} λ_{r→p}
    dual(λ) = Σ_p εc_p lse(f̂_p / εc_p) + Σ_r εc_r lse(f̂_r / εc_r)    (upper-bounds ε ln Z_ε)

The closed-form block update of a variable r (all its outgoing messages at once):

    μ_{p→r} = εc_p lse_{y_p∖y_r}(f̂_p / εc_p) − λ_{r→p}
    λ_{r→p} = c_p / (c_r + Σ_{p'} c_{p'}) · (θ_r + Σ_{p'} μ_{p'→r}) − μ_{p→r}

εc = 0 turns lse into max (ε = 0: the structured hinge / MAP side). After an update the variable's
belief is softmax((θ_r + Σμ) / (ε C_r)), C_r = c_r + Σ c_p, which stays defined for c_r ≤ 0 — the
Bethe numbers c_r = 1 − deg(r) make this sum-product belief propagation, exact on trees.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from dsp import interfaces as I
from dsp.errors import DspError
from dsp.inference.full_precision import full_precision
from dsp.inference.gradient import InferenceResult
from dsp.inference.region_graph import RegionGraph
from dsp.schema import Count, NonNegative


@dataclass
class MRFPotentials:
    unary: torch.Tensor  # [B, N, K]
    factors: list  # per factor group: [B, M, K, …, K]
    graph: RegionGraph

    @property
    def batch_size(self) -> int:
        return self.unary.shape[0]

    def detach(self) -> "MRFPotentials":
        return MRFPotentials(self.unary.detach(), [f.detach() for f in self.factors], self.graph)

    def take(self, index: torch.Tensor) -> "MRFPotentials":
        return MRFPotentials(self.unary[index], [f[index] for f in self.factors], self.graph)


@dataclass
class CountingNumbers:
    """c_r per variable ([N]) and c_p (one number for all factors), with the temperature ε."""

    variables: torch.Tensor
    factors: float
    epsilon: float

    @classmethod
    def make(cls, graph: RegionGraph, variables="1.0", factors: float = 1.0, epsilon: float = 1.0, device=None):
        if epsilon < 0 or factors < 0:
            raise DspError(f"epsilon and the factors' counting number must be >= 0 (got {epsilon}, {factors})")
        if str(variables) == "bethe":  # c_r = 1 - deg(r): exact marginals on trees (not convex)
            c_r = 1.0 - graph.degree.double()
        else:
            try:
                c_r = torch.full((graph.num_variables,), float(variables), dtype=torch.float64)
            except ValueError:
                raise DspError(f"counting number of the variables {variables!r}: a number or 'bethe'") from None
        if (c_r + factors * graph.degree < 1e-9).any():
            raise DspError("every variable needs c_r + Σ_p c_p > 0; raise the counting numbers")
        return cls(c_r.float().to(device), float(factors), float(epsilon))


def smooth_max(x: torch.Tensor, dims, temperature: float) -> torch.Tensor:
    """temperature · lse(x / temperature) over `dims`; the max when temperature is 0."""
    if temperature == 0:
        return x.amax(dim=dims)
    return temperature * torch.logsumexp(x / temperature, dim=dims)


def _broadcast(msg: torch.Tensor, slot: int, arity: int) -> torch.Tensor:
    """λ [B, E, K] -> [B, E, 1, …, K, …, 1] with K on the factor axis of `slot`."""
    shape = [msg.shape[0], msg.shape[1]] + [1] * arity
    shape[2 + slot] = msg.shape[2]
    return msg.view(shape)


def reparameterised(theta: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """f̂_p = θ_p + Σ_j λ_{j→p} for a factor group: θ [B, E, K…], λ [B, E, a, K] -> [B, E, K…]."""
    out = theta
    for j in range(lam.shape[2]):
        out = out + _broadcast(lam[:, :, j], j, lam.shape[2])
    return out


def factor_marginal(phi: torch.Tensor, slot: int, temperature: float) -> torch.Tensor:
    """temperature · lse over every factor axis but `slot`: [B, E, K…] -> [B, E, K]."""
    arity = phi.dim() - 2
    dims = tuple(2 + j for j in range(arity) if j != slot)
    return smooth_max(phi, dims, temperature) if dims else phi


def zero_messages(pot: MRFPotentials) -> list:
    b, k = pot.unary.shape[0], pot.unary.shape[2]
    return [pot.unary.new_zeros(b, g.size, g.arity, k) for g in pot.graph.groups]


def update_colour(pot: MRFPotentials, lam: list, blocks, counts: CountingNumbers) -> None:
    """Closed-form block-coordinate update of all outgoing messages of one colour's variables."""
    t_c = counts.epsilon * counts.factors
    scores = pot.unary.clone()  # θ_r + Σ μ_{p→r}, accumulated for this colour's variables
    mus = []
    for blk in blocks:
        lam_g = lam[blk.group][:, blk.factors]  # [B, E, a, K]
        phi = reparameterised(pot.factors[blk.group][:, blk.factors], lam_g)
        mu = factor_marginal(phi, blk.slot, t_c) - lam_g[:, :, blk.slot]  # [B, E, K]
        scores.index_add_(1, blk.variables, mu)
        mus.append(mu)
    weight = counts.factors / (counts.variables + counts.factors * pot.graph.degree)  # [N]
    for blk, mu in zip(blocks, mus):
        new = weight[blk.variables, None] * scores[:, blk.variables] - mu  # [B, E, K]
        lam[blk.group][:, blk.factors, blk.slot] = new


@full_precision  # fp32 under bf16/fp16 autocast: messages are differences of log-sum-exps
def sweep(pot: MRFPotentials, lam: list, counts: CountingNumbers, iterations: int = 1) -> list:
    """`iterations` passes over all colours, in place on (a copy of) the messages."""
    lam = [m.clone() for m in lam]
    for _ in range(iterations):
        for blocks in pot.graph.colours:
            update_colour(pot, lam, blocks, counts)
    return lam


@full_precision
def variable_scores(pot: MRFPotentials, lam: list, counts: CountingNumbers) -> torch.Tensor:
    """θ_r + Σ_p μ_{p→r} for every variable -> [B, N, K]."""
    t_c = counts.epsilon * counts.factors
    scores = pot.unary
    for gi, g in enumerate(pot.graph.groups):
        phi = reparameterised(pot.factors[gi], lam[gi])
        for slot in range(g.arity):
            mu = factor_marginal(phi, slot, t_c) - lam[gi][:, :, slot]
            scores = scores.index_add(1, g.variables[:, slot], mu)
    return scores


@full_precision
def variable_beliefs(pot: MRFPotentials, lam: list, counts: CountingNumbers) -> torch.Tensor:
    """b_r ∝ exp((θ_r + Σ μ) / (ε C_r)) -> [B, N, K] (one-hot argmax when ε = 0)."""
    scores = variable_scores(pot, lam, counts)
    if counts.epsilon == 0:
        return torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).to(scores.dtype)
    total = counts.variables + counts.factors * pot.graph.degree  # [N]
    return torch.softmax(scores / (counts.epsilon * total)[:, None], dim=-1)


@full_precision  # fp32: the dual sums log-sum-exps over all factors
def dual(pot: MRFPotentials, lam: list, counts: CountingNumbers) -> torch.Tensor:
    """The dual of Eq. 5 (without −F(w)) per example -> [B]. Differentiable in the potentials;
    needs c_r >= 0 (it is an upper bound on the approximate ε ln Z only then)."""
    eps = counts.epsilon
    if (counts.variables < 0).any():
        raise DspError("the dual of Eq. 5 needs counting numbers c_r >= 0 (not 'bethe')")
    out = pot.unary.new_zeros(pot.batch_size)
    unary_hat = pot.unary
    for gi, g in enumerate(pot.graph.groups):
        phi = reparameterised(pot.factors[gi], lam[gi])
        out = out + smooth_max(phi.flatten(2), 2, eps * counts.factors).sum(1)
        for slot in range(g.arity):
            unary_hat = unary_hat.index_add(1, g.variables[:, slot], -lam[gi][:, :, slot])
    t = eps * counts.variables  # [N]; a zero temperature is a max
    safe = torch.where(t > 0, t, torch.ones_like(t))[:, None]  # [N, 1]
    per_var = torch.where(t > 0, safe.squeeze(1) * torch.logsumexp(unary_hat / safe, -1), unary_hat.amax(-1))  # [B, N]
    return out + per_var.sum(1)


@full_precision  # fp32: a sum over all variables and factors
def score_labels(pot: MRFPotentials, y: torch.Tensor) -> torch.Tensor:
    """F(x, y) = Σ_r f_r(x, y_r) for labels y [B, N] (int) -> [B]."""
    out = pot.unary.gather(2, y.unsqueeze(-1)).squeeze(-1).sum(1)
    k = pot.unary.shape[-1]
    for gi, g in enumerate(pot.graph.groups):
        flat = y.new_zeros(y.shape[0], g.size)
        for slot in range(g.arity):
            flat = flat * k + y[:, g.variables[:, slot]]  # [B, M] row-major index into K^a
        out = out + pot.factors[gi].flatten(2).gather(2, flat.unsqueeze(-1)).squeeze(-1).sum(1)
    return out


@full_precision
def relaxed_score(pot: MRFPotentials, q: torch.Tensor) -> torch.Tensor:
    """The multilinear extension of F: Σ_r q_r·θ_r + Σ_p Σ_{y_p} θ_p(y_p) Π_{r∈p} q_r(y_r) for
    per-variable distributions q [B, N, K] -> [B]; equals score_labels at one-hot q."""
    out = (q * pot.unary).sum((1, 2))
    for gi, g in enumerate(pot.graph.groups):
        t = pot.factors[gi]  # [B, M, K, …, K]
        for slot in range(g.arity):  # contract the leading K axis with that slot's variable
            qs = q[:, g.variables[:, slot]]  # [B, M, K]
            t = (t * qs.view(*qs.shape, *([1] * (t.dim() - 3)))).sum(2)
        out = out + t.sum(1)  # [B]
    return out


class MessagePassing(I.Inference):
    """Prediction for MRFs: `iterations` sweeps of message passing from zero messages, then MAP
    decoding from the variables' beliefs (decode=beliefs), or exact Viterbi (decode=viterbi, for
    first-order chains, for comparison).

    output=labels returns labels [B, N]; output=probability returns the beliefs of state 1
    [B, N] of binary variables (multi-label tagging, where the task thresholds them).
    tol > 0 stops early once no message moves by more than tol (checked every 5 sweeps).
    """

    outputs = frozenset({I.SEQUENCE, I.MULTILABEL})
    needs = frozenset({I.REGION_POTENTIALS})

    def __init__(self, iterations: Count = 20, epsilon: NonNegative = 1.0,
                 counting_variables: float | Literal["bethe"] = 1.0, counting_factors: NonNegative = 1.0,
                 decode: Literal["beliefs", "viterbi"] = "beliefs", output: Literal["labels", "probability"] = "labels",
                 tol: NonNegative = 0.0):
        if decode not in ("beliefs", "viterbi"):
            raise DspError(f"inference.decode={decode!r}: choose beliefs or viterbi")
        if output not in ("labels", "probability"):
            raise DspError(f"inference.output={output!r}: choose labels or probability")
        self.iterations, self.epsilon, self.decode, self.output, self.tol = int(iterations), epsilon, decode, output, tol
        self.counting_variables, self.counting_factors = counting_variables, counting_factors

    def counts(self, graph: RegionGraph, device) -> CountingNumbers:
        return CountingNumbers.make(graph, self.counting_variables, self.counting_factors, self.epsilon, device)

    @full_precision
    @torch.no_grad()
    def __call__(self, model, pot: MRFPotentials, lengths=None) -> InferenceResult:
        counts = self.counts(pot.graph, pot.unary.device)
        lam, done = zero_messages(pot), 0
        while done < self.iterations:
            step = min(5, self.iterations - done) if self.tol > 0 else self.iterations
            new = sweep(pot, lam, counts, step)
            done += step
            moved = max((float((a - b).abs().max()) for a, b in zip(new, lam) if a.numel()), default=0.0) if self.tol > 0 else None
            lam = new
            if moved is not None and moved <= self.tol:
                break
        beliefs = variable_beliefs(pot, lam, counts)  # [B, N, K]
        if self.decode == "viterbi":
            labels = self._viterbi(pot)
        else:
            labels = beliefs.argmax(-1)
        score = score_labels(pot, labels)
        y = beliefs[..., 1] if self.output == "probability" else labels
        converged = torch.ones(pot.batch_size, dtype=torch.bool, device=pot.unary.device)
        return InferenceResult(y, done, converged, score)

    @staticmethod
    def _viterbi(pot: MRFPotentials) -> torch.Tensor:
        from dsp.inference import chain

        g = pot.graph
        n = g.num_variables
        chain_edges = torch.stack([torch.arange(n - 1), torch.arange(1, n)], 1)
        if len(g.groups) != 1 or not torch.equal(g.groups[0].variables.cpu(), chain_edges):
            raise DspError("inference.decode=viterbi needs a first-order chain (model.graph.kind=chain)")
        lengths = torch.full((pot.batch_size,), n, dtype=torch.long, device=pot.unary.device)
        return chain.viterbi(pot.unary, pot.factors[0], lengths)[0]
