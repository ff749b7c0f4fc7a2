"""What both entrypoints share: where the configs live, and turning user errors into one line."""
from __future__ import annotations

import argparse
import functools
import sys
from importlib import resources

from omegaconf.errors import OmegaConfBaseException

from dsp.errors import DspError


def config_dir() -> str:
    """Absolute path of the shipped configs (the `dsp.conf` package, top-level conf/ in a checkout)."""
    return str(resources.files("dsp.conf"))


def user_errors(fn):
    """Print DspError / config errors as `error: ...` and exit 2, without a Python traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DspError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except OmegaConfBaseException as err:
            print(f"error: bad configuration: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: files written so far are intact (each is written whole or not at all)", file=sys.stderr)
            sys.exit(130)

    return wrapper


def print_table(metrics: dict, title: str) -> None:
    width = max(len(k) for k in metrics)
    print(title)
    for k in sorted(metrics):
        v = metrics[k]
        print(f"  {k:<{width}}  {v:10.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v!s:>10}")


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (a count or a size), refused by argparse otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def square_int(text: str) -> int:
    """argparse type: a square number of at least 1 (crops on a k×k grid)."""
    value = positive_int(text)
    if round(value ** 0.5) ** 2 != value:
        raise argparse.ArgumentTypeError(f"{value} is not a square number (1, 4, 9, 16, 25, 36, ...)")
    return value
