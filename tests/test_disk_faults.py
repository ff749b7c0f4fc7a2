"""Disk faults are one clear line: a full disk, a read-only folder or a run folder that is a file
is a DspError naming the path and the cause, leaves no temporary file, damages nothing already
written, and the run goes on once space is back. The faults are simulated (a writer that fails
part-way, a disk_usage reporting little space); /dev/full gives a real ENOSPC where it exists.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from collections import namedtuple
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dsp.data import cache, hdf5_stream
from dsp.data.cache import cached_arrays
from dsp.data.hdf5_stream import PrefetchBatches, write_splits_h5
from dsp.errors import DiskError, DspError
from dsp.training import checkpoint
from dsp.training.checkpoint import RESUME_KEYS, load_latest, save_checkpoint, write_json

ROOT = os.geteuid() == 0  # chmod denies nothing to root
Usage = namedtuple("Usage", "total used free")
real_disk_usage = shutil.disk_usage


def little_space(monkeypatch, free=1 << 20):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1 << 40, (1 << 40) - free, free))


def failing_save(monkeypatch, error):
    """torch.save writes part of the file, then the disk refuses the rest."""
    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise error
    monkeypatch.setattr(torch, "save", save)


def run_with_checkpoints(tmp_path) -> tuple[Path, dict[str, bytes]]:
    ckpt = tmp_path / "run" / "checkpoints"
    for epoch in (1, 2):
        save_checkpoint({"model": {}, "config": {}, "epoch": epoch}, ckpt / "last.pt", keep_previous=True)
    save_checkpoint({"model": {}, "config": {}, "epoch": 1}, ckpt / "best.pt")
    write_json({"val/f1": 1.0}, tmp_path / "run" / "metrics.json")
    return ckpt, snapshot(tmp_path / "run")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("error, cause", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "no space is left on the disk"),
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "the disk quota is exceeded"),
    (RuntimeError("basic_ios::clear: iostream error"), "the disk is full"),  # torch's C++ writer: no errno
])
def test_a_full_disk_while_saving_names_the_file_the_cause_and_the_free_space(tmp_path, monkeypatch, error, cause):
    ckpt, before = run_with_checkpoints(tmp_path)
    failing_save(monkeypatch, error)
    little_space(monkeypatch, free=3 << 20)
    with pytest.raises(DspError) as raised:
        save_checkpoint({"model": {}, "config": {}, "epoch": 3}, ckpt / "last.pt", keep_previous=True)
    message = str(raised.value)
    assert str(ckpt / "last.pt") in message and cause in message and "3.0 MiB free" in message
    assert "\n" not in message and "trainer.resume=true" in message
    assert isinstance(raised.value, OSError)  # callers that handle failed writes still do
    assert snapshot(tmp_path / "run") == before  # no temporary file, last/last.prev/best/metrics intact

    monkeypatch.undo()  # space is back: the run saves (and rotates) as before
    save_checkpoint({"model": {}, "config": {}, "epoch": 3}, ckpt / "last.pt", keep_previous=True)
    assert checkpoint.load_checkpoint(ckpt / "last.pt")["epoch"] == 3
    assert (ckpt / "last.prev.pt").read_bytes() == before["checkpoints/last.pt"]


def test_a_write_error_with_room_left_is_reported_as_it_is(tmp_path, monkeypatch):
    ckpt, before = run_with_checkpoints(tmp_path)
    failing_save(monkeypatch, OSError(errno.EIO, os.strerror(errno.EIO)))
    with pytest.raises(DspError, match=r"last\.pt: Input/output error with .* free in .*check the disk"):
        save_checkpoint({"model": {}, "config": {}, "epoch": 3}, ckpt / "last.pt", keep_previous=True)
    assert snapshot(tmp_path / "run") == before


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_torch_save_through_a_python_file_reports_the_real_errno():
    """Why save_checkpoint opens the file itself: torch's path writer says only 'unexpected pos'."""
    with pytest.raises(OSError) as raised:
        checkpoint._torch_save({"w": torch.zeros(1000)}, Path("/dev/full"))
    assert raised.value.errno == errno.ENOSPC


@pytest.mark.parametrize("code, cause", [(errno.EROFS, "read-only file system"), (errno.EACCES, "not writable")])
def test_a_read_only_run_folder_is_named(tmp_path, monkeypatch, code, cause):
    ckpt, before = run_with_checkpoints(tmp_path)
    failing_save(monkeypatch, OSError(code, os.strerror(code)))
    with pytest.raises(DspError, match=re.escape(f"cannot write {ckpt / 'last.pt'}: {ckpt} ") + f".*{cause}"):
        save_checkpoint({"model": {}, "config": {}, "epoch": 3}, ckpt / "last.pt", keep_previous=True)
    assert snapshot(tmp_path / "run") == before


