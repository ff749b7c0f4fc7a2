"""dsp-gradcheck: autograd against central finite differences, on tiny data written by the tests."""
from __future__ import annotations

from importlib import resources

import pytest
import torch
import torch.nn.functional as F

from conftest import write_mulan, write_ocr
from dsp import interfaces as I
from dsp.cli.gradcheck import load_model_defaults, main, with_model_defaults
from dsp.gradcheck import gradcheck


def gradcheck_cli(capsys, *args) -> tuple[int, str, str]:
    """Run dsp-gradcheck in this process; returns (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as stop:
        main(list(args))
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


@pytest.fixture
def data_dir(tmp_path):
    """A data folder laid out like ../shared/data: tiny Bibtex (5 labels) and a tiny OCR file."""
    write_mulan(tmp_path / "mulan" / "bibtex", name="bibtex")
    write_ocr(tmp_path / "ocr" / "letter.data.gz")
    return tmp_path


def test_model_defaults_fill_only_the_groups_the_command_line_leaves_out():
    table = load_model_defaults()
    args, added = with_model_defaults(["model=chain_crf"], table)
    assert added == ["data=ocr", "trainer=default", "inference=chain", "objective=crf_nll"]
    assert args == ["model=chain_crf", *added]
    _, added = with_model_defaults(["model=dvn", "data=mulan", "objective.loss=l2"], table)
    assert added == ["trainer=default", "inference=dvn_ascent", "objective=value"]
    _, added = with_model_defaults(["model=dvn_seg", "objective=value"], table)  # objective.oracle: the user's
    assert added == ["data=horses32", "inference=dvn_seg_ascent", "trainer=default"]
    assert with_model_defaults(["model=foe", "trainer=default"], table)[1] == [
        "data=denoise_horses", "inference=unrolled_denoise", "objective=unrolled", "objective.loss=mse"]
    assert with_model_defaults(["experiment=crf_ocr_joint", "model=chain_crf"], table)[1] == []  # presets decide
    assert with_model_defaults(["data.num_train=8"], table)[1] == []  # no model=: the config's defaults
    assert table["mrf"]["data"] == "word50" and table["spen"]["data"] == "bibtex"


def test_every_model_default_composes_into_parts_that_fit():
    """`model=NAME` alone, for every family in model_defaults: dsp.compat's checks (run before any data
    loads) accept the composed run, the default staged trainer included where it is kept."""
    from dsp.cli.gradcheck import compose_config
    from dsp.compat import check_config

    for model in load_model_defaults():
        cfg, choices, _ = compose_config([f"model={model}"])
        check_config(cfg, {group: option for group, option in choices.items() if option})


@pytest.mark.parametrize("model,expect", [
    ("spen", ["data=bibtex", "held fixed", "inference ×1"]),  # SSVM: loss-augmented inference replayed
    ("dvn", ["data=bibtex", "objective.generate_adversarial", "objective.generate_inference"]),
    ("chain_crf", ["data=ocr", "objective=crf_nll", "unary_net.net.conv.0.weight", "pairwise.weight"]),
])
def test_each_family_passes_with_its_default_data(model, expect, data_dir, capsys):
    code, out, err = gradcheck_cli(capsys, f"model={model}", f"paths.data_dir={data_dir}", "data.num_labels=null"
                                   if model != "chain_crf" else "gradcheck.examples=3")
    assert code == 0, out + err
    assert "max rel err" in out and "input x" in out and out.rstrip().endswith(": OK")
    assert "FAIL" not in out
    for text in expect:
        assert text in out, out


def test_experiment_presets_work_too(data_dir, capsys):
    code, out, err = gradcheck_cli(capsys, "experiment=crf_ocr_joint", f"paths.data_dir={data_dir}",
                                   "gradcheck.params_per_tensor=1", "gradcheck.inputs=false")
    assert code == 0, out + err
    assert "experiment=crf_ocr_joint" in out and "objective=crf_ce" in out and "input x" not in out


class WrongSquare(torch.autograd.Function):
    """x² with a backward pass 10% off: the bug the tool must catch."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 2.2 * x


