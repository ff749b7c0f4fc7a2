"""dsp-summary on a real tiny multirun: a table of overrides vs metrics, best first, failures marked."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_mulan

QUICK = ["trainer.max_epochs=1", "trainer.progress=false", "inference.max_iter=5", "trainer.batch_size=16",
         "trainer=default"]


def run(module: str, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """4 jobs: num_labels=9 fails (jobs 0 and 1), the two learning rates train (jobs 2 and 3)."""
    tmp = tmp_path_factory.mktemp("sweep")
    tr, te, xml = write_mulan(tmp / "mulan" / "tiny")
    folder = tmp / "sweep"
    proc = run("dsp.cli.train", "-m", *QUICK, "data=mulan", f"data.train={tr}", f"data.test={te}",
               f"data.labels_xml={xml}", "data.num_labels=9,null", "trainer.lr=0.003,0.03",
               f"hydra.sweep.dir={folder}")
    assert proc.returncode == 1 and "2 job(s) of the sweep failed (job 0, job 1)" in proc.stderr, proc.stderr
    return folder


def val_f1(folder: Path) -> float:
    return json.loads((folder / "metrics.json").read_text())["val/example_f1"]


def test_summary_sorts_jobs_by_the_metric_and_marks_failed_ones(sweep):
    proc = run("dsp.cli.summary", f"sweep_dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    best = max((sweep / "2", sweep / "3"), key=val_f1)
    assert f"Best job: {best}\n" in proc.stdout
    assert f"failed: {sweep / '0'}" in proc.stdout and f"failed: {sweep / '1'}" in proc.stdout

    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["job"] for r in rows[:2]] == sorted(["2", "3"], key=lambda j: -val_f1(sweep / j))
    assert [r["status"] for r in rows] == ["ok", "ok", "FAILED (no metrics.json)", "FAILED (no metrics.json)"]
    assert {r["data.num_labels"] for r in rows[2:]} == {"9"} and rows[2]["folder"] == str(sweep / "0")
    assert float(rows[0]["val/example_f1"]) == val_f1(best)  # full precision
    assert {"trainer.lr", "data", "data.train", "test/example_f1", "test/hamming"} <= set(rows[0])  # every override

    md = (sweep / "summary.md").read_text()
    assert md in proc.stdout  # the table is printed as written
    header = next(line for line in md.splitlines() if line.startswith("| job"))
    assert "trainer.lr" in header and "data.num_labels" in header  # the overrides that vary...
    assert "data=mulan" in md and "| data " not in header  # ...the common ones above the table


def test_summary_takes_a_metric_and_a_direction(sweep):
    proc = run("dsp.cli.summary", f"sweep_dir={sweep}", "metric=val/hamming")  # auto: lower is better
    assert proc.returncode == 0, proc.stderr
    assert "sorted by val/hamming (min)" in proc.stdout
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert float(rows[0]["val/hamming"]) <= float(rows[1]["val/hamming"])
    proc = run("dsp.cli.summary", f"sweep_dir={sweep}", "metric=val/hamming", "mode=max")
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert float(rows[0]["val/hamming"]) >= float(rows[1]["val/hamming"])


@pytest.mark.parametrize("case", ["missing_folder", "not_a_sweep", "a_single_run", "unknown_metric"])
def test_summary_errors_are_one_clear_line(case, sweep, tmp_path):
    args, expect = {
        "missing_folder": ([f"sweep_dir={tmp_path / 'nowhere'}"], "does not exist"),
        "not_a_sweep": ([f"sweep_dir={tmp_path}"], "no job folders"),
        "a_single_run": ([f"sweep_dir={sweep / '2'}"], "is a single run, not a sweep"),
        "unknown_metric": ([f"sweep_dir={sweep}", "metric=val/nope"], "val/example_f1"),
    }[case]
    proc = run("dsp.cli.summary", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and expect in proc.stderr, proc.stderr


def test_summary_of_a_sweep_where_every_job_failed_exits_1(tmp_path):
    for job in ("0", "1"):  # what two failed jobs leave: their record, no metrics.json
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
    proc = run("dsp.cli.summary", f"sweep_dir={tmp_path}")
    assert proc.returncode == 1 and "every job of" in proc.stderr and "Traceback" not in proc.stderr
    assert "none (every job failed)" in (tmp_path / "summary.md").read_text()  # the table is still written


def test_summary_over_a_key_averages_the_jobs_that_differ_only_there(sweep):
    proc = run("dsp.cli.summary", f"sweep_dir={sweep}", "over=trainer.lr")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((sweep / "summary_mean.csv").open()))
    # data.num_labels=null trained with both learning rates (jobs 2, 3); 9 failed twice (jobs 0, 1)
    assert [(r["data.num_labels"], r["finished"]) for r in rows] == [("null", "2/2"), ("9", "0/2")]
    f1 = [val_f1(sweep / "2"), val_f1(sweep / "3")]
    assert float(rows[0]["val/example_f1 mean"]) == pytest.approx(sum(f1) / 2)
    assert float(rows[0]["val/example_f1 std"]) == pytest.approx(abs(f1[0] - f1[1]) / 2 ** 0.5)  # n - 1
    assert rows[1]["val/example_f1 mean"] == "" and "trainer.lr" not in rows[0]
    md = (sweep / "summary.md").read_text()
    assert "## Mean ± std over trainer.lr" in md and f"{sum(f1) / 2:.2f} ± " in md
    proc = run("dsp.cli.summary", f"sweep_dir={sweep}", "over=seed")  # not an override of these jobs
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "over=seed" in proc.stderr, proc.stderr


def test_mean_table_by_hand():
    from dsp.cli.summary import Job, mean_table

    def job(name, seed, lr, f1):
        return Job(name, Path(name), {"seed": seed, "trainer.lr": lr}, {"val/f1": f1, "test/f1": f1 - 1}, "auto")

    jobs = [job("0", "0", "0.1", 50.0), job("1", "1", "0.1", 54.0), job("2", "0", "0.01", 60.0),
            job("3", "1", "0.01", 61.0), job("4", "2", "0.01", 62.0)]
    header, rows = mean_table(jobs, "val/f1", "max", ["seed"])
    assert header == ["trainer.lr", "finished", "val/f1", "test/f1"]
    assert rows[0][:2] == ["0.01", "3/3"] and rows[0][2] == pytest.approx((61.0, 1.0))
    assert rows[1][:2] == ["0.1", "2/2"] and rows[1][2] == pytest.approx((52.0, 8 ** 0.5))
    assert rows[1][3] == pytest.approx((51.0, 8 ** 0.5))
