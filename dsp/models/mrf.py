"""MRFs with deep potentials on region graphs (Chen et al. 2015, §2.2 and §3):

    F(x, y; w) = Σ_i f_i(x, y_i; w_u) + Σ_{p ∈ factors} f_p(x, y_p; w_p)

f_i comes from `unary_net` ([B, N, K], or [B, N·K] reshaped), weights shared across variables
(a per-position MLP for Word50, one MLP with N·K outputs for tagging). Factor potentials are
tables W_type[y_p] (Eq. 6, data-independent, one table per factor type: per distance on chains,
per edge with share=false) or, for pairwise factors, a one-layer MLP of the two variables' inputs
(the PairH16/32/64 functions of Fig. 6), conditioned on x.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import nn

from dsp.errors import DspError
from dsp.inference.message_passing import MRFPotentials, relaxed_score
from dsp.inference.region_graph import build_graph
from dsp import interfaces as I
from dsp.nn.modes import eval_mode
from dsp.schema import NonNegative, SettingsOf, Size

PAIRWISE_KINDS = ("table", "mlp")


class FactorTables(nn.Module):
    """One table of K^a potentials per factor type, for each arity: W[type] -> [M, K, …, K]."""

    def __init__(self, num_states: int, num_types: dict[int, int], init_std: float):
        super().__init__()
        self.num_states = num_states
        self.tables = nn.ParameterDict({
            str(a): nn.Parameter(torch.randn(t, num_states ** a) * init_std) for a, t in num_types.items()
        })

    def forward(self, x, graph) -> list:
        k, b = self.num_states, x.shape[0]
        return [self.tables[str(g.arity)][g.types].view(1, g.size, *([k] * g.arity)).expand(b, *([-1] * (g.arity + 1)))
                for g in graph.groups]


class PairwiseMLP(nn.Module):
    """f_p(x, y_i, y_j) = (W_2 ReLU(W_1 [x_i; x_j]))[y_i, y_j], one MLP per factor type."""

    def __init__(self, num_states: int, num_types: dict[int, int], in_features: int, hidden: int):
        super().__init__()
        if set(num_types) - {2}:
            raise DspError("model.pairwise=mlp handles pairwise factors only; use pairwise=table for higher orders")
        self.num_states = num_states
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_states ** 2))
            for _ in range(num_types.get(2, 0))
        )

    def forward(self, x, graph) -> list:
        if x.dim() < 3:
            raise DspError("model.pairwise=mlp conditions on each variable's input: x must be [B, N, ...]")
        feats = x.flatten(2)  # [B, N, D]
        k, out = self.num_states, []
        for g in graph.groups:
            pair = torch.cat([feats[:, g.variables[:, 0]], feats[:, g.variables[:, 1]]], -1)  # [B, M, 2D]
            scores = pair.new_empty(*pair.shape[:2], k * k)
            for t, net in enumerate(self.nets):
                sel = (g.types == t).nonzero().squeeze(1)
                scores[:, sel] = net(pair[:, sel])
            out.append(scores.view(*pair.shape[:2], k, k))
        return out


class MRF(I.Model):
    parts = ("unary_net", "pairwise")  # the children a training stage may name
    outputs = frozenset({I.SEQUENCE, I.MULTILABEL})  # sequences: of the model's fixed length

    @classmethod
    def outputs_for(cls, config) -> frozenset[str]:
        """Binary variables are multi-label tags (the tagging MRF); more states, sequence labels."""
        return frozenset({I.MULTILABEL}) if str(config.get("num_states")) == "2" else frozenset({I.SEQUENCE})
    provides = frozenset({I.REGION_POTENTIALS, I.LOCAL, I.LOCAL_LOGITS, I.ENERGY, I.SMOOTH_ENERGY, I.VALUE})

    def __init__(self, num_variables: Size, num_states: Size, unary_net: nn.Module,
                 graph: Annotated[dict | None, SettingsOf(build_graph, exclude=("num_variables",))] = None,
                 pairwise: Literal["table", "mlp"] = "table", pairwise_hidden: Size = 16,
                 in_features: Size | None = None, init_std: NonNegative = 0.01):
        super().__init__()
        graph = dict(graph or {})
        self.graph_spec = graph
        self.graph = build_graph(num_variables, graph.get("kind", "chain"), graph.get("factors"), graph.get("share", True))
        self.num_variables, self.num_states = int(num_variables), int(num_states)
        self.unary_net = unary_net
        if pairwise not in PAIRWISE_KINDS:
            raise DspError(f"model.pairwise={pairwise!r}: choose one of {', '.join(PAIRWISE_KINDS)}")
        if pairwise == "mlp":
            if in_features is None:
                raise DspError("model.pairwise=mlp needs model.in_features (the inputs per variable)")
            self.pairwise = PairwiseMLP(num_states, self.graph.num_types, in_features, pairwise_hidden)
        else:
            self.pairwise = FactorTables(num_states, self.graph.num_types, init_std)
        self._graph_device = torch.device("cpu")

    def _graph_on(self, device):
        if device != self._graph_device:
            self.graph, self._graph_device = self.graph.to(device), device
        return self.graph

    def unaries(self, x: torch.Tensor) -> torch.Tensor:
        u = self.unary_net(x)
        if u.dim() == 2 and u.shape[1] == self.num_variables and self.num_states == 2:
            u = torch.stack([torch.zeros_like(u), u], -1)  # one score per binary label: f_i(0) = 0
        elif u.dim() == 2:  # [B, N·K] from one network over the whole input
            u = u.view(u.shape[0], self.num_variables, -1)
        if u.shape[1:] != (self.num_variables, self.num_states):
            raise DspError(f"model.unary_net gives {list(u.shape[1:])} per example, the MRF has "
                           f"{self.num_variables} variables with {self.num_states} states; check model.num_variables")
        return u

    def features(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> MRFPotentials:
        graph = self._graph_on(x.device)
        return MRFPotentials(self.unaries(x), self.pairwise(x, graph), graph)

    @property
    def relaxation(self) -> str:
        return "box" if self.num_states == 2 else "simplex"  # P(y_i = 1) [B, N], or rows [B, N, K]

    def energy(self, y: torch.Tensor, pot: MRFPotentials) -> torch.Tensor:
        """-F at relaxed labels [B, N] (binary: P(y_i = 1)) or [B, N, K]: the multilinear extension of
        the score, which equals -F(x, y) at 0/1 labels (End-to-end SPENs over the MRF's energy)."""
        q = torch.stack([1 - y, y], -1) if y.dim() == 2 else y  # [B, N, K]
        return -relaxed_score(pot, q)

    def score(self, y: torch.Tensor, pot: MRFPotentials) -> torch.Tensor:
        return -self.energy(y, pot)

    def local_probs(self, pot: MRFPotentials) -> torch.Tensor:
        """From the unaries alone: P(y_i = 1) [B, N] of binary variables (the tagging MRF's local
        model), per-variable class probabilities [B, N, K] otherwise."""
        probs = torch.softmax(pot.unary, -1)
        return probs[..., 1] if self.num_states == 2 else probs

    def local_logits(self, pot: MRFPotentials) -> torch.Tensor:
        """Log-odds [B, N] of binary variables, class scores [B, N, K] otherwise."""
        return pot.unary[..., 1] - pot.unary[..., 0] if self.num_states == 2 else pot.unary

    @torch.no_grad()
    def diagnostics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        with eval_mode(self):
            pot = self.features(x)
        out = {"potentials/unary_mean_abs": pot.unary.abs().mean().item()}
        if pot.factors:
            out["potentials/pairwise_mean_abs"] = torch.cat([f.flatten() for f in pot.factors]).abs().mean().item()
        return out

    @torch.no_grad()
    def images(self) -> dict[str, torch.Tensor]:
        """[H, W] images in [0, 1] for TensorBoard and PNGs: each pairwise table (Fig. 5, middle)
        and, for an MLP on images, first-layer unary weights tiled (Fig. 5, left)."""
        out = {}
        if isinstance(self.pairwise, FactorTables) and "2" in self.pairwise.tables:
            tables = self.pairwise.tables["2"].detach().float().cpu()
            k = self.num_states
            if tables.shape[0] <= 4:  # a table per distance (chains): K×K each
                for t in range(tables.shape[0]):
                    big = tables[t].view(k, k).repeat_interleave(8, 0).repeat_interleave(8, 1)  # 8 px per cell
                    out[f"pairwise_type{t}"] = _unit(big)
            elif k == 2:  # one table per edge of a fully connected binary MRF: the Fig. 8 matrix
                n, g = self.num_variables, self.graph.groups[0]
                corr = torch.zeros(n, n)
                t = tables.view(-1, 2, 2)
                coupling = t[:, 1, 1] + t[:, 0, 0] - t[:, 0, 1] - t[:, 1, 0]  # log-odds interaction
                vi, vj = g.variables[:, 0].cpu(), g.variables[:, 1].cpu()
                corr[vi, vj] = coupling[g.types.cpu()]
                corr[vj, vi] = coupling[g.types.cpu()]
                out["pairwise_coupling"] = _unit(corr.repeat_interleave(4, 0).repeat_interleave(4, 1))
        first = next((m for m in self.unary_net.modules() if isinstance(m, nn.Linear)), None)
        if first is not None:
            side = int(round(first.in_features ** 0.5))
            if side * side == first.in_features:
                w = first.weight.detach().float().cpu()[:64].view(-1, side, side)
                cols = 8
                rows = (w.shape[0] + cols - 1) // cols
                grid = torch.zeros(rows * (side + 1), cols * (side + 1))
                for i, img in enumerate(w):
                    r, c = divmod(i, cols)
                    grid[r * (side + 1): r * (side + 1) + side, c * (side + 1): c * (side + 1) + side] = _unit(img)
                out["unary_weights"] = grid
        return out


def _unit(t: torch.Tensor) -> torch.Tensor:
    return (t - t.min()) / (t.max() - t.min()).clamp_min(1e-12)
