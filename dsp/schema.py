"""Typed settings of every config part, checked by key at start-up.

A run's `data`, `model`, `inference` and `objective` (and any `_target_` node inside them, e.g.
model.feature_net, or a training stage's own objective) take the keyword arguments of their
`_target_` callable. Their schema is read from that callable's signature, so a user's own class is
checked the same way as dsp's:

    key the signature does not take    refused, with "did you mean" (unless it takes **kwargs)
    required argument not set          refused (unless the node is `_partial_`)
    int, float, bool, str, Path        the value's type (a bool is not a number, 2.0 not a whole number)
    Literal["a", "b"]                  one of the choices
    list[T], Sequence[T], tuple[T, T]  a list whose items are T (a tuple[...] of that length)
    dict[K, V], a TypedDict            a mapping, its keys and values checked
    X | None, or a None default        null too
    nn.Module (a part's class)         a `_target_` node (checked in turn) or such an object
    any other class (torch.device, …)  not judged
    Annotated[T, Range(...)]           T within bounds: Annotated[float, Range(0, inclusive=False)]
    Annotated[T, Check(fn)]            fn(value) returns what to give (a str) when the value does not fit
    Annotated[dict, SettingsOf(f)]     a mapping of f's keyword settings (a dict a part unpacks)
    Callable[..., T]                   a factory: a `_target_` node (with _partial_: true)

Unannotated parameters are only checked for nested `_target_` nodes. Hydra's own keys (_target_,
_partial_, _recursive_, _convert_, _args_) are not settings. Values that are interpolations are
resolved where they can be (`${data.crop}`); those that cannot be yet (`${dims.num_labels}`, filled
in once the data has loaded) and `???` are skipped.

`check_settings(cfg)` checks a whole run's config: the top level (seed, the paths, a top-level key that looks
like a misspelt one) and the four groups, and raises DspError with one line naming the key, e.g.
`inference.lr='abc': give a number above 0`. The trainer's settings are checked by
dsp.training.config_checks (they are read by the trainer, not passed to a `_target_`).

This module is in the base layer (dsp.architecture): parts of every layer import `Range` and the
aliases below for their annotations.
"""
from __future__ import annotations

import collections.abc as cabc
import dataclasses
import difflib
import functools
import inspect
import math
import os
import types
import typing
from pathlib import PurePath
from typing import Annotated, Any, Callable, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from dsp import interfaces as I
from dsp.errors import DspError

HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})
GROUPS = ("data", "model", "inference", "objective")
SEED_MAX = 2**32 - 1  # numpy's seeds must be below 2**32
# Parameters of these types are built from a `_target_` node (other classes are not judged).
PART_TYPES = (nn.Module, I.Model, I.Inference, I.Objective, I.Dataset, I.Task)


