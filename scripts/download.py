#!/usr/bin/env python
"""Download datasets into the layout the loaders expect.

    python scripts/download.py bibtex conll2000 --data-dir data
    python scripts/download.py all --base-url file:///mnt/mirror      # offline mirror, same file names
    python scripts/download.py bibtex --url https://example.org/bibtex.zip

Errors are printed as `error: ...` (exit status 2), never as a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

try:
    import dsp  # noqa: F401
except ImportError:  # running from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsp.data.download import DATASETS, download, get_spec
from dsp.errors import DspError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    listing = "\n".join(f"  {n:<10} -> <data-dir>/{s.folder}/  from {', '.join(s.urls)}" for n, s in DATASETS.items())
    parser = argparse.ArgumentParser(
        description="Download datasets for dsp.",
        epilog=f"datasets:\n{listing}\n\nAny source can be replaced with --url or --base-url, e.g. a mirror "
        "of weizmann_horse_db.tar.gz (the original host is often offline) or a zip/tar.gz copy of a "
        "Mulan .rar (reading .rar needs `pip install rarfile` plus unrar or bsdtar).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="+", metavar="NAME", help="dataset names, or 'all'")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("DSP_DATA_DIR") or "data",
        help="where to put the data (default: $DSP_DATA_DIR or ./data)",
    )
    parser.add_argument("--base-url", help="mirror (http(s)://, file:// or a local folder) serving the canonical file names")
    parser.add_argument(
        "--url",
        action="append",
        dest="urls",
        help="exact source URL or local file; with one dataset only, repeat once per file it downloads",
    )
    parser.add_argument("--force", action="store_true", help="download again even if the files exist")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    names = list(DATASETS) if "all" in args.names else list(dict.fromkeys(args.names))
    for name in names:  # check every name before downloading anything
        get_spec(name)
    if args.urls and len(names) != 1:
        raise DspError("--url can only be used with a single dataset name; use --base-url for several")
    if Path(args.data_dir).exists() and not Path(args.data_dir).is_dir():
        raise DspError(f"--data-dir {args.data_dir} is a file; give a folder (it is created if missing)")
    failed = []
    for name in names:  # one dataset failing does not stop the others
        spec = DATASETS[name]
        if not args.force and not spec.missing(args.data_dir):
            print(f"{name}: already present in {Path(args.data_dir) / spec.folder} (use --force to fetch again)")
            continue
        print(f"{name}: downloading...", flush=True)
        try:
            files = download(name, args.data_dir, base_url=args.base_url, urls=args.urls, force=args.force)
        except DspError as err:
            print(f"error: {name}: {err}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        print(f"{name}: {len(files)} file(s) in {Path(args.data_dir) / spec.folder}")
    if failed:
        raise DspError(f"{len(failed)} of {len(names)} dataset(s) failed ({', '.join(failed)}); see above")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except DspError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; partial downloads were discarded, rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
