"""∇_s f(s) for one unrolled gradient step, differentiable with respect to s and to everything
f depends on (energy parameters, features), in three ways that trade memory for time:

  autograd            create_graph=True: the backward pass is autograd's double backward. Keeps
                      the energy's internal activations of every step alive until the backward.
  checkpoint          keeps only s per step; the backward recomputes the energy's internals and
                      then runs the double backward (End-to-end SPENs §4.3).
  finite_difference   keeps only s per step; the backward needs the products of the energy's
                      Hessian with the incoming vector v, taken by central differences of
                      first-order gradients (Domke 2012): for every input w of f,
                          ∂/∂w ⟨v, ∇_s f(s)⟩ ≈ [∇_w f(s + r v) - ∇_w f(s - r v)] / 2r,
                      so energies that are expensive (or impossible) to double-differentiate
                      can still be learned through.

"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from dsp.errors import DspError

MODES = ("autograd", "checkpoint", "finite_difference")


def feature_tensors(feats) -> list[torch.Tensor]:
    """The tensors inside a model's features object (a tensor, a dataclass or a tuple), in order."""
    if isinstance(feats, torch.Tensor):
        return [feats]
    if dataclasses.is_dataclass(feats):
        return [t for f in dataclasses.fields(feats) for t in feature_tensors(getattr(feats, f.name))]
    if isinstance(feats, (list, tuple)):
        return [t for item in feats for t in feature_tensors(item)]
    return []


def rebuild_features(feats, tensors: list[torch.Tensor]):
    """`feats` with its tensors replaced, in the order of feature_tensors (consumes the list)."""
    if isinstance(feats, torch.Tensor):
        return tensors.pop(0)
    if dataclasses.is_dataclass(feats):
        return dataclasses.replace(feats, **{f.name: rebuild_features(getattr(feats, f.name), tensors)
                                             for f in dataclasses.fields(feats)})
    if isinstance(feats, (list, tuple)):
        return type(feats)(rebuild_features(item, tensors) for item in feats)
    return feats


def _first_order(fn, s, feats, params: Sequence[torch.Tensor] = (), create_graph: bool = False):
    """Gradients of Σ_b fn(s, feats)_b with respect to s, the feature tensors and `params`, where
    s and the features are fresh leaves: the graph built here never reaches the caller's."""
    with torch.enable_grad():
        s = s.detach().requires_grad_(True)
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in feature_tensors(feats)]
        out = fn(s, rebuild_features(feats, list(leaves))).sum()
        wanted = [s, *(t for t in leaves if t.requires_grad), *params]
        grads = torch.autograd.grad(out, wanted, create_graph=create_graph, allow_unused=True)
    return s, leaves, grads


def _expand(feats, grads_of_trainable):
    """Gradients for every feature tensor (None for those that need none)."""
    it = iter(grads_of_trainable)
    return [next(it) if t.requires_grad else None for t in feature_tensors(feats)]


class _RecomputedGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, feats, num_feats, s, *tensors):
        ctx.fn, ctx.feats, ctx.params = fn, feats, tensors[num_feats:]  # references, no internals
        ctx.save_for_backward(s)
        return _first_order(fn, s, feats)[2][0]

    @staticmethod
    def backward(ctx, v):
        (s,) = ctx.saved_tensors
        with torch.enable_grad():
            s_leaf, leaves, (g, *_) = _first_order(ctx.fn, s, ctx.feats, create_graph=True)
            trainable = [t for t in leaves if t.requires_grad]
            grads = torch.autograd.grad(g, [s_leaf, *trainable, *ctx.params], grad_outputs=v, allow_unused=True)
        n = len(trainable)
        return (None, None, None, grads[0], *_expand(ctx.feats, grads[1 : 1 + n]), *grads[1 + n :])


class _FiniteDifferenceGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, feats, num_feats, eps, s, *tensors):
        ctx.fn, ctx.feats, ctx.eps, ctx.params = fn, feats, eps, tensors[num_feats:]
        ctx.save_for_backward(s)
        return _first_order(fn, s, feats)[2][0]

    @staticmethod
    def backward(ctx, v):
        (s,) = ctx.saved_tensors
        # r is relative to v's size so that r·v has norm eps whatever v's scale.
        r = ctx.eps / v.norm().clamp_min(1e-12)
        *_, plus = _first_order(ctx.fn, s + r * v, ctx.feats, ctx.params)
        *_, minus = _first_order(ctx.fn, s - r * v, ctx.feats, ctx.params)
        grads = [None if a is None else (a - b) / (2 * r) for a, b in zip(plus, minus)]
        n = sum(t.requires_grad for t in feature_tensors(ctx.feats))
        return (None, None, None, None, grads[0], *_expand(ctx.feats, grads[1 : 1 + n]), *grads[1 + n :])


def energy_gradient(
    fn: Callable,
    s: torch.Tensor,
    feats,
    params: Sequence[torch.Tensor] = (),
    mode: str = "autograd",
    differentiable: bool = True,
    fd_eps: float = 1e-3,
) -> torch.Tensor:
    """∇_s Σ_b fn(s, feats)_b with the shape of s.

    `params` must list the parameters with requires_grad that fn reads directly (not through
    feats): the two custom backward passes return gradients for exactly those and the features.
    `differentiable=False` returns a detached gradient (prediction: no graph is kept at all)."""
    if not differentiable:
        return _first_order(fn, s, feats)[2][0].detach()
    if mode == "autograd":
        with torch.enable_grad():
            if not s.requires_grad:  # a constant start: nothing upstream, but s must be an input
                s = s.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(fn(s, feats).sum(), s, create_graph=True)
        return g
    tensors = feature_tensors(feats)
    if mode == "checkpoint":
        return _RecomputedGradient.apply(fn, feats, len(tensors), s, *tensors, *params)
    if mode == "finite_difference":
        return _FiniteDifferenceGradient.apply(fn, feats, len(tensors), fd_eps, s, *tensors, *params)
    raise DspError(f"inference.hessian={mode!r}: choose one of {', '.join(MODES)}")