# --------------------------------------------------------------------------- declarations
@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a number (or of every number of a list): `low` and `high` (None: unbounded);
    `inclusive` says whether `low` itself is allowed, `high_inclusive` (default: as `inclusive`)
    whether `high` is."""

    low: float | None = None
    high: float | None = None
    inclusive: bool = True
    high_inclusive: bool | None = None

    def contains(self, x) -> bool:
        upper = self.inclusive if self.high_inclusive is None else self.high_inclusive
        if self.low is not None and (x < self.low or (x == self.low and not self.inclusive)):
            return False
        return not (self.high is not None and (x > self.high or (x == self.high and not upper)))

    def describe(self) -> str:
        upper = self.inclusive if self.high_inclusive is None else self.high_inclusive
        low = None if self.low is None else f"{'at least' if self.inclusive else 'above'} {_number(self.low)}"
        high = None if self.high is None else f"{'at most' if upper else 'below'} {_number(self.high)}"
        if low and high:
            return f"between {_number(self.low)} and {_number(self.high)}" if self.inclusive and upper \
                else f"{low} and {high}"
        return low or high or ""


@dataclasses.dataclass(frozen=True)
class Check:
    """A value check beyond the type: `fn(value)` returns what to give (a str, e.g. "choose relu or
    softplus") when the value does not fit, anything else when it does. A DspError it raises is
    reported as it is (its message names the key itself)."""

    fn: Callable


@dataclasses.dataclass(frozen=True)
class SettingsOf:
    """A mapping of the keyword settings of `target` (a callable or its dotted name), less `exclude`:
    a dict that a part unpacks into one of its own parts (e.g. model.unary of the value networks)."""

    target: Any
    exclude: tuple[str, ...] = ()


# The usual kinds of setting (import them for annotations).
Size = Annotated[int, Range(1)]                                  # a width, count or length: at least 1
Count = Annotated[int, Range(0)]                                 # a count that may be 0 (or a seed)
Positive = Annotated[float, Range(0, inclusive=False)]           # a step size, tolerance, temperature
NonNegative = Annotated[float, Range(0)]                         # a weight that 0 switches off
Fraction = Annotated[float, Range(0, 1)]                         # 0 to 1, both included
Rate = Annotated[float, Range(0, 1, high_inclusive=False)]       # dropout, momentum: 0 up to, not including, 1
OpenFraction = Annotated[float, Range(0, 1, inclusive=False)]    # strictly between 0 and 1
Seed = Annotated[int, Range(0, SEED_MAX)]                        # a seed numpy accepts


# ------------------------------------------------------------------------------ signatures
@dataclasses.dataclass(frozen=True)
class Settings:
    """What a callable takes by key: its parameters, their annotations and defaults."""

    name: str
    params: tuple[str, ...]
    hints: dict
    defaults: dict
    required: tuple[str, ...]
    open: bool  # takes **kwargs: any key is accepted


def settings_of(obj) -> Settings | None:
    """The settings of a class (its constructor's) or function, or None where Python cannot tell."""
    try:
        return _cached_settings(obj)
    except TypeError:  # an unhashable callable
        return _settings(obj)


@functools.lru_cache(maxsize=None)
def _cached_settings(obj) -> Settings | None:
    return _settings(obj)


def _settings(obj) -> Settings | None:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params, defaults, required, open_ = [], {}, [], False
    for p in signature.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            open_ = True
        elif p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            params.append(p.name)
            if p.default is p.empty:
                required.append(p.name)
            else:
                defaults[p.name] = p.default
    hints = _hints(obj.__init__ if isinstance(obj, type) else obj)
    name = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}".lstrip(".")
    return Settings(name, tuple(params), {k: v for k, v in hints.items() if k in params}, defaults,
                    tuple(required), open_)


def _hints(fn) -> dict:
    """The annotations of `fn`, evaluated (with Annotated kept); those that cannot be are left out."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # noqa: BLE001 -- one unresolvable annotation: evaluate the others one by one
        pass
    out, namespace = {}, getattr(fn, "__globals__", {})
    for name, annotation in (getattr(fn, "__annotations__", None) or {}).items():
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)  # noqa: S307 -- what typing.get_type_hints does
            except Exception:  # noqa: BLE001
                continue
        out[name] = annotation
    return out


@functools.lru_cache(maxsize=512)
def _import(target: str):
    from hydra.utils import get_object

    return get_object(target)


def _target_object(target: str, key: str):
    try:
        return _import(target)
    except Exception as err:  # noqa: BLE001 -- ImportError, AttributeError, ValueError from a bad path
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DspError(f"{key}._target_={target}: cannot be imported ({first}); check the module path, "
                       f"and that your package is installed or on PYTHONPATH") from None


# ------------------------------------------------------------------------------- the checks
_SKIP = object()  # a value that cannot be resolved yet


class _Context:
    """Resolves interpolations of the run's config by key, where they can be resolved now (literal:
    values are taken as they are, already resolved)."""

    def __init__(self, cfg: DictConfig | None, literal: bool = False):
        self.cfg, self.literal = cfg, literal

    def resolve(self, path: tuple, raw):
        if self.literal:
            return raw
        if isinstance(raw, str):
            if raw == "???":
                return _SKIP
            if "${" not in raw:
                return raw
            if self.cfg is None:
                return _SKIP
            try:
                value = OmegaConf.select(self.cfg, ".".join(map(str, path)), throw_on_missing=True)
                if isinstance(value, (DictConfig, ListConfig)):
                    value = OmegaConf.to_container(value, resolve=True, throw_on_missing=True)
            except Exception:  # noqa: BLE001 -- not resolvable yet (dims, ${hydra:...}) or at all: not ours to judge
                return _SKIP
            return value
        if isinstance(raw, (list, tuple)):
            out = []
            for i, item in enumerate(raw):
                value = item if isinstance(item, cabc.Mapping) else self.resolve((*path, i), item)
                if value is _SKIP:
                    return _SKIP
                out.append(value)
            return out
        return raw


def check_settings(cfg) -> None:
    """Check a whole run's config (a DictConfig, or a plain mapping) by key: the top level and the
    data, model, inference and objective groups (with their nested `_target_` nodes and the training
    stages' own objectives). Raises DspError naming the first key that does not fit."""
    if isinstance(cfg, cabc.Mapping) and not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    ctx = _Context(cfg)
    # the run's settings as written (interpolations unresolved; the checks resolve what they can)
    tree = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]), resolve=False)
    for key in tree:
        key = str(key)
        if key not in TOP_LEVEL:
            close = difflib.get_close_matches(key, TOP_LEVEL, n=1, cutoff=0.75)
            if close:
                raise DspError(f"{key} is not a setting (did you mean {close[0]}?); the top-level settings are "
                               f"{', '.join(TOP_LEVEL)}")
    if "seed" in tree:
        _check_key(("seed",), tree["seed"], Seed, ctx)
    paths = tree.get("paths")
    if paths is not None:
        if not isinstance(paths, cabc.Mapping):
            raise DspError(f"paths={paths!r}: give a mapping of folders (conf/paths/default.yaml)")
        for name in PATHS:
            if name in paths:
                _check_key(("paths", name), paths[name], PATHS[name], ctx)
    for group in GROUPS:
        node = tree.get(group)
        if isinstance(node, cabc.Mapping):
            _check_part((group,), node, ctx)
    trainer = tree.get("trainer")
    stages = trainer.get("stages") if isinstance(trainer, cabc.Mapping) else None
    for name, stage in stages.items() if isinstance(stages, cabc.Mapping) else ():
        node = stage.get("objective") if isinstance(stage, cabc.Mapping) else None
        if isinstance(node, cabc.Mapping) and "_target_" in node:
            _check_part(("trainer", "stages", name, "objective"), node, ctx)


