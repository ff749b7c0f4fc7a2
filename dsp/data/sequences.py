"""Splits of variable-length sequences (OCR words, CoNLL sentences), padded to one length.

Labels `y [N, T]` are int64 class indices padded with -1, so a sequence's length is
`(y >= 0).sum(1)` and no separate length tensor has to travel through `TensorDataset`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import TensorDataset

from dsp import interfaces as I
from dsp.data.splits import NamedSplits


@dataclass
class SequenceSplits(NamedSplits):
    """Per split `x [N, T, ...]` and `y [N, T]` (int64, -1 = padding); same interface as MultiLabelSplits.

    `num_features` counts the features of one position (128 pixels for OCR; word id, POS id and
    character ids for CoNLL). `vocab` holds index -> token lists for token inputs (CoNLL), so a
    model config can read embedding sizes from it.
    """

    output, input = I.SEQUENCE, I.IMAGE_SEQUENCES  # (TokenSequenceSplits: token ids)

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    label_names: list[str]
    num_features: int
    vocab: dict[str, list[str]] | None = None
    augment: dict = field(default_factory=dict)  # image sequences (OCR): training augmentation (dsp.data.augment)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass
class TokenSequenceSplits(SequenceSplits):
    """Sequences of tokens (CoNLL): x holds ids into the `vocab` lists, whose sizes a model config
    reads as ${dims.num_words}, ${dims.num_pos} and ${dims.num_chars}."""

    input = I.TOKEN_SEQUENCES
    dims = SequenceSplits.dims | {"num_words", "num_pos", "num_chars"}


def pad_sequences(seqs: list[torch.Tensor], pad_value: float, length: int | None = None) -> torch.Tensor:
    """Stack `[T_i, ...]` tensors into `[N, T, ...]`, T = max T_i (or `length`, to give several
    splits one shape), filling the tail of each sequence with `pad_value`."""
    if not seqs:
        raise ValueError("pad_sequences needs at least one sequence")
    longest = max(s.shape[0] for s in seqs)
    t_max = longest if length is None else length
    if t_max < longest:
        raise ValueError(f"length={length} is shorter than the longest sequence ({longest})")
    out = seqs[0].new_full((len(seqs), t_max, *seqs[0].shape[1:]), pad_value)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out