class LocalLogitsObjective(I.Objective):
    """The tests' own objectives: multi-label, reading the local logits (declared for dsp.compat)."""

    outputs = frozenset({I.MULTILABEL})
    needs = frozenset({I.LOCAL_LOGITS})


class WrongLocalLoss(LocalLogitsObjective):
    def loss(self, model, inference, x, y):
        logits = model.features(x).logits
        return F.binary_cross_entropy_with_logits(logits, y) + WrongSquare.apply(logits).mean(), {}


def test_a_wrong_backward_pass_fails_with_exit_status_1(capsys):
    code, out, _ = gradcheck_cli(capsys, "model=mlp", "data=synthetic", "data.num_train=8",
                                 f"objective._target_={__name__}.WrongLocalLoss")
    assert code == 1
    assert "local_energy.linear.weight" in out and "FAIL" in out and "worst entry" in out
    assert out.rstrip().endswith(": FAIL")


def test_without_replaying_generated_labels_dvn_would_not_check(data_dir, capsys):
    """DVN's adversarial labels move with θ, which autograd ignores by design: the replay is needed."""
    code, out, _ = gradcheck_cli(capsys, "model=dvn", f"paths.data_dir={data_dir}", "data.num_labels=null",
                                 "gradcheck.frozen_methods=[]", "inference.max_iter=3")
    assert code == 1 and "FAIL" in out


class ZeroBiasHinge(LocalLogitsObjective):
    """The local loss plus relu(b) summed, with the local bias set to exactly 0 on the first call:
    every entry of b sits on a ReLU kink, where the central difference is no derivative."""

    def loss(self, model, inference, x, y):
        bias = model.local_energy.linear.bias
        if not getattr(self, "zeroed", False):
            bias.data.zero_()
            self.zeroed = True
        logits = model.features(x).logits
        return F.binary_cross_entropy_with_logits(logits, y) + torch.relu(bias).sum(), {}


def test_entries_on_a_kink_are_reported_and_replaced(capsys):
    code, out, _ = gradcheck_cli(capsys, "model=mlp", "data=synthetic", "data.num_train=8",
                                 f"objective._target_={__name__}.ZeroBiasHinge")
    assert code == 0, out
    assert "local_energy.linear.bias" in out and "KINKS ONLY" in out and "kink: local_energy.linear.bias" in out
    assert "entries at kinks skipped: OK" in out


@pytest.mark.parametrize("args,expect", [
    (["model=nope"], "no conf/model/nope.yaml"),
    (["gradcheck.tol_typo=1"], "gradcheck.tol_typo"),
    (["data.num_train=8", "gradcheck.stage=nope"], "local, global, joint"),
    (["--cfg", "job"], "key=value overrides only"),
    (["gradcheck.examples=abc"], "gradcheck.examples='abc': give a whole number"),  # not a gradient failure (1)
    (["gradcheck.tol=0"], "gradcheck.tol=0: give a number above 0"),
    (["gradcheck.inputs=maybe"], "gradcheck.inputs='maybe': give true or false"),
])
def test_configuration_errors_exit_2_with_one_line(args, expect, capsys):
    code, out, err = gradcheck_cli(capsys, *args)
    assert code == 2 and expect in err and "Traceback" not in err


