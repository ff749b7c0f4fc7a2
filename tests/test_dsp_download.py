"""dsp-download: pinned checksums, resumable downloads (HTTP Range), progress bar, Ctrl-C.

A local HTTP server (127.0.0.1, random port) serves a fake Mulan zip with the layout of bibtex
(plus incompressible padding, so that a download spans several reads). Its handler supports
Range requests (http.server's does not), can ignore them, cut the connection after some bytes, or
stall until released, and records what each request asked for and what it was sent.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import random
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

import dsp.data.download as dl
from dsp.cli.download import main
from dsp.data.download import DATASETS, DatasetSpec, download, partial_path
from dsp.errors import DspError

REPO = Path(__file__).resolve().parent.parent
MULAN = {
    "bibtex-train.arff": b"@relation train\n@attribute a {0,1}\n@data\n{0 1}\n",
    "bibtex-test.arff": b"@relation test\n@attribute a {0,1}\n@data\n{}\n",
    "bibtex.xml": b'<labels xmlns="http://mulan.sourceforge.net/labels"><label name="a"/></labels>\n',
    "README.bin": random.Random(0).randbytes(150_000),  # not needed by the loaders: padding
}
CONLL = {"train.txt": b"Confidence NN B-NP\n" * 2000, "test.txt": b"Rockwell NNP B-NP\n" * 1000}


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


ZIP = _zip(MULAN)
ZIP_SHA = hashlib.sha256(ZIP).hexdigest()
INSTALLED = {"mulan/bibtex/bibtex-train.arff", "mulan/bibtex/bibtex-test.arff", "mulan/bibtex/bibtex.xml"}


@dataclasses.dataclass
class ServerState:
    ranges: bool = True  # honour Range requests
    cuts: list = dataclasses.field(default_factory=list)  # per request: close after this many body bytes
    stall_after: int | None = None  # send this many body bytes, then wait for `release`
    stalled: threading.Event = dataclasses.field(default_factory=threading.Event)
    release: threading.Event = dataclasses.field(default_factory=threading.Event)
    requests: list = dataclasses.field(default_factory=list)  # dicts: path, range, if_range, status, sent


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    state: ServerState

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            return super().do_GET()  # its 404
        data = path.read_bytes()
        record = {"path": self.path, "range": self.headers.get("Range"), "if_range": self.headers.get("If-Range")}
        self.state.requests.append(record)
        start, status = 0, 200
        if record["range"] and self.state.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", record["range"]).group(1))
            if start >= len(data):
                record.update(status=416, sent=0)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Last-Modified", self.date_time_string(int(path.stat().st_mtime)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = self.state.cuts.pop(0) if self.state.cuts else None
        if self.state.stall_after is not None:
            self.wfile.write(body[: self.state.stall_after])
            self.wfile.flush()
            self.state.stalled.set()
            self.state.release.wait(timeout=20)
            cut = self.state.stall_after  # then drop the connection
        n = len(body) if cut is None else min(cut, len(body))
        if self.state.stall_after is None:
            self.wfile.write(body[:n])
        record.update(status=status, sent=n)
        self.close_connection = True


@pytest.fixture
def mirror(tmp_path):
    root = tmp_path / "mirror"
    root.mkdir()
    (root / "bibtex.rar").write_bytes(ZIP)  # a zip under the canonical .rar name, as mirrors do
    for name, data in CONLL.items():
        (root / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
    return root


@pytest.fixture
def server(mirror):
    """(base_url, ServerState) of a Range-capable server for `mirror`."""
    state = ServerState()
    handler = type("Handler", (RangeHandler,), {"state": state})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(mirror)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def pinned(monkeypatch):
    """Pin bibtex's archive to `digest` (the fake zip's by default)."""

    def pin(digest: str = ZIP_SHA) -> None:
        monkeypatch.setitem(DATASETS, "bibtex", dataclasses.replace(DATASETS["bibtex"], sha256=(digest,)))

    return pin


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def _installed_ok(data: Path) -> None:
    assert _files(data) == INSTALLED, "exactly the dataset's files, no .part or scratch left"
    assert (data / "mulan/bibtex/bibtex.xml").read_bytes() == MULAN["bibtex.xml"]


def test_full_download_with_pinned_checksum(server, pinned, tmp_path):
    base, state = server
    pinned()
    notes: list[str] = []
    data = tmp_path / "data"
    download("bibtex", data, base_url=base, log=notes.append)
    _installed_ok(data)
    assert [(r["range"], r["status"], r["sent"]) for r in state.requests] == [(None, 200, len(ZIP))]
    assert f"sha256 of bibtex.rar: {ZIP_SHA} (verified)" in notes


def test_checksum_mismatch_is_refused_and_cleaned_up(server, pinned, tmp_path):
    base, _ = server
    wrong = "0" * 64
    pinned(wrong)
    data = tmp_path / "data"
    with pytest.raises(DspError, match="checksum mismatch") as err:
        download("bibtex", data, base_url=base)
    message = str(err.value)
    assert f"{base}/bibtex.rar" in message and wrong in message and ZIP_SHA in message
    assert _files(data) == set(), "the bad file is removed and nothing is installed"
    # A deliberate repack is accepted with verification off.
    notes: list[str] = []
    download("bibtex", data, base_url=base, verify=False, log=notes.append)
    _installed_ok(data)
    assert any("differs from the pinned" in n for n in notes)


def test_partial_file_is_resumed_with_a_range_request(server, pinned, tmp_path):
    base, state = server
    pinned()
    data = tmp_path / "data"
    data.mkdir()
    have = 40_000
    partial_path(data, f"{base}/bibtex.rar").write_bytes(ZIP[:have])
    notes: list[str] = []
    download("bibtex", data, base_url=base, log=notes.append)
    _installed_ok(data)
    assert [(r["range"], r["status"], r["sent"]) for r in state.requests] == [
        (f"bytes={have}-", 206, len(ZIP) - have)
    ], "only the rest is served"
    assert any("resuming" in n for n in notes)


def test_server_ignoring_range_gets_a_full_download(server, pinned, tmp_path):
    base, state = server
    state.ranges = False
    pinned()
    data = tmp_path / "data"
    data.mkdir()
    partial_path(data, f"{base}/bibtex.rar").write_bytes(b"x" * 1000)  # would break the checksum if kept
    download("bibtex", data, base_url=base)
    _installed_ok(data)
    assert [(r["range"], r["status"], r["sent"]) for r in state.requests] == [("bytes=1000-", 200, len(ZIP))]


def test_interrupted_download_keeps_the_part_and_the_next_call_completes_it(server, pinned, tmp_path):
    base, state = server
    pinned()
    state.cuts = [50_000]  # the first response stops midway: the server closes the connection
    data = tmp_path / "data"
    with pytest.raises(DspError, match="closed after") as err:
        download("bibtex", data, base_url=base)
    part = partial_path(data, f"{base}/bibtex.rar")
    assert str(part) in str(err.value) and "resume" in str(err.value)
    assert part.read_bytes() == ZIP[:50_000]
    assert not (data / "mulan").exists(), "nothing that looks complete"
    download("bibtex", data, base_url=base)
    _installed_ok(data)
    assert [(r["range"], r["sent"]) for r in state.requests] == [(None, 50_000), ("bytes=50000-", len(ZIP) - 50_000)]
    assert state.requests[1]["if_range"], "If-Range guards the resume against a changed file"


def test_resumed_file_that_does_not_match_is_refused_then_fetched_afresh(server, pinned, tmp_path):
    base, state = server
    pinned()
    data = tmp_path / "data"
    data.mkdir()
    part = partial_path(data, f"{base}/bibtex.rar")
    part.write_bytes(b"\0" * 30_000)  # e.g. the start of another version of the file
    with pytest.raises(DspError, match="checksum mismatch"):
        download("bibtex", data, base_url=base)
    assert _files(data) == set()
    download("bibtex", data, base_url=base)
    _installed_ok(data)
    assert state.requests[-1]["range"] is None


def test_multi_file_dataset_keeps_completed_files_for_the_next_run(server, tmp_path):
    base, state = server
    state.cuts = [None, 100]  # train.txt.gz arrives whole, test.txt.gz is cut
    data = tmp_path / "data"
    with pytest.raises(DspError, match="closed after"):
        download("conll2000", data, base_url=base)
    assert not (data / "conll2000").exists()
    assert len(list(data.glob(".dsp-*.part"))) == 2
    download("conll2000", data, base_url=base)
    assert (data / "conll2000/train.txt").read_bytes() == CONLL["train.txt"]
    assert (data / "conll2000/test.txt").read_bytes() == CONLL["test.txt"]
    assert _files(data) == {"conll2000/train.txt", "conll2000/test.txt"}
    second = [(r["path"].rsplit("/", 1)[-1], r["range"], r["status"]) for r in state.requests[2:]]
    assert second == [("train.txt.gz", second[0][1], 416), ("test.txt.gz", "bytes=100-", 206)]


def test_file_url_ignores_a_partial_file_and_copies_whole(mirror, pinned, tmp_path):
    pinned()
    data = tmp_path / "data"
    data.mkdir()
    url = (mirror / "bibtex.rar").as_uri()
    partial_path(data, url).write_bytes(b"x" * 1000)
    download("bibtex", data, urls=[url])
    _installed_ok(data)


def test_a_partial_file_in_use_is_not_touched(server, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    base, state = server
    data = tmp_path / "data"
    data.mkdir()
    part = partial_path(data, f"{base}/bibtex.rar")
    with open(part, "ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(DspError, match="another download is writing"):
            download("bibtex", data, base_url=base)
    assert part.exists() and state.requests == []


def test_progress_bar_only_on_a_terminal(server, tmp_path, capsys, monkeypatch):
    base, _ = server
    download("bibtex", tmp_path / "a", base_url=base)  # stderr is not a terminal here
    assert capsys.readouterr().err == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    download("bibtex", tmp_path / "b", base_url=base)
    assert "bibtex.rar" in term.getvalue() and "100%" in term.getvalue()
    term2 = Terminal()
    monkeypatch.setattr(sys, "stderr", term2)
    download("bibtex", tmp_path / "c", base_url=base, progress=False)  # --quiet
    assert term2.getvalue() == ""


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsp.cli.download", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=30, **kw)


def test_cli_prints_the_digest_to_pin_and_no_progress_bar_when_piped(server, tmp_path):
    base, _ = server
    data = tmp_path / "data"
    res = _cli("bibtex", "--data-dir", str(data), "--base-url", base)
    assert res.returncode == 0, res.stderr
    assert f"bibtex: sha256 of bibtex.rar: {ZIP_SHA} (not pinned yet" in res.stdout
    assert res.stderr == "", "no progress bar when stderr is not a terminal"
    _installed_ok(data)
    listing = _cli("--list", "--data-dir", str(data))
    assert listing.returncode == 0
    assert all(name in listing.stdout for name in DATASETS)
    assert re.search(r"bibtex\s+present", listing.stdout) and re.search(r"ocr\s+missing", listing.stdout)
    none = _cli("--data-dir", str(data))
    assert none.returncode == 2 and none.stderr.startswith("error:") and "--list" in none.stderr


def test_cli_checksum_mismatch_is_one_error_line(server, pinned, tmp_path, capsys):
    base, _ = server
    pinned("f" * 64)
    code = main(["bibtex", "--data-dir", str(tmp_path / "data"), "--base-url", base])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: bibtex: checksum mismatch for") and "f" * 64 in err and ZIP_SHA in err


def test_ctrl_c_keeps_the_partial_file_and_the_next_run_resumes(server, tmp_path):
    base, state = server
    state.stall_after = 20_000
    data = tmp_path / "data"
    part = partial_path(data, f"{base}/bibtex.rar")
    proc = subprocess.Popen([sys.executable, "-m", "dsp.cli.download", "bibtex", "--data-dir", str(data),
                             "--base-url", base], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # generous bounds, not timings: on a loaded 2-core machine a reply to SIGINT took over 15 s
        assert state.stalled.wait(timeout=60)
        deadline = time.monotonic() + 30
        while not (part.exists() and part.stat().st_size == 20_000) and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        state.release.set()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err and str(part) in err and "resume" in err
    assert part.read_bytes() == ZIP[:20_000]
    state.stall_after = None
    res = _cli("bibtex", "--data-dir", str(data), "--base-url", base)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stdout
    assert state.requests[-1]["range"] == "bytes=20000-" and state.requests[-1]["sent"] == len(ZIP) - 20_000
    _installed_ok(data)


def test_scripts_download_is_the_same_command(tmp_path):
    res = subprocess.run([sys.executable, "scripts/download.py", "--list", "--data-dir", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "bibtex" in res.stdout


def test_spec_checksums_are_validated():
    with pytest.raises(ValueError, match="sha256"):
        DatasetSpec(urls=("a", "b"), folder="x", files=("f",), unpack="keep", sha256=(None,))
    with pytest.raises(ValueError, match="SHA-256"):
        DatasetSpec(urls=("a",), folder="x", files=("f",), unpack="keep", sha256=("ABC",))
    assert all(len(s.sha256) in (0, len(s.urls)) for s in dl.DATASETS.values())
