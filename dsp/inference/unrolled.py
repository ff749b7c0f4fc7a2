"""Unrolled gradient descent that learning can back-propagate through (End-to-end SPENs §3-4).

    s_0 = Init(F(x)),   v_t = μ v_{t-1} + ∇_s f(s_{t-1}),   s_t = s_{t-1} - η_t v_t,   t = 1..T

where s is the optimisation variable of one of four parameterisations of the output y:

  logit          y = Sigmoid(s) (or SoftMax over the last dim); the update is additive in the
                 logits with ∇_s of the energy *through* the link (Eq. 8), the paper's advice: it
                 avoids the vanishing gradients of the updates below.
  mirror         entropic mirror descent, y_t = Sigmoid/SoftMax(log y_{t-1} - η_t ∇_y E) (Eq. 7).
  projected      y_t = clip(y_{t-1} - η_t ∇_y E, 0, 1); clipped coordinates pass no gradient.
  unconstrained  y_t = y_{t-1} - η_t ∇_y E (e.g. denoising, where y is an image).

f(y) = E_x(y) - τ H(y) adds optional entropy smoothing for the simplex parameterisations (§4.2).
The step sizes η_t (one per step) and the momentum μ are trainable when `learn_lr` /
`learn_momentum` are set; they are parameters of this module, which the trainer attaches to the
model (as `model.inference`) so that stages, optimisers and checkpoints see them.

At prediction time the same T, step sizes and momentum are used (§4.2: keep the optimisation
configuration identical at train and test time), without building any graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from dsp import interfaces as I
from dsp.errors import DspError
from dsp.inference.energy_gradient import MODES, energy_gradient
from dsp.schema import NonNegative, Positive, Rate, Size

Parameterisation = Literal["logit", "mirror", "projected", "unconstrained"]
PARAMETERISATIONS = get_args(Parameterisation)


@dataclass
class UnrolledResult:
    y: torch.Tensor  # final iterate y_T, the output's shape
    iterations: int  # steps actually computed (< T when converged early)
    converged: torch.Tensor  # [B] bool
    objective: torch.Tensor  # [B] final energy values (detached)
    trajectory: list[torch.Tensor]  # [y_1 .. y_T]: always T iterates (repeats after convergence)


def _entropy(y: torch.Tensor, categorical: bool, eps: float = 1e-6) -> torch.Tensor:
    """Entropy of independent Bernoullis (or categoricals over the last dim), summed -> [B]."""
    y = y.clamp(eps, 1 - eps)
    h = -y * y.log() if categorical else -(y * y.log() + (1 - y) * torch.log1p(-y))
    return h.flatten(1).sum(-1)


class UnrolledGradientDescent(nn.Module, I.Inference):
    """T differentiable gradient steps on an energy; see the module docstring.

    Args:
        steps: T.
        lr: η for every step (a list gives one per step).
        momentum: μ (heavy ball); 0 is plain gradient descent.
        learn_lr, learn_momentum: make η_t (kept positive through its log) and μ (kept in (0, 1)
            through its logit) trainable.
        parameterisation: logit | mirror | projected | unconstrained (module docstring).
        output: sigmoid (independent labels in [0,1]), softmax (a simplex over the last dim), or
            auto (softmax for models whose relaxed outputs are label distributions: sequences), for
            logit and mirror.
        entropy_temperature: τ of the entropy smoothing.
        init: local (Init(F(x)): the model's local prediction, differentiable) or constant.
        init_value: the constant start.
        converge_tol: stop computing once max |y_t - y_{t-1}| <= tol for the whole batch; the
            remaining iterates equal the last one, so the fixed-T loss is unchanged (§4.3). 0 off;
            > 0 costs one host sync per step (the whole-batch test).
        hessian: autograd (double backward) or finite_difference (Domke 2012).
        checkpoint: keep only each step's input and recompute the energy's internals on the
            backward pass (always the case with finite differences).
        fd_eps: the finite-difference step (size of r·v).
    """

    outputs = frozenset({I.MULTILABEL, I.MASK, I.IMAGE, I.SEQUENCE})
    needs = frozenset({I.ENERGY, I.LOCAL})  # local_probs: Init(F(x)), and the output's shape
    provides = frozenset({I.RELAXED, I.LOSS_AUGMENTED, I.UNROLLED})

    def __init__(
        self,
        steps: Size = 10,
        lr: Positive | list[Positive] = 0.1,
        momentum: Rate = 0.0,
        learn_lr: bool = False,
        learn_momentum: bool = False,
        parameterisation: Parameterisation = "logit",
        output: Literal["auto", "sigmoid", "softmax"] = "auto",
        entropy_temperature: NonNegative = 0.0,
        init: Literal["local", "constant"] = "local",
        init_value: float = 0.5,
        converge_tol: NonNegative = 0.0,
        hessian: Literal["autograd", "finite_difference"] = "autograd",
        checkpoint: bool = False,
        fd_eps: Positive = 1e-3,
        eps: Positive = 1e-6,
    ):
        super().__init__()
        if steps < 1:
            raise DspError(f"inference.steps must be >= 1, got {steps}")
        if parameterisation not in PARAMETERISATIONS:
            raise DspError(f"inference.parameterisation={parameterisation!r}: choose one of {', '.join(PARAMETERISATIONS)}")
        if output not in ("auto", "sigmoid", "softmax"):
            raise DspError(f"inference.output={output!r}: choose auto, sigmoid or softmax")
        if init not in ("local", "constant"):
            raise DspError(f"inference.init={init!r}: choose local or constant")
        if hessian not in ("autograd", "finite_difference"):
            raise DspError(f"inference.hessian={hessian!r}: choose autograd or finite_difference")
        lrs = [float(lr)] * steps if isinstance(lr, (int, float)) else [float(v) for v in lr]
        if len(lrs) != steps or min(lrs) <= 0:
            raise DspError(f"inference.lr: give one positive step size or a list of {steps} (inference.steps)")
        if not 0.0 <= momentum < 1.0 or (learn_momentum and momentum == 0.0):
            raise DspError(f"inference.momentum must be in [0, 1) (and > 0 to be learned), got {momentum}")
        self.steps, self.parameterisation, self.output = steps, parameterisation, output
        self.entropy_temperature, self.init, self.init_value = entropy_temperature, init, init_value
        self.converge_tol, self.fd_eps, self.eps = converge_tol, fd_eps, eps
        self.mode = "finite_difference" if hessian == "finite_difference" else ("checkpoint" if checkpoint else "autograd")
        assert self.mode in MODES
        # Learned settings are parameters, fixed ones buffers (stages switch requires_grad of
        # whole modules on, which must never make a fixed step size trainable).
        logit_mu = math.log(momentum / (1 - momentum)) if momentum > 0 else -math.inf
        for name, value, learn in (("log_lr", torch.log(torch.tensor(lrs)), learn_lr),  # [T]
                                   ("momentum_logit", torch.tensor(logit_mu), learn_momentum)):
            if learn:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        self.learned = learn_lr or learn_momentum

    # ------------------------------------------------------------------------ parameterisation
    @property
    def lr(self) -> torch.Tensor:
        return self.log_lr.exp()  # [T]

    @property
    def momentum(self) -> torch.Tensor:
        return torch.sigmoid(self.momentum_logit)

    def categorical(self, model) -> bool:
        """A softmax over the last axis (output=softmax, or auto on a model whose relaxed outputs are
        distributions over labels: chain CRFs, MRFs) rather than independent sigmoids."""
        return self.output == "softmax" or (self.output == "auto" and model.relaxation == "simplex")

    def _link(self, s: torch.Tensor, categorical: bool) -> torch.Tensor:
        return torch.softmax(s, -1) if categorical else torch.sigmoid(s)

    def _to_y(self, s: torch.Tensor, categorical: bool) -> torch.Tensor:
        return self._link(s, categorical) if self.parameterisation == "logit" else s

    def _from_y(self, y: torch.Tensor, categorical: bool) -> torch.Tensor:
        if self.parameterisation == "logit":
            y = y.clamp(self.eps, 1 - self.eps)
            return y.log() if categorical else y.log() - torch.log1p(-y)
        if self.parameterisation == "mirror":
            return y.clamp(self.eps, 1 - self.eps)
        if self.parameterisation == "projected":
            return y.clamp(0.0, 1.0)
        return y

    def _step(self, s: torch.Tensor, direction: torch.Tensor, lr: torch.Tensor, categorical: bool) -> torch.Tensor:
        if self.parameterisation == "mirror":
            z = s.clamp_min(self.eps).log()
            if not categorical:
                z = z - torch.log1p(-s.clamp_max(1 - self.eps))
            return self._link(z - lr * direction, categorical).clamp(self.eps, 1 - self.eps)
        s = s - lr * direction
        return s.clamp(0.0, 1.0) if self.parameterisation == "projected" else s

    # ------------------------------------------------------------------------------- inference
    def initial(self, model, feats) -> torch.Tensor:
        y0 = model.local_probs(feats)  # the model's own Init(F(x)); also gives the output shape
        return y0 if self.init == "local" else torch.full_like(y0, self.init_value).detach()

    def forward(self, model, feats, augment: Callable | None = None, y0=None, train: bool = False,
                differentiable: bool = False) -> UnrolledResult:
        """Minimise f(y) = E(y) [- augment(y)] [- τ H(y)] with T steps.

        `differentiable=True` keeps the graph from the iterates back to the energy's parameters,
        the features, Init and the step sizes (for objective=unrolled). `train` is accepted for
        the interface of the other inference routines: the configuration never changes."""
        if not differentiable:
            feats = feats.detach()
        categorical = self.categorical(model)
        tau = self.entropy_temperature if self.parameterisation in ("logit", "mirror") else 0.0

        def f(s: torch.Tensor, feats) -> torch.Tensor:
            y = self._to_y(s, categorical)
            value = model.energy(y, feats)  # [B]
            if augment is not None:
                value = value - augment(y)
            return value - tau * _entropy(y, categorical, self.eps) if tau > 0 else value

        # The energy's own parameters (the feature network is reached through feats instead).
        params = [p for p in model.parameters() if p.requires_grad] if differentiable else []
        y0 = self.initial(model, feats) if y0 is None else y0
        if not differentiable:
            y0 = y0.detach()
        s = self._from_y(y0, categorical)
        velocity = torch.zeros_like(s)
        lrs, mu = self.lr, self.momentum
        if not differentiable:
            lrs, mu = lrs.detach(), mu.detach()
        trajectory: list[torch.Tensor] = []
        converged = torch.zeros(s.shape[0], dtype=torch.bool, device=s.device)
        for t in range(self.steps):
            with torch.set_grad_enabled(differentiable):
                g = energy_gradient(f, s, feats, params, self.mode, differentiable, self.fd_eps)
                velocity = mu * velocity + g
                s = self._step(s, velocity, lrs[t], categorical)
                y = self._to_y(s, categorical)
            if not differentiable:
                s, velocity, y = s.detach(), velocity.detach(), y.detach()
            if self.converge_tol > 0 and trajectory:
                converged = (y - trajectory[-1]).detach().abs().flatten(1).amax(-1) <= self.converge_tol
            trajectory.append(y)
            if self.converge_tol > 0 and bool(converged.all()):
                break
        computed = len(trajectory)
        trajectory += [trajectory[-1]] * (self.steps - computed)
        with torch.no_grad():
            final = model.energy(trajectory[-1].detach(), feats)
        return UnrolledResult(trajectory[-1] if differentiable else trajectory[-1].detach(), computed,
                              converged, final.detach(), trajectory)

    def extra_repr(self) -> str:
        return (f"steps={self.steps}, parameterisation={self.parameterisation}, output={self.output}, "
                f"mode={self.mode}, learned={self.learned}")
