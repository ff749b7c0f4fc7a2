"""Which parts of a config fit together, decided from their declarations (dsp.interfaces) before any
data is loaded or any file written.

`check_config(cfg)` reads the `_target_` classes of data, model, inference, objective and the
training stages, and refuses a combination that cannot work in one line: the two parts, the missing
capability and the shipped choices that would fit instead; before that, every setting of a composed
config is checked by key against its part's declared type and range (dsp.schema.check_settings).
`check_built(...)` repeats what only a built model can tell (e.g. a ReLU in a part an unrolled
objective differentiates twice).
"""
from __future__ import annotations

import re
import typing
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Mapping

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from dsp import interfaces as I
from dsp.errors import DspError
from dsp.schema import check_settings
from dsp.training.scaling import scaling_settings

GROUPS = ("data", "model", "inference", "objective")
# Modules whose second derivative is zero or undefined: unrolled learning differentiates ∇_y E.
NOT_TWICE_DIFFERENTIABLE = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.Hardtanh,
                            torch.nn.Threshold, torch.nn.MaxPool1d, torch.nn.MaxPool2d)


# ------------------------------------------------------------------------- declarations
def declared_class(target: str, key: str):
    """The class a `_target_` builds: the class itself, or a factory's annotated return class."""
    try:
        return _declared_class(target)
    except Exception as err:  # noqa: BLE001 -- ImportError, AttributeError, ValueError from a bad path
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DspError(f"{key}._target_={target}: cannot be imported ({first}); check the module path, "
                       f"and that your package is installed or on PYTHONPATH") from None


@lru_cache(maxsize=256)
def _declared_class(target: str):
    obj = get_object(target)
    if isinstance(obj, type):
        return obj
    try:
        returned = typing.get_type_hints(obj).get("return")
    except Exception:  # noqa: BLE001 -- unresolvable annotations: nothing declared
        return None
    return returned if isinstance(returned, type) else None


class Part:
    """One chosen part of a run: its config key, the name a user typed and its declarations."""

    BASES = {"model": I.Model, "inference": I.Inference, "objective": I.Objective}

    def __init__(self, group: str, cls, config: Mapping | None, choice: str | None = None,
                 structured: bool | None = None):
        self.group, self.cls, self.choice = group, cls, choice
        self.config = dict(config or {})
        self.declares = isinstance(cls, type) and issubclass(cls, self.BASES[group])
        self._structured = structured  # a built model's own answer
        self.target = None  # the `_target_` it was read from (of_node)

    @property
    def structured(self) -> bool:
        """A model that predicts with its inference routine (undeclared models are assumed to)."""
        if self._structured is not None:
            return self._structured
        return not self.declares or self.cls.structured(self.config)

    @classmethod
    def of_node(cls, group: str, node, choice: str | None = None) -> "Part":
        """The part a config node will build (its `_target_` class), read without building it."""
        target = str(node.get("_target_")) if node is not None and node.get("_target_") else None
        config = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node
        part = cls(group, declared_class(target, group) if target else None, config, choice)
        part.target = target
        return part

    @property
    def name(self) -> str:
        if self.choice:
            return f"{self.group}={self.choice}"
        return f"{self.group} {self.cls.__name__ if isinstance(self.cls, type) else self.target}"

    @property
    def outputs(self) -> frozenset[str]:
        if not self.declares:
            return frozenset()
        return self.cls.outputs_for(self.config) if self.group == "model" else self.cls.outputs

    @property
    def inputs(self) -> frozenset[str] | None:
        """A model's input kinds: those its direct input networks declare, else its own, else None."""
        if self.group != "model" or not self.declares:
            return None
        declared = [getattr(_quiet_class(node.get("_target_")), "inputs", None) for node in self.config.values()
                    if isinstance(node, Mapping) and node.get("_target_")]
        declared = [d for d in declared if d is not None]
        if declared:
            return frozenset.intersection(*map(frozenset, declared))
        return self.cls.inputs


def _quiet_class(target):
    try:
        return _declared_class(str(target))
    except Exception:  # noqa: BLE001 -- an unimportable child is reported when the model is built
        return None


