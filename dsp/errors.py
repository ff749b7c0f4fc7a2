"""User-facing errors: one clear paragraph, never a Python traceback."""


class DspError(Exception):
    """An error caused by the user's input (data, config, run folder) that says what to do.

    The command-line entrypoints print these as `error: <message>` and exit with status 2.
    """


class DiskError(DspError, OSError):
    """A write that the disk refused (full, read-only, a file where a folder should be), as one line
    naming the path and the cause. Also an OSError, so code that already handles failed writes
    (`except OSError`) keeps doing so."""
