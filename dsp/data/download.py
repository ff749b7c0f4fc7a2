"""Fetch the public datasets into the layout the loaders read (see `DATASETS`).

Only the standard library is used for fetching and for zip, tar(.gz) and .gz files; Mulan's
.rar archives additionally need the optional `rarfile` package and an unrar/bsdtar tool.

Crash safety: every download goes to a temporary file that is renamed into place, archives are
unpacked in a temporary folder and their files are moved only once all of them are present, so
an interrupted run never leaves a file that looks complete. The temporary names start with
`.dsp-` and are removed on any error.
"""
from __future__ import annotations

import fnmatch
import gzip
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence

from dsp.errors import DspError

TIMEOUT_S = 60
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


def _mulan(name: str, split: bool = True) -> DatasetSpec:
    arffs = (f"{name}-train.arff", f"{name}-test.arff") if split else (f"{name}.arff",)
    return DatasetSpec(
        urls=(f"{_MULAN}/{name}.rar/download",),
        folder=f"mulan/{name}",
        files=(*arffs, f"{name}.xml"),
        unpack="archive",  # .rar upstream; a zip/tar.gz mirror works too
    )


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


def download(
    name: str,
    data_dir: str | os.PathLike,
    base_url: str | None = None,
    urls: Mapping[str, str] | Sequence[str] | None = None,
    force: bool = False,
) -> list[Path]:
    """Download dataset `name` into data_dir (skipped if already complete); return its files."""
    spec = get_spec(name)
    data_dir = Path(data_dir)
    if not force and not spec.missing(data_dir):
        return spec.expected(data_dir)
    sources = resolve_urls(spec, base_url, urls)
    data_dir.mkdir(parents=True, exist_ok=True)
    # Everything is fetched and unpacked into a scratch folder inside data_dir (so os.replace
    # never crosses filesystems) and installed only once every required file is there.
    work = Path(tempfile.mkdtemp(prefix=f".dsp-{name}-", dir=data_dir))
    stage = work / "stage"
    stage.mkdir()
    try:
        for i, url in enumerate(sources):
            fetched = _fetch(url, work / f"download-{i}")
            fname = file_name(url)
            if spec.unpack == "keep":
                if fname.endswith(".gz"):
                    _check_gzip(fetched, url)
                os.replace(fetched, stage / fname)
            elif spec.unpack == "gunzip":
                _gunzip(fetched, stage / fname.removesuffix(".gz"), url)
            else:
                unpacked = work / f"unpacked-{i}"
                _unpack_archive(fetched, unpacked, url)
                _collect(unpacked, stage, spec.files)
        missing = _missing(stage, spec.files)
        if missing:
            raise DspError(
                f"the download from {', '.join(sources)} does not contain {', '.join(f'{spec.folder}/{m}' for m in missing)}; nothing "
                f"was installed for {name}. Check that --url/--base-url points at the right file."
            )
        for src in sorted(p for p in stage.rglob("*") if p.is_file()):
            target = data_dir / spec.folder / src.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    missing = spec.missing(data_dir)
    if missing:  # only reachable if something else deleted files meanwhile
        raise DspError(f"after downloading {name}, these files are missing under {data_dir}: {', '.join(missing)}")
    return spec.expected(data_dir)


def _fetch(url: str, target: Path) -> Path:
    """Stream url into `target`; DspError on any network/HTTP failure."""
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "dsp-download/0.1"})
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp, open(target, "wb") as out:
            shutil.copyfileobj(resp, out, length=1 << 20)
    except urllib.error.HTTPError as err:
        raise DspError(
            f"downloading {url} failed with HTTP {err.code} ({err.reason}). The file may have moved; "
            f"pass a working location with --url or --base-url. {_OFFLINE_HINT}"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise DspError(f"could not download {url}: {reason}. {_OFFLINE_HINT}") from None
    return target


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


def _unrar(path: Path, out: Path, url: str) -> None:
    hint = (
        f"{url} is a .rar archive. Install `pip install rarfile` plus the `unrar` or `bsdtar` tool, "
        "or pass a .zip/.tar.gz copy with the same files via --url or --base-url."
    )
    try:
        import rarfile
    except ImportError:
        raise DspError(hint) from None
    try:
        with rarfile.RarFile(path) as rf:
            rf.extractall(out)
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
