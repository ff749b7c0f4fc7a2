"""dsp-gradcheck [model=NAME] [experiment=NAME] [any dsp-train override] [gradcheck.KEY=...]:
compare autograd's gradient of the configured objective with central finite differences.

The loss is the one training minimises, L(θ) = objective.loss(model, inference, *task.batch(x, y))
on the first `gradcheck.examples` training examples, built from the same config groups as dsp-train
(conf/gradcheck.yaml). For a few random entries of every trainable parameter tensor (and of x, when
it is floating point) it compares the autograd derivative a with the central difference
n = (L(θ + eps·e) - L(θ - eps·e)) / (2 eps) and prints, per tensor, the worst relative error
|a - n| / max(|a|, |n|, floor); the floor (at least gradcheck.abs_floor) is the level below which
the central difference is round-off, so near-zero gradients are judged by their absolute error.
Exit status 0: every error <= gradcheck.tol; 1: some error above it; 2: a configuration or data error.

Kinks: where L is not differentiable along an entry (a ReLU input or max-pool tie exactly at θ: the
one-sided slopes differ and keep differing at a 10x step) the entry checks nothing; it is reported
as a kink and another entry is checked instead. A kink closer than eps bends the central difference;
such an entry passes only if differences at eps/10 or eps/100 converge onto autograd.

`model=NAME` alone also selects that model family's data, inference and objective
(conf/gradcheck.yaml, `model_defaults`), unless the command line names them or an experiment=.

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
    Objectives that differentiate through their inference on purpose (needs_second_order, the
    unrolled objective) keep it live;
  * objectives with state across steps (per-example messages, loss(..., index=...)) are evaluated
    gradcheck.warmup times first and then restored to that state before every evaluation.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import functools
import inspect
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from dsp.cli.common import config_dir, user_errors
from dsp.errors import DspError

GROUPS = ("paths", "data", "model", "inference", "objective", "trainer", "experiment")


# ------------------------------------------------------------------------------ configuration
def _key(arg: str) -> str:
    """The config key an override sets: `+data.x=1` -> data.x, `~objective` -> objective."""
    return arg.split("=", 1)[0].lstrip("+~")


def with_model_defaults(args: list[str], table) -> tuple[list[str], list[str]]:
    """Append the per-model defaults of `table` (conf/gradcheck.yaml model_defaults) for a
    `model=NAME` on the command line; returns (all overrides, the ones added). Nothing is added
    with experiment= (a preset chooses its own groups) or for a group the user set."""
    keys = [_key(a) for a in args]
    models = [a.split("=", 1)[1] for a in args if _key(a) == "model" and "=" in a]
    if not models or "experiment" in keys:
        return list(args), []
    entry = (table or {}).get(models[-1].strip("'\""))
    if entry is None:
        return list(args), []
    given = set(keys)
    added = [f"{group}={option}" for group, option in entry.items() if group != "overrides" and group not in given]
    for item in entry.get("overrides") or []:
        key = _key(str(item))
        # not where the user set the key, or re-chose its group (objective=X may not have the key;
        # the model group is the one the entry is for)
        group = key.split(".", 1)[0]
        if key not in given and (group == "model" or group not in given):
            added.append(str(item))
    return list(args) + added, added


def load_model_defaults():
    return OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "gradcheck.yaml")).get("model_defaults") or {}


def compose_config(args: list[str]) -> tuple[DictConfig, dict, list[str]]:
    """Compose conf/gradcheck.yaml with the command-line overrides (plus per-model defaults);
    returns (config without the hydra node, the group choices, the overrides added)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    for option in (a.split("=", 1)[1].strip("'\"") for a in args if _key(a) == "model" and "=" in a):
        if not (Path(config_dir()) / "model" / f"{option}.yaml").is_file():
            known = sorted(p.stem for p in (Path(config_dir()) / "model").glob("*.yaml"))
            raise DspError(f"model={option}: there is no conf/model/{option}.yaml; known models: {', '.join(known)}")
    args, added = with_model_defaults(args, load_model_defaults())
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="dsp-gradcheck"):
            cfg = compose("gradcheck", overrides=args, return_hydra_config=True)
    except HydraException as err:
        message = str(err).split("\nConfig search path:")[0].rstrip()
        hint = f" (added for this model: {' '.join(added)})" if added else ""
        raise DspError(f"bad configuration: {message}{hint}") from None
    finally:
        GlobalHydra.instance().clear()
    choices = {g: cfg.hydra.runtime.choices.get(g) for g in GROUPS}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices, added


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
            self.depth += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self.depth -= 1
            if _has_grad(out):
                self.live.add(name)
            self.entries.append((name, _constant(out), torch.get_rng_state()))
            return out  # the live result: autograd sees exactly what training sees
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