class Data(typing.NamedTuple):
    """What the chosen data declares: its output and input kinds."""

    kind: str | None
    input: str | None


def _choices(cfg) -> dict[str, str]:
    """The option names a user picked (model=spen ...), when Hydra composed the config."""
    choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None)
    if choices is None:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    return {g: str(choices[g]) for g in GROUPS if choices.get(g) not in (None, "null")}


@lru_cache(maxsize=None)
def shipped_options(group: str) -> dict[str, DictConfig]:
    """The shipped YAML options of a config group, each merged with the options it extends."""
    folder = Path(str(resources.files("dsp.conf"))) / group

    def load(name: str) -> DictConfig:
        raw = OmegaConf.load(folder / f"{name}.yaml")
        merged = OmegaConf.create()
        for entry in raw.pop("defaults", []) or []:
            if isinstance(entry, str) and entry != "_self_" and "/" not in entry:
                merged = OmegaConf.merge(merged, load(entry))
        return OmegaConf.merge(merged, raw)

    return {p.stem: load(p.stem) for p in sorted(folder.glob("*.yaml"))}


# ------------------------------------------------------------------------------ the checks
def _model_capabilities(model: Part) -> frozenset[str]:
    return model.cls.capabilities(model.config) if model.declares else frozenset()


def _inference_needs(inference: Part) -> frozenset[str]:
    return inference.cls.needs_for(inference.config) if inference.declares else frozenset()


def _objective_needs(objective: Part) -> tuple[frozenset[str], frozenset[str]]:
    return objective.cls.needs_for(objective.config) if objective.declares else (frozenset(), frozenset())


def _problems(data, model: Part, inference: Part, objective: Part) -> list[tuple[tuple[str, ...], str]]:
    """(the groups whose change would mend it, why) for every mismatch among the four parts, in the
    order a user would fix them; empty when they fit. Parts without declarations are not judged."""
    out = []
    kinds = I.OUTPUT_KINDS
    for part in (model, objective):
        if data.kind and part.declares and data.kind not in part.outputs:
            out.append(((part.group,), f"{part.name} works on {_listing(part.outputs)} outputs, but the data has "
                                       f"{data.kind} outputs ({kinds.get(data.kind, '')})"))
    if data.input and model.inputs is not None and data.input not in model.inputs:
        out.append((("model",), f"{model.name} reads {_listing(model.inputs)}, but the data gives {data.input} "
                                f"({I.INPUT_KINDS.get(data.input, '')})"))
    caps = _model_capabilities(model)
    model_needs, inference_needs = _objective_needs(objective)
    # The routine runs when the model predicts with it or the objective calls it; else any will do.
    inference_runs = bool(inference_needs) or model.structured
    if data.kind and inference_runs and inference.declares and data.kind not in inference.outputs:
        out.append((("inference",), f"{inference.name} works on {_listing(inference.outputs)} outputs, but the "
                                    f"data has {data.kind} outputs ({kinds.get(data.kind, '')})"))
    if model.declares and inference_runs:
        for need in sorted(_inference_needs(inference) - caps):
            out.append((("inference", "model"), f"{inference.name} needs a model with `{need}` "
                                                f"({I.describe(need)}), which {model.name} does not provide"))
    if model.declares:
        for need in sorted(model_needs - caps):
            out.append((("objective", "model"), f"{objective.name} needs a model with `{need}` "
                                                f"({I.describe(need)}), which {model.name} does not provide"
                                                + (_kinks(model) if need == I.SMOOTH_ENERGY else "")))
    if inference.declares:
        for need in sorted(inference_needs - inference.cls.provides):
            out.append((("inference", "objective"), f"{objective.name} needs an inference routine that "
                                                    f"{I.describe(need)}, which {inference.name} does not"))
    return out


def _kinks(model: Part) -> str:
    """Where a model's ȳ-parts name a kinked activation, for the smooth-energy refusal."""
    found = [f"model.{part}.activation is a ReLU-like {act}" for part, act in model.cls.kinked_parts(model.config)]
    return f" ({'; '.join(found)}: use a smooth activation there, e.g. activation: softplus:25)" if found else ""


def _fits(data, model: Part, inference: Part, objective: Part) -> bool:
    return not _problems(data, model, inference, objective)


