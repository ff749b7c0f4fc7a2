"""dsp-summary sweep_dir=DIR [metric=val/<name>] [mode=max|min] [over=seed]: one table for a dsp-train -m sweep.

Every folder under DIR that holds .hydra/overrides.yaml is a job (Hydra's layout, whatever the
launcher). Writes DIR/summary.csv (every override, every val/ and test/ metric, full precision)
and DIR/summary.md (the overrides that vary across jobs), best job first by `metric`; jobs without
a metrics.json (they failed, or are still running) or with a non-finite metric come last, marked
FAILED. Prints the table and the best job's folder.

over=KEY (or over=[KEY, ...]), e.g. over=seed for `dsp-train -m ... seed=0,1,2,3`: also averages the
jobs that differ only in KEY — one row per setting of the other overrides, with the number of
finished jobs and mean ± std (sample std, n - 1) of every val/ and test/ number, best mean first —
and writes it to DIR/summary_mean.csv and as a second table in summary.md.

A job's files are checked, never trusted blindly; each problem is one `warning:` line on stderr naming
the file, never a traceback:
- metrics.json that is not JSON, not an object, or unreadable: the job is FAILED (unreadable
  metrics.json); values that are neither numbers nor null are left out (a job whose metric is one
  of them is FAILED (no <metric>)).
- .hydra/overrides.yaml that is not Hydra's list of `key=value` strings: the job is listed by its
  folder only, EXCLUDED (unreadable overrides.yaml), with no numbers and out of the ranking and the
  means (its settings are unknown, so its numbers would belong to no row).
- settings that are not the ones its numbers were made with (the folder was reused: Hydra rewrote
  .hydra/ for a run with other settings): each override is compared with the config stored in the
  job's checkpoint (checkpoints/best.pt, else last.pt); a job whose checkpoint says otherwise is
  EXCLUDED (settings changed: <keys>), without numbers.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig

from dsp.cli.common import config_dir, user_errors
from dsp.errors import DspError
from dsp.training.checkpoint import _LEGACY_NUMPY, _atomic, load_checkpoint
from dsp.training.run_folder import may_change

# The tasks' headline metrics (Task.main_metric), tried in this order when metric=auto.
HEADLINE = ("example_f1", "chunk_f1", "char_acc", "mean_iou", "psnr")
LOWER_IS_BETTER = ("hamming", "mse")


@dataclass
class Job:
    name: str  # the folder, relative to the sweep folder
    folder: Path
    overrides: dict[str, str] | None  # None: no readable .hydra/overrides.yaml (settings unknown)
    metrics: dict | None  # None: no (usable) metrics.json
    monitor: str  # the job's trainer.monitor (auto: the task's headline metric)
    problem: str | None = None  # why the job is left out of the ranking, e.g. "FAILED (unreadable metrics.json)"


def _natural(name: str):
    """Job folders 0, 1, ..., 10 in numeric order."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _why(err: BaseException) -> str:
    """An exception as a short single line (YAML and JSON errors span several lines)."""
    text = " ".join(str(getattr(err, "strerror", None) or err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def read_overrides(path: Path) -> dict[str, str] | None:
    """A job's .hydra/overrides.yaml as {key: value}, or None after a warning when it is not Hydra's
    list of `key=value` strings (a `~key` deletion has no value)."""
    try:
        items = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:  # ValueError: not UTF-8
        _warn(f"{path} is unreadable ({_why(err)}); the job is listed without settings or numbers")
        return None
    if items is None:  # Hydra writes [] for a job without overrides: an empty file or null is damage
        _warn(f"{path} is empty, not Hydra's list of key=value overrides; the job is listed without settings "
              f"or numbers")
        return None
    if not isinstance(items, list):
        _warn(f"{path} holds {_kind(items)}, not a list of key=value overrides; the job is listed "
              f"without settings or numbers")
        return None
    bad = next((o for o in items if not (isinstance(o, str) and ("=" in o or o.startswith("~")))), None)
    if bad is not None:
        _warn(f"{path} holds {bad!r} ({_kind(bad)}), not only key=value overrides; the job is listed "
              f"without settings or numbers")
        return None
    return dict(o.split("=", 1) if "=" in o else (o, "") for o in items)


def read_metrics(path: Path) -> tuple[dict | None, str | None]:
    """(metrics, None) for a usable metrics.json, (None, None) when there is none (the job failed or is
    still running), (None, problem) after a warning when it cannot be used. Values that are neither
    numbers nor null are left out, with a warning."""
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        _warn(f"{path} is unreadable ({_why(err)}); the job counts as failed")
        return None, "FAILED (unreadable metrics.json)"
    if not isinstance(metrics, dict):
        _warn(f"{path} holds {_kind(metrics)}, not an object of metric names and numbers; the job counts as failed")
        return None, "FAILED (unreadable metrics.json)"
    odd = [k for k, v in metrics.items() if not (v is None or _is_number(v))]
    if odd:
        named = ", ".join(f"{k} is {_kind(metrics[k])}" for k in odd[:5]) + (", ..." if len(odd) > 5 else "")
        _warn(f"{path}: {named} (not a number); left out")
    return {k: v for k, v in metrics.items() if k not in odd}, None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _monitor(folder: Path) -> str:
    """The job's trainer.monitor from .hydra/config.yaml; auto when it cannot be told (only metric=auto uses it)."""
    try:
        config = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return "auto"
    trainer = config.get("trainer") if isinstance(config, dict) else None
    return str((trainer.get("monitor") if isinstance(trainer, dict) else None) or "auto")


# ------------------------------------------------------- settings vs the config stored in the checkpoint
# Why always, not only when metrics.json and overrides.yaml disagree in age: modification times are lost
# by a copy (cp, rsync without -t, a download) and differ between a cluster's nodes, and the check is
# cheap: the checkpoint is memory-mapped, so only its small pickled part is read, not its weights.
def stored_config(folder: Path) -> dict | None:
    """The resolved config stored in the job's checkpoints/best.pt (else last.pt); None when there is
    none or it cannot be read (with a warning: the settings then go unchecked)."""
    path = next((p for p in (folder / "checkpoints" / "best.pt", folder / "checkpoints" / "last.pt") if p.is_file()),
                None)
    if path is None:
        return None
    try:
        import torch

        with torch.serialization.safe_globals(_LEGACY_NUMPY):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 -- an old (non-zip) file cannot be mapped; a damaged one: load_checkpoint says why
        try:
            state = load_checkpoint(path)
        except DspError as err:
            _warn(f"cannot check the settings of {folder} against its checkpoint: {err}")
            return None
    config = state.get("config") if isinstance(state, dict) else None
    return config if isinstance(config, dict) else None


def _lookup(config, dotted: str):
    """config[a][b][c] for "a.b.c" (a list index for a digit); _ABSENT when it is not there."""
    node = config
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _ABSENT
    return node


_ABSENT = object()


def _same(a, b) -> bool:
    if _is_number(a) and _is_number(b):
        return a == b or math.isclose(a, b, rel_tol=1e-9) or (a != a and b != b)  # NaN = NaN here
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def changed_settings(overrides: dict[str, str], config: dict) -> list[tuple[str, str, object]]:
    """(key, override text, stored value) for each override whose value the stored config contradicts.

    Only what can be told for sure is compared: a config group choice (data=mulan: a whole section in
    the config), a key the stored config lacks, a deletion, an interpolation (${...}: the stored value is
    resolved) or a hydra.* setting is skipped."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    parser = OverridesParser.create()
    changed = []
    for key, text in overrides.items():
        if key.startswith("~"):
            continue
        try:
            [override] = parser.parse_overrides([f"{key}={text}"])
        except Exception:  # noqa: BLE001 -- what Hydra's grammar cannot read, it did not apply either
            continue
        name = override.key_or_group
        if (override.type == OverrideType.DEL or override.package is not None or override.is_sweep_override()
                or "/" in name or name == "hydra" or name.startswith("hydra.")
                or may_change(name)):  # a resume may change these
            continue
        value = override.value()
        stored = _lookup(config, name)
        if stored is _ABSENT or "${" in str(value) or (isinstance(stored, dict) and not isinstance(value, dict)):
            continue
        if not _same(value, stored):
            changed.append((name, text, stored))
    return changed


def collect(sweep_dir: Path) -> list[Job]:
    if not sweep_dir.is_dir():
        raise DspError(f"sweep folder {sweep_dir} does not exist; "
                       f"pass sweep_dir=<the hydra.sweep.dir of a dsp-train -m run>")
    if (sweep_dir / ".hydra" / "overrides.yaml").is_file():
        raise DspError(f"{sweep_dir} is a single run, not a sweep: its numbers are in {sweep_dir / 'metrics.json'}; "
                       f"pass sweep_dir=<the folder above its jobs>")
    jobs = []
    for folder in sorted({p.parent for p in sweep_dir.glob("**/checkpoints")} | {p.parent for p in sweep_dir.glob("**/.hydra")}):
        if folder != sweep_dir and not (folder / ".hydra" / "overrides.yaml").is_file():
            name = folder.relative_to(sweep_dir).as_posix()
            _warn(f"{folder / '.hydra' / 'overrides.yaml'} is missing; the job is listed without settings or numbers")
            jobs.append(Job(name, folder, None, None, "auto", "EXCLUDED (no overrides.yaml)"))
    for marker in sorted(sweep_dir.glob("**/.hydra/overrides.yaml"), key=lambda m: _natural(m.as_posix())):
        folder = marker.parent.parent
        name = folder.relative_to(sweep_dir).as_posix()
        # Unreadable settings: the job is still listed (a sweep of 8 jobs shows 8 rows, and the warning
        # points at the file), but with neither settings nor numbers, since numbers next to no settings
        # or guessed ones would be paired with settings they may not have been made with.
        overrides = read_overrides(marker)
        if overrides is None:
            jobs.append(Job(name, folder, None, None, "auto", "EXCLUDED (unreadable overrides.yaml)"))
            continue
        metrics, problem = read_metrics(folder / "metrics.json")
        if metrics is not None:
            config = stored_config(folder)
            changed = changed_settings(overrides, config) if config is not None else []
            if changed:
                _warn(f"job {name} ({folder}): its checkpoint was trained with "
                      + ", ".join(f"{k}={v!r}" for k, _, v in changed) + " but .hydra/overrides.yaml says "
                      + ", ".join(f"{k}={t}" for k, t, _ in changed)
                      + " (the folder was reused with other settings); its numbers are left out")
                metrics, problem = None, f"EXCLUDED (settings changed: {', '.join(k for k, _, _ in changed)})"
        jobs.append(Job(name, folder, overrides, metrics, _monitor(folder), problem))
    if not jobs:
        raise DspError(f"{sweep_dir} holds no job folders (<job>/.hydra/overrides.yaml); pass the folder "
                       f"a dsp-train -m run printed, i.e. its hydra.sweep.dir")
    return sorted(jobs, key=lambda j: _natural(j.name))


def choose_metric(jobs: list[Job], metric: str) -> str:
    available = sorted({k for j in jobs if j.metrics for k in j.metrics})
    if metric == "auto":
        monitors = {j.monitor for j in jobs} - {"auto"}
        candidates = [f"val/{m}" for m in sorted(monitors)] + [f"val/{m}" for m in HEADLINE]
        metric = next((m for m in candidates if m in available), None)
        if metric is None and available:
            raise DspError(f"no headline metric in the jobs' metrics.json; choose one with metric=..., "
                           f"e.g. {available[:6]}")
    elif metric not in available and available:
        raise DspError(f"metric={metric} is in no job's metrics.json; the jobs have {available}")
    return metric or "val/?"  # no job finished: the table only lists failures


def status(job: Job, metric: str) -> str:
    """ok, or why the job is not ranked: FAILED (...) for a run without a usable result, EXCLUDED (...)
    for one whose settings are unknown or not the ones its numbers were made with."""
    if job.problem:
        return job.problem
    if job.metrics is None:
        return "FAILED (no metrics.json)"
    value = job.metrics.get(metric)
    if value is None:
        return f"FAILED (no {metric})"
    return "ok" if math.isfinite(value) else "FAILED (not finite)"


def _ok(job: Job, metric: str) -> bool:
    return status(job, metric) == "ok"


def _known(jobs: list[Job]) -> list[Job]:
    """The jobs whose settings could be read."""
    return [j for j in jobs if j.overrides is not None]


def _varying(jobs: list[Job]) -> list[str]:
    """The override keys whose values tell the jobs apart, in first-seen order."""
    jobs = _known(jobs)
    keys = dict.fromkeys(k for j in jobs for k in j.overrides)
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]


def _numbers(jobs: list[Job], metric: str) -> list[str]:
    """Every val/ and test/ key of the jobs' metrics but `metric`, val/ first."""
    return sorted({k for j in jobs if j.metrics for k in j.metrics if k.startswith(("val/", "test/"))} - {metric},
                  key=lambda k: (not k.startswith("val/"), k))


def table(jobs: list[Job], metric: str, mode: str, all_overrides: bool) -> tuple[list[str], list[list]]:
    """(header, rows): job, status, overrides, metric first then val/ and test/ numbers; best first."""
    keys = list(dict.fromkeys(k for j in _known(jobs) for k in j.overrides)) if all_overrides else _varying(jobs)
    numbers = _numbers(jobs, metric)
    good = sorted((j for j in jobs if _ok(j, metric)), key=lambda j: j.metrics[metric], reverse=mode == "max")
    header = ["job", "status", *keys, metric, *numbers]
    rows = []
    for j in good + [j for j in jobs if not _ok(j, metric)]:
        rows.append([j.name, status(j, metric), *((j.overrides or {}).get(k, "") for k in keys),
                     *((j.metrics or {}).get(k, "") for k in [metric, *numbers])])
    return header, rows


def mean_table(jobs: list[Job], metric: str, mode: str, over: list[str]) -> tuple[list[str], list[list]]:
    """(header, rows): one row per setting of the varying overrides other than `over`, with the count
    of finished jobs and (mean, std) pairs of the metric and every val/ and test/ number; best mean
    first, groups with no finished job last."""
    jobs = _known(jobs)  # a job with unknown settings belongs to no setting
    unknown = [k for k in over if not any(k in j.overrides for j in jobs)]
    if unknown:
        known = sorted({k for j in jobs for k in j.overrides})
        raise DspError(f"over={unknown[0]} is no override of this sweep's jobs; they have {known}")
    keys = [k for k in _varying(jobs) if k not in over]
    numbers = _numbers(jobs, metric)
    groups: dict[tuple, list[Job]] = {}
    for j in jobs:
        groups.setdefault(tuple(j.overrides.get(k, "") for k in keys), []).append(j)
    rows = []
    for setting, members in groups.items():
        done = [j for j in members if _ok(j, metric)]
        stats = []
        for name in [metric, *numbers]:
            values = [j.metrics[name] for j in done if _is_number(j.metrics.get(name))]
            stats.append((statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
                         if values else None)
        rows.append([*setting, f"{len(done)}/{len(members)}", *stats])
    at = len(keys) + 1  # the metric's (mean, std), after the setting and the count
    ranked = sorted((r for r in rows if r[at] is not None), key=lambda r: r[at][0], reverse=mode == "max")
    return [*keys, "finished", metric, *numbers], ranked + [r for r in rows if r[at] is None]


def _number(v: float) -> str:
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.4g}"  # percentages and dB to 2 decimals; small values kept


def _cell(v) -> str:
    if isinstance(v, tuple):  # (mean, std) of a mean table
        return f"{_number(v[0])} ± {_number(v[1])}"
    return _number(v) if isinstance(v, float) else ("" if v is None else str(v))


def markdown(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[_cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])]) + "\n"


