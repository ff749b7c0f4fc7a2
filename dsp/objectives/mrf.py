"""Learning MRFs by blending learning and message passing (Chen et al. 2015, Fig. 3, Eq. 5).

The loss of a batch is Eq. 5 at the current messages λ (held fixed):

    L(w) = Σ_r εc_r lse(f̂_r(w, λ) / εc_r) − F(x, y; w),

an upper bound on the (approximate) negative log-likelihood at ε = 1 whose gradient in w is
exactly g = Σ_r b_r ∇f_r − ∇F of Fig. 3 step 3. Before it, `iterations` sweeps of block-coordinate
message passing update λ (step 2). Blended learning (persistent=true) keeps each training example's
messages across epochs, indexed by its example id, so one or a few sweeps per parameter update
suffice; persistent=false restarts from zero messages every time (the non-blended baseline, run
with 20 sweeps as the paper's Fig. 9 comparison). ε = 0 with margin > 0 is the structured hinge
(loss-augmented by margin·Hamming).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from dsp import interfaces as I
from dsp.errors import DspError
from dsp.schema import Count, NonNegative
from dsp.inference.message_passing import CountingNumbers, MRFPotentials, dual, score_labels, sweep, zero_messages


def labels_of(y: torch.Tensor) -> torch.Tensor:
    """Word labels [B, N] are class indices already; multi-label 0/1 vectors become states 0/1."""
    return y.long() if not y.dtype.is_floating_point else (y > 0.5).long()


def augment(pot: MRFPotentials, y: torch.Tensor, margin: float) -> MRFPotentials:
    """Add margin·[y_i ≠ y*_i] to the unaries (loss-augmented potentials)."""
    if margin == 0:
        return pot
    wrong = 1.0 - F.one_hot(y, pot.unary.shape[-1]).to(pot.unary.dtype)
    return MRFPotentials(pot.unary + margin * wrong, pot.factors, pot.graph)


def detach(pot: MRFPotentials) -> MRFPotentials:
    return MRFPotentials(pot.unary.detach(), [f.detach() for f in pot.factors], pot.graph)


class MessageStore:
    """Messages per training example (grown on demand), on the device or in host memory."""

    def __init__(self, where: str = "device"):
        if where not in ("device", "host"):
            raise DspError(f"objective.store={where!r}: choose device or host")
        self.where, self.groups = where, None

    def get(self, index: torch.Tensor, template: list) -> list:
        self._grow(int(index.max()) + 1, template)
        idx = index.to(self.groups[0].device) if self.groups else index
        return [g[idx].to(t.device) for g, t in zip(self.groups, template)]

    def put(self, index: torch.Tensor, lam: list) -> None:
        for g, m in zip(self.groups, lam):
            g[index.to(g.device)] = m.to(g.device, g.dtype)

    def reserve(self, size: int) -> None:
        """Make room for example ids < size (data-parallel ranks grow their copies in step)."""
        if self.groups is not None:
            self._grow(size, [g[:1] for g in self.groups])

    def _grow(self, size: int, template: list) -> None:
        if self.groups is not None and self.groups[0].shape[0] >= size:
            return
        device = template[0].device if self.where == "device" and template else torch.device("cpu")
        new = [t.new_zeros((size, *t.shape[1:]), device=device) for t in template]
        if self.groups is not None:
            for n, o in zip(new, self.groups):
                n[: o.shape[0]] = o.to(device)
        self.groups = new

    def state_dict(self) -> dict:
        return {} if self.groups is None else {str(i): g.cpu() for i, g in enumerate(self.groups)}

    def load_state_dict(self, state: dict) -> None:
        self.groups = [state[str(i)] for i in range(len(state))] or None


class BlendedMRFLoss(I.Objective):
    outputs = frozenset({I.SEQUENCE, I.MULTILABEL})
    needs = frozenset({I.REGION_POTENTIALS})
    prediction = "beliefs"
    per_example_state = True  # messages kept per training example (index=)

    def __init__(self, epsilon: NonNegative = 1.0, counting_variables: float | Literal["bethe"] = 1.0,
                 counting_factors: NonNegative = 1.0, iterations: Count = 1, persistent: bool = True,
                 margin: NonNegative = 0.0, store: Literal["device", "host"] = "device",
                 checkpoint_messages: bool = True, probe_iterations: Count = 50):
        if iterations < 0:
            raise DspError(f"objective.iterations must be >= 0, got {iterations}")
        if str(counting_variables) == "bethe":
            raise DspError("objective.counting_variables=bethe is not convex: learning needs ε·c_r >= 0 (Claim 1)")
        self.epsilon, self.counting_variables, self.counting_factors = float(epsilon), counting_variables, counting_factors
        self.iterations, self.persistent, self.margin = int(iterations), bool(persistent), float(margin)
        self.store = MessageStore(store)
        self.probe_iterations = int(probe_iterations)
        # Messages go into checkpoints (exact resume) unless they are too big to write every
        # epoch (a fully connected tagging MRF): then a resumed run restarts them from zero.
        self.checkpoint_state = bool(checkpoint_messages and persistent)

    def counts(self, pot: MRFPotentials) -> CountingNumbers:
        return CountingNumbers.make(pot.graph, self.counting_variables, self.counting_factors, self.epsilon,
                                    pot.unary.device)

    def messages(self, pot: MRFPotentials, counts, index=None, iterations=None) -> list:
        """Step 2 of Fig. 3: update the (stored) messages of these examples, without gradients."""
        n = self.iterations if iterations is None else iterations
        keep = self.persistent and index is not None
        with torch.no_grad():
            start = zero_messages(pot)
            lam = sweep(detach(pot), self.store.get(index, start) if keep else start, counts, n)
            if keep:
                self.store.put(index, lam)
        return lam

    def loss(self, model, inference, x, y, index=None):
        y = labels_of(y)
        pot = augment(model.features(x), y, self.margin)
        counts = self.counts(pot)
        lam = self.messages(pot, counts, index)
        bound = dual(pot, lam, counts)  # [B]: ε ln Z_ε ≤ this, for any λ
        loss = (bound - score_labels(pot, y)).mean()
        return loss, {}

    @torch.no_grad()
    def probe(self, model, x, y) -> dict[str, float]:
        """The converged objective on fixed examples (fresh messages, probe_iterations sweeps):
        the training NLL of Fig. 9, comparable between blended and non-blended runs."""
        y = labels_of(y)
        pot = augment(model.features(x), y, self.margin)
        counts = self.counts(pot)
        lam = sweep(pot, zero_messages(pot), counts, self.probe_iterations)
        nll = (dual(pot, lam, counts) - score_labels(pot, y)).mean().item()
        return {"nll_converged": nll}

    def shared_rows(self):
        return self.store if self.persistent else None  # ddp: every rank reads the freshest messages

    def state_dict(self) -> dict:
        return {"messages": self.store.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.store.load_state_dict(state.get("messages", {}))


class MRFUnaryLoss(I.Objective):
    outputs = frozenset({I.SEQUENCE, I.MULTILABEL})
    needs = frozenset({I.REGION_POTENTIALS})
    """Cross-entropy of each variable's unaries alone (the 'unary only' strategy and the first
    stage of PwTrain / PreTrainJoint: pairwise potentials play no part)."""

    prediction = "unary"

    def loss(self, model, inference, x, y, index=None):
        u = model.unaries(x)  # [B, N, K]
        return F.cross_entropy(u.flatten(0, 1), labels_of(y).flatten()), {}
