#!/usr/bin/env python
"""Download datasets into the layout the loaders expect: `dsp-download` run from a checkout.

    python scripts/download.py bibtex conll2000 --data-dir data
    python scripts/download.py --list

Same options as `dsp-download` (see dsp/cli/download.py, or --help).
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    import dsp  # noqa: F401
except ImportError:  # running from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsp.cli.download import main

if __name__ == "__main__":
    sys.exit(main())
