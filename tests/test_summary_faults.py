"""dsp-summary on job folders whose files are damaged or do not belong together: one warning line naming
the file, a clear status in the table, never a traceback, and never numbers next to settings they were
not made with (the config stored in a job's checkpoint is compared with its .hydra/overrides.yaml)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsp.cli.summary import changed_settings, summarise

GOOD = {"val/example_f1": 50.0, "test/example_f1": 49.0}


def job(sweep: Path, name: str, overrides: str | bytes | None = "- seed=0\n", metrics=GOOD, config=None) -> Path:
    """A job folder as a sweep leaves it; metrics as a dict (written as JSON) or the file's raw text;
    config: a checkpoints/best.pt holding it, as the trainer stores the run's resolved config."""
    folder = sweep / name
    (folder / ".hydra").mkdir(parents=True)
    for path, content in ((folder / ".hydra" / "overrides.yaml", overrides), (folder / "metrics.json", metrics)):
        if isinstance(content, dict):
            content = json.dumps(content)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
    if config is not None:
        (folder / "checkpoints").mkdir()
        torch.save({"model": {"w": torch.zeros(3)}, "config": config}, folder / "checkpoints" / "best.pt")
    return folder


def rows(sweep: Path) -> dict[str, dict]:
    return {r["job"]: r for r in csv.DictReader((sweep / "summary.csv").open())}


def warnings(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line]


@pytest.mark.parametrize("content, what", [
    ("- seed=[1\n  bad: : yaml\n", "unreadable"),           # not YAML
    ("seed: 2\n", "holds an object"),                      # YAML, but a mapping
    ("- 3\n- seed=3\n", "holds 3 (a number)"),             # an item that is no override
    ("- [seed, 1]\n", "(a list)"),
    ("- seed\n", "'seed' (a string)"),                     # no =
    ("just text\n", "holds a string"),
    (b"- seed=\xff\xfe\n", "unreadable"),                  # not UTF-8
])
def test_a_malformed_overrides_yaml_lists_the_job_by_its_folder_only(tmp_path, capsys, content, what):
    job(tmp_path, "0", "- seed=0\n", GOOD)
    bad = job(tmp_path, "1", content, {"val/example_f1": 99.0})  # its numbers belong to no known settings
    job(tmp_path, "2", "- seed=2\n", {"val/example_f1": 60.0})
    result = summarise(tmp_path)
    [line] = warnings(capsys)
    assert line.startswith("warning: ") and str(bad / ".hydra" / "overrides.yaml") in line and what in line, line
    assert result["best"] == tmp_path / "2" and result["excluded"] == [(bad, "EXCLUDED (unreadable overrides.yaml)")]
    table = rows(tmp_path)
    assert table["1"]["status"] == "EXCLUDED (unreadable overrides.yaml)"
    assert table["1"]["seed"] == table["1"]["val/example_f1"] == ""  # folder only: no settings, no numbers
    assert [r["job"] for r in table.values()] == ["2", "0", "1"]
    assert "seed" in next(x for x in result["text"].splitlines() if x.startswith("| job"))  # still varies


def test_an_empty_or_missing_overrides_yaml_is_damage_and_hydras_empty_list_is_none(tmp_path, capsys):
    job(tmp_path, "0", "", GOOD)  # Hydra writes [] for no overrides: an empty file or null is damage
    job(tmp_path, "1", "[]\n", {"val/example_f1": 51.0})
    job(tmp_path, "2", "null\n", GOOD)
    job(tmp_path, "3", "[]\n", GOOD)
    (tmp_path / "3" / ".hydra" / "overrides.yaml").unlink()
    result = summarise(tmp_path)
    assert result["best"] == tmp_path / "1"
    assert sorted(result["excluded"]) == [(tmp_path / "0", "EXCLUDED (unreadable overrides.yaml)"),
                                          (tmp_path / "2", "EXCLUDED (unreadable overrides.yaml)"),
                                          (tmp_path / "3", "EXCLUDED (no overrides.yaml)")]
    assert len(warnings(capsys)) == 3


@pytest.mark.parametrize("content, what", [
    ("[1, 2]", "holds a list, not an object"),
    ("3", "holds a number, not an object"),
    ('"val/example_f1"', "holds a string"),
    ("{bad", "unreadable (Expecting property name"),
    ("", "unreadable (Expecting value"),
    (b"\xff\xfe{}", "unreadable"),
    (None, "unreadable (Is a directory)"),
])
def test_an_unreadable_metrics_json_is_a_failed_job_with_one_warning(tmp_path, capsys, content, what):
    job(tmp_path, "0")
    bad = job(tmp_path, "1", "- seed=1\n", content)
    if content is None:
        (bad / "metrics.json").mkdir()
    result = summarise(tmp_path)
    [line] = warnings(capsys)
    assert line.startswith("warning: ") and str(bad / "metrics.json") in line and what in line, line
    assert rows(tmp_path)["1"]["status"] == "FAILED (unreadable metrics.json)"
    assert result["failed"] == [bad] and result["best"] == tmp_path / "0"


