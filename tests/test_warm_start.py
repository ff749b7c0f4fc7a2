"""trainer.init_from: weights (all, or named parts) copied from an earlier checkpoint, with clear
errors for a missing file, unknown parts or another architecture; the stage-reuse flow end to end."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dsp.errors import DspError
from dsp.training.warm_start import warm_start


class TwoParts(nn.Module):
    def __init__(self, width=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.unary_net = nn.Linear(3, width)
        self.pairwise = nn.Linear(width, width)


def saved(tmp_path, model, name="ckpt.pt"):
    path = tmp_path / name
    torch.save({"model": model.state_dict(), "config": {}}, path)
    return path


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_copies_every_weight_or_only_the_named_parts(tmp_path):
    source = TwoParts(seed=1)
    path = saved(tmp_path, source)
    target = TwoParts(seed=2)
    assert warm_start(target, path) == (path, 4) and same(target, source)
    target = TwoParts(seed=2)
    before = TwoParts(seed=2)
    assert warm_start(target, path, ["unary_net"])[1] == 2
    assert same(target.unary_net, source.unary_net) and same(target.pairwise, before.pairwise)


def test_a_run_folder_means_its_best_checkpoint(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    source = TwoParts(seed=1)
    saved(tmp_path / "run" / "checkpoints", source, "best.pt")
    target = TwoParts(seed=2)
    warm_start(target, tmp_path / "run")
    assert same(target, source)


def test_bad_sources_are_refused_and_leave_the_model_untouched(tmp_path):
    target, before = TwoParts(seed=2), TwoParts(seed=2)
    with pytest.raises(DspError, match="no checkpoint there"):
        warm_start(target, tmp_path / "nowhere")
    with pytest.raises(DspError, match=r"other shapes: unary_net.weight \(5, 3\) vs \(4, 3\)"):
        warm_start(target, saved(tmp_path, TwoParts(width=5)))
    with pytest.raises(DspError, match="does not have"):
        warm_start(target, saved(tmp_path, TwoParts()), ["unaries"])
    partial = saved(tmp_path, nn.ModuleDict({"unary_net": nn.Linear(3, 4)}), "partial.pt")
    with pytest.raises(DspError, match="lacks pairwise.weight"):
        warm_start(target, partial)
    assert same(target, before)
    warm_start(target, partial, ["unary_net"])  # the part it has is enough when only that is asked for


def test_stage_training_reuses_another_runs_unary_stage(tmp_path):
    from test_cli import QUICK_CRF, run_cli
    from conftest import write_ocr

    data = write_ocr(tmp_path / "ocr" / "letter.data.gz")
    first = tmp_path / "stage_ce"
    proc = run_cli("dsp-train", "experiment=crf_ocr_stage", f"data.path={data}", *QUICK_CRF, f"hydra.run.dir={first}")
    assert proc.returncode == 0, proc.stderr
    second = tmp_path / "stage_nll"
    proc = run_cli("dsp-train", "experiment=crf_ocr_stage", "objective=crf_nll", f"data.path={data}", *QUICK_CRF,
                   f"trainer.init_from={first}", "trainer.init_parts=[unary_net]", "trainer.stages.unary=null",
                   f"hydra.run.dir={second}")
    assert proc.returncode == 0, proc.stderr
    assert "warm start:" in proc.stdout and "stage unary:" not in proc.stdout and "stage pairwise:" in proc.stdout
    assert (second / "metrics.json").is_file()
    proc = run_cli("dsp-train", "experiment=crf_ocr_stage", f"data.path={data}", *QUICK_CRF,
                   f"trainer.init_from={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'bad'}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no checkpoint there" in proc.stdout + proc.stderr
