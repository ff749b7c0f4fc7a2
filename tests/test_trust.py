"""Hostile checkpoints cannot act: the config stored in a checkpoint builds dsp's parts, torch.nn and
torch.optim only (and modules the user names with trust=), checked before anything is imported or
called. Each case here would delete, write or spawn something if it ran; the victims must survive."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import dsp
from dsp.errors import DspError
from dsp.instantiate import check_trusted
from dsp.training.checkpoint import save_checkpoint

SPEN_MODEL = {"_target_": "dsp.models.spen.SPEN", "num_features": 4, "num_labels": 3}


def hostile_run(folder: Path, config: dict) -> Path:
    """A run folder whose best.pt loads with weights_only=True but whose config names `config`."""
    save_checkpoint({"config": config, "model": {}, "threshold": 0.5, "predict": "inference"},
                    folder / "checkpoints" / "best.pt")
    return folder


def cases(victim: Path, marker: Path) -> dict[str, dict]:
    spawn = {"_target_": "subprocess.Popen", "args": ["touch", str(marker)]}
    return {
        "unlink": {"data": {"_target_": "pathlib.Path.unlink", "self": {"_target_": "pathlib.Path", "_args_": [str(victim)]}}},
        "os.remove through a dsp module": {"model": {"_target_": "dsp.data.cache.os.remove", "_args_": [str(victim)]}},
        "torch.save through torch.nn": {"model": {"_target_": "torch.nn.modules.module.torch.save",
                                                  "_args_": [{}, str(victim)]}},
        "dsp's own file writer": {"data": {"_target_": "dsp.training.checkpoint.write_json", "obj": [],
                                           "path": str(victim)}},
        "process spawn": {"model": spawn},
        "os.system nested in a list": {"model": {**SPEN_MODEL, "layers": [{"_target_": "os.system",
                                                                           "_args_": [f"touch {marker}"]}]}},
        "interpolated target": {"model": {"_target_": "${oc.env:EVIL_TARGET}"}},
        "a target created by a resolver": {"model": {**SPEN_MODEL, "feature_net": "${oc.create:{_target_: "
                                                     f"shutil.copyfile, _args_: [/dev/null, {victim}]}}}}"}},
        "a secret copied by a resolver": {"model": {**SPEN_MODEL, "feature_net": "${oc.create:{_target_: torch.save, "
                                                    f"_args_: ['${{oc.env:HOME}}', {marker}]}}}}"}},
        "exec": {"inference": {"_target_": "builtins.exec", "_args_": ["open(" + repr(str(marker)) + ", 'w')"]}},
    }


@pytest.fixture
def victims(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    return victim, tmp_path / "spawned.txt"


@pytest.mark.parametrize("case", list(cases(Path("v"), Path("m"))))
def test_a_hostile_stored_config_is_refused_before_anything_runs(case, victims, tmp_path, monkeypatch):
    victim, marker = victims
    monkeypatch.setenv("EVIL_TARGET", "os.remove")
    run = hostile_run(tmp_path / "run", {"seed": 0, **cases(victim, marker)[case]})
    with pytest.raises(DspError, match="refused|not a plain dotted name|an interpolation"):
        dsp.load_run(run)
    assert victim.read_text() == "precious" and not marker.exists()


def test_importing_an_untrusted_module_is_itself_refused(tmp_path, monkeypatch):
    """Importing a module runs its code: a module outside the trusted ones is never imported."""
    marker = tmp_path / "imported.txt"
    (tmp_path / "evil_pkg.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Model:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DspError, match="outside the trusted modules"):
        check_trusted({"model": {"_target_": "evil_pkg.Model"}}, "a checkpoint")
    assert not marker.exists() and "evil_pkg" not in sys.modules


def test_a_trusted_users_module_may_be_named_but_not_escaped(tmp_path, monkeypatch):
    (tmp_path / "users_pkg.py").write_text("import os\nclass Model:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    check_trusted({"model": {"_target_": "users_pkg.Model"}}, "a checkpoint", trust=["users_pkg"])
    monkeypatch.setenv("DSP_TRUST", "users_pkg")
    check_trusted({"model": {"_target_": "users_pkg.Model"}}, "a checkpoint")
    with pytest.raises(DspError, match="not part of users_pkg"):  # the module's own imports stay out
        check_trusted({"model": {"_target_": "users_pkg.os.remove"}}, "a checkpoint")


def test_dsps_parts_and_torch_layers_pass():
    check_trusted({"data": {"_target_": "dsp.data.mulan.load_mulan"}, "model": {**SPEN_MODEL, "act": {
        "_target_": "torch.nn.Softplus"}}, "inference": {"_target_": "dsp.inference.gradient.GradientInference"},
        "objective": {"_target_": "dsp.objectives.ssvm.SSVMLoss"}, "opt": {"_target_": "torch.optim.SGD"}},
        "a checkpoint")


def test_dsp_eval_refuses_a_hostile_checkpoint_in_one_line(victims, tmp_path):
    victim, marker = victims
    run = hostile_run(tmp_path / "run", {"seed": 0, **cases(victim, marker)["unlink"]})
    proc = subprocess.run([sys.executable, "-m", "dsp.cli.evaluate", f"run_dir={run}"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "DSP_TRUST": ""})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr and "pathlib.Path.unlink" in proc.stderr
    assert victim.read_text() == "precious" and not (run / "eval").exists()


@pytest.mark.parametrize("ckpt", ["../../other/checkpoints/best", "/etc/passwd", ""])
def test_ckpt_names_a_checkpoint_of_this_run_only(ckpt, tmp_path):
    run = hostile_run(tmp_path / "run", {"seed": 0, "model": SPEN_MODEL})
    with pytest.raises(DspError, match="give the name of a checkpoint"):
        dsp.load_run(run, ckpt=ckpt)
