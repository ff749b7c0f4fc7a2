"""Parts that cannot work together are refused before anything loads or is written, in one line
naming the parts, what is missing and what would fit (dsp.compat)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from dsp.cli.common import config_dir
from dsp.compat import check_built, check_config
from dsp.errors import DspError
from dsp.inference.gradient import GradientInference
from dsp.objectives.ssvm import SSVMLoss


def composed(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    return cfg, dict(cfg.hydra.runtime.choices)


@pytest.mark.parametrize("overrides, message", [
    (["model=spen", "data=ocr"], r"model=spen works on multilabel outputs.*model choices .*spen_sequence"),
    (["model=spen", "data=ocr", "trainer=default"], r"model choices that fit inference=mirror, objective=ssvm and "
                                                     r"data=ocr: chain_crf, spen_sequence$"),
    (["model=mlp3", "objective=local", "trainer=staged"], r"trainer.stages.global.train names \['global_energy'\], which model=mlp3"),
    (["+trainer.online_scaling={min_exp: 0.5}"], r"trainer.online_scaling.min_exp=0.5: give a whole number"),
    (["model=mrf", "data=ocr", "inference=message_passing", "objective=mrf_blended", "trainer=default"],
     r"model.num_variables: \$\{data.word_length\} refers to `data.word_length`, which data=ocr does not have"),
    (["model=chain_crf_text", "data=ocr", "inference=chain", "objective=crf_nll", "trainer=default"],
     r"model=chain_crf_text reads token sequences, but the data gives image sequences.*fit .*: chain_crf"),
    (["model=chain_crf_text", "data=ocr", "inference=chain", "objective=crf_nll", "trainer=default",
      "model.unary_net._target_=torch.nn.Identity"],  # an input network that declares nothing
     r"model.unary_net.num_words: \$\{dims.num_words\} is a size data=ocr does not have"),
    (["model=chain_crf", "data=conll2000", "inference=chain", "objective=crf_nll", "trainer=default"],
     r"model=chain_crf reads image sequences, but the data gives token sequences.*chain_crf_bilstm"),
    (["model=mrf", "data=word50", "inference=message_passing", "objective=mrf_blended", "trainer=default",
      "+trainer.online_scaling={subset: 10}"], r"trainer.online_scaling: model=mrf has no scalable local term"),
    (["model=foe", "data=denoise_horses", "objective=unrolled", "inference=unrolled_denoise"],
     r"trainer.stages.local.objective: objective LocalLoss works on .* outputs, but the data has image.*trainer=default"),
    (["model=spen", "objective=unrolled", "inference=mirror"],
     r"objective=unrolled needs an inference routine that keeps the graph.*inference choices that fit.*unrolled_gd"),
    (["model=spen", "objective=unrolled", "inference=unrolled_gd", "model.global_energy.activation=relu"],
     r"needs a model with `smooth_energy`.*model.global_energy.activation is a ReLU-like relu"),
])
def test_a_pairing_that_cannot_work_is_refused_with_its_reason_and_the_choices_that_fit(overrides, message):
    cfg, choices = composed(*overrides)
    with pytest.raises(DspError, match=message) as err:
        check_config(cfg, choices)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["model=spen_sequence", "data=ocr", "inference=mirror", "objective=ssvm", "trainer=default"],
    ["model=chain_crf", "data=ocr", "inference=unrolled_gd", "objective=unrolled", "trainer=default"],
    ["model=spen", "data=bibtex", "+trainer.online_scaling={subset: 10}"],
    ["experiment=crf_ocr_online"],
])
def test_pairings_that_work_pass(overrides):
    check_config(*composed(*overrides))


def test_built_parts_that_declare_nothing_are_refused_by_name():
    class Plain(torch.nn.Module):
        def features(self, x, lengths=None):
            return x

    with pytest.raises(DspError, match=r"model: .*Plain does not subclass dsp.interfaces.Model"):
        check_built(None, Plain(), GradientInference(), SSVMLoss())


def test_a_sweep_with_one_job_that_cannot_work_is_refused_before_any_job_runs(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "dsp.cli.train", "-m", "model=spen,chain_crf",
                           f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "job 1 (model=chain_crf)" in proc.stderr and not sweep.exists()


def test_dsp_gradcheck_refuses_the_same_way():
    proc = subprocess.run([sys.executable, "-m", "dsp.cli.gradcheck", "model=spen", "objective=crf_nll"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "objective=crf_nll works on sequence outputs" in proc.stdout + proc.stderr