@pytest.mark.skipif(ROOT, reason="chmod denies nothing to root (the simulated case above covers it)")
def test_a_really_read_only_run_folder_is_named(tmp_path):
    ckpt, before = run_with_checkpoints(tmp_path)
    ckpt.chmod(0o555)
    try:
        with pytest.raises(DspError, match=re.escape(f"{ckpt} is not writable")):
            save_checkpoint({"model": {}, "config": {}, "epoch": 3}, ckpt / "last.pt", keep_previous=True)
        with pytest.raises(DspError, match="not writable"):
            save_checkpoint({"model": {}, "config": {}}, ckpt / "sub" / "x.pt")  # the mkdir fails
    finally:
        ckpt.chmod(0o755)
    assert snapshot(tmp_path / "run") == before


def test_a_run_folder_that_is_a_file_is_named(tmp_path):
    run = tmp_path / "run"
    run.write_text("not a folder")
    for write in (lambda: save_checkpoint({"model": {}, "config": {}}, run / "checkpoints" / "last.pt"),
                  lambda: write_json({}, run / "metrics.json")):
        with pytest.raises(DspError, match=re.escape(f"{run} is a file, not a folder")):
            write()
    run.unlink()
    run.mkdir()
    (run / "checkpoints").write_text("")  # checkpoints/ a file: mkdir's EEXIST
    with pytest.raises(DspError, match=re.escape(f"{run / 'checkpoints'} is a file, not a folder")):
        save_checkpoint({"model": {}, "config": {}}, run / "checkpoints" / "last.pt")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


# ---------------------------------------------------------------------------------- resume
def test_a_last_checkpoint_without_what_resume_needs_falls_back_to_the_previous_one(tmp_path, capsys):
    full = {key: 0 for key in RESUME_KEYS} | {"model": {}, "config": {}}
    save_checkpoint(full | {"epoch": 1}, tmp_path / "last.pt", keep_previous=True)
    save_checkpoint({k: v for k, v in full.items() if k != "optimizer"} | {"epoch": 2}, tmp_path / "last.pt",
                    keep_previous=True)
    state, found = load_latest(tmp_path, require=RESUME_KEYS)
    assert found == tmp_path / "last.prev.pt" and state["epoch"] == 1
    err = capsys.readouterr().err
    assert "warning:" in err and "last.pt is unreadable (no optimizer inside)" in err

    save_checkpoint({"model": {}, "config": {}}, tmp_path / "last.pt", keep_previous=True)  # both lack keys now
    with pytest.raises(DspError, match=r"neither .*last\.pt nor .*last\.prev\.pt.*no optimizer"):
        load_latest(tmp_path, require=RESUME_KEYS)
    assert load_latest(tmp_path)[1] == tmp_path / "last.pt"  # without `require`: as before


def test_training_stopped_by_a_full_disk_resumes_once_space_is_back(tmp_path, monkeypatch):
    """End to end: the second last.pt hits a full disk; the run stops with one line; nothing the run
    wrote is damaged; with space back, trainer.resume=true finishes it. RESUME_KEYS are what the
    trainer writes."""
    from hydra import compose, initialize_config_dir

    from dsp.cli.common import config_dir
    from dsp.cli.train import train

    def cfg(resume: bool):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("config", overrides=[
                "data.num_train=32", "data.num_val=16", "data.num_test=16", "trainer=default",
                "trainer.max_epochs=2", "trainer.progress=false", "inference.max_iter=3",
                "trainer.batch_size=16", f"trainer.resume={str(resume).lower()}"])

    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        saves.append(Path(f.name).name)
        if saves.count(".last.pt.tmp%d" % os.getpid()) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(DspError, match=re.escape(f"cannot write {run / 'checkpoints' / 'last.pt'}: no space is left")):
        train(cfg(False), run)
    ckpt = run / "checkpoints"
    before = snapshot(ckpt)
    assert set(before) <= {"best.pt", "last.pt", "last.prev.pt"} and "last.pt" in before  # no temporary file
    assert checkpoint.load_latest(ckpt, require=RESUME_KEYS)[1] == ckpt / "last.pt"

    monkeypatch.setattr(torch, "save", real_save)
    metrics = train(cfg(True), run)
    assert metrics["train/epochs"] == 2 and (run / "metrics.json").is_file()


# ------------------------------------------------------------------------------ HDF5 cache
def parsed(path):
    return np.arange(12, dtype=np.float64).reshape(3, 4), ["a", "b", "c", "d"]


def counting(parse, calls):
    def wrapped(path):
        calls.append(path)
        return parse(path)
    return wrapped


def h5_writes(monkeypatch) -> list[str]:
    """Record every h5py.File opened for writing by the cache and the stream writer."""
    opened, real = [], h5py.File

    def File(name, mode="r", *args, **kwargs):
        if mode != "r":
            opened.append(str(name))
        return real(name, mode, *args, **kwargs)
    for module in (cache, hdf5_stream):
        monkeypatch.setattr(module.h5py, "File", File)
    return opened