# ------------------------------------------------------------------------------------ the check
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


def build(cfg: DictConfig):
    """Data, model, inference and objective as dsp-train builds them (plus the stage's objective
    and trainable parts with gradcheck.stage)."""
    from dsp.build import build_run

    data, model, inference, objective = build_run(cfg)
    stage = cfg.gradcheck.get("stage")
    if stage:
        from dsp.training.stages import build_stages

        stages = {s.name: s for s in build_stages(cfg.trainer, objective, model)}
        if stage not in stages:
            raise DspError(f"gradcheck.stage={stage}: the trainer has the stages {', '.join(stages)}")
        objective = stages[stage].objective
        stages[stage].parameters(model)  # the parts the stage trains keep requires_grad
    return data, model, inference, objective


def gradcheck(cfg: DictConfig) -> Report:
    """Run the check for a composed config (see the module docstring); also usable from Python."""
    from dsp.tasks import takes_rows, task_for
    from dsp.training.config_checks import check_number
    from dsp.training.trainer import set_seed

    gc = cfg.gradcheck
    for key, kind, low, inclusive, nullable in (
            ("examples", "int", 1, True, False), ("params_per_tensor", "int", 1, True, False),
            ("input_entries", "int", 1, True, True), ("seed", "int", 0, True, False),
            ("warmup", "int", 0, True, True), ("eps", "float", 0, False, False), ("tol", "float", 0, False, False),
            ("abs_floor", "float", 0, False, False), ("roundoff", "float", 0, True, False),
            ("jitter", "float", 0, True, True)):
        check_number(f"gradcheck.{key}", gc.get(key), kind, low, inclusive, nullable)
    if not isinstance(gc.inputs, bool):
        raise DspError(f"gradcheck.inputs={gc.inputs!r}: give true or false")
    examples, per_tensor, eps, tol = int(gc.examples), int(gc.params_per_tensor), float(gc.eps), float(gc.tol)
    start_time = time.time()
    data, model, inference, objective = build(cfg)
    # float64 on the CPU: central differences with eps = 1e-6 need the precision. Eval mode: no
    # dropout, since finite differences need one deterministic function of θ.
    model.to("cpu").double().eval()
    jitter = float(gc.get("jitter") or 0.0)
    if jitter > 0:  # move off exact ties (zero-initialised biases in front of ReLUs): see the config
        gen = torch.Generator().manual_seed(int(gc.seed))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(jitter * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    task = task_for(data)
    x_all, y_all = data.split("train").tensors
    n = min(examples, x_all.shape[0])
    set_seed(int(gc.seed))
    with torch.no_grad():
        rows = {"index": torch.arange(n)} if takes_rows(task) else {}
        batch = task.batch(x_all[:n], y_all[:n], **rows)
    batch = [t.detach().to(torch.float64 if t.is_floating_point() else t.dtype).clone() for t in batch]
    x = batch[0]
    check_x = bool(gc.inputs) and x.is_floating_point()
    if check_x:
        x.requires_grad_(True)
    kwargs = {"index": torch.arange(n)} if "index" in inspect.signature(objective.loss).parameters else {}

    tape = Tape()
    notes = []
    if getattr(objective, "needs_second_order", False):
        frozen_inference = inference  # differentiated through on purpose: kept live
        notes.append("inference kept live: the objective differentiates through it (needs_second_order)")
    else:
        frozen_inference = None if inference is None else FrozenInference(inference, tape)
    for pattern in gc.get("frozen_methods") or []:
        for name in dir(objective):
            if not name.startswith("_") and fnmatch.fnmatch(name, pattern) and callable(getattr(objective, name)):
                setattr(objective, name, tape.wrap(f"objective.{name}", getattr(objective, name)))
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise DspError("the model has no trainable parameters to check")
    frozen_params = sum(1 for _ in model.parameters()) - len(params)
    if frozen_params:
        notes.append(f"{frozen_params} parameter tensor(s) not trained by this stage are skipped")

    count = [0]
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # tensors the loss creates on the fly are float64 too
    try:
        for _ in range(int(gc.get("warmup") or 0)):  # objectives with state: let it settle first
            objective.loss(model, frozen_inference, *batch, **kwargs)
        states = [State(objective), State(inference)]

        def evaluate(mode: str) -> torch.Tensor:
            for s in states:
                s.restore()
            set_seed(int(gc.seed))
            tape.start(mode)
            loss, _ = objective.loss(model, frozen_inference, *batch, **kwargs)
            tape.finish()
            count[0] += 1
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise DspError(f"objective.loss returned {type(loss).__name__} of shape "
                               f"{getattr(loss, 'shape', None)}, not a scalar tensor")
            if not torch.isfinite(loss):
                raise DspError(f"the loss is {float(loss)} at the current parameters: nothing to check")
            return loss.detach().reshape(()) if mode == "replay" else loss.reshape(())

        loss = evaluate("record")
        targets = [p for _, p in params] + ([x] if check_x else [])
        grads = torch.autograd.grad(loss, targets, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(targets, grads)]
        for name in sorted(tape.live):
            notes.append(f"{name} returned a result with a gradient, which finite differences hold fixed: "
                         f"if the objective differentiates through it, set needs_second_order on the objective")

        gen = torch.Generator().manual_seed(int(gc.seed))
        # The central difference cannot resolve less than its own round-off, about
        # roundoff·|L| / eps (one evaluation of L is accurate to a relative `roundoff`): gradients
        # below noise/tol are judged by that absolute error, not by a ratio of round-off.
        noise = float(gc.roundoff) * max(1.0, abs(loss.item())) / eps
        floor = max(float(gc.abs_floor), noise / tol)
        at_theta = []  # L(θ) as the perturbed evaluations compute it (replayed constants), when needed

        def shifted(target, where, step: float) -> float:
            with torch.no_grad():
                original = target.data[where].clone()
                target.data[where] = original + step
            try:
                return evaluate("replay").item()
            finally:
                with torch.no_grad():
                    target.data[where] = original

        def kink_at(target, where, plus: float, minus: float):
            """(left, right) one-sided slopes when θ sits on a kink along this entry (a max-pool tie,
            a ReLU or hinge exactly at 0), else None. There the central difference averages two
            slopes and is no derivative, and autograd returns one subgradient choice: the entry
            checks nothing and is replaced. A kink's jump right - left stays the same at a 10×
            larger step; at a smooth point it is eps·L'' and grows 10×."""
            if not at_theta:
                at_theta.append(evaluate("replay").item())
            l0 = at_theta[0]
            left, right = (l0 - minus) / eps, (plus - l0) / eps
            wide = 10 * eps
            jump_wide = (shifted(target, where, wide) - l0) / wide - (l0 - shifted(target, where, -wide)) / wide
            jump, noise = right - left, 2 * float(gc.roundoff) * max(1.0, abs(l0)) / eps
            if abs(jump) > 10 * noise and abs(jump_wide - jump) <= 0.25 * abs(jump):
                return left, right
            return None

        checks = []
        names = [name for name, _ in params] + (["input x"] if check_x else [])
        x_entries = int(gc.get("input_entries") or per_tensor)
        for name, target, grad in zip(names, targets, grads):
            k = x_entries if name == "input x" else per_tensor
            check = TensorCheck(name, tuple(target.shape))
            for i in _candidates(grad, k, gen) if target.numel() else []:
                if len(check.entries) >= k:
                    break
                where = _flat_index(target.shape, i)
                plus, minus = shifted(target, where, eps), shifted(target, where, -eps)
                a = float(grad[where])
                entry = (where, a, (plus - minus) / (2 * eps), floor, eps)
                step = eps
                while TensorCheck.errors(entry)[0] > tol and step > eps * 1e-2 * 1.01:
                    # A kink closer than eps (a ReLU input or max-pool gap below 1e-6) bends the
                    # central difference; the derivative is its limit, so smaller steps (eps/10,
                    # eps/100) decide, with the floor raised for their larger round-off.
                    step /= 10
                    numeric = (shifted(target, where, step) - shifted(target, where, -step)) / (2 * step)
                    step_floor = max(float(gc.abs_floor), float(gc.roundoff) * max(1.0, abs(loss.item())) / step / tol)
                    smaller = (where, a, numeric, step_floor, step)
                    # Only a difference that converges onto autograd counts (a wrong gradient stays
                    # as far from the finite differences at every step).
                    if TensorCheck.errors(smaller)[0] <= tol and abs(a - numeric) <= 0.1 * abs(a - entry[2]):
                        entry = smaller
                if TensorCheck.errors(entry)[0] > tol:
                    kink = kink_at(target, where, plus, minus)
                    if kink is not None:
                        check.kinks.append((where, a, *kink))
                        continue
                check.entries.append(entry)
            checks.append(check)
    finally:
        torch.set_default_dtype(previous_dtype)
    return Report(checks=checks, examples=n, tol=tol, eps=eps, loss=loss.item(), floor=floor, evaluations=count[0],
                  seconds=time.time() - start_time, frozen=tape.names, notes=notes)


# ------------------------------------------------------------------------------------- output
def print_report(report: Report, header: str) -> None:
    print(header)
    if report.frozen:
        calls = ", ".join(f"{name} ×{k}" for name, k in report.frozen.items())
        print(f"held fixed (recorded once, replayed under perturbation): {calls}")
    for note in report.notes:
        print(f"note: {note}")
    print(f"loss {report.loss:.6g} ({report.evaluations} evaluations, {report.seconds:.1f} s); relative error "
          f"= |autograd - finite difference| / max(|autograd|, |finite difference|, {report.floor:.1e})")
    width = max([len("parameter")] + [len(c.name) for c in report.checks])
    shapes = [str(list(c.shape)) for c in report.checks]
    swidth = max([len("shape")] + [len(s) for s in shapes])
    print(f"  {'parameter':<{width}}  {'shape':<{swidth}}  checked  max rel err  max abs err  status")
    for c, shape in zip(report.checks, shapes):
        rel, diff, entry = c.worst
        status = "FAIL" if rel > report.tol else ("OK" if c.entries else "KINKS ONLY")
        notes = ([f"{len(c.kinks)} at a kink, skipped"] if c.kinks else []) + (
            [f"{c.smaller_steps(report.eps)} needed a smaller step"] if c.smaller_steps(report.eps) else [])
        note = f"  ({'; '.join(notes)})" if notes else ""
        print(f"  {c.name:<{width}}  {shape:<{swidth}}  {len(c.entries):7d}  {rel:11.2e}  {diff:11.2e}  {status}{note}")
        if status == "FAIL":
            where, a, n, _, step = entry
            print(f"  {'':<{width}}    worst entry {list(where)}: autograd {a:.8g}, "
                  f"finite difference {n:.8g} (step {step:g})")
    kinks = [(c.name, *kink) for c in report.checks for kink in c.kinks]
    for name, where, a, left, right in kinks[:3]:
        print(f"kink: {name} {list(where)} is not differentiable here (one-sided slopes {left:.6g} left, "
              f"{right:.6g} right, the same at a 10x step; autograd {a:.6g}): not counted, another entry "
              f"was checked instead")
    if len(kinks) > 3:
        print(f"kink: ... and {len(kinks) - 3} more entries at kinks")
    rel, name = report.worst
    verdict = "OK" if report.ok else "FAIL"
    skipped = f", {report.kinks} entries at kinks skipped" if report.kinks else ""
    if report.kinks and not report.ok:
        print("hint: this loss has kinks (ReLU inputs or max-pool ties at or near θ); failures next to them "
              "say nothing about autograd. gradcheck.jitter=0.01 checks at a nearby point instead")
    print(f"worst relative error {rel:.2e} ({name}), tolerance {report.tol:.1e}{skipped}: {verdict}")


@user_errors
def run(args: list[str]) -> int:
    cfg, choices, added = compose_config(args)
    gc = cfg.gradcheck
    groups = " ".join(f"{g}={choices[g]}" for g in ("model", "data", "inference", "objective") if choices.get(g))
    extra = f" experiment={choices['experiment']}" if choices.get("experiment") else ""
    stage = f" stage={gc.stage}" if gc.get("stage") else ""
    report = gradcheck(cfg)
    header = (f"gradcheck: {groups}{extra}{stage} ({report.examples} examples, float64, "
              f"eps {float(gc.eps):g}, {int(gc.params_per_tensor)} entries per tensor)")
    if added:
        header += f"\nmodel defaults added: {' '.join(added)}"
    print_report(report, header)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        sys.exit(0)
    flags = [a for a in args if a.startswith("-")]
    if flags:
        print(f"error: dsp-gradcheck takes key=value overrides only, not {' '.join(flags)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(args))


if __name__ == "__main__":
    main()