def check_part(node, key: str, cfg=None) -> None:
    """Check one `_target_` node (e.g. a model's config) against its callable's settings; `key` names
    it in errors. Interpolations are resolved in `cfg` (the whole config) when given."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    _check_part(tuple(key.split(".")), node, _Context(cfg) if isinstance(cfg, DictConfig) else _Context(None))


def check_value(key: str, value, annotation) -> None:
    """Check one (resolved) value against an annotation (e.g. Seed), naming `key` in the error."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    _check_key(tuple(key.split(".")), value, annotation, _Context(None, literal=True))


TOP_LEVEL = ("seed", "dims", "paths", "data", "model", "inference", "objective", "trainer", "logger")
PATHS = {"data_dir": str, "output_dir": str, "cache_dir": str}


def _check_key(path: tuple, raw, annotation, ctx: _Context, default=inspect.Parameter.empty) -> None:
    value = ctx.resolve(path, raw)
    if value is _SKIP:
        return
    if value is None and default is None:  # a None default: null is the part's own choice
        return
    problem = _problem(path, value, annotation, ctx)
    if problem:
        raise DspError(_message(path, value, problem, raw))


def _check_part(path: tuple, node: cabc.Mapping, ctx: _Context, building: bool = True) -> None:
    """A `_target_` node: every key a setting of the target, of the declared type; the required ones set."""
    target = node.get("_target_")
    if not isinstance(target, str) or not target or "${" in target:
        _walk(path, node, ctx, building)  # nothing to check it against (the parts checks report it)
        return
    settings = settings_of(_target_object(target, _format(path)))
    building = building and node.get("_recursive_", True) is not False
    for name, raw in node.items():
        if name in HYDRA_KEYS:
            continue
        sub = (*path, name)
        if settings is not None and not settings.open and name not in settings.params:
            raise DspError(_unknown(sub, settings.params, target))
        value = ctx.resolve(sub, raw)
        if value is _SKIP:
            continue
        if settings is not None and name in settings.hints:
            if not (value is None and settings.defaults.get(name, inspect.Parameter.empty) is None):
                problem = _problem(sub, value, settings.hints[name], ctx)
                if problem:
                    raise DspError(_message(sub, value, problem, raw))
        _walk(sub, value, ctx, building)
    if settings is not None and building and node.get("_partial_") is not True:
        args = node.get("_args_")
        given = set(settings.params[:len(args)] if isinstance(args, (list, tuple)) else ())
        for name in settings.required:
            if name not in node and name not in given:
                raise DspError(f"{_format((*path, name))} is not set: {target} needs it")


