"""Every setting of data, model, inference, objective (nested `_target_` nodes included) and the top
level has a type and a range, checked by key at start-up (dsp.schema): the shipped configs pass,
and a wrong value is refused in one line that names the key and what to give."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from dsp.cli.common import config_dir
from dsp.compat import check_config, shipped_options
from dsp.errors import DspError
from dsp.schema import HYDRA_KEYS, check_part, check_settings, settings_of
from dsp.training.config_checks import check_seed

PRESETS = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))
# Plausible sizes for the ${dims.*} the data fills in once loaded.
DIMS = {"num_features": 16, "num_labels": 4, "num_words": 50, "num_pos": 8, "num_chars": 30}
DEFAULTS = {"data": "synthetic", "model": "spen_synthetic", "inference": "mirror", "objective": "ssvm"}
DATA_REFERENCE = re.compile(r"\$\{data\.(\w+)\}")


def _with_dims(cfg: DictConfig) -> DictConfig:
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.dims = dict(DIMS)
    return cfg


@pytest.fixture(scope="module")
def presets() -> dict[str, DictConfig]:
    """Every shipped experiment preset, composed as dsp-train composes it (once for the module)."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return {name: compose("config", overrides=[f"experiment={name}"]) for name in PRESETS}


@pytest.fixture(scope="module")
def base() -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=["experiment=spen_synthetic"])


