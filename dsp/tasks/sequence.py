"""The sequence-labelling output space (OCR words, chunking): labels [N, T] padded with -1.

Lengths are read off the targets' padding: a sequence's length is part of its input (how many
letters or words it has), never predicted. Prediction is whatever the inference routine returns
(Viterbi MAP or per-position argmax of marginals); mode="local" takes the argmax of the unaries
(the unary-only stage of stage training).

Training batches of image sequences (OCR) are augmented when data.augment is set: every valid
letter gets its own random warp (dsp.data.augment.augment_letters); predict() never augments.
"""
from __future__ import annotations

import numpy as np
import torch

from dsp import metrics as M
from dsp import interfaces as I
from dsp.errors import DspError
from dsp.data.augment import augment_letters, augment_settings
from dsp.nn.modes import eval_mode


def lengths_of(y: torch.Tensor) -> torch.Tensor:
    return (y >= 0).sum(-1)  # [N]


def decode_labels(out: torch.Tensor, logits: bool = False) -> torch.Tensor:
    """Class ids [B, T] from a prediction: decoded labels as they are, relaxed outputs or class
    scores [B, T, K] by their argmax, binary outputs [B, T] (probabilities or log-odds) by a cut."""
    if not out.is_floating_point():
        return out
    if out.dim() == 3:
        return out.argmax(-1)
    return (out > (0.0 if logits else 0.5)).long()


def is_chunking(label_names) -> bool:
    return any(str(n).startswith(("B-", "I-")) for n in label_names)


class SequenceTask(I.Task):
    output = I.SEQUENCE

    def __init__(self, label_names, augment: dict | None = None):
        self.label_names = [str(n) for n in label_names]
        self.augment = augment_settings(augment)
        self.augmenting = any(self.augment.values())
        self.chunking = is_chunking(self.label_names)
        self.main_metric = "chunk_f1" if self.chunking else "char_acc"

    def batch(self, x, y, index=None):
        """Training: the batch cut to its longest sequence, its letters augmented (data.augment)."""
        x, y = self.cut(x, y)
        if self.augmenting:
            if not x.is_floating_point() or x.dim() != 4:
                raise DspError(f"data.augment warps letter images [B, T, H, W]; these sequences hold "
                               f"{tuple(x.shape)} {x.dtype} inputs: drop data.augment")
            valid = y >= 0  # [B, T]
            letters = augment_letters(x[valid], self.augment)  # [n, H', W']
            x = letters.new_zeros(*y.shape, *letters.shape[1:]).index_put((valid,), letters)  # [B, T, H', W']
        return x, y

    @staticmethod
    def cut(x, y):
        """Cut a batch's padding to its longest sequence (datasets pad to their longest one)."""
        t = int(lengths_of(y).max())
        return x[:, :t], y[:, :t]

    def predict(self, model, inference, x, y, batch_size: int, mode: str):
        """Labels [N, T] (-1 at padding) and the mean inference iterations per batch."""
        outs, iters = [], []
        with eval_mode(model):
            for start in range(0, x.shape[0], batch_size):
                xb, yb = self.cut(x[start : start + batch_size], y[start : start + batch_size])
                lengths = lengths_of(yb)
                with torch.no_grad():
                    feats = model.features(xb, lengths)
                    if self.predicts_locally(model, mode):
                        labels, n = decode_labels(model.local_logits(feats), logits=True), 0  # [B, T]
                    else:
                        result = inference(model, feats)
                        labels, n = decode_labels(result.y), result.iterations
                outs.append(torch.where(yb >= 0, labels, torch.full_like(labels, -1)))
                iters.append(n)
        t = y.shape[1]  # batches were cut to their own longest sequence: pad back with -1
        outs = [torch.nn.functional.pad(o, (0, t - o.shape[1]), value=-1) for o in outs]
        return torch.cat(outs), sum(iters) / max(1, len(iters))

    def calibrate(self, pred, y, setting):
        return None  # nothing to tune: labels are decoded by the inference routine

    def evaluate(self, pred, y, state=None) -> dict[str, float]:
        out = {
            "char_acc": M.char_accuracy(pred, y),
            "letter_acc": M.letter_accuracy(pred, y),
            "word_acc": M.word_accuracy(pred, y),
        }
        if self.chunking:
            out["chunk_f1"] = M.chunk_f1(pred, y, self.label_names)
        return out

    def arrays(self, pred, y, state=None, x=None) -> dict[str, np.ndarray]:
        return {
            "pred": pred.cpu().numpy().astype(np.int64),  # [N, T], -1 at padding
            "target": y.cpu().numpy().astype(np.int64),  # [N, T], -1 at padding
            "lengths": lengths_of(y).cpu().numpy().astype(np.int64),  # [N]
            "labels": np.array(self.label_names),  # index -> tag name
        }
