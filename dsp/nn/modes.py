"""Switching a module's train / eval mode for a block, restoring it afterwards."""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Run a block with the model in eval mode (no dropout, BN statistics), then restore its mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
