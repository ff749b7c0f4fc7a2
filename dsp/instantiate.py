"""Building objects from `_target_` config nodes, with errors that name the config key, and the
allow-list that guards configs dsp did not compose itself.

A config the user composed (dsp-train's command line and YAML files) may name any callable: the
user wrote it. A *stored* config — the one inside a checkpoint or a run folder, which may come
from anyone — is only instantiated after `check_trusted`: every `_target_` must lie in dsp's own
parts, `torch.nn`, `torch.optim` or a module the user names (`trust=[my_pkg]`, `DSP_TRUST`), and
is checked before any of it is imported or called.
"""
from __future__ import annotations

import os
import typing
from collections.abc import Iterable, Mapping

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig
from torch import nn, optim

from dsp import interfaces as I
from dsp.errors import DspError

# What a stored config may build: dsp's parts and torch's layers and optimisers.
TRUSTED_MODULES = ("dsp", "torch.nn", "torch.optim")
_PART_BASES = (nn.Module, optim.Optimizer, optim.lr_scheduler.LRScheduler, I.Dataset, I.Model, I.Inference,
               I.Objective, I.Task)


def instantiate(node, key: str):
    """hydra.utils.instantiate, with errors that name the config key (and no wrapped traceback)."""
    try:
        return hydra.utils.instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, DspError):  # our own message, already clear
            raise err.__cause__ from None
        raise DspError(f"could not build `{key}` from the config: {err}") from None


def trusted_modules(trust: Iterable[str] | str | None = ()) -> tuple[str, ...]:
    """dsp, torch.nn, torch.optim, the modules in `trust` and those in $DSP_TRUST (comma-separated)."""
    named = [trust] if isinstance(trust, str) else list(trust or ())
    named += os.environ.get("DSP_TRUST", "").split(",")
    return TRUSTED_MODULES + tuple(str(m).strip() for m in named if str(m).strip())


def _within(dotted: str, modules: tuple[str, ...]) -> str | None:
    """The trusted module `dotted` lies in (itself or a submodule), or None."""
    return next((m for m in modules if dotted == m or dotted.startswith(m + ".")), None)


def _targets(node, key: str):
    """(config key, _target_ string) of every node of a config tree, lists included."""
    if isinstance(node, (Mapping, DictConfig)):
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
        for name, value in items:
            if name == "_target_":
                yield key or "<top>", value
            else:
                yield from _targets(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, (list, tuple, ListConfig)):
        for i, value in enumerate(node):
            yield from _targets(value, f"{key}[{i}]")


def _strings(node, key: str):
    """(config key, text) of every string of a config tree, keys included, interpolations unresolved."""
    if isinstance(node, (Mapping, DictConfig)):
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
        for name, value in items:
            where = f"{key}.{name}" if key else str(name)
            if isinstance(name, str):
                yield where, name
            yield from _strings(value, where)
    elif isinstance(node, (list, tuple, ListConfig)):
        for i, value in enumerate(node):
            yield from _strings(value, f"{key}[{i}]")
    elif isinstance(node, str):
        yield key, node


def _is_part(obj) -> bool:
    """A class of dsp's or torch's parts, or a data loader whose annotated return is a Dataset."""
    if isinstance(obj, type):
        return issubclass(obj, _PART_BASES)
    try:
        returned = typing.get_type_hints(obj).get("return")
    except Exception:  # noqa: BLE001 -- unresolvable annotations: not a declared loader
        return False
    return isinstance(returned, type) and issubclass(returned, I.Dataset)


def check_trusted(tree, source: str, trust: Iterable[str] | str | None = ()) -> None:
    """Refuse, before anything is imported or called, a stored config naming a `_target_` outside the
    trusted modules. Within them the object itself is checked too: `dsp.models.spen.os.remove`
    starts with a trusted name but is os.remove, and dsp's file writers are not parts."""
    modules = trusted_modules(trust)
    # dsp-train stores its config resolved, so a stored config holds no interpolation; one would be
    # resolved only inside hydra's instantiate, after this check (${oc.create:{_target_: ...}}).
    for key, value in _strings(tree, ""):
        if "${" in value:
            raise DspError(f"{source}: {key}={value!r} is an interpolation; a stored config holds plain values "
                           f"only (dsp-train writes it resolved), so it is refused before anything ran")
    hint = (f"instantiate it only if you trust where {source} came from: pass trust=[<module>] to dsp-eval "
            f"(trust=... to dsp.load_run, or DSP_TRUST=<module>)")
    for key, target in _targets(tree, ""):
        if not isinstance(target, str) or not target or "${" in target:
            raise DspError(f"{source}: {key}._target_={target!r} is not a plain dotted name; refused")
        home = _within(target, modules)
        if home is None:
            raise DspError(f"{source}: {key}._target_={target} lies outside the trusted modules "
                           f"({', '.join(modules)}); refused before anything ran. {hint}")
        try:
            obj = hydra.utils.get_object(target)
        except Exception as err:  # noqa: BLE001 -- ImportError, AttributeError from a bad path
            raise DspError(f"{source}: {key}._target_={target} cannot be imported ({err})") from None
        defined_in = getattr(obj, "__module__", None) or ""
        if not callable(obj) or _within(defined_in, (home,)) is None:
            raise DspError(f"{source}: {key}._target_={target} is {defined_in or 'a'}."
                           f"{getattr(obj, '__qualname__', type(obj).__name__)}, not part of {home}; refused. {hint}")
        if home in TRUSTED_MODULES and not _is_part(obj):
            raise DspError(f"{source}: {key}._target_={target} is not a model, inference routine, objective, "
                           f"data loader or torch layer/optimiser; refused. {hint}")