def test_metric_values_that_are_not_numbers_are_left_out_with_a_warning(tmp_path, capsys):
    job(tmp_path, "0", "- seed=0\n", {"val/example_f1": 50.0, "test/example_f1": "n/a", "train/time_to_target_s": None})
    odd = job(tmp_path, "1", "- seed=1\n", {"val/example_f1": "high", "test/example_f1": [1], "val/flag": True,
                                             "val/hamming": 3.0})
    job(tmp_path, "2", "- seed=2\n", {"val/example_f1": float("nan")})  # json writes NaN: a number, not finite
    result = summarise(tmp_path)
    lines = warnings(capsys)
    assert len(lines) == 2 and all(line.startswith("warning: ") for line in lines)
    assert str(tmp_path / "0" / "metrics.json") in lines[0] and "test/example_f1 is a string" in lines[0]
    assert str(odd / "metrics.json") in lines[1]
    assert all(f"{k} is {kind}" in lines[1] for k, kind in (("val/example_f1", "a string"),
                                                             ("test/example_f1", "a list"), ("val/flag", "a boolean")))
    table = rows(tmp_path)
    assert table["0"]["status"] == "ok" and "test/example_f1" not in table["0"]  # no job has a number there
    assert table["1"]["status"] == "FAILED (no val/example_f1)" and table["1"]["val/hamming"] == "3.0"
    assert table["2"]["status"] == "FAILED (not finite)"
    assert result["best"] == tmp_path / "0"
    summarise(tmp_path, over="seed")  # the mean table skips them too
    capsys.readouterr()