def _walk(path: tuple, value, ctx: _Context, building: bool) -> None:
    """The `_target_` nodes inside a value (a mapping, a list), each checked in turn."""
    if isinstance(value, cabc.Mapping):
        if "_target_" in value:
            _check_part(path, value, ctx, building)
            return
        for k, v in value.items():
            if isinstance(v, (cabc.Mapping, list, tuple)):
                _walk((*path, k), v, ctx, building)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if isinstance(v, (cabc.Mapping, list, tuple)):
                _walk((*path, i), v, ctx, building)


# ------------------------------------------------------------------------------ type checks
def _split(tp):
    """(the type, its Annotated metadata)."""
    if typing.get_origin(tp) is Annotated:
        return typing.get_args(tp)[0], tuple(tp.__metadata__)
    return tp, ()


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


_LISTS = (list, tuple, cabc.Sequence, cabc.MutableSequence, cabc.Collection, cabc.Iterable)
_MAPPINGS = (dict, cabc.Mapping, cabc.MutableMapping)


def _kind(tp) -> str:
    """scalar, list, map or any: the shape of value a type takes."""
    tp, meta = _split(tp)
    if _is_union(tp):
        return "any"
    origin = typing.get_origin(tp) or tp
    if origin in _LISTS:
        return "list"
    if origin in _MAPPINGS or typing.is_typeddict(tp) or any(isinstance(m, SettingsOf) for m in meta):
        return "map"
    if tp in (bool, int, float, str) or typing.get_origin(tp) is Literal or _is_path(tp):
        return "scalar"
    if isinstance(tp, type) and issubclass(tp, PART_TYPES):
        return "map"  # a part: a `_target_` node
    return "any"


def _value_kind(value) -> str:
    if isinstance(value, (list, tuple)):
        return "list"
    return "map" if isinstance(value, cabc.Mapping) else "scalar"


def _is_path(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, (os.PathLike, PurePath))


def _problem(path: tuple, value, tp, ctx: _Context) -> str | None:
    """What to give instead of `value` (e.g. "give a number above 0"), or None when it fits `tp`.
    Problems of a mapping's own keys are raised at once, naming those keys."""
    tp, meta = _split(tp)
    ranges = [m for m in meta if isinstance(m, Range)]
    if tp is Any or tp is object or tp is inspect.Parameter.empty or isinstance(tp, (str, typing.ForwardRef,
                                                                                    typing.TypeVar)):
        problem = None
    elif _is_union(tp):
        problem = _union_problem(path, value, typing.get_args(tp), ranges, ctx)
    elif tp is None or tp is type(None):
        problem = None if value is None else "give null"
    elif typing.get_origin(tp) is Literal:
        problem = _choice_problem(value, typing.get_args(tp))
    elif tp is bool:
        problem = None if isinstance(value, bool) else "give true or false"
    elif tp in (int, float):
        problem = _number_problem(value, tp, ranges)
    elif tp is str:
        problem = None if isinstance(value, str) else "give a string"
    elif _is_path(tp):
        problem = None if isinstance(value, (str, os.PathLike)) else "give a path"
    elif (typing.get_origin(tp) or tp) in _LISTS:
        problem = _list_problem(path, value, tp, ranges, ctx)
    elif typing.is_typeddict(tp):
        problem = _typeddict_problem(path, value, tp, ctx)
    elif (typing.get_origin(tp) or tp) in _MAPPINGS:
        problem = _mapping_problem(path, value, tp, ctx)
    elif (typing.get_origin(tp) or tp) is cabc.Callable:  # a factory: a `_partial_` node, or a callable
        fits = callable(value) or (isinstance(value, cabc.Mapping) and "_target_" in value)
        problem = None if fits else "give a node with a _target_ (and _partial_: true)"
    elif isinstance(tp, type) and issubclass(tp, PART_TYPES):
        fits = isinstance(value, tp) or (isinstance(value, cabc.Mapping) and "_target_" in value)
        problem = None if fits else f"give a node with a _target_ (one that builds a {tp.__qualname__})"
    else:
        problem = None  # a type this check does not know: the part itself judges the value
    if problem:
        return problem
    for m in meta:
        if isinstance(m, SettingsOf) and isinstance(value, cabc.Mapping):
            target = _target_object(m.target, _format(path)) if isinstance(m.target, str) else m.target
            _check_settings_mapping(path, value, settings_of(target), m.exclude, ctx)
        elif isinstance(m, Check) and value is not None:  # (null was judged by the type)
            try:
                said = m.fn(value)
            except DspError:
                raise
            except (TypeError, ValueError) as err:
                said = str(err)
            if isinstance(said, str) and said:
                return said
    return None


