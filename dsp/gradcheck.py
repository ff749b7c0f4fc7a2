"""Autograd against central finite differences for a composed config's model + objective.

This is the engine of dsp-gradcheck, kept apart from the command line so that Python code and tests
can check a gradient without Hydra's CLI: `gradcheck(cfg)` returns a `Report`.

The loss is the one training minimises, L(θ) = objective.loss(model, inference, *task.batch(x, y))
on the first `gradcheck.examples` training examples. For a few entries of every trainable parameter
tensor (and of x, when it is floating point) the autograd derivative a is compared with the central
difference n = (L(θ + eps·e) - L(θ - eps·e)) / (2 eps) by the relative error
|a - n| / max(|a|, |n|, floor); the floor (at least gradcheck.abs_floor) is the level below which
the central difference is round-off, so near-zero gradients are judged by their absolute error.

Kinks: where L is not differentiable along an entry (a ReLU input or max-pool tie exactly at θ: the
one-sided slopes differ and keep differing at a 10x step) the entry checks nothing; it is reported
as a kink and another entry is checked instead. A kink closer than eps bends the central difference;
such an entry passes only if differences at eps/10 or eps/100 converge onto autograd.

What is held fixed, so that autograd and finite differences describe the same function:
  * everything runs on the CPU in float64 with the model in eval mode (no dropout: finite
    differences need a deterministic function);
  * torch's RNG (and Python's and NumPy's) is reset to gradcheck.seed before every evaluation, so
    objectives that sample (DVN's tuple sources) draw the same samples every time;
  * results that the objective treats as constants (SSVM's loss-augmented inference, DVN's generated
    labels: the inference routine's calls and the objective methods named by
    gradcheck.frozen_methods) are recorded on the first evaluation and replayed, in call order, on
    the perturbed ones. Autograd ignores how they move with θ by design (at an optimum of the inner
    problem that is the envelope theorem), so finite differences must not see them move either.
    Objectives that differentiate through their inference on purpose (second_order: the unrolled
    objective) keep it live;
  * objectives with state across steps (per-example messages, loss(..., index=...)) are evaluated
    gradcheck.warmup times first and then restored to that state before every evaluation.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import functools
import inspect
import time
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from dsp.errors import DspError
from dsp.seed import set_seed


# ------------------------------------------------------------------------------------ settings
# gradcheck.KEY numbers: (key, kind, lowest value, lowest allowed, may be null)
_NUMBERS = (("examples", "int", 1, True, False), ("params_per_tensor", "int", 1, True, False),
            ("input_entries", "int", 1, True, True), ("seed", "int", 0, True, False),
            ("warmup", "int", 0, True, True), ("eps", "float", 0, False, False), ("tol", "float", 0, False, False),
            ("abs_floor", "float", 0, False, False), ("roundoff", "float", 0, True, False),
            ("jitter", "float", 0, True, True))


@dataclass(frozen=True)
class Settings:
    """The `gradcheck:` node of the config (conf/gradcheck.yaml), checked and typed."""

    examples: int
    per_tensor: int
    input_entries: int
    eps: float
    tol: float
    abs_floor: float
    roundoff: float
    inputs: bool
    seed: int
    stage: str | None
    jitter: float
    warmup: int
    frozen_methods: tuple

    @classmethod
    def from_config(cls, gc) -> "Settings":
        from dsp.training.config_checks import check_number

        for key, kind, low, inclusive, nullable in _NUMBERS:
            check_number(f"gradcheck.{key}", gc.get(key), kind, low, inclusive, nullable)
        if not isinstance(gc.inputs, bool):
            raise DspError(f"gradcheck.inputs={gc.inputs!r}: give true or false")
        per_tensor = int(gc.params_per_tensor)
        return cls(examples=int(gc.examples), per_tensor=per_tensor,
                   input_entries=int(gc.get("input_entries") or per_tensor), eps=float(gc.eps), tol=float(gc.tol),
                   abs_floor=float(gc.abs_floor), roundoff=float(gc.roundoff), inputs=bool(gc.inputs),
                   seed=int(gc.seed), stage=gc.get("stage"), jitter=float(gc.get("jitter") or 0.0),
                   warmup=int(gc.get("warmup") or 0), frozen_methods=tuple(gc.get("frozen_methods") or []))

    def floor(self, loss: float, step: float) -> float:
        """The relative error's floor for a central difference with `step`: below it, its own
        round-off (one evaluation of L is accurate to a relative `roundoff`) divided by tol."""
        return max(self.abs_floor, self.roundoff * max(1.0, abs(loss)) / step / self.tol)


# ------------------------------------------------------------------- record / replay of constants
def _has_grad(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.requires_grad
    if isinstance(obj, (list, tuple)):
        return any(_has_grad(o) for o in obj)
    if isinstance(obj, dict):
        return any(_has_grad(o) for o in obj.values())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return any(_has_grad(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return False


def _constant(obj):
    """A detached copy of a call's result: tensors anywhere in tuples, lists, dicts, dataclasses."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_constant(o) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_constant(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _constant(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _constant(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


