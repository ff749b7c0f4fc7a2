"""Building objects from `_target_` config nodes, with errors that name the config key."""
from __future__ import annotations

import hydra
from hydra.errors import InstantiationException

from dsp.errors import DspError


def instantiate(node, key: str):
    """hydra.utils.instantiate, with errors that name the config key (and no wrapped traceback)."""
    try:
        return hydra.utils.instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, DspError):  # our own message, already clear
            raise err.__cause__ from None
        raise DspError(f"could not build `{key}` from the config: {err}") from None