def _number_problem(value, tp, ranges) -> str | None:
    what = "a whole number" if tp is int else "a number"
    bound = "".join(f" {r.describe()}" for r in ranges)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and not isinstance(value, int)):
        return f"give {what}{bound}"
    if not math.isfinite(value) or not all(r.contains(value) for r in ranges):
        return f"give {what}{bound}"
    return None


def _choice_problem(value, choices) -> str | None:
    if any(value == c and type(value) is type(c) for c in choices):
        return None
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), names, n=1) if isinstance(value, str) else []
    return f"choose {_join(names)}" + (f" (did you mean {close[0]}?)" if close else "")


def _union_problem(path, value, alternatives, ranges, ctx) -> str | None:
    nullable = type(None) in alternatives or None in alternatives
    if value is None and nullable:
        return None
    others = [a for a in alternatives if a not in (type(None), None)]
    if all(typing.get_origin(_split(a)[0]) is Literal for a in others):  # Literal["auto"] | Method: one choice
        choices = [c for a in others for c in typing.get_args(_split(a)[0])]
        return _choice_problem(value, choices + (["null"] if nullable else []))
    if ranges:  # Annotated[int | float, Range(...)]: the bounds apply to every alternative
        others = [Annotated[(a, *ranges)] for a in others]
    problems = []
    for alternative in others:
        try:
            problem = _problem(path, value, alternative, ctx)
        except DspError as err:
            problem = err
        if problem is None:
            return None
        problems.append((alternative, problem))
    same = [p for a, p in problems if _kind(a) == _value_kind(value)]
    if len(same) == 1:  # the one alternative of the value's shape says best what is wrong
        if isinstance(same[0], DspError):
            raise same[0]
        return same[0] + (", or null" if nullable and same[0].startswith("give ") else "")
    return "give " + _join([_noun(a) for a in others] + (["null"] if nullable else []))


def _list_problem(path, value, tp, ranges, ctx) -> str | None:
    args = typing.get_args(tp)
    fixed = typing.get_origin(tp) is tuple and args and args[-1] is not Ellipsis
    items = list(args) if fixed else [args[0] if args else Any]
    if ranges:
        items = [Annotated[(t, *ranges)] for t in items]
    if not isinstance(value, (list, tuple)) or (fixed and len(value) != len(items)):
        return "give " + _noun(tp if not ranges else Annotated[(tp, *ranges)])
    for i, item in enumerate(value):
        item_tp = items[i] if fixed else items[0]
        item = ctx.resolve((*path, i), item)
        if item is _SKIP:
            continue
        problem = _problem((*path, i), item, item_tp, ctx)
        if problem:
            if _kind(item_tp) == "scalar" and not problem.startswith("choose"):
                return "give " + (_noun(tp if not ranges else Annotated[(tp, *ranges)])
                                  if fixed else _noun(item_tp, plural=True))
            return problem
    return None


