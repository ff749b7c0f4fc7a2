"""Mean squared error of a feed-forward prediction: the denoising CNN baseline (End-to-end SPENs
§6.1.3) and, more generally, any model whose `local_probs` is its output."""
from __future__ import annotations

import torch.nn.functional as F

from dsp import interfaces as I


class LocalMSE(I.Objective):
    outputs = frozenset({I.IMAGE, I.MULTILABEL, I.MASK})
    needs = frozenset({I.LOCAL, I.LOCAL_LOGITS})  # a trainable local prediction

    def loss(self, model, inference, x, y):
        return F.mse_loss(model.local_probs(model.features(x)), y), {}