def test_the_cache_skips_a_nearly_full_disk_without_opening_h5py(tmp_path, monkeypatch, capsys):
    source, folder = tmp_path / "data.arff", tmp_path / "cache"
    source.write_text("x")
    opened = h5_writes(monkeypatch)
    little_space(monkeypatch)
    mat, names = cached_arrays(source, parsed, folder)
    assert names == ["a", "b", "c", "d"] and mat.shape == (3, 4)
    assert opened == [] and list(folder.iterdir()) == []
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: not caching data.arff in") and str(folder) in err and "1.0 MiB free" in err
    assert "\n" not in err

    monkeypatch.setattr(shutil, "disk_usage", real_disk_usage)  # space is back: the entry is written
    cached_arrays(source, parsed, folder)
    calls = []
    mat, names = cached_arrays(source, counting(parsed, calls), folder)
    assert calls == [] and names == ["a", "b", "c", "d"] and len(opened) == 1
    assert [p.suffix for p in folder.iterdir()] == [".h5"]


def test_a_cache_write_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    source, folder = tmp_path / "data.arff", tmp_path / "cache"
    source.write_text("x")

    def File(name, mode="r", *args, **kwargs):
        Path(name).write_bytes(b"\x89HDF partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(cache.h5py, "File", File)
    assert cached_arrays(source, parsed, folder)[1] == ["a", "b", "c", "d"]
    assert list(folder.iterdir()) == []
    assert "warning: not caching data.arff" in capsys.readouterr().err


def test_a_read_only_cache_folder_is_skipped_quietly(tmp_path, capsys):
    source, folder = tmp_path / "data.arff", tmp_path / "cache"
    source.write_text("x")
    if ROOT:
        folder.write_text("a file where the cache folder should be")
    else:
        folder.mkdir()
        folder.chmod(0o555)
    try:
        assert cached_arrays(source, parsed, folder)[1] == ["a", "b", "c", "d"]
    finally:
        if not ROOT:
            folder.chmod(0o755)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("matrix, names", [
    (np.arange(12.0), [b"a", b"b", b"c", b"d"]),  # one axis
    (np.zeros((3, 4)), [b"a", b"b"]),  # fewer names than columns
    (np.zeros((3, 4)), b"abcd"),  # names a scalar
])
def test_a_cache_entry_of_the_wrong_shape_is_parsed_again_and_replaced(tmp_path, matrix, names):
    source, folder = tmp_path / "data.arff", tmp_path / "cache"
    source.write_text("x")
    cached_arrays(source, parsed, folder)
    [entry] = folder.iterdir()
    with h5py.File(entry, "w") as f:
        f.create_dataset("matrix", data=matrix)
        f.create_dataset("names", data=names)
    calls = []
    mat, got = cached_arrays(source, counting(parsed, calls), folder)
    assert len(calls) == 1 and mat.shape == (3, 4) and got == ["a", "b", "c", "d"]
    calls.clear()
    assert cached_arrays(source, counting(parsed, calls), folder)[1] == got and calls == []  # overwritten


# --------------------------------------------------------------------------- HDF5 splits
def test_writing_splits_to_a_nearly_full_disk_stops_before_h5py(tmp_path, monkeypatch):
    opened = h5_writes(monkeypatch)
    little_space(monkeypatch)
    path = tmp_path / "run" / "data.h5"
    with pytest.raises(DiskError, match=re.escape(f"cannot write {path}: 1.0 MiB free in {path.parent}")):
        write_splits_h5(path, {"train": {"x": np.zeros((10, 3)), "y": np.zeros(10)}})
    assert opened == [] and list(path.parent.iterdir()) == []

    monkeypatch.setattr(shutil, "disk_usage", real_disk_usage)
    write_splits_h5(path, {"train": {"x": np.zeros((10, 3)), "y": np.zeros(10)}})
    assert [p.name for p in path.parent.iterdir()] == ["data.h5"]


def test_writing_splits_into_a_file_names_it(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(DspError, match=re.escape(f"{tmp_path / 'run'} is a file, not a folder")):
        write_splits_h5(tmp_path / "run" / "data.h5", {"train": {"x": np.zeros((2, 1)), "y": np.zeros(2)}})


@pytest.mark.parametrize("x, y, found", [
    (np.float32(1.0), np.zeros(3), r"/train/x should be an array of shape \[examples, \.\.\.\], found shape \(\)"),
    (np.zeros((3, 2)), np.zeros((4, 1)), r"/train/y should hold one row per example .*shape \[3, \.\.\.\], "
                                         r"found shape \(4, 1\)"),
])
def test_a_splits_file_of_the_wrong_shape_names_the_file_and_the_dataset(tmp_path, x, y, found):
    path = tmp_path / "user.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("train/x", data=x)
        f.create_dataset("train/y", data=y)
    with pytest.raises(DspError, match=re.escape(f"HDF5 file {path}: dataset ") + found):
        PrefetchBatches(path, "train", [0], 1)