def summarise(sweep_dir: str | Path, metric: str = "auto", mode: str = "auto", over=None) -> dict:
    """Write sweep_dir/summary.{csv,md} (and summary_mean.csv with `over`); returns {"metric", "mode",
    "best" (folder or None), "failed" (folders), "excluded" ((folder, status) pairs), "text"}."""
    over = [over] if isinstance(over, str) else [str(k) for k in (over or [])]
    sweep_dir = Path(sweep_dir).resolve()
    jobs = collect(sweep_dir)
    metric = choose_metric(jobs, str(metric))
    if mode == "auto":
        mode = "min" if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER else "max"
    if mode not in ("max", "min"):
        raise DspError(f"mode={mode}: choose max, min or auto")

    header, rows = table(jobs, metric, mode, all_overrides=True)
    buf = io.StringIO()
    csv.writer(buf).writerows([header + ["folder"]] + [r + [str(sweep_dir / r[0])] for r in rows])
    _atomic(sweep_dir / "summary.csv", lambda tmp: tmp.write_text(buf.getvalue()))

    header, rows = table(jobs, metric, mode, all_overrides=False)
    varying = set(header)
    known = _known(jobs)
    common = [f"{k}={v}" for k, v in known[0].overrides.items() if k not in varying] if known else []
    best = next((sweep_dir / r[0] for r in rows if r[1] == "ok"), None)
    failed = [sweep_dir / r[0] for r in rows if r[1].startswith("FAILED")]
    excluded = [(sweep_dir / r[0], r[1]) for r in rows if r[1].startswith("EXCLUDED")]
    text = (f"# Sweep {sweep_dir}\n\n{len(jobs)} jobs, sorted by {metric} ({mode}); job folders are relative "
            f"to the sweep folder.\n\n" + (f"Common overrides: `{' '.join(common)}`\n\n" if common else "")
            + markdown(header, rows) + f"\nBest job: {best or 'none (every job failed)'}\n")
    if over:
        header, rows = mean_table(jobs, metric, mode, over)
        buf = io.StringIO()
        k = header.index(metric)  # the settings and the count come first, then (mean, std) pairs
        stats = [f"{h} {part}" for h in header[k:] for part in ("mean", "std")]
        csv.writer(buf).writerows([header[:k] + stats] + [r[:k] + [x for v in r[k:] for x in (v or ("", ""))]
                                                           for r in rows])
        _atomic(sweep_dir / "summary_mean.csv", lambda tmp: tmp.write_text(buf.getvalue()))
        text += (f"\n## Mean ± std over {', '.join(over)}\n\n" + markdown(header, rows))
    _atomic(sweep_dir / "summary.md", lambda tmp: tmp.write_text(text))
    return {"metric": metric, "mode": mode, "best": best, "failed": failed, "excluded": excluded, "text": text}


@user_errors
def _main(cfg: DictConfig) -> None:
    result = summarise(cfg.sweep_dir, cfg.metric, cfg.mode, cfg.over)
    print(result["text"], end="")
    for folder in result["failed"]:
        print(f"failed: {folder}")
    for folder, why in result["excluded"]:
        print(f"excluded: {folder} {why.removeprefix('EXCLUDED ')}")
    sweep = Path(cfg.sweep_dir).resolve()
    print(f"wrote {sweep / 'summary.csv'}" + (f", {sweep / 'summary_mean.csv'}" if cfg.over else "")
          + f" and {sweep / 'summary.md'}")
    if result["best"] is None:  # a script reading the exit status learns that nothing trained
        print(f"error: every job of {sweep} failed" + (" or was excluded" if result["excluded"] else ""),
              file=sys.stderr)
        sys.exit(1)


def main() -> None:
    hydra.main(config_path=config_dir(), config_name="summary", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()