@lru_cache(maxsize=None)
def _shipped_parts(group: str) -> dict[str, Part]:
    out = {}
    for name, node in shipped_options(group).items():
        try:
            out[name] = Part.of_node(group, node, name)
        except DspError:  # an option whose code is not importable here (an optional extra)
            continue
    return out


_FITTING: dict = {}


def _alternatives(group: str, data, parts: dict[str, Part], tree: Mapping | None = None) -> list[str]:
    """Shipped options of `group` that fit the other chosen parts (and, given the config's `tree`,
    its data's keys and its training stages: a suggestion must not be refused in turn)."""
    context = None if tree is None else (repr(tree.get("data")), repr((tree.get("trainer") or {}).get("stages")))
    key = (group, data, context) + tuple((g, p.cls, repr(p.config), p._structured) for g, p in parts.items()
                                         if g != group)
    if key not in _FITTING:
        _FITTING[key] = _fitting(group, data, parts, tree)
    return _FITTING[key]


def _fitting(group: str, data, parts: dict[str, Part], tree: Mapping | None) -> list[str]:
    fitting = []
    for name, candidate in _shipped_parts(group).items():
        trial = {**parts, group: candidate}
        if not (candidate.declares and _fits(data, trial["model"], trial["inference"], trial["objective"])):
            continue
        if tree is not None:
            try:
                trial_tree = {**tree, group: candidate.config}
                _check_references(trial_tree, group, data_class(trial_tree), {})
                _check_stages(trial_tree, data, trial)
            except DspError:
                continue
        fitting.append(name)
    return fitting


def _listing(items) -> str:
    items = sorted(items)
    return " or ".join(items) if len(items) <= 2 else ", ".join(items[:-1]) + " or " + items[-1]


def _tree(cfg) -> dict:
    """The config's parts as plain containers, interpolations left as written."""
    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    return {k: OmegaConf.to_container(v, resolve=False) if isinstance(v, DictConfig) else v
            for k, v in cfg.items() if k != "hydra"}


def data_class(tree: Mapping):
    """The declared class of the config's data (its loader's return class), or None."""
    target = (tree.get("data") or {}).get("_target_")
    cls = declared_class(str(target), "data") if target else None
    return cls if isinstance(cls, type) and issubclass(cls, I.Dataset) else None


def check_config(cfg, choices: Mapping[str, str] | None = None) -> None:
    """Refuse a config whose parts cannot work together (see the module docstring). A composed config
    (a DictConfig) has its settings checked by key first (dsp.schema: types, ranges, unknown keys),
    so that the declarations below read values of the declared types."""
    if isinstance(cfg, DictConfig):  # (matrix() passes plain trees of the shipped options)
        check_settings(cfg)
    choices = dict(_choices(cfg) if choices is None else choices)
    tree = _tree(cfg)
    data = data_class(tree)
    declared = Data(data.output, data.input) if data is not None else Data(None, None)
    parts = {g: Part.of_node(g, tree.get(g), choices.get(g)) for g in ("model", "inference", "objective")}
    _refuse_mismatch(declared, parts, f"data={choices['data']}" if "data" in choices else "the data", tree)
    for group in ("model", "inference", "objective"):
        _check_references(tree, group, data, choices)
    data = declared
    _check_stages(tree, data, parts)


def _refuse_mismatch(data, parts: dict[str, Part], data_name: str, tree: Mapping | None = None) -> None:
    problems = _problems(data, parts["model"], parts["inference"], parts["objective"])
    if problems:
        groups, why = problems[0]
        hints = []
        for group in groups:
            fitting = _alternatives(group, data, parts, tree)
            if fitting:
                others = ", ".join(p.name for g, p in parts.items() if g != group)
                hints.append(f"{group} choices that fit {others} and {data_name}: {', '.join(fitting)}")
        if not hints and data.kind:  # nothing fits the rest: name what works on this data at all
            group = groups[0]
            made_for = [n for n, p in _shipped_parts(group).items() if p.declares and data.kind in p.outputs]
            hints = [f"{group} choices made for {data.kind} outputs: {', '.join(made_for)}"] if made_for else []
        raise DspError(f"{why}. " + ("; or ".join(hints) if hints else "No shipped choice of "
                                     f"{' or '.join(groups)} fits the other parts; change another part"))


