"""Fetch the public datasets into the layout the loaders read (see `DATASETS`).

Only the standard library (plus tqdm for the progress bar) is used for fetching and for zip,
tar(.gz) and .gz files; Mulan's .rar archives additionally need the optional `rarfile` package and
an unrar/bsdtar tool.

Checksums: `DatasetSpec.sha256` pins the SHA-256 of each canonical file (in the order of `urls`).
A pinned file is verified after its download, whatever URL served it; a mismatch removes the file
and raises one error naming the URL, the expected and the found digest. `None` means "not pinned
yet": the file is accepted and its digest is reported (`log`), so that a maintainer can pin it.
The unpacked files are then checked for presence as before.

Resumption: an http(s) download is written to `<data_dir>/.dsp-<file>.<url hash>.part`, which is
kept when the transfer stops (Ctrl-C, a network error, a connection closed midway). The next run
asks the server for the rest with an HTTP Range request (If-Range guards against a file that
changed upstream meanwhile) and appends it; a server that ignores Range (status 200) and file://
URLs are fetched from the start. The checksum decides at the end.

Crash safety: a download lives under its .part name until it is complete (and verified when
pinned), archives are unpacked in a temporary folder and their files are moved only once all of
them are present, so an interrupted run never leaves a file that looks complete. Temporary names
start with `.dsp-`; only the .part files (and their small .part.json notes) outlive a failed run.
"""
from __future__ import annotations

import fnmatch
import gzip
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping, Sequence

from dsp.data.diskspace import disk_error, human
from dsp.errors import DspError

