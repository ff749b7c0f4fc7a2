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
from dsp.training.checkpoint import _atomic

# The tasks' headline metrics (Task.main_metric), tried in this order when metric=auto.
HEADLINE = ("example_f1", "chunk_f1", "char_acc", "mean_iou", "psnr")
LOWER_IS_BETTER = ("hamming", "mse")


@dataclass
class Job:
    name: str  # the folder, relative to the sweep folder
    folder: Path
    overrides: dict[str, str]
    metrics: dict | None  # None: no readable metrics.json
    monitor: str  # the job's trainer.monitor (auto: the task's headline metric)


def _natural(name: str):
    """Job folders 0, 1, ..., 10 in numeric order."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def collect(sweep_dir: Path) -> list[Job]:
    if not sweep_dir.is_dir():
        raise DspError(f"sweep folder {sweep_dir} does not exist; "
                       f"pass sweep_dir=<the hydra.sweep.dir of a dsp-train -m run>")
    if (sweep_dir / ".hydra" / "overrides.yaml").is_file():
        raise DspError(f"{sweep_dir} is a single run, not a sweep: its numbers are in {sweep_dir / 'metrics.json'}; "
                       f"pass sweep_dir=<the folder above its jobs>")
    jobs = []
    for marker in sweep_dir.glob("**/.hydra/overrides.yaml"):
        folder = marker.parent.parent
        overrides = dict(o.split("=", 1) if "=" in o else (o, "") for o in yaml.safe_load(marker.read_text()) or [])
        config_file = folder / ".hydra" / "config.yaml"
        config = (yaml.safe_load(config_file.read_text()) if config_file.is_file() else None) or {}
        monitor = str((config.get("trainer") or {}).get("monitor") or "auto")
        try:
            metrics = json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = None
        jobs.append(Job(folder.relative_to(sweep_dir).as_posix(), folder, overrides, metrics, monitor))
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


def _ok(job: Job, metric: str) -> bool:
    value = (job.metrics or {}).get(metric)
    return isinstance(value, (int, float)) and math.isfinite(value)


def _varying(jobs: list[Job]) -> list[str]:
    """The override keys whose values tell the jobs apart, in first-seen order."""
    keys = dict.fromkeys(k for j in jobs for k in j.overrides)
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]


def _numbers(jobs: list[Job], metric: str) -> list[str]:
    """Every val/ and test/ key of the jobs' metrics but `metric`, val/ first."""
    return sorted({k for j in jobs if j.metrics for k in j.metrics if k.startswith(("val/", "test/"))} - {metric},
                  key=lambda k: (not k.startswith("val/"), k))


def table(jobs: list[Job], metric: str, mode: str, all_overrides: bool) -> tuple[list[str], list[list]]:
    """(header, rows): job, status, overrides, metric first then val/ and test/ numbers; best first."""
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides)) if all_overrides else _varying(jobs)
    numbers = _numbers(jobs, metric)
    good = sorted((j for j in jobs if _ok(j, metric)), key=lambda j: j.metrics[metric], reverse=mode == "max")
    header = ["job", "status", *keys, metric, *numbers]
    rows = []
    for j in good + [j for j in jobs if not _ok(j, metric)]:
        status = "ok" if _ok(j, metric) else ("FAILED (no metrics.json)" if j.metrics is None else "FAILED (not finite)")
        rows.append([j.name, status, *(j.overrides.get(k, "") for k in keys),
                     *((j.metrics or {}).get(k, "") for k in [metric, *numbers])])
    return header, rows


def mean_table(jobs: list[Job], metric: str, mode: str, over: list[str]) -> tuple[list[str], list[list]]:
    """(header, rows): one row per setting of the varying overrides other than `over`, with the count
    of finished jobs and (mean, std) pairs of the metric and every val/ and test/ number; best mean
    first, groups with no finished job last."""
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
            values = [j.metrics[name] for j in done if isinstance(j.metrics.get(name), (int, float))]
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
    "best" (folder or None), "failed", "text"}."""
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
    common = [f"{k}={v}" for k, v in jobs[0].overrides.items() if k not in varying]
    best = next((sweep_dir / r[0] for r in rows if r[1] == "ok"), None)
    failed = [sweep_dir / r[0] for r in rows if r[1] != "ok"]
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
    return {"metric": metric, "mode": mode, "best": best, "failed": failed, "text": text}


@user_errors
def _main(cfg: DictConfig) -> None:
    result = summarise(cfg.sweep_dir, cfg.metric, cfg.mode, cfg.over)
    print(result["text"], end="")
    for folder in result["failed"]:
        print(f"failed: {folder}")
    sweep = Path(cfg.sweep_dir).resolve()
    print(f"wrote {sweep / 'summary.csv'}" + (f", {sweep / 'summary_mean.csv'}" if cfg.over else "")
          + f" and {sweep / 'summary.md'}")
    if result["best"] is None:  # a script reading the exit status learns that nothing trained
        print(f"error: every job of {sweep} failed", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    hydra.main(config_path=config_dir(), config_name="summary", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()
