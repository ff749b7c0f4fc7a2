"""One writer per run folder, and resumes that continue only what the checkpoint was trained with.

- `hold(run_dir)` takes an exclusive lock on the run folder for the life of the process: a
  second dsp-train (or a resume) into a held folder is refused at once. The kernel drops the lock
  when its process dies however it dies, so a killed run never leaves a lock that blocks its resume.
- `refuse_changed_resume(stored, new, checkpoint)` compares the config a checkpoint was trained
  with and the one a resume brings, and refuses a change to anything that alters what is trained,
  naming the keys. Only the settings in `MAY_CHANGE` may differ.
- `keep_record` / `restore_record`: Hydra rewrites `.hydra/` before a job's code runs; a launcher
  or sweeper whose jobs are only known once they start (Optuna) cannot be checked earlier, so the
  record of the last accepted start is kept and put back when such a resume is refused.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dsp.errors import DspError
from dsp.training.config_checks import trainer_defaults

LOCK_NAME = ".dsp.lock"
PREEMPTED = "preempted.json"  # checkpoints/preempted.json: the run stopped on a signal and has not finished
RECORD_FILES = ("config.yaml", "overrides.yaml", "hydra.yaml")
RECORD_COPY = "accepted"  # .hydra/accepted/: the record of the run's last accepted start

# Settings a resume may change: when to stop, where it runs, what it prints and where files live
# (logger: where scalars go; compile: how the same function is computed, not what).
MAY_CHANGE = ("trainer.max_epochs", "trainer.stage_epochs", "trainer.patience", "trainer.max_steps",
              "trainer.max_time_s", "trainer.stop_at", "trainer.device", "trainer.progress", "trainer.log_every",
              "trainer.eval_batch_size", "trainer.resume", "paths", "data.cache_dir", "logger", "trainer.compile")
STAGE_MAY_CHANGE = ("max_epochs", "patience")  # trainer.stages.<name>.<key>

_held: dict[Path, int] = {}  # run folder -> file descriptor holding its lock (this process's)


def _folder(run_dir) -> Path:
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise DspError(f"{run_dir} is a file, not a run folder; choose another hydra.run.dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DspError(f"cannot create the run folder {run_dir}: {err.strerror or err}; choose another "
                       f"hydra.run.dir (or DSP_OUTPUT_DIR) that you can write to") from None
    return run_dir.resolve()


def hold(run_dir) -> None:
    """Lock `run_dir` for this process (again: nothing happens); DspError if another process holds it.
    The lock is on the folder itself, so deleting files in it cannot let a second writer in;
    .dsp.lock only says who holds it."""
    folder = _folder(run_dir)
    if folder in _held:
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        raise DspError(f"cannot open the run folder {folder} ({err.strerror or err}); choose another "
                       f"hydra.run.dir that you can write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            try:
                holder = (folder / LOCK_NAME).read_text(errors="replace").strip()[:200] or "another process"
            except OSError:
                holder = "another process"
            raise DspError(f"{folder} is in use by another run ({holder}); wait for it to finish, or choose "
                           f"another hydra.run.dir") from None
        raise DspError(f"cannot lock the run folder {folder} ({err.strerror or err})") from None
    _held[folder] = fd
    try:  # who holds it, for the message a second run prints
        (folder / LOCK_NAME).write_text(f"pid {os.getpid()} on {os.uname().nodename}, "
                                        f"since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    except OSError as err:
        release(folder)
        raise DspError(f"cannot write into the run folder {folder} ({err.strerror or err}); choose another "
                       f"hydra.run.dir that you can write to") from None


def release(run_dir) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing drops the lock


def is_lock(path: Path) -> bool:
    return path.name == LOCK_NAME


# ------------------------------------------------------------------------- runs that continue
def requeued() -> bool:
    """Slurm requeued this job (scontrol requeue, a preemption with --requeue, submitit's requeue)."""
    return os.environ.get("SLURM_RESTART_COUNT", "0").strip() not in ("", "0")


def mark_preempted(run_dir, signal_name: str, step: int) -> None:
    from dsp.training.checkpoint import write_json  # (checkpoint imports nothing of this module)

    write_json({"signal": signal_name, "step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S")},
               Path(run_dir) / "checkpoints" / PREEMPTED)


def clear_preempted(run_dir) -> None:
    (Path(run_dir) / "checkpoints" / PREEMPTED).unlink(missing_ok=True)


