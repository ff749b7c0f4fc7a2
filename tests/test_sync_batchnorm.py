"""trainer.sync_batchnorm: dsp.nn.sync_batchnorm.SyncBatchNorm under two gloo ranks (CPU, where
torch.nn.SyncBatchNorm does not run) is nn.BatchNorm on the concatenated batch, and ddp training of a
network with BatchNorm (the UNet) matches one process only with it.

Tolerances (absolute, float32): the module against nn.BatchNorm on the concatenated batch 1e-5
(outputs, input and parameter gradients, running statistics; observed <= 1.9e-6, on inputs of mean
3 and spread 2); a 3-step ddp run of the UNet against one process 1e-5 on every parameter and
running statistic of last.pt (observed <= 6e-8), while without sync every running statistic is off
by more than that, the largest by more than 1e-3 (observed 7e-5 to 7e-3): the comparison can fail.
The run trains with plain SGD: Adam's first steps, lr·g/|g|, turn float noise in gradient
components near 0 into weight differences that say nothing about BatchNorm (observed: 9.5e-7 for
this run with Adam, 1.7e-5 for a 2-epoch variant).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import free_port
from dsp.errors import DspError
from dsp.nn.sync_batchnorm import SyncBatchNorm, batchnorm_layers, convert
from dsp.training import distributed

TESTS = Path(__file__).resolve().parent
MODULE_TOL, TRAIN_TOL = 1e-5, 1e-5

# (layer, global input shape, the two ranks' slice sizes, momentum, affine)
CASES = [
    ("1d", (8, 3), (5, 3), 0.1, True),
    ("1d", (6, 4, 7), (2, 4), None, True),  # [N, C, L]; momentum=None: cumulative average
    ("2d", (4, 3, 5, 6), (3, 1), 0.3, True),
    ("3d", (3, 2, 3, 4, 2), (1, 2), 0.1, False),
]
STEPS = 3


def _layer(kind: str, c: int, momentum, affine: bool) -> nn.Module:
    torch.manual_seed(1)
    bn = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}[kind](c, momentum=momentum, affine=affine)
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def _batch(shape, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(shape, generator=g) * 2 + 3  # a mean far from 0: statistics that can lose digits
    return x, torch.randn(shape, generator=g)  # (input, the output's weights in the loss)


def _run(layer: nn.Module, shape, lo: int, hi: int) -> dict:
    """STEPS training-mode steps on rows [lo, hi) of each batch, loss Σ out·w; then eval mode."""
    out = {"y": [], "dx": [], "dw": [], "db": [], "mean": [], "var": [], "count": []}
    for step in range(STEPS):
        x, w = _batch(shape, step)
        x = x[lo:hi].clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        (y * w[lo:hi]).sum().backward()
        out["y"].append(y.detach())
        out["dx"].append(x.grad)
        if layer.affine:
            out["dw"].append(layer.weight.grad.clone())
            out["db"].append(layer.bias.grad.clone())
        out["mean"].append(layer.running_mean.clone())
        out["var"].append(layer.running_var.clone())
        out["count"].append(int(layer.num_batches_tracked))
    layer.eval()
    with torch.no_grad():
        out["eval"] = layer(_batch(shape, STEPS)[0][lo:hi])
    layer.train()
    return out


def _module_rank(folder: str) -> None:
    """One rank of test_module_matches_batchnorm_on_the_concatenated_batch (RANK etc. set)."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo")
    rank = tdist.get_rank()
    results = []
    for kind, shape, sizes, momentum, affine in CASES:
        layer = convert(_layer(kind, shape[1], momentum, affine))
        assert isinstance(layer, SyncBatchNorm)
        lo = sum(sizes[:rank])
        got = _run(layer, shape, lo, lo + sizes[rank])
        for key in ("dw", "db"):  # the parameter gradients dsp's ddp sums over ranks
            for g in got[key]:
                tdist.all_reduce(g)
        results.append(got)
    torch.save(results, Path(folder) / f"rank{rank}.pt")
    tdist.barrier()
    tdist.destroy_process_group()


