"""Offline tests for dsp.data.download and scripts/download.py.

Tiny fixture archives are written into tmp_path and served by a local HTTP server (127.0.0.1,
random port) or as file:// URLs; nothing touches the internet or ../shared/data.
"""
from __future__ import annotations

import functools
import gzip
import http.server
import io
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from dsp.data.download import DATASETS, download, resolve_urls
from dsp.errors import DspError

REPO = Path(__file__).resolve().parent.parent
MULAN = {
    "bibtex-train.arff": b"@relation train\n@attribute a {0,1}\n@data\n{0 1}\n",
    "bibtex-test.arff": b"@relation test\n@attribute a {0,1}\n@data\n{}\n",
    "bibtex.xml": b'<labels xmlns="http://mulan.sourceforge.net/labels"><label name="a"/></labels>\n',
}
LETTER = b"1\to\t1\t-1\t2\t1\t1\t0 1 0\n"
CONLL = {"train.txt": b"Confidence NN B-NP\n", "test.txt": b"Rockwell NNP B-NP\n"}
HORSE = {"rgb/horse001.jpg": b"\xff\xd8rgb", "figure_ground/horse001.jpg": b"\xff\xd8fg"}


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def mirror(tmp_path):
    """A folder holding every canonical file name (the Mulan 'rar' is really a zip)."""
    root = tmp_path / "mirror"
    root.mkdir()
    (root / "bibtex.rar").write_bytes(_zip(MULAN))
    (root / "bibtex.zip").write_bytes(_zip(MULAN))
    (root / "letter.data.gz").write_bytes(gzip.compress(LETTER))
    for name, data in CONLL.items():
        (root / f"{name}.gz").write_bytes(gzip.compress(data))
    # Nested like the real archive, plus a folder the loaders don't need.
    members = {f"weizmann_horse_db/{k}": v for k, v in HORSE.items()}
    members["weizmann_horse_db/gray/horse001.jpg"] = b"gray"
    (root / "weizmann_horse_db.tar.gz").write_bytes(_tar_gz(members))
    return root


@pytest.fixture
def server(mirror):
    """Serve `mirror` over HTTP on a free local port; yields (base_url, list of requested paths)."""
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet, record the hit instead
            hits.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(mirror)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_download_everything_produces_exact_layout(server, tmp_path):
    base, _ = server
    data = tmp_path / "data"
    for name in ("bibtex", "ocr", "conll2000", "horses"):
        got = download(name, data, base_url=base)
        assert got and all(p.is_file() for p in got)
    assert _files(data) == {
        "mulan/bibtex/bibtex-train.arff",
        "mulan/bibtex/bibtex-test.arff",
        "mulan/bibtex/bibtex.xml",
        "ocr/letter.data.gz",
        "conll2000/train.txt",
        "conll2000/test.txt",
        "weizmann_horse_db/rgb/horse001.jpg",
        "weizmann_horse_db/figure_ground/horse001.jpg",
    }
    assert (data / "mulan/bibtex/bibtex.xml").read_bytes() == MULAN["bibtex.xml"]
    assert gzip.decompress((data / "ocr/letter.data.gz").read_bytes()) == LETTER
    assert (data / "conll2000/train.txt").read_bytes() == CONLL["train.txt"]
    assert (data / "weizmann_horse_db/figure_ground/horse001.jpg").read_bytes() == HORSE["figure_ground/horse001.jpg"]
    assert not list(data.glob(".dsp-*")), "scratch folders must be removed"


def test_file_urls_and_per_file_overrides(mirror, tmp_path):
    data = tmp_path / "data"
    download("ocr", data, urls=[(mirror / "letter.data.gz").as_uri()])
    download("bibtex", data, urls={"bibtex.rar": (mirror / "bibtex.zip").as_uri()})
    download("conll2000", data, base_url=mirror.as_uri())
    assert {"ocr/letter.data.gz", "mulan/bibtex/bibtex.xml", "conll2000/test.txt"} <= _files(data)