def _check_stages(tree: Mapping, data, parts: dict[str, Part]) -> None:
    """Each training stage's own objective, predict mode and trainer.online_scaling."""
    trainer = tree.get("trainer") or {}
    caps = _model_capabilities(parts["model"])
    for name, spec in (trainer.get("stages") or {}).items():
        if spec is None:
            continue
        node = spec.get("objective")
        if isinstance(node, Mapping):
            stage_objective = Part.of_node("objective", node)
            problems = _problems(data, parts["model"], parts["inference"], stage_objective)
            if problems:
                raise DspError(f"trainer.stages.{name}.objective: {problems[0][1]}; train in one stage with "
                               f"trainer=default, or switch this stage off with trainer.stages.{name}=null")
        model = parts["model"]
        train = spec.get("train")
        # (only a class's own list: a subclass may add parts of its own, e.g. a parameter on itself)
        own = model.cls.parts_for(model.config) if model.declares else None
        if isinstance(train, list) and own is not None:
            unknown = [t for t in map(str, train) if t not in (*own, "inference")]
            if unknown:
                raise DspError(f"trainer.stages.{name}.train names {unknown}, which {model.name} does not have (its "
                               f"parts: {', '.join(own)}); train in one stage with trainer=default, or name the "
                               f"model's own parts")
        if spec.get("predict") == "local" and parts["model"].declares and I.LOCAL not in caps:
            raise DspError(f"trainer.stages.{name}.predict=local: {parts['model'].name} has no local term to "
                           f"predict from ({I.describe(I.LOCAL)}); predict with inference")
    if trainer.get("online_scaling") is not None:  # ({} is on, with the paper's grid)
        scaling_settings(trainer["online_scaling"])  # its keys and values, by name
    if trainer.get("online_scaling") is not None and parts["model"].declares and I.SCALABLE_LOCAL not in caps:
        raise DspError(f"trainer.online_scaling: {parts['model'].name} has no scalable local term "
                       f"({I.describe(I.SCALABLE_LOCAL)}); set trainer.online_scaling=null")


_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")
_MISSING = object()


def _lookup(tree: Mapping, dotted: str):
    node = tree
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _check_references(tree: Mapping, group: str, data, choices: Mapping[str, str]) -> None:
    """A part's reference to a key the chosen data (or another part) lacks, e.g. ${data.word_length},
    or to a ${dims.*} size the data does not fill in (a text model's vocabulary sizes on image data):
    refused now, not when the part is built after the data has loaded."""
    for key, text, ref in _references(tree.get(group), group):
        owner = ref.split(".")[0]
        which = f"{owner}={choices[owner]}" if owner in choices else owner
        if owner == "dims":
            if data is not None and ref[5:] not in data.dims:
                where = f"data={choices['data']}" if "data" in choices else "the data"
                raise DspError(f"{key}: {text} is a size {where} does not have (it fills in "
                               f"{', '.join(sorted(data.dims))}): this {group} reads inputs of another kind (e.g. "
                               f"token vocabularies); choose a {group} made for this data")
        elif _lookup(tree, ref) is _MISSING:
            raise DspError(f"{key}: {text} refers to `{ref}`, which {which} does not have; choose a "
                           f"{owner} that sets it or set {key} yourself")


def _references(node, prefix: str) -> list[tuple[str, str, str]]:
    """(key, text, referenced key) of every plain ${a.b} interpolation in a part's tree."""
    return [(key, text, ref) for key, text in _strings(node or {}, prefix) for ref in _REFERENCE.findall(text)
            if "." in ref]


