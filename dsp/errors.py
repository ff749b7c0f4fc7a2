"""User-facing errors: one clear paragraph, never a Python traceback."""


class DspError(Exception):
    """An error caused by the user's input (data, config, run folder) that says what to do.

    The command-line entrypoints print these as `error: <message>` and exit with status 2.
    """