def _mapping_problem(path, value, tp, ctx) -> str | None:
    if not isinstance(value, cabc.Mapping):
        return "give a mapping"
    args = typing.get_args(tp)
    if len(args) != 2:
        return None
    key_tp, value_tp = args
    for k, v in value.items():
        if typing.get_origin(_split(key_tp)[0]) is Literal:
            names = [str(c) for c in typing.get_args(_split(key_tp)[0])]
            if k not in names:
                raise DspError(_unknown((*path, k), names, None))
        _check_key((*path, k), v, value_tp, ctx)
    return None


def _typeddict_problem(path, value, tp, ctx) -> str | None:
    if not isinstance(value, cabc.Mapping):
        return "give a mapping"
    hints = typing.get_type_hints(tp, include_extras=True)
    for k, v in value.items():
        if k not in hints:
            raise DspError(_unknown((*path, k), list(hints), None))
        _check_key((*path, k), v, hints[k], ctx)
    for k in getattr(tp, "__required_keys__", ()):
        if k not in value:
            raise DspError(f"{_format((*path, k))} is not set: {_format(path)} needs it")
    return None


def _check_settings_mapping(path, value: cabc.Mapping, settings: Settings | None, exclude, ctx) -> None:
    if settings is None:
        return
    params = [p for p in settings.params if p not in exclude]
    for k, v in value.items():
        if k not in params and not settings.open:
            raise DspError(_unknown((*path, k), params, settings.name))
        if k in settings.hints:
            _check_key((*path, k), v, settings.hints[k], ctx, settings.defaults.get(k, inspect.Parameter.empty))


# --------------------------------------------------------------------------------- wording
def _noun(tp, plural: bool = False) -> str:
    """What a type takes, in words: "a whole number at least 1", "lists of numbers"."""
    tp, meta = _split(tp)
    bound = "".join(f" {m.describe()}" for m in meta if isinstance(m, Range))
    if _is_union(tp):
        return _join([_noun(Annotated[(a, *meta)] if meta and a is not type(None) else a, plural)
                      for a in typing.get_args(tp)])
    if tp is type(None) or tp is None:
        return "null"
    if typing.get_origin(tp) is Literal:
        return _join([str(c) for c in typing.get_args(tp)])
    if tp is bool:
        return "true or false"
    if tp is int:
        return ("whole numbers" if plural else "a whole number") + bound
    if tp is float:
        return ("numbers" if plural else "a number") + bound
    if tp is str:
        return "strings" if plural else "a string"
    if _is_path(tp):
        return "paths" if plural else "a path"
    origin = typing.get_origin(tp) or tp
    if origin in _LISTS:
        args = typing.get_args(tp)
        items = [Annotated[(a, *meta)] if bound else a for a in args if a is not Ellipsis]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if all(a == items[0] for a in items):
                return f"{'lists' if plural else 'a list'} of {len(items)} {_noun(items[0], plural=True)}"
            return f"{'lists' if plural else 'a list'} [{', '.join(_noun(a) for a in items)}]"
        return f"{'lists' if plural else 'a list'} of {_noun(items[0], plural=True) if items else 'values'}"
    if origin in _MAPPINGS or typing.is_typeddict(tp):
        return "mappings" if plural else "a mapping"
    if origin is cabc.Callable:
        return "a node with a _target_ (and _partial_: true)"
    if isinstance(tp, type) and issubclass(tp, PART_TYPES):
        return f"a node with a _target_ (one that builds a {tp.__qualname__})"
    return "values" if plural else "a value"


def _join(words: list[str]) -> str:
    words = list(dict.fromkeys(words))
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _number(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def _format(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(path: tuple, value, problem: str, raw) -> str:
    written = f" (from {raw})" if isinstance(raw, str) and "${" in raw else ""
    return f"{_format(path)}={value!r}{written}: {problem}"


def _unknown(path: tuple, known, owner: str | None) -> str:
    """`path` names a key that is not a setting: the nearest known key, or the list of them."""
    where, name = _format(path), str(path[-1])
    parent = _format(path[:-1])
    of = f"a setting of {owner}" if owner else f"a key of {parent}"
    close = difflib.get_close_matches(name, [str(k) for k in known], n=1)
    if close:
        return f"{where} is not {of} (did you mean {parent}.{close[0]}?)"
    listing = f"its settings are {', '.join(map(str, known))}" if known else "it takes no settings"
    return f"{where} is not {of}; {listing}"