def _launch(target: str, *args: str, timeout: int = 120) -> None:
    """Run `target(*args)` of this file as ranks 0 and 1 of a gloo group (two processes; the first
    argument is a folder, which receives their output as rank<r>.log)."""
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.update(OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")])))
    code = f"import test_sync_batchnorm as t; t.{target}(*{list(args)!r})"
    logs = [open(Path(args[0]) / f"rank{r}.log", "w+") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=log, stderr=subprocess.STDOUT, text=True) for r, log in enumerate(logs)]
    try:  # a rank that fails leaves the other waiting in a collective: stop it then
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    for p, log in zip(procs, logs):
        log.seek(0)
        assert p.returncode == 0, log.read()[-3000:]
        log.close()


def _close(a: torch.Tensor, b: torch.Tensor, what) -> float:
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert a.shape == b.shape and err <= MODULE_TOL, (what, err)
    return err


def test_module_matches_batchnorm_on_the_concatenated_batch(tmp_path):
    _launch("_module_rank", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    worst = 0.0
    for case, (kind, shape, sizes, momentum, affine) in enumerate(CASES):
        want = _run(_layer(kind, shape[1], momentum, affine), shape, 0, shape[0])  # one process, whole batch
        a, b = ranks[0][case], ranks[1][case]
        for key in ("y", "dx", "eval"):
            pairs = zip(a[key], b[key]) if key != "eval" else [(a[key], b[key])]
            cat, ref = [torch.cat(pair) for pair in pairs], want[key] if key != "eval" else [want[key]]
            worst = max(worst, *(_close(g, w, (case, key)) for g, w in zip(cat, ref)))
        for key in ("dw", "db", "mean", "var"):  # every rank holds the global batch's
            for got in (a, b):
                worst = max(worst, 0.0, *(_close(g, w, (case, key)) for g, w in zip(got[key], want[key])))
        assert a["count"] == b["count"] == want["count"] == [1, 2, 3]
    print(f"largest difference to nn.BatchNorm: {worst:.2e}")


def test_convert_keeps_parameters_buffers_and_state_dict_keys():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    shared = nn.BatchNorm1d(5, momentum=None)
    holder = nn.ModuleDict({"net": net, "a": shared, "b": shared, "plain": nn.BatchNorm1d(3, affine=False)})
    holder["plain"].eval()
    params, buffers = list(holder.parameters()), list(holder.buffers())
    keys = list(holder.state_dict())
    assert len(batchnorm_layers(holder)) == 3
    assert convert(holder) is holder
    assert all(type(m) is SyncBatchNorm for m in (net[1], holder["a"], holder["plain"]))
    assert holder["a"] is holder["b"] and holder["a"].momentum is None and holder["a"].input_dims == (2, 3)
    assert not holder["plain"].training and holder["plain"].weight is None
    assert [id(p) for p in holder.parameters()] == [id(p) for p in params]
    assert [id(b) for b in holder.buffers()] == [id(b) for b in buffers]
    assert list(holder.state_dict()) == keys
    bn = nn.BatchNorm1d(5)
    plain = nn.ModuleDict({"net": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                                nn.LazyLinear(2)), "a": bn, "b": bn,
                           "plain": nn.BatchNorm1d(3, affine=False)})
    plain["net"](torch.zeros(1, 3, 5, 5))  # (the lazy layer takes its shape)
    holder["net"].eval()(torch.zeros(1, 3, 5, 5))
    plain.load_state_dict(holder.state_dict())  # checkpoints load both ways
    holder.load_state_dict(plain.state_dict())
    # one process (no process group): nn.BatchNorm's own forward, training and eval
    x = torch.randn(6, 5)
    ref = nn.BatchNorm1d(5, momentum=None)
    torch.testing.assert_close(holder["a"](x), ref(x))
    torch.testing.assert_close(holder["a"].running_var, ref.running_var)
    with pytest.raises(ValueError, match="2D or 3D"):
        holder["a"](torch.zeros(2, 5, 1, 1))
    assert type(convert(nn.BatchNorm3d(2))) is SyncBatchNorm  # a layer by itself comes back converted


def test_setting_is_checked_before_anything_loads():
    assert distributed.setup("single", "cpu", "auto").sync_batchnorm == "auto"
    assert distributed.setup("single", "cpu", False).sync_batchnorm is False
    assert distributed.sync_batchnorm_setting("TRUE") is True
    for bad in ("yes", None, 1):
        with pytest.raises(DspError, match=r"^trainer.sync_batchnorm=.*choose auto .*, true or false$"):
            distributed.setup("single", "cpu", bad)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert distributed.Single().prepare(model, 10, [4]) == 0 and type(model[1]) is nn.BatchNorm1d


