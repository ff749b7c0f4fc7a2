"""Gradient-based inference on the relaxation ȳ ∈ [0,1]^L (SPEN §2, §7.4, §A.4-A.5).

Two geometries: entropic mirror descent, which on each coordinate's 2-simplex (ȳ_i, 1-ȳ_i) is a
gradient step on the logit z_i = log(ȳ_i / (1-ȳ_i)) with ∂E/∂ȳ_i (iterates stay in (0,1)), and
Euclidean projected gradient descent (clip to [0,1]). Both with heavy-ball momentum.

Convergence is tracked per example on the device (relative change of the objective or ℓ∞ change
of the iterates, the paper's two tests); converged examples are frozen and the batch stops once
`stop_fraction` of it has converged; only that stop test reads a value back to the host, every
`check_every` iterations. ∂E/∂ȳ comes from the model's hand-written gradient where it has one
(`energy_and_grad`, e.g. SPEN: one matrix product per layer each way) or from autograd, which
then forms no parameter gradients.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Annotated, Callable, Literal, get_args

import torch

from dsp import interfaces as I
from dsp.errors import DspError
from dsp.inference.full_precision import full_precision
from dsp.schema import Count, Fraction, NonNegative, Positive, Range, Rate, SettingsOf, Size

EnergyFn = Callable[[torch.Tensor], torch.Tensor]  # ȳ [B, L] -> objective [B]
ValueAndGradFn = Callable[[torch.Tensor], tuple]  # ȳ [B, L] -> (objective [B], ∂objective/∂ȳ [B, L])
Gradient = Literal["auto", "analytic", "autograd"]
GRADIENTS = get_args(Gradient)


@dataclass
class InferenceResult:
    y: torch.Tensor  # [B, L] relaxed output
    iterations: int  # iterations run for the batch
    converged: torch.Tensor  # [B] bool
    objective: torch.Tensor  # [B] final objective values


def _logit(y: torch.Tensor, eps: float) -> torch.Tensor:
    y = y.clamp(eps, 1 - eps)
    return torch.log(y) - torch.log1p(-y)


def replace_settings(routine, **settings):
    """A shallow copy of an inference routine with some settings changed."""
    out = copy.copy(routine)
    for key, value in settings.items():
        setattr(out, key, value)
    return out


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of v [..., K] onto the probability simplex (sort-based,
    Held et al. 1974 / Duchi et al. 2008)."""
    u = v.sort(-1, descending=True).values
    css = u.cumsum(-1) - 1
    k = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / k) > 0).sum(-1, keepdim=True).clamp_min(1)  # [..., 1]
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0)


def _on_simplex(y: torch.Tensor, rows: int | None) -> torch.Tensor:
    """Flat ȳ [B, n·rows] with each row of `rows` entries scaled to sum to 1 (unchanged if rows is None)."""
    if rows is None:
        return y
    r = y.view(y.shape[0], -1, rows)
    return (r / r.sum(-1, keepdim=True).clamp_min(1e-12)).view_as(y)


def entropy(y: torch.Tensor, eps: float) -> torch.Tensor:
    """Σ_i H(ȳ_i) of independent Bernoullis -> [B]."""
    y = y.clamp(eps, 1 - eps)
    return -(y * y.log() + (1 - y) * torch.log1p(-y)).sum(-1)


