"""The written import order of dsp/ (tests/test_architecture.py enforces it).

A module may import from its own layer and the layers listed before it, never from a later one:

    base        errors, instantiate, seed, metrics, interfaces, schema   (no dsp imports but each other)
    data        loaders, caches, augmentation of raw inputs
    nn          building blocks (MLP, LeNet, UNet, text encoders, eval_mode)
    inference   routines and the potentials they consume (chain, message passing, CG, gradient)
    models      energies and score functions built from nn parts
    tasks       output spaces: decoding, metrics, oracles, batched prediction
    objectives  losses of (model, inference, batch)
    training    trainer, stages, checkpoints, scaling, distributed
    build       wiring a config into a run (dsp.build, dsp.compat, dsp.gradcheck, dsp.prediction)
    cli         the console entry points

Data flows the same way: nothing below knows what sits above it.
"""
from __future__ import annotations

LAYERS: list[tuple[str, ...]] = [
    ("dsp.errors", "dsp.instantiate", "dsp.seed", "dsp.metrics", "dsp.interfaces", "dsp.architecture", "dsp.schema"),
    ("dsp.data",),
    ("dsp.nn",),
    ("dsp.inference",),
    ("dsp.models",),
    ("dsp.tasks",),
    ("dsp.objectives",),
    ("dsp.training",),
    ("dsp.build", "dsp.compat", "dsp.gradcheck", "dsp.prediction", "dsp.conf"),
    ("dsp.cli",),
]


def layer_of(module: str) -> int | None:
    """The layer index of a dsp module (a package's modules share its layer), or None."""
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None