def continues(run_dir) -> bool:
    """A start into `run_dir` continues the run there without trainer.resume=true: the run stopped
    on a preemption signal (SIGTERM, SIGUSR2) after saving and has not finished, or Slurm requeued
    this job. Whatever launcher starts the same job again (submitit's requeue, Slurm's, a shell
    loop), it resumes; its settings are checked as any resume's."""
    checkpoints = Path(run_dir) / "checkpoints"
    return (checkpoints / "last.pt").is_file() and ((checkpoints / PREEMPTED).is_file() or requeued())


# ------------------------------------------------------------------------------ resume checks
def _leaves(tree, prefix: str = ""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}{key}.")
        if not tree and prefix:
            yield prefix[:-1], {}
    else:
        yield prefix[:-1], tree


def resolved(cfg: DictConfig, dims: dict | None) -> dict:
    """A composed config as the trainer stores it: resolved, with the data's sizes as `dims`
    (taken from the checkpoint: they are only known once the data loads). A value that cannot be
    resolved outside a run stays as written."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    if dims is not None:
        cfg.dims = dims
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 -- e.g. ${hydra:...} outside a Hydra run: leaf by leaf below
        pass

    def walk(node, key: str):
        if isinstance(node, dict):
            return {k: walk(v, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{key}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            try:
                return OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
            except Exception:  # noqa: BLE001 -- compared as written
                return node
        return node

    return walk(OmegaConf.to_container(cfg, resolve=False), "")


def _same(key: str, old, new) -> bool:
    if old == new:
        return True
    # A data file that moved (another data folder, a node's local copy) is the same file by name.
    if isinstance(old, str) and isinstance(new, str) and key.startswith("data.") and os.sep in old and os.sep in new:
        return Path(old).name == Path(new).name and Path(old).name != ""
    return False


def may_change(key: str) -> bool:
    """A setting a resume may change (MAY_CHANGE, and each stage's max_epochs and patience)."""
    parts = key.split(".")
    return (any(key == k or key.startswith(k + ".") for k in MAY_CHANGE)
            or (len(parts) == 4 and parts[:2] == ["trainer", "stages"] and parts[3] in STAGE_MAY_CHANGE))


def _shipped_default(key: str):
    """The value conf/trainer/default.yaml gives a trainer key (a checkpoint from before the key
    existed was trained with it), or a marker when there is none."""
    name = key.removeprefix("trainer.")
    return trainer_defaults().get(name, _NONE) if key.startswith("trainer.") and "." not in name else _NONE


_NONE = object()


def changed_keys(stored: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, checkpoint's value, new value) of every setting that differs and may not change. A
    trainer key the checkpoint's config lacks counts as its shipped default."""
    old, now = dict(_leaves(stored)), dict(_leaves(new))
    missing = object()
    out = []
    for key in sorted(set(old) | set(now)):
        if key.startswith("hydra.") or may_change(key):
            continue
        a, b = old.get(key, missing), now.get(key, missing)
        if a is missing and _shipped_default(key) is not _NONE:
            a = _shipped_default(key)
        if not _same(key, a, b):
            out.append((key, "(absent)" if a is missing else a, "(absent)" if b is missing else b))
    return out


def refuse_changed_resume(stored: dict, new: dict, checkpoint: Path) -> None:
    changes = changed_keys(stored, new)
    if not changes:
        return
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:6]) + ("; ..." if len(changes) > 6 else "")
    raise DspError(
        f"cannot resume from {checkpoint}: {len(changes)} setting(s) differ from the ones it was trained with "
        f"({listed}). Resume with the run's own settings (a resume may change only {', '.join(MAY_CHANGE)}), "
        f"or start a new run, warm-started with trainer.init_from={checkpoint.parent.parent}")


# ----------------------------------------------------------------------------- the .hydra record
def keep_record(run_dir) -> None:
    """Copy the run's .hydra record (as this accepted start wrote it) to .hydra/accepted/."""
    record = Path(run_dir) / ".hydra"
    if not record.is_dir():
        return
    kept = record / RECORD_COPY
    kept.mkdir(exist_ok=True)
    for name in RECORD_FILES:
        if (record / name).is_file():
            tmp = kept / f".{name}.tmp"
            shutil.copyfile(record / name, tmp)
            os.replace(tmp, kept / name)


def restore_record(run_dir) -> bool:
    """Put the record of the last accepted start back (a refused resume must not leave its own)."""
    record = Path(run_dir) / ".hydra"
    kept = record / RECORD_COPY
    if not kept.is_dir():
        return False
    for name in RECORD_FILES:
        if (kept / name).is_file():
            tmp = record / f".{name}.tmp"
            shutil.copyfile(kept / name, tmp)
            os.replace(tmp, record / name)
    return True