def test_plain_local_paths_work_as_urls(mirror, tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.chdir(mirror.parent)  # a relative path too, as a user types it
    download("ocr", data, urls=[f"{mirror.name}/letter.data.gz"])
    download("conll2000", data, base_url=str(mirror))
    assert {"ocr/letter.data.gz", "conll2000/test.txt"} <= _files(data)


def test_resolve_urls_rehosts_by_file_name():
    spec = DATASETS["bibtex"]
    assert resolve_urls(spec, base_url="http://m/x/") == ["http://m/x/bibtex.rar"]
    with pytest.raises(DspError, match="train.txt.gz"):
        resolve_urls(DATASETS["conll2000"], urls=["only-one"])


def test_http_404_names_the_url(server, tmp_path):
    base, _ = server
    with pytest.raises(DspError, match=r"HTTP 404") as err:
        download("ocr", tmp_path / "data", base_url=f"{base}/nowhere")
    assert f"{base}/nowhere/letter.data.gz" in str(err.value)
    assert not _files(tmp_path / "data")


def test_archive_missing_a_file_installs_nothing(server, mirror, tmp_path):
    base, _ = server
    (mirror / "partial.zip").write_bytes(_zip({k: v for k, v in MULAN.items() if k != "bibtex.xml"}))
    data = tmp_path / "data"
    with pytest.raises(DspError, match=r"mulan/bibtex/bibtex\.xml") as err:
        download("bibtex", data, urls=[f"{base}/partial.zip"])
    assert "partial.zip" in str(err.value)
    assert not _files(data), "no partial files may be left behind"


def test_non_gzip_response_is_rejected(server, mirror, tmp_path):
    base, _ = server
    (mirror / "page.gz").write_bytes(b"<html>moved</html>")
    with pytest.raises(DspError, match="gzip"):
        download("ocr", tmp_path / "data", urls=[f"{base}/page.gz"])
    assert not _files(tmp_path / "data")


def test_rar_without_rarfile_explains_the_fix(server, mirror, tmp_path, monkeypatch):
    base, _ = server
    (mirror / "real.rar").write_bytes(b"Rar!\x1a\x07\x00" + b"\x00" * 32)
    monkeypatch.setitem(sys.modules, "rarfile", None)  # makes `import rarfile` fail
    with pytest.raises(DspError, match="rarfile") as err:
        download("bibtex", tmp_path / "data", urls=[f"{base}/real.rar"])
    assert "--base-url" in str(err.value) and "unrar" in str(err.value)


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(DspError) as err:
        download("bibtexx", tmp_path)
    assert all(name in str(err.value) for name in DATASETS)


def test_complete_dataset_is_skipped_unless_forced(server, tmp_path):
    base, hits = server
    data = tmp_path / "data"
    first = download("conll2000", data, base_url=base)
    assert len(hits) == 2
    hits.clear()
    assert download("conll2000", data, base_url=base) == first
    assert hits == [], "a complete dataset must not hit the server"
    download("conll2000", data, base_url=base, force=True)
    assert len(hits) == 2


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/download.py", *args], cwd=REPO, capture_output=True, text=True, timeout=30
    )


def test_cli_downloads_and_reports_errors_without_traceback(server, tmp_path):
    base, _ = server
    data = tmp_path / "data"
    ok = _cli("ocr", "conll2000", "--data-dir", str(data), "--base-url", base)
    assert ok.returncode == 0, ok.stderr
    assert str(data / "conll2000") in ok.stdout and (data / "ocr/letter.data.gz").is_file()

    for bad in (["nope", "--data-dir", str(data)], ["horses", "--data-dir", str(data), "--base-url", f"{base}/x"]):
        res = _cli(*bad)
        assert res.returncode == 2
        assert res.stderr.startswith("error:") and "Traceback" not in res.stderr
    assert "known datasets" in _cli("nope", "--data-dir", str(data)).stderr
