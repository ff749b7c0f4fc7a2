"""Region graphs of MRFs (Chen et al. 2015, §2.2): variables (regions of size 1) and factors
(regions of size ≥ 2) whose children are the variables they contain.

Factors are grouped by arity so message passing works on one dense tensor per group. Each
factor has a type: factors of one type share their potential (Word50 shares one pairwise table
for all distance-1 edges and another for all distance-2 edges). Variables are coloured so that no
two variables of a colour share a factor: their message blocks are independent, so a colour is
updated at once and the block-coordinate descent of Fig. 3 stays exact (and monotone).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal, Sequence, get_args

import torch

from dsp.errors import DspError
from dsp.schema import Count

GraphKind = Literal["chain", "chain2", "full", "list", "none"]
GRAPH_KINDS = get_args(GraphKind)


@dataclass
class FactorGroup:
    variables: torch.Tensor  # [M, a] variable indices of each factor
    types: torch.Tensor  # [M] potential type of each factor (weight sharing)

    @property
    def arity(self) -> int:
        return self.variables.shape[1]

    @property
    def size(self) -> int:
        return self.variables.shape[0]


@dataclass
class ColourBlock:
    """The factors of one group touching one colour through one slot."""

    group: int
    slot: int
    factors: torch.Tensor  # [E] factor indices in the group
    variables: torch.Tensor  # [E] the coloured variable each factor touches through `slot`


@dataclass
class RegionGraph:
    num_variables: int
    groups: list[FactorGroup]
    num_types: dict[int, int]  # arity -> number of potential types
    colours: list[list[ColourBlock]] = field(default_factory=list)
    degree: torch.Tensor = None  # [N] factors per variable

    def to(self, device) -> "RegionGraph":
        move = lambda t: t.to(device)  # noqa: E731
        return RegionGraph(
            self.num_variables,
            [FactorGroup(move(g.variables), move(g.types)) for g in self.groups],
            dict(self.num_types),
            [[ColourBlock(b.group, b.slot, move(b.factors), move(b.variables)) for b in c] for c in self.colours],
            move(self.degree),
        )


def build_graph(num_variables: int, kind: GraphKind = "chain", factors: Sequence[Sequence[Count]] | None = None,
                share: bool = True) -> RegionGraph:
    """chain: edges i–i+1; chain2: i–i+1 and i–i+2 (second-order Markov); full: every pair;
    list: `factors`, a list of variable tuples of any arity ≥ 2; none: unaries only.

    share=True gives chain edges one type per distance and other graphs one type per arity;
    share=False gives every factor its own potential (the fully connected tagging MRF).
    """
    n = int(num_variables)
    if n < 1:
        raise DspError(f"model.num_variables must be >= 1, got {num_variables}")
    if kind not in GRAPH_KINDS:
        raise DspError(f"model.graph.kind={kind!r}: choose one of {', '.join(GRAPH_KINDS)}")
    if kind == "chain":
        tuples = [(i, i + 1) for i in range(n - 1)]
    elif kind == "chain2":
        tuples = [(i, i + 1) for i in range(n - 1)] + [(i, i + 2) for i in range(n - 2)]
    elif kind == "full":
        tuples = list(itertools.combinations(range(n), 2))
    elif kind == "none":
        tuples = []
    else:
        tuples = [tuple(int(v) for v in f) for f in (factors or [])]
        for f in tuples:
            if len(f) < 2 or len(set(f)) != len(f) or not all(0 <= v < n for v in f):
                raise DspError(f"model.graph.factors: {list(f)} must list >= 2 distinct variables in 0..{n - 1}")
    by_arity: dict[int, list[tuple]] = {}
    for f in tuples:
        by_arity.setdefault(len(f), []).append(f)
    groups, num_types = [], {}
    for arity, fs in sorted(by_arity.items()):
        var = torch.tensor(fs, dtype=torch.long)
        if not share:
            types = torch.arange(len(fs))
        elif kind in ("chain", "chain2"):
            types = var[:, 1] - var[:, 0] - 1  # distance 1 -> type 0, distance 2 -> type 1
        else:
            types = torch.zeros(len(fs), dtype=torch.long)
        groups.append(FactorGroup(var, types))
        num_types[arity] = int(types.max()) + 1
    graph = RegionGraph(n, groups, num_types)
    graph.degree = torch.zeros(n, dtype=torch.long)
    for g in groups:
        graph.degree.index_add_(0, g.variables.flatten(), torch.ones(g.variables.numel(), dtype=torch.long))
    graph.colours = _colour_blocks(graph)
    return graph


def _colour_blocks(graph: RegionGraph) -> list[list[ColourBlock]]:
    """Greedy colouring of the variables' conflict graph (two variables conflict when they share
    a factor), then each colour's (group, slot) blocks of incident factors."""
    n = graph.num_variables
    neighbours = [set() for _ in range(n)]
    for g in graph.groups:
        for f in g.variables.tolist():
            for a in f:
                neighbours[a].update(v for v in f if v != a)
    colour = [-1] * n
    for v in sorted(range(n), key=lambda v: -len(neighbours[v])):
        taken = {colour[u] for u in neighbours[v]}
        colour[v] = next(c for c in itertools.count() if c not in taken)
    colours = []
    for c in range(max(colour) + 1 if n else 0):
        in_colour = torch.tensor([colour[v] == c for v in range(n)])
        blocks = []
        for gi, g in enumerate(graph.groups):
            for slot in range(g.arity):
                hit = in_colour[g.variables[:, slot]]
                if hit.any():
                    factors = hit.nonzero().squeeze(1)
                    blocks.append(ColourBlock(gi, slot, factors, g.variables[factors, slot]))
        colours.append(blocks)
    return colours