TIMEOUT_S = 60
CHUNK = 1 << 16
USER_AGENT = "dsp-download/0.1"
_log = logging.getLogger(__name__)
_OFFLINE_HINT = (
    "If this machine has no internet access, download the file elsewhere and pass its location "
    "with --url (a local path or a file:// URL works) or --base-url (a mirror or local folder with the same file "
    "names)."
)


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset comes from and what it must leave under data_dir."""

    urls: tuple[str, ...]  # canonical sources, one per downloaded file
    folder: str  # destination folder, relative to data_dir
    files: tuple[str, ...]  # required files relative to `folder`; glob patterns match >= 1 file
    # "archive": extract zip/tar/rar and keep the members matching `files`;
    # "gunzip": store x.gz decompressed as x; "keep": store the download as-is.
    unpack: str
    # SHA-256 (lowercase hex) of each canonical file, in the order of `urls`; None (or an empty
    # tuple for all of them) means "not pinned yet": accepted, and its digest is reported.
    sha256: tuple[str | None, ...] = ()

    def __post_init__(self):
        if self.sha256 and len(self.sha256) != len(self.urls):
            raise ValueError(f"DatasetSpec for {self.folder}: {len(self.sha256)} sha256 values for {len(self.urls)} urls")
        for digest in self.sha256:
            if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"DatasetSpec for {self.folder}: {digest!r} is not a lowercase hex SHA-256")

    def pinned(self, index: int) -> str | None:
        """The pinned SHA-256 of the index-th canonical file, or None."""
        return self.sha256[index] if self.sha256 else None

    def expected(self, data_dir: str | os.PathLike) -> list[Path]:
        """Required files on disk (patterns expanded)."""
        root = Path(data_dir) / self.folder
        return [p for pattern in self.files for p in sorted(root.glob(pattern)) if p.is_file()]

    def missing(self, data_dir: str | os.PathLike) -> list[str]:
        """Required files (or patterns) with nothing on disk, relative to data_dir."""
        return [f"{self.folder}/{p}" for p in _missing(Path(data_dir) / self.folder, self.files)]


def _missing(root: Path, patterns: Sequence[str]) -> list[str]:
    return [p for p in patterns if not any(q.is_file() for q in root.glob(p))]


# SourceForge serves the file itself only under .../<file>/download (the bare URL is an HTML page).
_MULAN = "https://sourceforge.net/projects/mulan/files/datasets"


def _mulan(name: str, split: bool = True, sha256: str | None = None) -> DatasetSpec:
    arffs = (f"{name}-train.arff", f"{name}-test.arff") if split else (f"{name}.arff",)
    return DatasetSpec(
        urls=(f"{_MULAN}/{name}.rar/download",),
        folder=f"mulan/{name}",
        files=(*arffs, f"{name}.xml"),
        unpack="archive",  # .rar upstream; a zip/tar.gz mirror works too (with verify=False once pinned)
        sha256=(sha256,),
    )


# No SHA-256 is pinned yet: the canonical archives could not be fetched where this table was
# written. `dsp-download NAME` prints the digest of each file it fetched; pin it here
# (sha256=(...) in the order of urls) once it was checked against a trusted copy.
DATASETS: dict[str, DatasetSpec] = {
    "bibtex": _mulan("bibtex"),
    "delicious": _mulan("delicious"),
    "bookmarks": _mulan("bookmarks", split=False),  # Mulan ships one file; conf/data/bookmarks.yaml splits it
    "ocr": DatasetSpec(
        urls=("http://ai.stanford.edu/~btaskar/ocr/letter.data.gz",),
        folder="ocr",
        files=("letter.data.gz",),
        unpack="keep",
    ),
    "conll2000": DatasetSpec(
        urls=(
            "https://www.clips.uantwerpen.be/conll2000/chunking/train.txt.gz",
            "https://www.clips.uantwerpen.be/conll2000/chunking/test.txt.gz",
        ),
        folder="conll2000",
        files=("train.txt", "test.txt"),
        unpack="gunzip",
    ),
    # Eran Borenstein's original page; it is often offline, so point --url/--base-url at a mirror
    # of weizmann_horse_db.tar.gz (rgb/ and figure_ground/ folders of horseNNN.jpg).
    "horses": DatasetSpec(
        urls=("https://www.msri.org/people/members/eranb/weizmann_horse_db.tar.gz",),
        folder="weizmann_horse_db",
        files=("rgb/horse*.jpg", "figure_ground/horse*.jpg"),
        unpack="archive",
    ),
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DspError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)} (or 'all')")
    return DATASETS[name]


def file_name(url: str) -> str:
    """The file name a URL serves (SourceForge's trailing /download is skipped)."""
    parts = [p for p in url.split("?", 1)[0].split("/") if p]
    if len(parts) > 1 and parts[-1] == "download":
        parts.pop()
    return parts[-1] if parts else url


def as_url(location: str) -> str:
    """A URL as given, or a local path (a mirror folder or file) as its file:// URL."""
    return location if "://" in location else Path(location).expanduser().resolve().as_uri()


def resolve_urls(
    spec: DatasetSpec,
    base_url: str | None = None,
    urls: Mapping[str, str] | Sequence[str] | None = None,
) -> list[str]:
    """Canonical URLs, re-hosted under base_url, then overridden per file by `urls`.

    `urls` is either a list in the order of `spec.urls` or a dict keyed by the canonical file
    name (e.g. {"train.txt.gz": "file:///mnt/conll/train.txt.gz"}).
    """
    base_url = as_url(base_url) if base_url else None
    out = [f"{base_url.rstrip('/')}/{file_name(u)}" if base_url else u for u in spec.urls]
    if isinstance(urls, Mapping):
        urls = {k: as_url(v) for k, v in urls.items()}
    elif urls is not None:
        urls = [as_url(u) for u in urls]
    if urls is None:
        return out
    names = [file_name(u) for u in spec.urls]
    if isinstance(urls, Mapping):
        unknown = sorted(set(urls) - set(names))
        if unknown:
            raise DspError(f"--url names {unknown} are not files of this dataset; expected keys from {names}")
        return [urls.get(n, u) for n, u in zip(names, out)]
    if len(urls) != len(out):
        raise DspError(
            f"got {len(urls)} URL override(s) but this dataset downloads {len(out)} file(s) ({', '.join(names)}); "
            "give one --url per file, in that order"
        )
    return list(urls)


class DownloadInterrupted(KeyboardInterrupt):
    """Ctrl-C during a transfer: the partial file is kept where the next run resumes it."""

    def __init__(self, url: str, partial: Path, done: int, total: int | None):
        super().__init__(f"interrupted while downloading {url}")
        self.url, self.partial, self.done, self.total = url, partial, done, total


def partial_path(data_dir: str | os.PathLike, url: str) -> Path:
    """Where the download of url collects until it is complete (stable across runs)."""
    tag = hashlib.sha256(url.encode()).hexdigest()[:12]
    return Path(data_dir) / f".dsp-{file_name(url)}.{tag}.part"


def download(
    name: str,
    data_dir: str | os.PathLike,
    base_url: str | None = None,
    urls: Mapping[str, str] | Sequence[str] | None = None,
    force: bool = False,
    *,
    verify: bool = True,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Download dataset `name` into data_dir (skipped if already complete); return its files.

    verify=False accepts a file whose SHA-256 differs from the pinned one (a deliberate repack,
    e.g. a zip copy of a Mulan .rar given with --url). progress: a tqdm bar on stderr (None: only
    when stderr is a terminal). log receives one-line notes (digests, resumption); default: the
    module's logger. force also discards partial downloads instead of resuming them.
    """
    spec = get_spec(name)
    data_dir = Path(data_dir)
    log = log or _log.info
    if not force and not spec.missing(data_dir):
        return spec.expected(data_dir)
    sources = resolve_urls(spec, base_url, urls)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise disk_error(data_dir, err, "pass another --data-dir") from None
    if force:
        for url in sources:
            discard_partial(partial_path(data_dir, url))
    # Everything is unpacked into a scratch folder inside data_dir (so os.replace never crosses
    # filesystems) and installed only once every required file is there. A completed download
    # stays under its .part name until then: if a later file of the dataset fails, the next run
    # finds it complete (HTTP 416 to its Range request) instead of fetching it again.
    work = Path(tempfile.mkdtemp(prefix=f".dsp-{name}-", dir=data_dir))
    stage = work / "stage"
    stage.mkdir()
    parts: list[Path] = []
    try:
        for i, url in enumerate(sources):
            part = partial_path(data_dir, url)
            digest = _fetch(url, part, progress=progress, log=log)
            parts.append(part)
            fname = file_name(url)
            expected = spec.pinned(i)
            if expected is None:
                log(f"sha256 of {fname}: {digest} (not pinned yet; pin it in DATASETS[{name!r}].sha256 "
                    "once checked against a trusted copy)")
            elif digest == expected:
                log(f"sha256 of {fname}: {digest} (verified)")
            elif verify:
                discard_partial(part)
                raise DspError(
                    f"checksum mismatch for {url}: expected SHA-256 {expected}, found {digest}. The file was "
                    f"removed and nothing was installed for {name}. The download is corrupt or not the file "
                    "pinned for this dataset; if this URL deliberately serves another packaging (e.g. a zip "
                    "copy of a .rar), rerun with --no-verify."
                )
            else:
                log(f"sha256 of {fname}: {digest} differs from the pinned {expected}; accepted (verification off)")
            try:
                if spec.unpack == "keep":
                    if fname.endswith(".gz"):
                        _check_gzip(part, url)
                    shutil.copyfile(part, stage / fname)
                elif spec.unpack == "gunzip":
                    _gunzip(part, stage / fname.removesuffix(".gz"), url)
                else:
                    unpacked = work / f"unpacked-{i}"
                    _unpack_archive(part, unpacked, url)
                    _collect(unpacked, stage, spec.files)
                    shutil.rmtree(unpacked, ignore_errors=True)
            except _MissingTool:
                raise  # the download is fine: kept for the run after the tool is installed
            except DspError:
                discard_partial(part)  # complete but unusable: the next run fetches it afresh
                raise
        missing = _missing(stage, spec.files)
        if missing:
            for part in parts:
                discard_partial(part)
            raise DspError(
                f"the download from {', '.join(sources)} does not contain {', '.join(f'{spec.folder}/{m}' for m in missing)}; nothing "
                f"was installed for {name}. Check that --url/--base-url points at the right file."
            )
        for src in sorted(p for p in stage.rglob("*") if p.is_file()):
            target = data_dir / spec.folder / src.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, target)
        for part in parts:
            discard_partial(part)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    missing = spec.missing(data_dir)
    if missing:  # only reachable if something else deleted files meanwhile
        raise DspError(f"after downloading {name}, these files are missing under {data_dir}: {', '.join(missing)}")
    return spec.expected(data_dir)


def _fetch(url: str, part: Path, progress: bool | None = None, log: Callable[[str], None] = _log.info) -> str:
    """Download url completely into the partial file `part`; return its SHA-256 hex digest.

    DspError on any network/HTTP failure (the .part of an http(s) download is kept for the next
    run), DownloadInterrupted on Ctrl-C during the transfer.
    """
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    try:
        if urllib.parse.urlsplit(url).scheme in ("http", "https"):
            try:
                _fetch_http(url, part, progress, log)
            except _Busy:
                raise
            except BaseException:
                if part.is_file() and part.stat().st_size == 0:  # nothing to resume: leave no trace
                    discard_partial(part)
                raise
        else:  # file:// and the like: no ranges; start afresh, keep nothing on failure
            try:
                _fetch_whole(url, part, progress)
            except DownloadInterrupted:
                discard_partial(part)
                raise KeyboardInterrupt from None
            except BaseException:
                discard_partial(part)
                raise
        return _sha256(part)
    except DspError:
        raise
    except OSError as err:  # a write refused on flushing/closing the partial file
        raise disk_error(part, err, "pass another --data-dir") from None


def _open_url(url: str, headers: Mapping[str, str] | None = None):
    """urlopen with our User-Agent; HTTPError passes through, other failures become DspError."""
    try:
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
        return urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise DspError(f"could not download {url}: {reason}. {_OFFLINE_HINT}") from None


def _http_error(url: str, err: urllib.error.HTTPError) -> DspError:
    return DspError(
        f"downloading {url} failed with HTTP {err.code} ({err.reason}). The file may have moved; "
        f"pass a working location with --url or --base-url. {_OFFLINE_HINT}"
    )


def _fetch_whole(url: str, part: Path, progress: bool) -> None:
    try:
        resp = _open_url(url)
    except urllib.error.HTTPError as err:
        raise _http_error(url, err) from None
    with resp:
        total = _int(resp.headers.get("Content-Length"))
        try:
            out = open(part, "wb")
        except OSError as err:
            raise disk_error(part, err, "pass another --data-dir") from None
        with out:
            done = _copy(resp, out, url, part, 0, total, progress, resumable=False)
    if total is not None and done < total:
        raise DspError(f"reading {url} stopped after {done} of {total} bytes; retry.")


def _fetch_http(url: str, part: Path, progress: bool, log: Callable[[str], None]) -> None:
    note = _note_path(part)
    try:
        out = open(part, "ab")  # append: what is there is the start of the file
    except OSError as err:
        raise disk_error(part, err, "pass another --data-dir") from None
    with out:
        _lock(out, part)
        offset = os.fstat(out.fileno()).st_size
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            validator = _validator(note, url)
            if validator:  # a file changed upstream meanwhile comes back whole (200), not as a range of it
                headers["If-Range"] = validator
        try:
            resp = _open_url(url, headers)
        except urllib.error.HTTPError as err:
            with err:
                if err.code == 416 and offset:  # nothing after offset: complete already, or longer than the file
                    if _content_range(err.headers.get("Content-Range"))[2] == offset:
                        log(f"{file_name(url)}: the partial download is complete already")
                        return
                    log(f"{file_name(url)}: the partial download does not fit the file on the server; starting again")
                    out.truncate(0)
                    out.close()
                    return _fetch_http(url, part, progress, log)
                raise _http_error(url, err) from None
        with resp:
            length = _int(resp.headers.get("Content-Length"))
            start, _, size = _content_range(resp.headers.get("Content-Range")) if resp.status == 206 else (None, None, None)
            if offset and resp.status == 206 and start == offset:
                total = size if size is not None else (offset + length if length is not None else None)
                log(f"{file_name(url)}: resuming after {human(offset)}" + (f" of {human(total)}" if total else ""))
            else:
                if offset and resp.status == 206:  # a range we cannot use: ask for the whole file
                    log(f"{file_name(url)}: the server sent another range than asked for; downloading it from the start")
                    resp.close()
                    out.truncate(0)
                    out.close()
                    _discard(note)
                    return _fetch_http(url, part, progress, log)
                if offset:
                    log(f"{file_name(url)}: the server sent the whole file (it does not support resuming, or the "
                        "file changed); downloading it from the start")
                out.truncate(0)
                offset, total = 0, (size if resp.status == 206 and size is not None else length)
                _write_note(note, url, resp.headers)
            done = _copy(resp, out, url, part, offset, total, progress, resumable=True)
    if total is not None and done < total:
        raise DspError(
            f"the connection to {url} closed after {human(done)} of {human(total)}; the partial file {part} is "
            "kept, run the same command again to resume it."
        )


def _copy(resp, out, url: str, part: Path, done: int, total: int | None, progress: bool, resumable: bool) -> int:
    """Stream resp into out (with a progress bar); return the bytes the file holds now.

    Bytes arrive in order, so whatever reached the file when the transfer stops is a prefix of it.
    """
    from tqdm import tqdm

    kept = f"The partial file {part} is kept, run the same command again to resume it." if resumable else "Retry."
    bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc=file_name(url),
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    read = getattr(resp, "read1", resp.read)  # what has arrived, without waiting for a whole chunk
    with bar:
        try:
            while True:
                try:
                    chunk = read(CHUNK)
                except (OSError, ValueError, http.client.HTTPException) as err:
                    got = f"{human(done)} of {human(total)}" if total else human(done)
                    raise DspError(f"the download of {url} stopped after {got}: {err or type(err).__name__}. {kept}") from None
                if not chunk:
                    return done
                try:
                    out.write(chunk)
                    out.flush()  # on disk as it arrives: a killed run leaves what it got to resume
                except OSError as err:
                    raise disk_error(part, err, "pass another --data-dir") from None
                done += len(chunk)
                bar.update(len(chunk))
        except KeyboardInterrupt:
            out.flush()
            raise DownloadInterrupted(url, part, os.fstat(out.fileno()).st_size, total) from None


def _note_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _write_note(note: Path, url: str, headers) -> None:
    """Remember what identifies the server's file (ETag, Last-Modified) for If-Range on resume."""
    data = {"url": url, "etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified")}
    try:
        note.write_text(json.dumps(data))
    except OSError:
        pass  # only an optimisation of the resume; the checksum (when pinned) still decides


def _validator(note: Path, url: str) -> str | None:
    try:
        data = json.loads(note.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("url") != url:
        return None
    etag = data.get("etag")
    if isinstance(etag, str) and etag and not etag.startswith("W/"):  # If-Range needs a strong ETag
        return etag
    modified = data.get("last_modified")
    return modified if isinstance(modified, str) and modified else None


class _Busy(DspError):
    """Another process holds the partial file."""


def _lock(out, part: Path) -> None:
    """Refuse a second process appending to the same partial file (POSIX; a no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:
        return
    try:
        fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _Busy(f"another download is writing {part}; wait for it to finish, then run again.") from None
    except OSError:
        pass  # a filesystem without locks: go on unlocked


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """(first, last, size) of a Content-Range header ('bytes 10-99/100', 'bytes */100')."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None, None
    first, last, size = (int(g) if g and g != "*" else None for g in m.groups())
    return first, last, size


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def discard_partial(part: Path) -> None:
    """Remove a partial download and its note."""
    _discard(part)
    _discard(_note_path(part))


def _check_gzip(path: Path, url: str) -> None:
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            raise DspError(
                f"{url} did not return a gzip file (an HTML error page?); pass a working location with --url."
            )


def _gunzip(src: Path, target: Path, url: str) -> None:
    try:
        with gzip.open(src, "rb") as fin, open(target, "wb") as fout:
            shutil.copyfileobj(fin, fout, length=1 << 20)
    except (OSError, EOFError) as err:
        raise DspError(f"{url} is not a valid gzip file ({err}); pass a working location with --url.") from None


def _unpack_archive(path: Path, out: Path, url: str) -> None:
    """Extract by content (magic bytes), not by the registry: mirrors may serve zip/tar for .rar."""
    out.mkdir()
    with open(path, "rb") as f:
        head = f.read(8)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                zf.extractall(out)  # zipfile already strips absolute paths and '..'
        elif head.startswith(b"Rar!\x1a\x07"):
            _unrar(path, out, url)
        elif tarfile.is_tarfile(path):
            with tarfile.open(path) as tf:
                # The "data" filter refuses links/paths escaping `out` (Python >= 3.11.4).
                kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tf.extractall(out, **kw)
        else:
            raise DspError(
                f"{url} is not a zip, tar(.gz) or rar archive (maybe an HTML page); "
                "pass a working location with --url or --base-url."
            )
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        raise DspError(f"could not unpack the archive from {url}: {err}. The download may be corrupt; retry with --force.") from None


class _MissingTool(DspError):
    """The download is fine but this machine cannot unpack it (no rarfile)."""


def _unrar(path: Path, out: Path, url: str) -> None:
    hint = (
        f"{url} is a .rar archive. Install `pip install rarfile` plus the `unrar` or `bsdtar` tool, "
        "or pass a .zip/.tar.gz copy with the same files via --url or --base-url."
    )
    try:
        import rarfile
    except ImportError:
        raise _MissingTool(hint) from None
    try:
        with rarfile.RarFile(path) as rf:
            rf.extractall(out)
    except getattr(rarfile, "RarCannotExec", ()) as err:  # no unrar/bsdtar tool
        raise _MissingTool(f"{hint} (rarfile: {err})") from None
    except rarfile.Error as err:
        raise DspError(f"{hint} (rarfile: {err})") from None


def _collect(unpacked: Path, stage: Path, patterns: Sequence[str]) -> None:
    """Move the unpacked files matching `patterns` into stage, matching on trailing path parts.

    Archives differ in nesting (Mulan: top level; horses: weizmann_horse_db/rgb/...), so
    "rgb/horse*.jpg" matches .../rgb/horse001.jpg at any depth and lands at stage/rgb/horse001.jpg.
    """
    files = [p for p in sorted(unpacked.rglob("*")) if p.is_file()]
    for pattern in patterns:
        depth = len(PurePosixPath(pattern).parts)
        for p in files:
            tail = PurePosixPath(*p.relative_to(unpacked).parts[-depth:])
            target = stage / tail
            if p.exists() and not target.exists() and fnmatch.fnmatchcase(str(tail), pattern):
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(p, target)
