"""Task metrics reported by the papers, as Python floats: percentages (0-100), except PSNR (dB).

Inputs are 0/1 tensors `[N, L]` (or anything `bool()`-able), predictions already decoded.
"""
from __future__ import annotations

import torch


def example_f1(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Example-averaged F1 (SPEN, DVN): mean over examples of 2|y ∩ ŷ| / (|y| + |ŷ|).

    An example with no true and no predicted label counts as 100 (a perfect, empty answer).
    """
    pred, target = pred.bool(), target.bool()
    inter = (pred & target).sum(-1).double()  # [N]
    denom = (pred.sum(-1) + target.sum(-1)).double()  # [N]
    f1 = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))
    return 100.0 * f1.mean().item()


def hamming(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Percentage of wrong label bits (Hamming loss)."""
    return 100.0 * (pred.bool() != target.bool()).double().mean().item()


def empty_rate(pred: torch.Tensor) -> float:
    """Percentage of examples given no label at all: a model that collapsed to predicting nothing
    shows here first (next to the share of examples whose true label set is empty)."""
    return 100.0 * (~pred.bool().any(-1)).double().mean().item() if pred.shape[0] else 0.0


# Sequence metrics. Inputs are int64 `[N, T]` label indices; -1 in the target marks padding, and
# predictions at padded positions are ignored. Sequences of length 0 are skipped; with nothing
# left to score the metrics return 0.0 (conlleval's default).


def _per_sequence(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct labels and lengths per sequence, both `[N]`."""
    valid = target >= 0
    return ((pred == target) & valid).sum(1), valid.sum(1)


def char_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Per-word letter accuracy averaged over words (Shevchenko & Osokin 2019, §6.1)."""
    correct, lengths = _per_sequence(pred, target)
    keep = lengths > 0
    return 100.0 * (correct[keep] / lengths[keep]).double().mean().item() if keep.any() else 0.0


def letter_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Accuracy over all letters (tokens) pooled, so long words weigh more."""
    correct, lengths = _per_sequence(pred, target)
    total = lengths.sum().item()
    return 100.0 * correct.sum().item() / total if total else 0.0


def word_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Percentage of words (sequences) with every letter right."""
    correct, lengths = _per_sequence(pred, target)
    keep = lengths > 0
    return 100.0 * (correct[keep] == lengths[keep]).double().mean().item() if keep.any() else 0.0


# The two predicates of the official conlleval script, rule for rule: tags are "B", "I", "O",
# "E", "[", "]" or "." and types the text after the first "-" ("" for "O").
def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (
        (prev_tag, tag) in {("B", "B"), ("B", "O"), ("I", "B"), ("I", "O"), ("E", "E"), ("E", "I"), ("E", "O")}
        or (prev_tag not in ("O", ".") and prev_type != type_)
        or prev_tag in ("[", "]")  # bracket chunks have length 1
    )


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (
        (prev_tag, tag) in {("B", "B"), ("I", "B"), ("O", "B"), ("O", "I"), ("E", "E"), ("E", "I"), ("O", "E")}
        or (tag not in ("O", ".") and prev_type != type_)
        or tag in ("[", "]")
    )


def chunk_f1(pred: torch.Tensor, target: torch.Tensor, label_names: list[str]) -> float:
    """Chunk F1 (FB1) exactly as the CoNLL-2000 conlleval script computes it.

    A chunk is found where startOfChunk fires (B-X, I-X after O or after another type, ...); a
    guessed chunk is correct when it starts and ends at the same tokens as a true chunk of the same
    type. F1 = 2PR / (P + R) with precision and recall in percent, 0 when either is 0.
    """
    def split(index: int) -> tuple[str, str]:
        tag, _, type_ = label_names[index].partition("-")  # conlleval: /^([^-]*)-(.*)$/
        return tag, type_

    # conlleval reads one stream with a sentence break after each sentence, where both tags are
    # "O"; the state below carries over between sentences exactly as it does there.
    boundary = (("O", ""), ("O", ""))
    n_correct = n_found_true = n_found_guessed = 0
    last_g = last_c = ("O", "")
    in_correct = False  # the chunk being read so far matches in guess and truth
    for p_row, t_row in zip(pred.tolist(), target.tolist()):
        length = sum(1 for t in t_row if t >= 0)
        bad = [p for p in p_row[:length] if not 0 <= p < len(label_names)]
        if bad:
            raise ValueError(f"prediction {bad[0]} is not an index into the {len(label_names)} label names")
        for g, c in [*((split(p), split(t)) for p, t in zip(p_row[:length], t_row[:length])), boundary]:
            end_c = _end_of_chunk(last_c[0], c[0], last_c[1], c[1])
            end_g = _end_of_chunk(last_g[0], g[0], last_g[1], g[1])
            start_c = _start_of_chunk(last_c[0], c[0], last_c[1], c[1])
            start_g = _start_of_chunk(last_g[0], g[0], last_g[1], g[1])
            if in_correct:
                if end_c and end_g and last_g[1] == last_c[1]:
                    in_correct = False
                    n_correct += 1
                elif end_c != end_g or g[1] != c[1]:
                    in_correct = False
            if start_c and start_g and g[1] == c[1]:
                in_correct = True
            n_found_true += start_c
            n_found_guessed += start_g
            last_g, last_c = g, c
    n_correct += in_correct  # a chunk still open at the end of the input
    precision = 100.0 * n_correct / n_found_guessed if n_found_guessed else 0.0
    recall = 100.0 * n_correct / n_found_true if n_found_true else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


# Image denoising (End-to-end SPENs §6.1): intensities in [0, 1].

MIN_MSE = 1e-10  # PSNR of an exact match: 10·log10(1 / 1e-10) = 100 dB, large but finite


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1], averaged over images (dim 0).

    Per image i: 10·log10(1 / MSE_i), with the prediction clamped to [0, 1] first (the valid
    intensity range, so overshooting never costs more than the clipped value) and MSE_i floored
    at MIN_MSE so that a perfect image scores 100 dB instead of infinity. Any trailing shape.
    """
    diff = pred.detach().double().clamp(0, 1) - target.detach().double()
    mse = diff.pow(2).flatten(1).mean(1).clamp_min(MIN_MSE)  # [N]
    return (10.0 * torch.log10(1.0 / mse)).mean().item()