class Tape:
    """Calls whose results are constants of the loss: `record` runs them and keeps a detached copy
    (and the RNG state after them); `replay` returns the copies in call order instead of running
    them (and restores that RNG state, so later random draws match); `pass` just runs them. Frozen
    calls inside a frozen call run as they are: the outer result is what is kept."""

    def __init__(self):
        self.mode, self.entries, self.pos, self.depth = "pass", [], 0, 0
        self.live: set[str] = set()  # frozen results that carried a gradient when recorded

    def start(self, mode: str) -> None:
        self.mode, self.pos = mode, 0
        if mode == "record":
            self.entries, self.live = [], set()

    def finish(self) -> None:
        if self.mode == "replay" and self.pos != len(self.entries):
            raise DspError(f"the loss made {self.pos} frozen call(s) where the first evaluation made "
                           f"{len(self.entries)}: its control flow depends on the parameters, so the "
                           f"recorded results cannot be replayed")

    def call(self, name: str, fn, args, kwargs):
        if self.mode == "pass" or self.depth > 0:
            return fn(*args, **kwargs)
        if self.mode == "record":
            return self._record(name, fn, args, kwargs)
        return self._replay(name)

    def _record(self, name: str, fn, args, kwargs):
        self.depth += 1
        try:
            out = fn(*args, **kwargs)
        finally:
            self.depth -= 1
        if _has_grad(out):
            self.live.add(name)
        self.entries.append((name, _constant(out), torch.get_rng_state()))
        return out  # the live result: autograd sees exactly what training sees

    def _replay(self, name: str):
        if self.pos >= len(self.entries) or self.entries[self.pos][0] != name:
            expected = self.entries[self.pos][0] if self.pos < len(self.entries) else "nothing"
            raise DspError(f"frozen call {self.pos + 1} is {name} where the first evaluation made {expected}: "
                           f"the loss's control flow depends on the parameters")
        _, out, rng = self.entries[self.pos]
        self.pos += 1
        torch.set_rng_state(rng)
        return _constant(out)

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def frozen(*args, **kwargs):
            return self.call(name, fn, args, kwargs)

        return frozen

    @property
    def names(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name, _, _ in self.entries:
            counts[name] = counts.get(name, 0) + 1
        return counts


class FrozenInference:
    """Stands in for the inference routine: calls to it (and to its methods) go through the tape;
    attributes read and write through to it. copy.copy copies the routine (DVN's truncated runs)."""

    def __init__(self, target, tape: Tape, name: str = "inference"):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_tape", tape)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args, **kwargs):
        return self._tape.call(self._name, self._target, args, kwargs)

    def __getattr__(self, attr):
        value = getattr(self._target, attr)
        if callable(value) and not isinstance(value, (type, torch.nn.Module)) and not attr.startswith("__"):
            return self._tape.wrap(f"{self._name}.{attr}", value)
        return value

    def __setattr__(self, attr, value):
        setattr(self._target, attr, value)

    def __copy__(self):
        return FrozenInference(copy.copy(self._target), self._tape, self._name)


def _has_tensor(obj, depth: int = 3) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if depth == 0:
        return False
    if isinstance(obj, (list, tuple)):
        return any(_has_tensor(o, depth - 1) for o in obj)
    if isinstance(obj, dict):
        return any(_has_tensor(o, depth - 1) for o in obj.values())
    return (hasattr(obj, "__dict__") and not callable(obj)
            and any(_has_tensor(v, depth - 1) for v in vars(obj).values()))


class State:
    """The state an objective or inference routine keeps across steps (per-example messages),
    restored before every evaluation: its state_dict() when it has one, else its tensor attributes."""

    def __init__(self, obj):
        self.obj = obj
        if obj is None or isinstance(obj, (torch.nn.Module, FrozenInference)):
            self.kind, self.saved = None, None
        elif callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
            self.kind, self.saved = "state_dict", copy.deepcopy(obj.state_dict())
        else:
            attrs = {k: v for k, v in vars(obj).items() if _has_tensor(v)} if hasattr(obj, "__dict__") else {}
            self.kind, self.saved = "attrs", copy.deepcopy(attrs)

    def restore(self) -> None:
        if self.kind == "state_dict":
            self.obj.load_state_dict(copy.deepcopy(self.saved))
        elif self.kind == "attrs":
            for k, v in self.saved.items():
                setattr(self.obj, k, copy.deepcopy(v))


# ------------------------------------------------------------------------------------ the report
@dataclass
class TensorCheck:
    """One parameter tensor (or the input x): per checked entry (index, autograd, finite difference,
    floor of the relative error, step), and the entries found at a kink (index, autograd, left and
    right one-sided slopes)."""

    name: str
    shape: tuple
    entries: list = field(default_factory=list)
    kinks: list = field(default_factory=list)

    @staticmethod
    def errors(entry) -> tuple[float, float]:
        _, a, n, floor, _ = entry
        diff = abs(a - n)
        return diff / max(abs(a), abs(n), floor), diff

    @property
    def worst(self):
        """(relative error, absolute error, entry) of the entry with the largest relative error."""
        if not self.entries:
            return 0.0, 0.0, None
        rel, _, entry = max((*self.errors(e), e) for e in self.entries)
        return rel, max(self.errors(e)[1] for e in self.entries), entry

    def smaller_steps(self, eps: float) -> int:
        return sum(1 for e in self.entries if e[4] < eps)


@dataclass
class Report:
    checks: list[TensorCheck]
    examples: int
    tol: float
    eps: float
    loss: float
    floor: float  # relative errors are |a - n| / max(|a|, |n|, floor)
    evaluations: int
    seconds: float
    frozen: dict
    notes: list[str]

    @property
    def worst(self) -> tuple[float, str]:
        return max(((c.worst[0], c.name) for c in self.checks), default=(0.0, "-"))

    @property
    def kinks(self) -> int:
        return sum(len(c.kinks) for c in self.checks)

    @property
    def ok(self) -> bool:
        return self.worst[0] <= self.tol


# ------------------------------------------------------------------------- what is differentiated
def build(cfg: DictConfig, stage: str | None = None):
    """Data, model, inference and objective as dsp-train builds them (with `stage`, that trainer
    stage's objective, and only the parts it trains keep requires_grad)."""
    from dsp.build import assemble

    run = assemble(cfg)
    data, model, inference, objective = run.data, run.model, run.inference, run.objective
    if stage:
        stages = {s.name: s for s in run.stages}
        if stage not in stages:
            raise DspError(f"gradcheck.stage={stage}: the trainer has the stages {', '.join(stages)}")
        objective = stages[stage].objective
        stages[stage].parameters(model)  # the parts the stage trains keep requires_grad
    return data, model, inference, objective


def _to_float64(model: torch.nn.Module, s: Settings) -> None:
    """float64 on the CPU: central differences with eps = 1e-6 need the precision. Eval mode: no
    dropout, since finite differences need one deterministic function of θ. Jitter moves off exact
    ties (zero-initialised biases in front of ReLUs): see conf/gradcheck.yaml."""
    model.to("cpu").double().eval()
    if s.jitter > 0:
        gen = torch.Generator().manual_seed(s.seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(s.jitter * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _first_batch(data, s: Settings) -> tuple[list[torch.Tensor], int]:
    """The task's batch of the first `examples` training examples, floating point as float64."""
    from dsp.tasks import takes_rows, task_for

    task = task_for(data)
    x_all, y_all = data.split("train").tensors
    n = min(s.examples, x_all.shape[0])
    set_seed(s.seed)
    with torch.no_grad():
        rows = {"index": torch.arange(n)} if takes_rows(task) else {}
        batch = task.batch(x_all[:n], y_all[:n], **rows)
    return [t.detach().to(torch.float64 if t.is_floating_point() else t.dtype).clone() for t in batch], n


def _freeze(objective, inference, tape: Tape, patterns, notes: list[str]):
    """Route the calls whose results the loss treats as constants through `tape`; returns what the
    objective gets as its inference routine."""
    for pattern in patterns:
        for name in dir(objective):
            if not name.startswith("_") and fnmatch.fnmatch(name, pattern) and callable(getattr(objective, name)):
                setattr(objective, name, tape.wrap(f"objective.{name}", getattr(objective, name)))
    declared = _second_order(objective)
    if declared:
        notes.append(f"inference kept live: the objective differentiates through it ({declared})")
        return inference  # differentiated through on purpose: kept live
    return None if inference is None else FrozenInference(inference, tape)


def _second_order(objective) -> str | None:
    """"second_order" when the objective differentiates through its inference (the unrolled
    objective declares dsp.interfaces.Objective.second_order), else None."""
    return "second_order" if objective.second_order else None


def _trainable(model: torch.nn.Module, notes: list[str]) -> list[tuple[str, torch.Tensor]]:
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise DspError("the model has no trainable parameters to check")
    frozen = sum(1 for _ in model.parameters()) - len(params)
    if frozen:
        notes.append(f"{frozen} parameter tensor(s) not trained by this stage are skipped")
    return params


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Tensors the loss creates on the fly get `dtype` too."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class Loss:
    """L(θ) on the fixed batch, the same function at every call: the objective's and inference's
    state restored, the RNG reset, frozen calls recorded (first call) or replayed (perturbed ones)."""

    def __init__(self, objective, model, inference, batch, n: int, tape: Tape, seed: int):
        self.objective, self.model, self.inference, self.batch = objective, model, inference, batch
        self.tape, self.seed = tape, seed
        # objectives with per-example state: the batch holds training examples 0..n-1
        self.kwargs = {"index": torch.arange(n)} if "index" in inspect.signature(objective.loss).parameters else {}
        self.states: list[State] = []
        self.evaluations = 0
        self.value: float | None = None  # L(θ) of the recording evaluation
        self._at_theta: float | None = None

    def warm_up(self, times: int, inference) -> None:
        """Objectives with state: let it settle, then keep that state (of the objective and of the
        unwrapped `inference`) to restore before every evaluation."""
        for _ in range(times):
            self.objective.loss(self.model, self.inference, *self.batch, **self.kwargs)
        self.states = [State(self.objective), State(inference)]

    def __call__(self, mode: str) -> torch.Tensor:
        for s in self.states:
            s.restore()
        set_seed(self.seed)
        self.tape.start(mode)
        loss, _ = self.objective.loss(self.model, self.inference, *self.batch, **self.kwargs)
        self.tape.finish()
        self.evaluations += 1
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise DspError(f"objective.loss returned {type(loss).__name__} of shape "
                           f"{getattr(loss, 'shape', None)}, not a scalar tensor")
        if not torch.isfinite(loss):
            raise DspError(f"the loss is {float(loss)} at the current parameters: nothing to check")
        return loss.detach().reshape(()) if mode == "replay" else loss.reshape(())

    def record(self) -> torch.Tensor:
        """The first evaluation: frozen calls recorded, the live loss returned for autograd."""
        loss = self("record")
        self.value = loss.item()
        return loss

    def shifted(self, target: torch.Tensor, where: tuple, step: float) -> float:
        """L with target[where] moved by `step` (constants replayed)."""
        with torch.no_grad():
            original = target.data[where].clone()
            target.data[where] = original + step
        try:
            return self("replay").item()
        finally:
            with torch.no_grad():
                target.data[where] = original

    def at_theta(self) -> float:
        """L(θ) as the perturbed evaluations compute it (replayed constants), evaluated once."""
        if self._at_theta is None:
            self._at_theta = self("replay").item()
        return self._at_theta


# ------------------------------------------------------------------------------------ the check
def _candidates(grad: torch.Tensor, k: int, gen: torch.Generator) -> list[int]:
    """Up to 5k flat indices in the order they are checked: the first uniformly at random, then
    entries whose autograd gradient is non-zero (sparse inputs make most first-layer gradients
    exactly zero, so uniform picks would mostly check 0 == 0), topped up uniformly. The ones after
    the first k replace entries that turn out to sit on a kink."""
    n = grad.numel()
    want = min(n, 5 * k)
    first = int(torch.randint(n, (1,), generator=gen))
    picked = [first]
    nonzero = grad.reshape(-1).nonzero().squeeze(-1)
    nonzero = nonzero[nonzero != first]
    picked += nonzero[torch.randperm(nonzero.numel(), generator=gen)][: want - 1].tolist()
    if len(picked) < want:
        seen = set(picked)
        picked += [i for i in torch.randperm(n, generator=gen).tolist() if i not in seen][: want - len(picked)]
    return picked


def _flat_index(shape, i: int) -> tuple:
    out = []
    for size in reversed(shape):
        out.append(i % size)
        i //= size
    return tuple(reversed(out))


def _kink_at(loss: Loss, target, where, plus: float, minus: float, s: Settings):
    """(left, right) one-sided slopes when θ sits on a kink along this entry (a max-pool tie, a ReLU
    or hinge exactly at 0), else None. There the central difference averages two slopes and is no
    derivative, and autograd returns one subgradient choice: the entry checks nothing and is
    replaced. A kink's jump right - left stays the same at a 10× larger step; at a smooth point it
    is eps·L'' and grows 10×."""
    eps = s.eps
    l0 = loss.at_theta()
    left, right = (l0 - minus) / eps, (plus - l0) / eps
    wide = 10 * eps
    jump_wide = (loss.shifted(target, where, wide) - l0) / wide - (l0 - loss.shifted(target, where, -wide)) / wide
    jump, noise = right - left, 2 * s.roundoff * max(1.0, abs(l0)) / eps
    if abs(jump) > 10 * noise and abs(jump_wide - jump) <= 0.25 * abs(jump):
        return left, right
    return None


def _converged_entry(loss: Loss, target, where, entry: tuple, s: Settings) -> tuple:
    """A kink closer than eps (a ReLU input or max-pool gap below 1e-6) bends the central
    difference; the derivative is its limit, so smaller steps (eps/10, eps/100) decide, with the
    floor raised for their larger round-off. Only a difference that converges onto autograd counts
    (a wrong gradient stays as far from the finite differences at every step)."""
    a, step = entry[1], s.eps
    while TensorCheck.errors(entry)[0] > s.tol and step > s.eps * 1e-2 * 1.01:
        step /= 10
        numeric = (loss.shifted(target, where, step) - loss.shifted(target, where, -step)) / (2 * step)
        smaller = (where, a, numeric, s.floor(loss.value, step), step)
        if TensorCheck.errors(smaller)[0] <= s.tol and abs(a - numeric) <= 0.1 * abs(a - entry[2]):
            entry = smaller
    return entry


def _check_tensor(loss: Loss, name: str, target, grad, k: int, gen: torch.Generator, s: Settings) -> TensorCheck:
    """Up to k entries of one tensor, entries at a kink replaced by further candidates."""
    check = TensorCheck(name, tuple(target.shape))
    for i in _candidates(grad, k, gen) if target.numel() else []:
        if len(check.entries) >= k:
            break
        where = _flat_index(target.shape, i)
        plus, minus = loss.shifted(target, where, s.eps), loss.shifted(target, where, -s.eps)
        a = float(grad[where])
        entry = (where, a, (plus - minus) / (2 * s.eps), s.floor(loss.value, s.eps), s.eps)
        entry = _converged_entry(loss, target, where, entry, s)
        if TensorCheck.errors(entry)[0] > s.tol:
            kink = _kink_at(loss, target, where, plus, minus, s)
            if kink is not None:
                check.kinks.append((where, a, *kink))
                continue
        check.entries.append(entry)
    return check


def gradcheck(cfg: DictConfig) -> Report:
    """Check a composed config (conf/gradcheck.yaml with any dsp-train overrides): see the module
    docstring. Raises DspError for a setting or a loss that cannot be checked."""
    s = Settings.from_config(cfg.gradcheck)
    start_time = time.time()
    data, model, inference, objective = build(cfg, s.stage)
    _to_float64(model, s)
    batch, n = _first_batch(data, s)
    x = batch[0]
    check_x = s.inputs and x.is_floating_point()
    if check_x:
        x.requires_grad_(True)
    tape, notes = Tape(), []
    frozen_inference = _freeze(objective, inference, tape, s.frozen_methods, notes)
    loss = Loss(objective, model, frozen_inference, batch, n, tape, s.seed)
    params = _trainable(model, notes)
    with _default_dtype(torch.float64):
        loss.warm_up(s.warmup, inference)
        targets = [p for _, p in params] + ([x] if check_x else [])
        grads = torch.autograd.grad(loss.record(), targets, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(targets, grads)]
        notes += [f"{name} returned a result with a gradient, which finite differences hold fixed: if the "
                  f"objective differentiates through it, declare second_order = True on the objective"
                  for name in sorted(tape.live)]
        gen = torch.Generator().manual_seed(s.seed)
        names = [name for name, _ in params] + (["input x"] if check_x else [])
        counts = [s.input_entries if name == "input x" else s.per_tensor for name in names]
        checks = [_check_tensor(loss, *args, gen, s) for args in zip(names, targets, grads, counts)]
    return Report(checks=checks, examples=n, tol=s.tol, eps=s.eps, loss=loss.value, floor=s.floor(loss.value, s.eps),
                  evaluations=loss.evaluations, seconds=time.time() - start_time, frozen=tape.names, notes=notes)