class _TwoRanks(distributed.Distributed):
    """prepare's decisions without a process group."""

    def __init__(self, sync):
        self.rank, self.world_size, self.sync_batchnorm = 0, 2, sync


def test_prepare_converts_by_setting_and_refuses_a_rank_without_examples(capsys):
    def model():
        return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))

    for sync, want in (("auto", 1), (True, 1), (False, 0)):
        m = model()
        assert _TwoRanks(sync).prepare(m, 10, [4, 5]) == want  # last batches: 2 and 0 examples
        assert (type(m[1]) is SyncBatchNorm) == bool(want)
    assert _TwoRanks("auto").prepare(nn.Linear(2, 2), 9, [4]) == 0  # no BatchNorm: nothing to sync or refuse
    assert "1 BatchNorm layer(s)" in capsys.readouterr().out
    with pytest.raises(DspError, match=r"^trainer.sync_batchnorm=auto: the last batch of each epoch holds 1 of the 9 "
                                       r"training examples \(batch size 4\).*or trainer.sync_batchnorm=false$"):
        _TwoRanks("auto").prepare(model(), 9, [4])
    assert _TwoRanks(False).prepare(model(), 9, [4]) == 0


# ----------------------------------------------------------------------------- training
def _unet_overrides(root: Path, sync) -> list[str]:
    from fixtures_images import tiny_images_overrides

    # 13 training images in batches of 5, 5 and 3 (slices 3/2, 3/2, 2/1): 3 steps of plain SGD (see
    # the module docstring) in one epoch; no random augmentation or EMA, so that ddp and one process
    # see the same batches
    return ["experiment=unet_horses", *tiny_images_overrides(root, n=15), "trainer.batch_size=5",
            "trainer.max_epochs=1", "trainer.ema_decay=null", "data.augment.scale=0",
            "data.augment.rotate=0", "data.augment.translate=0", "data.warp_source_scale=1", "trainer.device=cpu",
            "trainer.optimizer=sgd", "trainer.lr=0.1", "trainer.momentum=0", f"trainer.sync_batchnorm={sync}"]


def _train(run: str, root: str, sync: str, strategy: str) -> None:
    from hydra import compose, initialize_config_dir

    from dsp.cli.common import config_dir
    from dsp.cli.train import train

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[*_unet_overrides(Path(root), sync), f"trainer.strategy={strategy}"])
    train(cfg, run)


def _train_rank(folder: str, root: str) -> None:
    """One rank: the same ddp run with and without sync, in one gloo group."""
    from torch import _dynamo  # noqa: F401  -- before the group (see Distributed.__init__)
    import torch.distributed as tdist

    tdist.init_process_group("gloo")
    try:
        for sync in ("true", "false"):
            _train(str(Path(folder) / sync), root, sync, "ddp")
    finally:
        tdist.barrier()
        tdist.destroy_process_group()


def test_ddp_unet_with_sync_batchnorm_trains_like_one_process(tmp_path):
    from fixtures_images import write_image_folder

    root = write_image_folder(tmp_path / "imgs", n=15)
    _launch("_train_rank", str(tmp_path), str(root), timeout=240)
    _train(str(tmp_path / "ref"), str(root), "auto", "single")
    want = torch.load(tmp_path / "ref" / "checkpoints" / "last.pt", weights_only=True)
    stats = [k for k in want["model"] if k.endswith(("running_mean", "running_var"))]
    assert want["step"] == 3 and len(stats) == 5 * 2 * 2  # 5 UNet blocks (depth 2) × 2 BatchNorm × 2 statistics
    worst = {}
    for sync in ("true", "false"):
        got = torch.load(tmp_path / sync / "checkpoints" / "last.pt", weights_only=True)
        assert got["step"] == 3 and got["model"].keys() == want["model"].keys()  # plain BatchNorm's keys
        worst[sync] = {k: (got["model"][k].double() - t.double()).abs().max().item() for k, t in want["model"].items()}
    assert max(worst["true"].values()) <= TRAIN_TOL, max(worst["true"].items(), key=lambda kv: kv[1])
    # without sync every running statistic is off, by up to 100 times the tolerance
    assert min(worst["false"][k] for k in stats) > TRAIN_TOL and max(worst["false"][k] for k in stats) > 1e-3
    print(f"sync: largest difference {max(worst['true'].values()):.2e}; "
          f"without: {max(worst['false'].values()):.2e}")
