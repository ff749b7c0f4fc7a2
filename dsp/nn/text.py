"""Unary network for CoNLL chunking (Shevchenko & Osokin 2019, §6.1, after Yang et al. 2016).

Each token of x [B, T, 2 + C] (word id, POS id, C character ids; 0 = padding, 1 = unknown) becomes
[word embedding; POS embedding; final states of a character BiLSTM]; a head turns the sequence
into unary scores [B, T, K]:

- head="bilstm": a word-level BiLSTM and a linear layer, the model whose joint training works;
- head="linear": two linear layers with a ReLU in between, the variant whose joint training
  underperforms (the paper's chunking rows of Table 2).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dsp import interfaces as I

from dsp.data.conll import UNK_ID
from dsp.errors import DspError
from dsp.schema import Rate, Size


class CharEncoder(nn.Module):
    """Words as character id rows [N, C] (left-aligned, 0-padded) -> BiLSTM final states [N, 2H]."""

    def __init__(self, num_chars: int, char_dim: int = 10, hidden: int = 50, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(num_chars, char_dim, padding_idx=0)
        self.lstm = nn.LSTM(char_dim, hidden, layers, batch_first=True, bidirectional=True)
        self.out_features = 2 * hidden

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        # A batch repeats its frequent words ("the", ","): encode each distinct spelling once.
        uniq, inverse = torch.unique(chars, dim=0, return_inverse=True)  # [U, C], [N]
        n_chars = (uniq > 0).sum(-1).clamp_min(1)  # [U]; packing skips the padding
        packed = pack_padded_sequence(self.embed(uniq), n_chars.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # h [layers * 2, U, H], in uniq's order
        return torch.cat([h[-2], h[-1]], -1)[inverse]  # [N, 2H]: last layer, forward and backward


class LinearHead(nn.Module):
    """Per-token two-layer perceptron: [B, T, D] -> [B, T, K]."""

    def __init__(self, in_features: int, num_labels: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, num_labels))

    def forward(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class BiLSTMHead(nn.Module):
    """Word-level BiLSTM over each sentence's valid tokens, then a linear layer: [B, T, D] -> [B, T, K]."""

    def __init__(self, in_features: int, num_labels: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(in_features, hidden, layers, batch_first=True, bidirectional=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(2 * hidden, num_labels)

    def forward(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(h, lengths.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False)
        states, _ = self.lstm(packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=h.shape[1])  # [B, T, 2H]
        return self.out(self.dropout(states))


class WordTagger(nn.Module):
    """x [B, T, 2 + C] and lengths [B] -> unary scores [B, T, num_labels], zero at padded positions.

    `pretrained`: a text file of word vectors (`word v1 ... v_word_dim` per line, GloVe/SENNA style)
    that initialises the embeddings of the vocabulary's words found in it; it needs `vocab`, the
    index -> word list of the data (`data.vocab["words"]`). Words not in the file keep their random
    (learnable) embedding, as the paper's out-of-SENNA words do.

    `word_dropout`: while training, each token's word id becomes the unknown id with this
    probability. With every training word in the vocabulary the unknown row is otherwise never
    trained, yet it is the embedding every out-of-vocabulary validation and test word gets.
    """

    inputs = frozenset({I.TOKEN_SEQUENCES})  # what dsp.compat matches against the data's input kind

    def __init__(self, num_labels: Size, num_words: Size, num_pos: Size, num_chars: Size, word_dim: Size = 50,
                 pos_dim: Size = 10, char_dim: Size = 10, char_hidden: Size = 50, char_layers: Size = 2,
                 head: Literal["linear", "bilstm"] = "linear", hidden: Size = 300, word_layers: Size = 2,
                 dropout: Rate = 0.5, pretrained: str | os.PathLike | None = None, vocab: Sequence[str] | None = None,
                 word_dropout: Rate = 0.0):
        super().__init__()
        if not 0.0 <= word_dropout < 1.0:
            raise DspError(f"model.unary_net.word_dropout must be in [0, 1), got {word_dropout}")
        self.word_dropout = word_dropout
        self.words = nn.Embedding(num_words, word_dim, padding_idx=0)
        self.pos = nn.Embedding(num_pos, pos_dim, padding_idx=0)
        self.chars = CharEncoder(num_chars, char_dim, char_hidden, char_layers)
        self.dropout = nn.Dropout(dropout)
        d = word_dim + pos_dim + self.chars.out_features
        if head == "linear":
            self.head = LinearHead(d, num_labels, hidden, dropout)
        elif head == "bilstm":
            self.head = BiLSTMHead(d, num_labels, hidden, word_layers, dropout)
        else:
            raise DspError(f"model.unary_net.head must be linear or bilstm, got {head!r}")
        self.pretrained_found = 0
        if pretrained is not None:
            if vocab is None:
                raise DspError("model.unary_net.pretrained needs the word vocabulary (unary_net.vocab, "
                               "the data's vocab['words']) to know which row each vector belongs to")
            self.pretrained_found = load_word_vectors(self.words.weight, vocab, pretrained)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] < 3:
            raise DspError(f"WordTagger expects x [B, T, 2 + C] (word, POS, characters), got {tuple(x.shape)}")
        b, t = x.shape[:2]
        mask = torch.arange(t, device=x.device) < lengths.unsqueeze(-1)  # [B, T]
        chars = x.new_zeros(b, t, self.chars.out_features, dtype=self.words.weight.dtype)  # [B, T, 2H]
        chars[mask] = self.chars(x[..., 2:][mask])  # only real tokens go through the character BiLSTM
        words = x[..., 0]
        if self.training and self.word_dropout > 0:
            unknown = (torch.rand(words.shape, device=words.device) < self.word_dropout) & mask
            words = words.masked_fill(unknown, UNK_ID)
        h = torch.cat([self.words(words), self.pos(x[..., 1]), chars], -1)  # [B, T, D]
        scores = self.head(self.dropout(h), lengths)  # [B, T, K]
        return scores * mask.unsqueeze(-1)


def load_word_vectors(weight: torch.Tensor, vocab: Sequence[str], path: str | os.PathLike) -> int:
    """Copy the vectors of `path` into the rows of `weight` [V, D] whose word, or failing that its
    lowercase form (SENNA is lowercased), the file holds. Returns how many rows were set."""
    vocab = list(vocab)  # an OmegaConf ListConfig is slow to index
    if len(vocab) != weight.shape[0]:
        raise DspError(f"the word vocabulary has {len(vocab)} entries but the embedding {weight.shape[0]} rows")
    wanted = set(vocab[2:]) | {w.lower() for w in vocab[2:]}  # skip padding and unknown
    dim, found = weight.shape[1], {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                fields = line.split()
                if not fields or (lineno == 1 and len(fields) == 2):  # blank, or word2vec's "count dim" header
                    continue
                if len(fields) != dim + 1:
                    raise DspError(f"{path}, line {lineno}: expected a word and {dim} numbers "
                                   f"(model.unary_net.word_dim), got {len(fields) - 1}")
                if fields[0] in wanted:  # keep only what the vocabulary can use (GloVe has 400k words)
                    try:
                        found[fields[0]] = [float(v) for v in fields[1:]]
                    except ValueError:
                        raise DspError(f"{path}, line {lineno}: a vector entry is not a number") from None
    except OSError as err:
        raise DspError(f"cannot read the word vectors model.unary_net.pretrained={path}: {err}") from None
    rows = [(i, found.get(w, found.get(w.lower()))) for i, w in enumerate(vocab) if i > 1]
    rows = [(i, v) for i, v in rows if v is not None]
    if rows:
        with torch.no_grad():
            weight[torch.tensor([i for i, _ in rows])] = torch.tensor([v for _, v in rows], dtype=weight.dtype)
    return len(rows)