def composed(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def refusal(cfg) -> str:
    with pytest.raises(DspError) as err:
        check_settings(cfg)
    message = str(err.value)
    assert "\n" not in message  # one line
    return message


# --------------------------------------------------------------------------- shipped configs
def test_every_experiment_preset_passes_as_composed_and_with_its_sizes_filled_in(presets):
    for name, cfg in presets.items():
        check_settings(cfg)  # at compose time: ${dims.*} not known yet (skipped)
        check_settings(_with_dims(cfg))  # once the data has loaded


def _tree(**chosen: str) -> DictConfig:
    """A run's config made of shipped options (the defaults of config.yaml for the groups not named),
    with sizes filled in and mandatory `???` data keys given, so every value resolves."""
    names = {**DEFAULTS, **chosen}
    groups = {g: OmegaConf.to_container(shipped_options(g)[names[g]], resolve=False) for g in DEFAULTS}
    for key, value in list(groups["data"].items()):
        if value == "???":
            groups["data"][key] = f"/nowhere/{key}.arff"
    paths = OmegaConf.to_container(shipped_options("paths")["default"], resolve=False)
    return OmegaConf.create({"seed": 0, "dims": dict(DIMS), "paths": paths, **groups})


def _data_for(group: str, name: str) -> str:
    """A shipped data option with every `${data.*}` key the option reads (data.word_length, ...)."""
    wanted = set(DATA_REFERENCE.findall(str(OmegaConf.to_container(shipped_options(group)[name], resolve=False))))
    return next(d for d, node in shipped_options("data").items() if wanted <= set(node))


@pytest.mark.parametrize("group", ["data", "model", "inference", "objective"])
def test_every_shipped_option_of_every_group_passes_with_every_value_resolved(group):
    for name in shipped_options(group):
        chosen = {group: name} if group == "data" else {group: name, "data": _data_for(group, name)}
        cfg = _tree(**chosen)
        # (every interpolation resolves, so every value was checked, none skipped as not yet known)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        try:
            check_settings(cfg)
        except DspError as err:
            pytest.fail(f"{group}={name}: {err}")


def _nodes(tree, key):
    """(key, node) of every `_target_` node of a plain config tree."""
    if isinstance(tree, dict):
        if "_target_" in tree:
            yield key, tree
        for k, v in tree.items():
            yield from _nodes(v, f"{key}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _nodes(v, f"{key}[{i}]")


def test_every_shipped_setting_is_declared_with_a_type():
    """Each key a shipped config sets is an annotated parameter of its target (a nested `_target_`
    node, e.g. a SPEN's partial local_energy, is checked against its own target instead)."""
    from hydra.utils import get_object

    undeclared = []
    for group in ("data", "model", "inference", "objective", "trainer"):
        for name, option in shipped_options(group).items():
            for key, node in _nodes(OmegaConf.to_container(option, resolve=False), f"{group}={name}"):
                settings = settings_of(get_object(node["_target_"]))
                for k, v in node.items():
                    if k in HYDRA_KEYS or (isinstance(v, dict) and "_target_" in v):
                        continue
                    if k not in settings.hints:
                        undeclared.append(f"{key}.{k} ({settings.name})")
    assert not undeclared, "settings without a type annotation:\n" + "\n".join(sorted(set(undeclared)))


def test_the_literal_choices_match_what_the_parts_accept():
    from typing import get_args

    from dsp.objectives.unrolled import LOSSES, Loss
    from dsp.tasks.multilabel import DELTAS
    from dsp.tasks.oracles import ORACLES
    from dsp.objectives.ssvm import SSVMLoss
    from dsp.objectives.value import SOURCES, Sources, ValueObjective

    assert set(get_args(Loss)) == set(LOSSES)
    assert set(get_args(settings_of(SSVMLoss).hints["delta"])) == set(DELTAS)
    assert set(get_args(settings_of(ValueObjective).hints["oracle"])) == {"auto", *ORACLES}
    assert tuple(Sources.__annotations__) == SOURCES


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("key, value, message", [
    ("inference.lr", "abc", "inference.lr='abc': give a number above 0"),
    ("inference.momentum", "abc", "inference.momentum='abc': give a number at least 0 and below 1"),
    ("objective.margin_weight", "abc", "objective.margin_weight='abc': give a number at least 0"),
    ("inference.lr", -1, "inference.lr=-1: give a number above 0"),
    ("inference.lr", True, "inference.lr=True: give a number above 0"),  # a bool is not a number
    ("seed", 100000000000000, "seed=100000000000000: give a whole number between 0 and 4294967295"),
    ("seed", 2**32, "seed=4294967296: give a whole number between 0 and 4294967295"),
    ("seed", "abc", "seed='abc': give a whole number"),
    ("model.feature_net.hidden", [0], "model.feature_net.hidden=[0]: give whole numbers at least 1"),
    ("model.feature_net.hidden", 5, "model.feature_net.hidden=5: give a list of whole numbers at least 1"),
    ("inference.restarts", -1, "inference.restarts=-1: give a whole number at least 0"),  # a negative count
    ("data.num_train", -5, "data.num_train=-5: give a whole number at least 1"),
    ("inference.max_iter", 2.5, "inference.max_iter=2.5: give a whole number at least 1"),
    ("inference.method", "sgd", "inference.method='sgd': choose mirror or projected"),  # not in its Literal
    ("inference.method", "mirorr", "inference.method='mirorr': choose mirror or projected (did you mean mirror?)"),
    ("model.global_energy.activation", "swish", "model.global_energy.activation='swish': choose one of relu"),
    ("model.feature_net.dropout", 1.0, "model.feature_net.dropout=1.0: give a number at least 0 and below 1"),
    ("inference.predict.restarts", -2, "inference.predict.restarts=-2: give a whole number at least 0"),
    ("data.seed", None, "data.seed=None: give a whole number at least 0"),
])
def test_a_value_of_the_wrong_type_or_range_is_refused_naming_the_key(base, key, value, message):
    cfg = base.copy()
    OmegaConf.update(cfg, key, value)
    assert refusal(cfg).startswith(message)


@pytest.mark.parametrize("key, message", [
    ("inference.lrr", "inference.lrr is not a setting of dsp.inference.gradient.GradientInference "
                      "(did you mean inference.lr?)"),
    ("model.feature_net.hiden", "model.feature_net.hiden is not a setting of dsp.nn.mlp.MLP "
                                "(did you mean model.feature_net.hidden?)"),
    ("inference.predict.restart", "inference.predict.restart is not a setting of dsp.inference.gradient."
                                  "GradientInference (did you mean inference.predict.restarts?)"),
    ("objective.weight", "objective.weight is not a setting of dsp.objectives.ssvm.SSVMLoss "
                         "(did you mean objective.margin_weight?)"),
    ("trainer.stages.local.objective.margin", "trainer.stages.local.objective.margin is not a setting of "
                                              "dsp.objectives.local.LocalLoss; it takes no settings"),
    ("sed", "sed is not a setting (did you mean seed?)"),
])
def test_an_unknown_key_is_refused_with_the_nearest_setting(base, key, message):
    cfg = base.copy()
    with open_dict(cfg):
        OmegaConf.update(cfg, key, 1, force_add=True)
    assert refusal(cfg).startswith(message)


def test_nested_mappings_are_checked_by_key(presets):
    cfg = presets["dvn_horses"].copy()
    with open_dict(cfg):
        cfg.objective.sources.inferrence = 1
    assert refusal(cfg).startswith("objective.sources.inferrence is not a key of objective.sources "
                                   "(did you mean objective.sources.inference?)")
    cfg = presets["dvn_horses"].copy()
    cfg.objective.sources.adversarial = -1
    assert refusal(cfg) == "objective.sources.adversarial=-1: give a number at least 0"
    cfg = presets["dvn_horses"].copy()
    with open_dict(cfg):
        cfg.model.unary.kernel = 3  # model.unary: the settings of the value network's conv layers
    assert refusal(cfg).startswith("model.unary.kernel is not a setting of dsp.models.dvn_seg.ConvLayers "
                                   "(did you mean model.unary.kernel_size?)")
    cfg = presets["dvn_horses"].copy()
    cfg.data.augment.rotate = -5  # data.augment: the loader's own check, at start-up
    assert "data.augment.rotate" in refusal(cfg)


def test_interpolations_are_judged_by_their_value_once_it_is_known(presets):
    cfg = presets["dvn_horses"].copy()  # model.size: ${data.crop}
    cfg.data.crop = 0
    assert refusal(cfg) == "data.crop=0: give a whole number at least 1, or null"
    cfg.data.crop = None
    assert refusal(cfg) == "model.size=None (from ${data.crop}): give a whole number at least 1"
    cfg = _with_dims(presets["spen_synthetic"])
    cfg.dims.num_features = 0  # model.feature_net.in_features: ${dims.num_features}
    assert refusal(cfg).startswith("model.feature_net.in_features=0 (from ${dims.num_features}): give a whole number")
    check_settings(presets["spen_synthetic"])  # ${dims.*} is ??? at compose time: skipped


def test_a_list_setting_and_a_union_say_what_each_item_takes():
    cfg = composed("model=spen", "data=bibtex", "inference=unrolled_gd", "objective=unrolled", "trainer=default",
                   "inference.lr=[1.0,-1.0]")
    assert refusal(cfg) == "inference.lr=[1.0, -1.0]: give numbers above 0"
    cfg.inference.lr = "fast"
    assert refusal(cfg) == "inference.lr='fast': give a number above 0"
    cfg = composed("experiment=mrf_word50_order2", "model.graph.kind=chain3")
    assert refusal(cfg) == ("model.graph.kind='chain3': choose chain, chain2, full, list or none "
                            "(did you mean chain?)")
    cfg = composed("experiment=mrf_word50_order2", "inference.counting_variables=bethe")
    check_settings(cfg)  # a number or bethe
    cfg.inference.counting_variables = "half"
    assert refusal(cfg) == "inference.counting_variables='half': give a number or bethe"


def test_seed_check_keeps_its_old_uses():
    check_seed(0)
    check_seed(2**32 - 1)
    for bad in (-1, 2**32, 1.5, True, "1", "${seed}", "???"):
        with pytest.raises(DspError, match=r"give a whole number between 0 and 4294967295"):
            check_seed(bad)


def test_check_config_refuses_at_compose_time_before_the_parts_are_matched():
    cfg = composed("experiment=spen_synthetic", "inference.lr=abc")
    with pytest.raises(DspError, match=r"^inference.lr='abc': give a number above 0$"):
        check_config(cfg)
    check_config(composed("experiment=spen_synthetic"))


# --------------------------------------------------------------------------------- user parts
class UserEnergy(torch.nn.Module):
    def __init__(self, width: int, scale: float = 1.0, mode: str = "a", device: torch.device | None = None,
                 net: torch.nn.Module | None = None):
        super().__init__()


class OpenUserEnergy(torch.nn.Module):
    def __init__(self, width: int, **kwargs):
        super().__init__()


def test_a_users_own_class_is_checked_from_its_signature():
    target = f"{__name__}.UserEnergy"
    check_part({"_target_": target, "width": 3, "scale": 2, "device": "cpu"}, "model.prior")  # (a class not judged)
    check_part({"_target_": target, "width": 3, "net": {"_target_": "torch.nn.Identity"}}, "model.prior")
    with pytest.raises(DspError, match=r"^model.prior.net=\{'width': 3\}: give a node with a _target_ \(one that "
                                       r"builds a Module\), or null$"):
        check_part({"_target_": target, "width": 3, "net": {"width": 3}}, "model.prior")
    with pytest.raises(DspError, match=r"^model.prior.widht is not a setting of .*UserEnergy \(did you mean "
                                       r"model.prior.width\?\)$"):
        check_part({"_target_": target, "widht": 3}, "model.prior")
    with pytest.raises(DspError, match=r"^model.prior.scale='big': give a number$"):
        check_part({"_target_": target, "width": 3, "scale": "big"}, "model.prior")
    with pytest.raises(DspError, match=r"^model.prior.width is not set: .*UserEnergy needs it$"):
        check_part({"_target_": target, "scale": 2.0}, "model.prior")
    check_part({"_target_": target, "_partial_": True, "scale": 2.0}, "model.prior")  # the parent gives width
    # **kwargs: any key may be meant for it, so none is refused
    check_part({"_target_": f"{__name__}.OpenUserEnergy", "width": 3, "anything": 1}, "model.prior")
    with pytest.raises(DspError, match=r"^model.prior.width=1.5: give a whole number$"):
        check_part({"_target_": f"{__name__}.OpenUserEnergy", "width": 1.5}, "model.prior")
    # Hydra's own keys are not settings
    check_part({"_target_": target, "_recursive_": False, "_convert_": "all", "_args_": [3]}, "model.prior")


def test_an_unimportable_target_is_refused_by_key():
    with pytest.raises(DspError, match=r"^model.feature_net._target_=dsp.nn.mlp.MPL: cannot be imported"):
        check_part({"_target_": "dsp.nn.mlp.MPL"}, "model.feature_net")


# ---------------------------------------------------------------------------------------- CLI
def test_dsp_train_refuses_a_bad_setting_in_one_line_before_any_folder(tmp_path, capsys):
    """dsp-train's compose-time check (the CheckParts callback, before Hydra makes the run folder)."""
    from dsp.cli.train import CheckParts

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=spen_synthetic", "inference.lr=abc",
                                           f"hydra.run.dir={tmp_path / 'run'}"], return_hydra_config=True)
    with pytest.raises(SystemExit) as stop:
        CheckParts().on_run_start(cfg)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == "error: inference.lr='abc': give a number above 0"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arg, named", [("trainer.lrr=0.1", "trainer.lrr is not a trainer setting (did you mean trainer.lr?)"),
                                        ("trainer.stages.train.lrr=1", "did you mean trainer.stages.train.lr?")])
def test_an_unknown_trainer_key_on_the_command_line_is_one_line(arg, named, capsys):
    """Hydra itself would refuse it in several lines, without a suggestion."""
    from dsp.cli.train import refuse_unknown_trainer_keys

    refuse_unknown_trainer_keys(["trainer.lr=0.1", "trainer.stages.joint.lr=0.1", "model=mlp"])  # known: nothing
    with pytest.raises(SystemExit) as stop:
        refuse_unknown_trainer_keys([arg])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and named in err and len(err.strip().splitlines()) == 1