class GradientInference(I.Inference):
    """Minimise an energy over ȳ ∈ [0,1]^L by projected gradient or entropic mirror descent.

    Args:
        method: "mirror" or "projected".
        lr, momentum: step size and heavy-ball momentum (paper: 0.1 and 0.95).
        max_iter: iteration cap.
        rel_tol: converged when |f_t - f_{t-1}| <= rel_tol * |f_{t-1}|  (0 disables).
        abs_tol: converged when max_i |ȳ_t - ȳ_{t-1}| <= abs_tol  (0 disables).
        stop_fraction: stop the batch once this fraction of examples has converged (§7.4).
        init: "local" (start from the local/MLP prediction σ(logits)) or "constant".
        init_value: the constant start for init="constant".
        entropy_temperature: test-time smoothing, minimise E(ȳ) - τ H(ȳ) (§A.4); 0 disables.
        check_every: iterations between convergence tests: the per-example tests run on the device,
            then the stop test reads one value back to the host (the loop's only sync).
        gradient: "analytic" uses the model's hand-written ∂E/∂ȳ (`energy_and_grad`), "autograd"
            differentiates `energy`, "auto" takes the analytic one whenever the model has it.
        restarts: extra starting points drawn uniformly in (0,1) (seeded by restart_seed, so
            prediction is deterministic); per example the lowest final objective wins.
        anneal_temperature, anneal_iters: continuation for non-convex energies: an extra entropy
            term whose temperature falls linearly from anneal_temperature to 0 over the first
            anneal_iters iterations, smoothing away shallow local minima; convergence is only
            tested afterwards.
        output: how ȳ is relaxed: sigmoid (each entry in [0, 1]), softmax (a distribution over the
            last axis: mirror descent on each row's simplex, or Euclidean projection onto it), or
            auto (softmax for models whose relaxed outputs are label distributions: sequences).
        predict: overrides of any of the settings above that apply only when predicting
            (validation, test, dsp-eval), never inside learning: e.g. more restarts or a tighter
            tolerance, which pay off at test time but slow every training step.
    """

    outputs = frozenset({I.MULTILABEL, I.MASK, I.IMAGE, I.SEQUENCE})
    needs = frozenset({I.ENERGY})
    provides = frozenset({I.RELAXED, I.LOSS_AUGMENTED})

    @classmethod
    def needs_for(cls, config):
        starts_local = config.get("init", "local") == "local" or (config.get("predict") or {}).get("init") == "local"
        return cls.needs | ({I.LOCAL} if starts_local else set())

    def __init__(
        self,
        method: Literal["mirror", "projected"] = "mirror",
        lr: Positive = 0.1,
        momentum: Rate = 0.95,
        max_iter: Size = 100,
        rel_tol: NonNegative = 1e-4,
        abs_tol: NonNegative = 1e-3,
        stop_fraction: Annotated[float, Range(0, 1, inclusive=False, high_inclusive=True)] = 1.0,
        init: Literal["local", "constant"] = "local",
        init_value: Fraction = 0.5,
        entropy_temperature: NonNegative = 0.0,
        check_every: Size = 1,
        restarts: Count = 0,
        restart_seed: Count = 0,
        anneal_temperature: NonNegative = 0.0,
        anneal_iters: Count = 0,
        eps: Positive = 1e-6,
        gradient: Gradient = "auto",
        output: Literal["auto", "sigmoid", "softmax"] = "auto",
        # overrides of the settings above used only when predicting
        predict: Annotated[dict | None, SettingsOf(GradientInference, exclude=("predict",))] = None,
    ):
        if method not in ("mirror", "projected"):
            raise DspError(f"inference.method={method!r}: choose 'mirror' or 'projected'")
        if init not in ("local", "constant"):
            raise DspError(f"inference.init={init!r}: choose 'local' or 'constant'")
        if output not in ("auto", "sigmoid", "softmax"):
            raise DspError(f"inference.output={output!r}: choose auto, sigmoid or softmax")
        if gradient not in GRADIENTS:
            raise DspError(f"inference.gradient={gradient!r}: choose one of {', '.join(GRADIENTS)}")
        if not 0.0 < stop_fraction <= 1.0:
            raise DspError(f"inference.stop_fraction must be in (0, 1], got {stop_fraction}")
        if max_iter < 1 or check_every < 1 or restarts < 0 or anneal_iters < 0:
            raise DspError("inference.max_iter and check_every must be >= 1; restarts and anneal_iters >= 0")
        self.method, self.lr, self.momentum, self.max_iter = method, lr, momentum, max_iter
        self.rel_tol, self.abs_tol, self.stop_fraction = rel_tol, abs_tol, stop_fraction
        self.init, self.init_value = init, init_value
        self.entropy_temperature, self.check_every, self.eps = entropy_temperature, check_every, eps
        self.gradient, self.output = gradient, output
        self.restarts, self.restart_seed = restarts, restart_seed
        self.anneal_temperature, self.anneal_iters = anneal_temperature, anneal_iters
        self.predictor = None  # a second routine with the `predict` overrides, used when not training
        if predict:
            settings = {k: v for k, v in vars(self).items() if k != "predictor"}
            unknown = set(predict) - set(settings)
            if unknown:
                raise DspError(f"inference.predict: unknown key(s) {sorted(unknown)}; known: {sorted(settings)}")
            self.predictor = GradientInference(**{**settings, **dict(predict)})

    def at_random_step(self) -> "GradientInference":
        return replace_settings(self, max_iter=int(torch.randint(1, self.max_iter + 1, ()).item()))

    def initial(self, model, feats) -> torch.Tensor:
        if self.init == "local":
            return model.local_probs(feats).detach()
        start = model.local_probs(feats)  # the output's shape (every energy model has local_probs)
        if self.categorical(model):  # the constant start on a simplex: the uniform distribution
            return torch.full_like(start, 1.0 / start.shape[-1]).detach()
        return torch.full_like(start, self.init_value).detach()

    def categorical(self, model) -> bool:
        """Rows of ȳ on the simplex (output=softmax, or auto on label-distribution models)."""
        return self.output == "softmax" or (self.output == "auto" and model.relaxation == "simplex")

    # ȳ, the mirror-descent iterate, the momentum and the convergence tests (rel_tol 1e-4 is finer than
    # bfloat16's resolution) in float32 under trainer.precision=bf16|fp16, the energy's networks too
    @full_precision
    def __call__(self, model, feats, augment: EnergyFn | None = None, y0=None, train: bool = False):
        """Minimise E(ȳ) [- augment(ȳ)] for a batch; `train=True` drops the prediction-time
        settings (entropy smoothing and the `predict` overrides)."""
        if not train and self.predictor is not None:
            return self.predictor(model, feats, augment, y0)
        feats = feats.detach()

        def objective(y: torch.Tensor) -> torch.Tensor:
            f = model.energy(y, feats)
            return f if augment is None else f - augment(y)  # [B]

        y0 = self.initial(model, feats) if y0 is None else y0.detach()
        return self.minimise(objective, y0, temperature=0.0 if train else self.entropy_temperature,
                             value_and_grad=self._analytic(model, feats, augment),
                             rows=y0.shape[-1] if self.categorical(model) else None)

    def _analytic(self, model, feats, augment: EnergyFn | None) -> ValueAndGradFn | None:
        """The objective and its gradient from the model's closed-form ∂E/∂ȳ (plus autograd on the
        augmentation term only), or None to let autograd differentiate the whole objective."""
        available = model.has_analytic_gradient()
        if self.gradient == "analytic" and not available:
            raise DspError(f"inference.gradient=analytic: {type(model).__name__} has no hand-written ∂E/∂ȳ "
                           "for this configuration (e.g. dropout active or an activation without one); "
                           "use inference.gradient=auto or autograd")
        if self.gradient == "autograd" or not available:
            return None

        def value_and_grad(y: torch.Tensor):
            f, grad = model.energy_and_grad(y, feats)
            if augment is not None:
                with torch.enable_grad():
                    y_var = y.detach().requires_grad_(True)
                    a = augment(y_var)
                    (grad_a,) = torch.autograd.grad(a.sum(), y_var)
                f, grad = f - a.detach(), grad - grad_a
            return f, grad

        return value_and_grad

    def minimise(self, objective: EnergyFn, y0: torch.Tensor, temperature: float = 0.0,
                 value_and_grad: ValueAndGradFn | None = None, rows: int | None = None) -> InferenceResult:
        """Minimise objective(ȳ) - temperature·H(ȳ) over a batch ȳ [B, ...] -> [B], with restarts.

        Outputs of any shape (label vectors [B, L], masks [B, H, W]) are optimised as flat vectors
        per example; the objective and the result see the original shape. `value_and_grad`, when
        given, returns the objective and its gradient in closed form and replaces autograd."""
        if y0.dim() > 2:
            shape = y0.shape[1:]
            flat_vg = None
            if value_and_grad is not None:
                def flat_vg(y):
                    f, g = value_and_grad(y.view(-1, *shape))
                    return f, g.flatten(1)
            res = self.minimise(lambda y: objective(y.view(-1, *shape)), y0.flatten(1), temperature, flat_vg, rows)
            return replace(res, y=res.y.view(-1, *shape))
        if self.restarts == 0:
            return self._descend(objective, y0, temperature, value_and_grad, rows)
        gen = torch.Generator(device=y0.device).manual_seed(self.restart_seed)
        starts = [y0] + [_on_simplex(torch.rand(y0.shape, generator=gen, device=y0.device, dtype=y0.dtype), rows)
                         for _ in range(self.restarts)]
        # Every restart is one copy of the batch, solved together: [K*B, L].
        batch = y0.shape[0]

        def stacked(y: torch.Tensor) -> torch.Tensor:  # the objective knows the batch once
            return torch.cat([objective(chunk) for chunk in y.split(batch)])

        stacked_vg = None
        if value_and_grad is not None:
            def stacked_vg(y):
                values, grads = zip(*(value_and_grad(chunk) for chunk in y.split(batch)))
                return torch.cat(values), torch.cat(grads)

        res = self._descend(stacked, torch.cat(starts), temperature, stacked_vg, rows)
        k = len(starts)
        best = res.objective.reshape(k, batch).argmin(0)  # [B]
        pick = torch.arange(batch, device=y0.device)
        return InferenceResult(
            res.y.reshape(k, batch, -1)[best, pick], res.iterations,
            res.converged.reshape(k, batch)[best, pick], res.objective.reshape(k, batch)[best, pick],
        )

    def _descend(self, objective: EnergyFn, y0: torch.Tensor, temperature: float,
                 value_and_grad: ValueAndGradFn | None = None, rows: int | None = None) -> InferenceResult:
        """The optimisation loop itself; `rows`: ȳ [B, n·rows] holds distributions over `rows`
        labels (the simplex geometry), else independent entries in [0, 1]."""
        def neg_entropy_grad(y: torch.Tensor) -> torch.Tensor:  # ∂(-H)/∂ȳ, zero where entropy() clamps
            if rows is not None:
                return y.clamp_min(self.eps).log() + 1
            inside = (y >= self.eps) & (y <= 1 - self.eps)
            return torch.where(inside, _logit(y, self.eps), torch.zeros_like(y))

        def total_entropy(y: torch.Tensor) -> torch.Tensor:
            return entropy(y, self.eps) if rows is None else -(y * y.clamp_min(self.eps).log()).sum(-1)

        def tau_at(it: int) -> float:
            if it <= self.anneal_iters:
                return temperature + self.anneal_temperature * (1 - it / max(1, self.anneal_iters))
            return temperature

        def smoothed(y: torch.Tensor, it: int) -> torch.Tensor:
            f, tau = objective(y), tau_at(it)
            return f - tau * total_entropy(y) if tau > 0 else f

        def smoothed_value_and_grad(y: torch.Tensor, it: int):
            if value_and_grad is None:
                y_var = y.detach().requires_grad_(True)
                f = smoothed(y_var, it)  # [B]
                (grad,) = torch.autograd.grad(f.sum(), y_var)
                return f.detach(), grad
            f, grad = value_and_grad(y)
            tau = tau_at(it)
            if tau > 0:  # ∂(-τH)/∂ȳ: τ·logit(ȳ) in the box, τ(log ȳ + 1) on the simplex
                f = f - tau * total_entropy(y)
                grad = grad + tau * neg_entropy_grad(y)
            return f, grad

        if rows is not None:  # distributions: mirror descent keeps log ȳ, normalised per row
            y = _on_simplex(y0.clamp_min(self.eps) if self.method == "mirror" else y0.clamp_min(0), rows)
            z = y.log() if self.method == "mirror" else None
        else:
            y = y0.clamp(self.eps, 1 - self.eps) if self.method == "mirror" else y0.clamp(0, 1)
            z = _logit(y, self.eps) if self.method == "mirror" else None
        z_max = float(_logit(torch.tensor(1 - self.eps, dtype=torch.float64), 0.0))  # keeps ȳ in [eps, 1-eps]
        velocity = torch.zeros_like(y)
        active = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)  # [B]
        f_prev = None
        it = 0
        with torch.enable_grad():
            for it in range(1, self.max_iter + 1):
                f, grad = smoothed_value_and_grad(y, it)  # [B], [B, L]
                # Converged examples freeze: their step is scaled by 0. velocity ← grad + m·velocity
                # and z ← z - lr·active·velocity are one fused pass each.
                velocity = torch.add(grad, velocity, alpha=self.momentum)
                step = (-self.lr * active.to(y.dtype)).unsqueeze(-1)  # [B, 1]
                if self.method == "mirror" and rows is not None:  # ȳ ∝ ȳ·exp(-lr·v), row by row
                    z = torch.log_softmax(z.addcmul(step, velocity).view(y.shape[0], -1, rows), -1)
                    z = z.clamp_min(-z_max).view(y.shape[0], -1)
                    y_new = z.exp()
                elif self.method == "mirror":
                    z = z.addcmul(step, velocity).clamp_(-z_max, z_max)
                    y_new = torch.sigmoid(z)
                elif rows is not None:
                    y_new = project_simplex(y.addcmul(step, velocity).view(y.shape[0], -1, rows)).view(y.shape[0], -1)
                else:
                    y_new = y.addcmul(step, velocity).clamp_(0.0, 1.0)
                # Per-example convergence tests, on the device, every check_every iterations.
                if f_prev is not None and it > self.anneal_iters + 1 and it % self.check_every == 0:
                    done = torch.zeros_like(active)
                    if self.rel_tol > 0:
                        done |= (f - f_prev).abs() <= self.rel_tol * f_prev.abs()
                    if self.abs_tol > 0:
                        done |= (y_new - y).abs().amax(-1) <= self.abs_tol
                    active = active & ~done
                    # The only host sync of the loop: stop once stop_fraction has converged.
                    if active.float().mean() <= 1 - self.stop_fraction + 1e-9:
                        y = y_new
                        break
                y, f_prev = y_new, f
        with torch.no_grad():
            final = smoothed(y, self.max_iter + 1)
        return InferenceResult(y.detach(), it, ~active, final.detach())