def test_the_command_warns_in_one_line_per_file_and_never_tracebacks(tmp_path):
    job(tmp_path, "0")
    job(tmp_path, "1", "seed: 1\n")
    job(tmp_path, "2", "- seed=2\n", "[]")
    job(tmp_path, "3", "- seed=3\n", {"val/example_f1": "x"})
    job(tmp_path, "4", "- seed=4\n", GOOD, config={"seed": 5})  # the folder was reused with seed=4
    proc = subprocess.run([sys.executable, "-m", "dsp.cli.summary", f"sweep_dir={tmp_path}"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 4 and all(line.startswith("warning: ") for line in lines), lines
    for line, name in zip(lines, ("1/.hydra/overrides.yaml", "2/metrics.json", "3/metrics.json", "job 4 (")):
        assert name in line, (name, line)
    assert f"Best job: {tmp_path / '0'}\n" in proc.stdout
    assert f"failed: {tmp_path / '2'}" in proc.stdout and f"excluded: {tmp_path / '1'}" in proc.stdout
    assert f"excluded: {tmp_path / '4'} (settings changed: seed)" in proc.stdout

    for name in ("0", "4"):  # nothing usable left: exit 1, the table still written
        (tmp_path / name / "metrics.json").write_text("{")
    proc = subprocess.run([sys.executable, "-m", "dsp.cli.summary", f"sweep_dir={tmp_path}"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "every job of" in proc.stderr and "failed or was excluded" in proc.stderr


# --------------------------------------------------------------- settings vs the checkpoint's config
STORED = {"seed": 0, "data": {"_target_": "dsp.data.mulan.load", "num_labels": None, "train": "/d/a-train.arff"},
          "trainer": {"lr": 0.003, "batch_size": 16, "progress": False, "stages": [{"name": "joint", "lr": 1e-4}]},
          "model": {"hidden": [150, 150], "act": "relu"}}


@pytest.mark.parametrize("override, changed", [
    ("seed=0", False), ("seed=1", True),
    ("trainer.lr=3e-3", False), ("trainer.lr=0.0030000000000000001", False), ("trainer.lr=0.03", True),
    ("trainer.batch_size=16", False), ("trainer.batch_size=16.0", False), ("trainer.batch_size=32", True),
    ("trainer.progress=False", False), ("trainer.progress=false", False),
    ("trainer.progress=true", False), ("trainer.max_epochs=99", False),  # a resume may change these (MAY_CHANGE)
    ("data.num_labels=null", False), ("data.num_labels=9", True),
    ("data.train=/d/a-train.arff", False), ("data.train='/d/a-train.arff'", False), ("data.train=/d/b.arff", True),
    ("model.hidden=[150, 150]", False), ("model.hidden=[150,150]", False), ("model.hidden=[150]", True),
    ("model.act=relu", False), ("model.act=tanh", True), ("model.act=1", True),
    ("trainer.stages.0.lr=1e-4", False), ("trainer.stages.0.lr=1e-3", True),
    # what cannot be told for sure is not compared
    ("data=mulan", False),                    # a group choice: a whole section in the stored config
    ("+trainer.new_key=1", False),            # a key the stored config lacks
    ("model.act=${oc.env:ACT}", False),       # an interpolation: the stored value is resolved
    ("~model.act", False), ("model@m=x", False), ("model/feature_net=big", False), ("hydra.verbose=true", False),
    ("seed=[1", False),                       # not Hydra's grammar: Hydra did not apply it either
])
def test_changed_settings(override, changed):
    key, _, text = override.partition("=")
    found = changed_settings({key: text} if "=" in override else {key: ""}, STORED)
    assert bool(found) == changed, found
    if changed:
        assert found[0][0] == key.lstrip("+~")


def test_a_job_whose_checkpoint_was_trained_with_other_settings_is_excluded(tmp_path, capsys):
    config = {"seed": 0, "trainer": {"lr": 0.003}, "data": {"num_labels": None}}
    job(tmp_path, "0", "- data=mulan\n- trainer.lr=0.003\n- data.num_labels=null\n- seed=0\n", GOOD, config=config)
    reused = job(tmp_path, "1", "- data=mulan\n- trainer.lr=0.03\n- data.num_labels=null\n- seed=0\n",
                 {"val/example_f1": 99.0, "test/example_f1": 98.0}, config=config)  # made with lr 0.003
    damaged = job(tmp_path, "2", "- data=mulan\n- trainer.lr=0.01\n- data.num_labels=null\n- seed=0\n",
                  {"val/example_f1": 70.0})
    (damaged / "checkpoints").mkdir()
    (damaged / "checkpoints" / "best.pt").write_text("not a checkpoint")
    legacy = job(tmp_path, "3", "- data=mulan\n- trainer.lr=0.3\n- data.num_labels=null\n- seed=0\n",
                 {"val/example_f1": 80.0})
    (legacy / "checkpoints").mkdir()  # torch's pre-1.6 format (cannot be memory-mapped), and only a last.pt
    torch.save({"model": {}, "config": config}, legacy / "checkpoints" / "last.pt",
               _use_new_zipfile_serialization=False)
    job(tmp_path, "4", "- data=mulan\n- trainer.lr=0.001\n- data.num_labels=null\n- seed=0\n",
        {"val/example_f1": 40.0})  # no checkpoint: nothing to compare with

    result = summarise(tmp_path, over="seed")
    lines = warnings(capsys)
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"warning: job 1 ({reused}): its checkpoint was trained with trainer.lr=0.003 "
                               f"but .hydra/overrides.yaml says trainer.lr=0.03"), lines[0]
    assert lines[1].startswith(f"warning: cannot check the settings of {damaged}") and "corrupted" in lines[1]
    assert lines[2].startswith(f"warning: job 3 ({legacy}): ") and "trainer.lr=0.3" in lines[2]
    table = rows(tmp_path)
    assert table["1"]["status"] == "EXCLUDED (settings changed: trainer.lr)" and table["1"]["val/example_f1"] == ""
    assert table["1"]["trainer.lr"] == "0.03"
    assert table["3"]["status"] == "EXCLUDED (settings changed: trainer.lr)"
    assert [table[j]["status"] for j in ("0", "2", "4")] == ["ok"] * 3
    assert result["best"] == tmp_path / "2" and result["failed"] == []
    assert [folder for folder, _ in result["excluded"]] == [reused, legacy]
    mean = {r["trainer.lr"]: r["finished"] for r in csv.DictReader((tmp_path / "summary_mean.csv").open())}
    assert mean == {"0.003": "1/1", "0.03": "0/1", "0.01": "1/1", "0.3": "0/1", "0.001": "1/1"}


def test_a_real_job_folder_reused_with_other_settings(tmp_path, capsys):
    """A checkpoint as dsp-train writes it: its stored config matches the job's own overrides, and a
    rewritten .hydra/overrides.yaml (what Hydra does when the folder is reused) is caught."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "dsp.cli.train", "-m", "experiment=mlp_synthetic", "data.num_train=32",
                           "data.num_val=16", "data.num_test=16", "trainer.max_epochs=1", "trainer.progress=false",
                           "trainer.batch_size=16", "trainer.lr=0.003", "seed=3", f"hydra.sweep.dir={sweep}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    job(sweep, "1", "- seed=9\n", GOOD)  # a second job, so that the sweep is one
    assert summarise(sweep)["best"] is not None and rows(sweep)["0"]["status"] == "ok"
    assert warnings(capsys) == []
    record = sweep / "0" / ".hydra" / "overrides.yaml"
    record.write_text(record.read_text().replace("trainer.lr=0.003", "trainer.lr=0.01").replace("seed=3", "seed=4"))
    summarise(sweep)
    [line] = warnings(capsys)
    assert "job 0" in line and "trainer.lr=0.003, seed=3" in line and "trainer.lr=0.01, seed=4" in line, line
    assert rows(sweep)["0"]["status"] == "EXCLUDED (settings changed: trainer.lr, seed)"
