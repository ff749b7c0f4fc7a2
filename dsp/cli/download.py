"""dsp-download NAME... [--data-dir DIR] [--base-url URL] [--url URL]: fetch the benchmark datasets.

    dsp-download bibtex conll2000 --data-dir data
    dsp-download all --base-url file:///mnt/mirror      # offline mirror, same file names
    dsp-download bibtex --url https://example.org/bibtex.zip --no-verify
    dsp-download --list                                 # what can be fetched, and what is there

Each file is downloaded from its canonical page (or the mirror / URL given) with a progress bar on
stderr (only on a terminal; --quiet turns it off), checked against the SHA-256 pinned in
dsp.data.download.DATASETS (an unpinned file's digest is printed, to be pinned), unpacked, and
installed only once every file the loaders read is there. An interrupted download (Ctrl-C, a
network error) keeps its `.dsp-*.part` file in the data folder; running the same command again
resumes it with an HTTP Range request.

Errors are printed as `error: ...` (exit status 2), never as a traceback; Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dsp.data.download import DATASETS, DownloadInterrupted, download, get_spec
from dsp.data.diskspace import human
from dsp.errors import DspError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    listing = "\n".join(f"  {n:<10} -> <data-dir>/{s.folder}/  from {', '.join(s.urls)}" for n, s in DATASETS.items())
    parser = argparse.ArgumentParser(
        prog="dsp-download",
        description="Download datasets for dsp (resumable; files whose SHA-256 is pinned are verified, --list says which).",
        epilog=f"datasets:\n{listing}\n\nAny source can be replaced with --url or --base-url, e.g. a mirror "
        "of weizmann_horse_db.tar.gz (the original host is often offline) or a zip/tar.gz copy of a "
        "Mulan .rar (reading .rar needs `pip install rarfile` plus unrar or bsdtar; a repacked copy "
        "needs --no-verify once the .rar's checksum is pinned).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="dataset names, or 'all'")
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
    parser.add_argument("--force", action="store_true",
                        help="download again even if the files exist (partial downloads are discarded, not resumed)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="accept files whose SHA-256 differs from the pinned one (a deliberately repacked copy)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no notes; results and errors only")
    parser.add_argument("--list", action="store_true", help="list the datasets (and whether they are in --data-dir), then exit")
    return parser.parse_args(argv)


def list_datasets(data_dir: str) -> None:
    for name, spec in DATASETS.items():
        state = "present" if not spec.missing(data_dir) else "missing"
        print(f"{name:<10} {state:<8} {Path(data_dir) / spec.folder}")
        for i, url in enumerate(spec.urls):
            print(f"  {url}  sha256: {spec.pinned(i) or 'not pinned'}")


def run(args: argparse.Namespace) -> None:
    if args.list:
        list_datasets(args.data_dir)
        return
    if not args.names:
        raise DspError(f"give at least one dataset name ({', '.join(DATASETS)}, or 'all'); --list shows them")
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

        def note(message: str, name: str = name) -> None:
            # Digests are always shown (a maintainer pins them); other notes only without --quiet.
            if not args.quiet or message.startswith("sha256 "):
                print(f"{name}: {message}", flush=True)

        try:
            files = download(name, args.data_dir, base_url=args.base_url, urls=args.urls, force=args.force,
                             verify=args.verify, progress=False if args.quiet else None, log=note)
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
    except DownloadInterrupted as err:
        got = f"{human(err.done)} of {human(err.total)}" if err.total else human(err.done)
        print(f"\ninterrupted: the partial download of {err.url} ({got}) is kept in {err.partial}; "
              "run the same command again to resume it", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was installed for the dataset in progress; partial downloads "
              f"(.dsp-*.part in {args.data_dir}) are kept and resumed by the next run", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