def _strings(tree, prefix: str):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _strings(v, f"{prefix}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _strings(v, f"{prefix}[{i}]")
    elif isinstance(tree, str):
        yield prefix, tree


# -------------------------------------------------------------------------- after building
def check_built(data, model, inference, objective, cfg=None) -> None:
    """The same checks on built parts (a Python user's own objects, or data whose loader declared
    no class), with undeclared parts refused, and twice differentiability for second-order
    objectives, which only a built model can tell."""
    for key, part in (("model", model), ("inference", inference), ("objective", objective)):
        base = Part.BASES[key]
        if not isinstance(part, base):
            raise DspError(f"{key}: {type(part).__module__}.{type(part).__name__} does not subclass "
                           f"dsp.interfaces.{base.__name__}, so dsp cannot tell what it provides or needs; "
                           f"subclass it and declare `outputs` and `provides`/`needs` (docs/EXTENDING.md)")
    if data is not None and not isinstance(data, I.Dataset):
        raise DspError(f"data: {type(data).__module__}.{type(data).__name__} does not subclass "
                       f"dsp.interfaces.Dataset (or one of dsp.data's split classes), so dsp cannot tell its "
                       f"output kind; subclass it and set `output` (docs/EXTENDING.md)")
    _check_implemented(model)
    nodes = {g: (OmegaConf.to_container(cfg[g], resolve=False) if cfg is not None and cfg.get(g) is not None else {})
             for g in ("model", "inference", "objective")}
    parts = {"model": Part("model", type(model), nodes["model"], structured=model.is_structured),
             "inference": Part("inference", type(inference), nodes["inference"]),
             "objective": Part("objective", type(objective), nodes["objective"])}
    _refuse_mismatch(Data(data.output, data.input) if data is not None else Data(None, None), parts, "the data")
    if objective.second_order:
        _check_twice_differentiable(model)


# The method (or state) behind each capability a model may declare.
IMPLEMENTS = {I.ENERGY: "energy", I.LOCAL: "local_probs", I.LOCAL_LOGITS: "local_logits", I.VALUE: "score",
              I.REGION_POTENTIALS: "unaries", I.SCALABLE_LOCAL: "unary_scale"}


def _check_implemented(model) -> None:
    """A model that declares a capability has what it promises (not an AttributeError mid-run)."""
    lacking = [f"`{cap}` ({attr})" for cap, attr in IMPLEMENTS.items()
               if cap in model.provides and not hasattr(model, attr)]
    if lacking:
        raise DspError(f"model: {type(model).__name__} declares {', '.join(lacking)} but does not define "
                       f"{'it' if len(lacking) == 1 else 'them'}; implement the methods or drop the declarations")


def _check_twice_differentiable(model) -> None:
    for part in model.y_parts:
        module = getattr(model, part, None)
        for name, sub in ([] if module is None else module.named_modules()):
            if isinstance(sub, NOT_TWICE_DIFFERENTIABLE):
                where = f"model.{part}" + (f".{name}" if name else "")
                raise DspError(
                    f"{where} is a {type(sub).__name__}, whose second derivative is zero or undefined, "
                    f"but objective=unrolled differentiates the energy's gradient in y (End-to-end SPENs "
                    f"§5). Use a smooth activation for the parts that see y, e.g. activation: softplus:25")


# ---------------------------------------------------------------------------- the matrix
def matrix():
    """Every shipped data loader × model × inference × objective, with None where the parts fit and
    the one-line reason where they do not: [(data, model, inference, objective, reason)]. Data
    options that share a loader are one family (named by the first option using it)."""
    plain = {g: {name: OmegaConf.to_container(node, resolve=False) for name, node in shipped_options(g).items()}
             for g in ("data", "model", "inference", "objective", "paths")}
    families = {}
    for name, node in plain["data"].items():
        if node.get("_target_"):
            families.setdefault(str(node["_target_"]), name)
    rows = []
    for data_name in families.values():
        for model_name in plain["model"]:
            for inference_name in plain["inference"]:
                for objective_name in plain["objective"]:
                    tree = {"paths": plain["paths"].get("default", {}), "data": plain["data"][data_name],
                            "model": plain["model"][model_name], "inference": plain["inference"][inference_name],
                            "objective": plain["objective"][objective_name]}
                    choices = {"data": data_name, "model": model_name, "inference": inference_name,
                               "objective": objective_name}
                    try:
                        check_config(tree, choices)
                        reason = None
                    except DspError as err:
                        reason = str(err)
                    rows.append((data_name, model_name, inference_name, objective_name, reason))
    return rows
