"""Start-up checks of the trainer's settings, so that a mistyped number is refused by its key
before any data is loaded instead of failing as a Python error deep in training (or after a
whole epoch, as a bad multi-label threshold would)."""
from __future__ import annotations

import difflib
import functools
import math
import re
from importlib import resources

from omegaconf import DictConfig, OmegaConf

from dsp.errors import DspError
from dsp.training.compiling import check_compile
from dsp.training.precision import check_precision
from dsp.schema import Seed, check_settings, check_value  # noqa: F401 -- check_settings: the run's other settings

# key: (kind, lower bound, whether the bound itself is allowed, whether null is allowed)
_NUMBERS = {
    "batch_size": ("int", 1, True, False),
    "eval_batch_size": ("int", 1, True, False),
    "stage_epochs": ("int", 1, True, False),
    "max_epochs": ("int", 1, True, True),
    "max_steps": ("int", 1, True, True),
    "patience": ("int", 0, True, False),
    "lr_patience": ("int", 0, True, False),
    "log_every": ("int", 1, True, False),
    "probe_every": ("int", 0, True, False),
    "probe_size": ("int", 1, True, False),
    "lr": ("float", 0.0, False, False),
    "momentum": ("float", 0.0, True, False),
    "weight_decay": ("float", 0.0, True, False),
    "lr_factor": ("float", 0.0, False, False),
    "min_delta": ("float", 0.0, True, False),
    "grad_clip": ("float", 0.0, False, True),
    "stop_at": ("float", -math.inf, False, True),
    "max_time_s": ("float", 0.0, False, True),
}
_AUTO = ("batch_size",)  # may also be `auto` (dsp.training.stages.auto_batch_size)
# The keys a stage may set for itself (null there means "the trainer's value").
_STAGE_NUMBERS = ("lr", "momentum", "weight_decay", "max_epochs", "patience", "batch_size", "lr_factor", "lr_patience")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_number(where: str, value, kind: str, low: float, inclusive: bool, nullable: bool = False) -> None:
    """Refuse `value` unless it is a number (`kind` int: a whole one) at or above (inclusive) or above
    `low`, or null where `nullable`; the error names `where`."""
    if value is None:
        if nullable:
            return
        raise DspError(f"{where} is null: give a number")
    # bool is an int to Python, and "1e-3" can reach here as a string from a YAML file.
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    what = "a whole number" if kind == "int" else "a number"
    if number is None or not math.isfinite(number):
        raise DspError(f"{where}={value!r}: give {what}")
    if kind == "int" and number != int(number):
        raise DspError(f"{where}={value!r}: give a whole number")
    bound = f"at least {low:g}" if inclusive else f"above {low:g}"
    if number < low or (number == low and not inclusive):
        raise DspError(f"{where}={value!r}: give {what} {bound}")


@functools.cache
def trainer_defaults() -> dict:
    """The trainer's settings and their shipped values (conf/trainer/default.yaml)."""
    return OmegaConf.to_container(OmegaConf.load(resources.files("dsp.conf") / "trainer" / "default.yaml"))


def _trainer_keys() -> frozenset[str]:
    """The trainer's settings: the keys of the shipped conf/trainer/default.yaml."""
    return frozenset(trainer_defaults())


def check_trainer(trainer: DictConfig) -> None:
    """Refuse unknown trainer settings (a key added with +trainer.… that nothing reads) and settings
    of the wrong type or range, naming the key and what it takes."""
    for key in trainer:
        if key not in _trainer_keys():
            close = difflib.get_close_matches(str(key), sorted(_trainer_keys()), n=1)
            hint = f" (did you mean trainer.{close[0]}?)" if close else ""
            raise DspError(f"trainer.{key} is not a trainer setting{hint}; conf/trainer/default.yaml lists them")
    for key, spec in _NUMBERS.items():
        if key in trainer and not (key in _AUTO and trainer[key] == "auto"):
            check_number(f"trainer.{key}", trainer[key], *spec)
    ema = trainer.get("ema_decay")
    if ema is not None:
        check_number("trainer.ema_decay", ema, "float", 0.0, False, False)
        if float(ema) >= 1:
            raise DspError(f"trainer.ema_decay={ema!r}: give a number between 0 and 1 (e.g. 0.999), or null")
    threshold = trainer.get("threshold", "tune")
    if threshold != "tune":
        try:
            check_number("trainer.threshold", threshold, "float", 0.0, True, False)
            if float(threshold) > 1:
                raise DspError("above 1")
        except DspError:
            raise DspError(f"trainer.threshold={threshold!r}: give tune (chosen on validation data) "
                           f"or a number between 0 and 1") from None
    if "precision" in trainer:  # (device-dependent support is checked when the trainer starts)
        check_precision(trainer.precision)
    if "compile" in trainer:
        check_compile(trainer.get("compile"))
    device = str(trainer.get("device", "auto"))
    if not _DEVICE.match(device):
        raise DspError(f"trainer.device={device!r}: choose auto, cpu, cuda or cuda:N")
    for name, stage in (trainer.get("stages") or {}).items():
        if stage is None:
            continue
        for key in _STAGE_NUMBERS:
            if stage.get(key) is not None and not (key in _AUTO and stage[key] == "auto"):
                kind, low, inclusive, _ = _NUMBERS[key]
                check_number(f"trainer.stages.{name}.{key}", stage[key], kind, low, inclusive, True)


def check_seed(seed) -> None:
    """A seed numpy accepts: a whole number from 0 to 2**32 - 1."""
    check_value("seed", seed, Seed)