def test_mrf_families_pass_with_their_default_data(tmp_path, capsys):
    """The Word50 MRF (messages held fixed: Eq. 5 at fixed λ) and the tagging MRF."""
    from test_word50 import write_word50_sources

    ocr, horses = write_word50_sources(tmp_path / "src")
    code, out, err = gradcheck_cli(capsys, "model=mrf", f"data.ocr_path={ocr}", f"data.horses_dir={horses}",
                                   f"data.cache_dir={tmp_path / 'cache'}", "data.num_words=4", "data.train_size=8",
                                   "data.val_size=4", "data.test_size=4", "model.unary_net.net.hidden=[6]",
                                   "model.graph.kind=chain2")
    assert code == 0, out + err
    assert "data=word50" in out and "objective.messages" in out and "pairwise.tables.2" in out
    write_mulan(tmp_path / "mulan" / "bibtex", name="bibtex")
    code, out, err = gradcheck_cli(capsys, "model=mrf_tagging", f"paths.data_dir={tmp_path}", "data.num_labels=null",
                                   "model.unary_net.hidden=[6]")
    assert code == 0, out + err
    assert "FAIL" not in out and out.rstrip().endswith(": OK")


# A user's own model option, outside the shipped configs: a SPEN with other sizes.
USER_MODEL = """\
_target_: dsp.models.spen.SPEN
num_labels: ${dims.num_labels}
feature_net:
  _target_: dsp.nn.mlp.MLP
  in_features: ${dims.num_features}
  hidden: [7]
  activation: softplus
local_energy:
  _target_: dsp.models.spen.LocalEnergy
  _partial_: true
global_energy:
  _target_: dsp.models.spen.GlobalEnergy
  _partial_: true
  measurements: 3
  hidden: []
  activation: softplus
  conditional: false
"""


@pytest.mark.parametrize("how", ["hydra.searchpath", "--config-dir"])
def test_a_user_model_yaml_is_found_as_dsp_train_finds_it(how, tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "my_spen.yaml").write_text(USER_MODEL)
    where = [f"hydra.searchpath=[file://{tmp_path}]"] if how == "hydra.searchpath" else ["--config-dir", str(tmp_path)]
    code, out, err = gradcheck_cli(capsys, *where, "model=my_spen", "data.num_train=8")
    assert code == 0, out + err
    assert "model=my_spen data=synthetic" in out and out.rstrip().endswith(": OK")
    assert "feature_net.net.0.weight      [7, 64]" in out and "global_energy.measure.weight  [3, 16]" in out
    code, _, err = gradcheck_cli(capsys, "model=my_spen", "data.num_train=8")  # not without the folder
    assert code == 2 and "model=my_spen: there is no conf/model/my_spen.yaml" in err


class HandSquare(torch.autograd.Function):
    """x² with a hand-written backward pass factor·x: right with factor 2."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.save_for_backward(x)
        ctx.factor = factor
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ctx.factor * x, None


class HandSquareLoss(LocalLogitsObjective):
    def __init__(self, factor: float):
        self.factor = factor

    def loss(self, model, inference, x, y):
        logits = model.features(x).logits
        return F.binary_cross_entropy_with_logits(logits, y) + HandSquare.apply(logits, self.factor).mean(), {}


def compose_gradcheck(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(resources.files("dsp.conf")), version_base="1.3"):
        return compose("gradcheck", overrides=list(overrides))


@pytest.mark.parametrize("factor", [2.0, 2.2])
def test_the_engine_alone_tells_a_right_hand_written_gradient_from_a_wrong_one(factor):
    cfg = compose_gradcheck("model=mlp", "data=synthetic", "data.num_train=8", "model.feature_net.hidden=[8]",
                            "objective=local", "trainer=default",
                            f"objective._target_={__name__}.HandSquareLoss", f"+objective.factor={factor}")
    report = gradcheck(cfg)
    worst = {c.name: c.worst[0] for c in report.checks}
    assert {"feature_net.net.0.weight", "local_energy.linear.weight", "input x"} <= set(worst)
    assert all(len(c.entries) == 3 for c in report.checks) and report.evaluations > 6 * len(worst)
    if factor == 2.0:
        assert report.ok and max(worst.values()) < 1e-6
    else:
        assert not report.ok and worst["local_energy.linear.weight"] > 100 * report.tol
