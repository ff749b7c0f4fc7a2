"""trainer.precision (autocast training steps, fp32 inference recursions and evaluation) and
trainer.compile (compiled model parts, eager fallback with one warning line)."""
from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import write_ocr
from dsp.cli.common import config_dir
from dsp.cli.train import train
from dsp.errors import DspError
from dsp.inference import cg, chain, mean_field, message_passing
from dsp.inference.region_graph import build_graph
from dsp.training import compiling
from dsp.training.checkpoint import load_checkpoint
from dsp.training.config_checks import check_trainer
from dsp.training.precision import Precision

TINY = ["data.num_train=32", "data.num_val=16", "data.num_test=16", "trainer.progress=false", "trainer.batch_size=16"]
# the smallest model: the 3-layer MLP baseline, one stage, one epoch
SMALLEST = ["experiment=mlp_synthetic", *TINY, "trainer.max_epochs=1", "trainer.eval_batch_size=16"]


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides))


class DtypeSpy:
    """Records the output dtype of every nn.Linear call, split by grad mode (training steps run with
    gradients, validation and evaluation without)."""

    def __init__(self):
        self.train, self.no_grad = set(), set()

    def __enter__(self):
        def hook(module, args, out):
            if isinstance(module, torch.nn.Linear) and isinstance(out, torch.Tensor):
                (self.train if torch.is_grad_enabled() else self.no_grad).add(out.dtype)

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def finite(metrics, monitor):
    return all(math.isfinite(metrics[k]) for k in (f"val/{monitor}", f"test/{monitor}", "train/time_s"))


def test_bf16_training_ends_with_finite_metrics_on_a_spen_and_a_chain_crf(tmp_path):
    spen = compose_cfg("experiment=spen_synthetic", *TINY, "trainer.max_epochs=1", "inference.max_iter=5",
                       "inference.predict.max_iter=10", "inference.predict.restarts=0", "trainer.precision=bf16")
    with DtypeSpy() as spy:
        metrics = train(spen, tmp_path / "spen")
    assert finite(metrics, metrics.monitor)
    assert torch.bfloat16 in spy.train  # the training steps ran under autocast
    assert spy.no_grad == {torch.float32}  # validation and the final evaluation did not
    ocr = write_ocr(tmp_path / "ocr" / "letter.data.gz")
    crf = compose_cfg("experiment=crf_ocr_joint", f"data.path={ocr}", "trainer.max_epochs=2", "trainer.progress=false",
                      "trainer.batch_size=8", "trainer.precision=bf16")
    metrics = train(crf, tmp_path / "crf")
    assert finite(metrics, "char_acc") and 0 <= metrics["test/char_acc"] <= 100


