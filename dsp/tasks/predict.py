"""Batched prediction of relaxed outputs for a whole split."""
from __future__ import annotations

import torch

from dsp.nn.modes import eval_mode


def predict_soft(model, inference, x: torch.Tensor, batch_size: int, mode: str = "inference"):
    """ȳ [N, L] for inputs x [N, D] and the mean number of inference iterations per batch.

    mode="local" (or a model without structured terms) reads σ(logits) off the local energy;
    mode="inference" minimises the full energy with the configured inference routine.
    """
    outs, iters = [], []
    with eval_mode(model):
        for start in range(0, x.shape[0], batch_size):
            with torch.no_grad():
                feats = model.features(x[start : start + batch_size])
            if mode == "local" or not model.is_structured:  # (Task.predicts_locally)
                outs.append(model.local_probs(feats))
                iters.append(0)
            else:
                result = inference(model, feats)
                outs.append(result.y)
                iters.append(result.iterations)
    return torch.cat(outs), sum(iters) / max(1, len(iters))