def test_the_chain_crf_recursions_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    B, T, K = 16, 14, 26
    unary, pairwise = 3 * torch.randn(B, T, K), torch.randn(K, K)
    lengths = torch.randint(1, T + 1, (B,))
    labels = torch.randint(0, K, (B, T)).masked_fill(~chain.mask_from_lengths(lengths, T), -1)
    logz, marg = chain.log_partition(unary, pairwise, lengths), chain.marginals(unary, pairwise, lengths)
    path, score = chain.viterbi(unary, pairwise, lengths)
    nll = chain.nll(labels, unary, pairwise, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logz_bf16 = chain.log_partition(unary, pairwise, lengths)
        marg_bf16 = chain.marginals(unary, pairwise, lengths)
        path_bf16, score_bf16 = chain.viterbi(unary, pairwise, lengths)
        nll_bf16 = chain.nll(labels, unary, pairwise, lengths)
        unkept = chain.log_partition.__wrapped__(unary, pairwise, lengths)  # the recursion without the fp32 region
    assert logz_bf16.dtype == marg_bf16.dtype == torch.float32
    assert (logz_bf16 - logz).abs().max() <= 1e-5 and (nll_bf16 - nll).abs().max() <= 1e-5
    assert (marg_bf16 - marg).abs().max() <= 1e-6
    assert torch.equal(path_bf16, path) and (score_bf16 - score).abs().max() <= 1e-5
    assert (unkept - logz).abs().max() > 1e-4  # what bfloat16 matrix products would have done
    # half-precision inputs (a bf16 network's unaries) are computed with in float32, gradients flow back
    u16 = unary.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chain.log_partition(u16, pairwise, lengths)
    out.sum().backward()
    assert out.dtype == torch.float32 and u16.grad.dtype == torch.bfloat16
    assert (out - chain.log_partition(u16.detach().float(), pairwise, lengths)).abs().max() <= 1e-5
    # float64 inputs (the brute-force tests') are left in float64
    assert chain.log_partition(unary.double(), pairwise.double(), lengths).dtype == torch.float64


def test_mean_field_cg_and_message_passing_stay_float32_under_bf16_autocast():
    torch.manual_seed(1)
    unary, pairwise, lengths = torch.randn(4, 6, 5), torch.randn(5, 5), torch.tensor([6, 4, 2, 1])
    emb = torch.randn(3, 40, 4)
    u = torch.randn(3, 40)
    graph = build_graph(6, "chain")
    pot = message_passing.MRFPotentials(torch.randn(2, 6, 3), [torch.randn(2, graph.groups[0].size, 3, 3)], graph)
    counts = message_passing.CountingNumbers.make(graph)

    def run():
        lam = message_passing.sweep(pot, message_passing.zero_messages(pot), counts, 3)
        return (mean_field.mean_field_marginals(unary, pairwise, lengths, sweeps=3),
                cg.gcrf_solve(u, emb, lam=0.5)[0], message_passing.dual(pot, lam, counts))

    reference = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = run()
    for ref, out in zip(reference, under_autocast):
        assert out.dtype == torch.float32 and (out - ref).abs().max() <= 1e-5


def test_fp16_trains_with_a_gradient_scaler_and_checkpoints_its_state(tmp_path):
    precision = Precision("fp16", torch.device("cpu"))
    assert precision.scaler is not None and precision.scaler.is_enabled()
    metrics = train(compose_cfg(*SMALLEST, "trainer.precision=fp16", "trainer.grad_clip=1.0"), tmp_path / "run")
    assert finite(metrics, metrics.monitor)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["grad_scaler"]["scale"] > 0  # a resume continues the scale
    assert Precision("fp32", torch.device("cpu")).state_dict() == {} == Precision("bf16", torch.device("cpu")).state_dict()


def test_fp16_is_refused_in_one_line_where_torch_cannot_autocast_it(monkeypatch):
    from dsp.training import precision

    monkeypatch.setattr(precision, "_autocast_works", lambda device_type, dtype: False)
    with pytest.raises(DspError, match=r"^trainer.precision=fp16: torch .* has no torch.float16 autocast on the cpu "
                                       r"device; use bf16 or fp32 here$"):
        Precision("fp16", torch.device("cpu"))


@pytest.mark.parametrize("override, message", [
    ("trainer.precision=fp64", "trainer.precision='fp64': choose fp32, bf16, fp16"),
    ("trainer.precision=16", "trainer.precision=16: choose fp32, bf16, fp16"),
    ("trainer.compile=yes", "trainer.compile='yes': give true, false, or a torch.compile backend"),
    ("trainer.compile=1", "trainer.compile=1: give true, false"),
])
def test_a_bad_precision_or_compile_value_is_refused_by_name(override, message):
    with pytest.raises(DspError) as err:
        check_trainer(compose_cfg(override).trainer)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_compile_true_trains_the_smallest_model(tmp_path, capfd):
    metrics = train(compose_cfg(*SMALLEST, "trainer.compile=true"), tmp_path / "run")
    assert finite(metrics, metrics.monitor)
    err = capfd.readouterr().err
    if compiling._cxx_compiler() is None:  # the fallback says why
        assert "warning: trainer.compile: no C++ compiler" in err
    else:
        assert "warning: trainer.compile" not in err
        from torch._dynamo.utils import counters

        assert counters["stats"]["unique_graphs"] > 0  # something was compiled


def test_a_part_that_fails_to_compile_falls_back_to_eager_with_one_warning(tmp_path, capfd, monkeypatch):
    def failing(fn, backend=None):
        def call(*args, **kwargs):
            raise RuntimeError("cannot compile this\nsecond line of the cause")
        return call

    monkeypatch.setattr(compiling.torch, "compile", failing)
    metrics = train(compose_cfg(*SMALLEST, "trainer.compile=true"), tmp_path / "run")
    assert finite(metrics, metrics.monitor)
    warnings = [line for line in capfd.readouterr().err.splitlines() if "trainer.compile" in line]
    assert warnings == ["warning: trainer.compile: MLP.forward failed under torch.compile (RuntimeError: cannot "
                        "compile this); running feature_net, local_energy eagerly"]


def test_a_backward_that_fails_compiled_repeats_the_step_eagerly(tmp_path, capfd, monkeypatch):
    """E.g. a double backward through a compiled graph: the error comes from loss.backward()."""

    class Fails(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("compiled backward cannot do this")

    monkeypatch.setattr(compiling.torch, "compile", lambda fn, backend=None: lambda *a, **k: Fails.apply(fn(*a, **k)))
    metrics = train(compose_cfg(*SMALLEST, "trainer.compile=true"), tmp_path / "run")
    assert finite(metrics, metrics.monitor)
    warnings = [line for line in capfd.readouterr().err.splitlines() if "trainer.compile" in line]
    assert warnings == ["warning: trainer.compile: a training step failed under torch.compile (RuntimeError: "
                        "compiled backward cannot do this); running feature_net, local_energy eagerly"]


def test_without_a_cxx_compiler_compile_says_so_and_trains_eagerly(capfd, monkeypatch):
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    model = torch.nn.Sequential()
    model.add_module("net", torch.nn.Linear(2, 2))
    compiled = compiling.Compiled(model, True, torch.device("cpu"))
    assert not compiled.active and type(model.net) is torch.nn.Linear
    assert capfd.readouterr().err == ("warning: trainer.compile: no C++ compiler (g++, c++ or clang++; or $CXX) on "
                                      "PATH, which torch.compile needs for the CPU; training eagerly\n")


def test_a_compiled_part_keeps_its_names_state_and_copies():
    import copy

    model = torch.nn.Sequential()
    model.add_module("net", torch.nn.Linear(3, 2))
    keys = list(model.state_dict())
    compiled = compiling.Compiled(model, "eager", torch.device("cpu"))
    assert compiled.parts == ["net"] and isinstance(model.net, torch.nn.Linear) and type(model.net).__name__ == "Linear"
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(model)  # (the weight average's copy) computes with its own weights
    with torch.no_grad():
        twin.net.weight.zero_()
        twin.net.bias.zero_()
    x = torch.randn(4, 3)
    assert torch.equal(twin.net(x), torch.zeros(4, 2)) and not torch.equal(model.net(x), torch.zeros(4, 2))
    assert compiled.revert(RuntimeError("x"), "test") and type(model.net) is torch.nn.Linear
