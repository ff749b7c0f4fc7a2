"""CoNLL-2000 chunking: one `word POS chunk-tag` line per token, a blank line between sentences.

Each split's x is one int64 tensor `[N, T, 2 + C]` so it fits a TensorDataset: per token the
word id, the POS id, then the word's character ids (C = longest word, capped at MAX_WORD_CHARS;
longer words are cut). In every vocabulary index 0 is padding and 1 the unknown token.

Input vocabularies come from the training sentences left after holding out validation, so
validation meets unknown words the way test does. The chunk tags (the labels) come from both
files instead: the official test set uses a tag that training never does (I-LST), and
conlleval has to score it.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from dsp.data.sequences import TokenSequenceSplits, pad_sequences
from dsp.data.splits import holdout
from dsp.errors import DspError
from dsp.schema import Count, OpenFraction, Size

PAD, UNK = "<pad>", "<unk>"
UNK_ID = 1  # every vocabulary starts [PAD, UNK, ...]; out-of-vocabulary tokens get this id
MAX_WORD_CHARS = 20
TAG = re.compile(r"O|[BIES]-\S+")  # the tag schemes conlleval understands
DOWNLOAD_HINT = (
    "Fetch it with `python scripts/download.py conll2000 --data-dir DIR`, or point paths.data_dir (or "
    "the DSP_DATA_DIR environment variable) at the folder that holds conll2000/train.txt and test.txt."
)

Sentence = list[tuple[str, str, str]]


def read_conll(path: str | os.PathLike) -> list[Sentence]:
    """Sentences as lists of (word, POS, chunk tag)."""
    path = Path(path)
    if not path.is_file():
        raise DspError(f"CoNLL-2000 file not found: {path}. {DOWNLOAD_HINT}")
    sentences, current = [], []
    with open(path, encoding="latin-1") as f:  # latin-1 never fails; the corpus is ASCII anyway
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:  # sentence break (several blank lines count as one)
                if current:
                    sentences.append(current)
                    current = []
                continue
            if len(fields) != 3 or not TAG.fullmatch(fields[2]):
                raise DspError(
                    f"{path}, line {lineno}: expected `word POS chunk-tag` (3 space-separated fields, "
                    f"the tag O or B-/I-TYPE), got {line.strip()!r}"
                )
            current.append((fields[0], fields[1], fields[2]))
    if current:  # the last sentence need not end with a blank line
        sentences.append(current)
    if not sentences:
        raise DspError(f"{path} holds no sentences; download it again. {DOWNLOAD_HINT}")
    return sentences


def _vocab(counts: Counter, min_count: int = 1) -> list[str]:
    """Index -> token: padding, unknown, then tokens seen `min_count`+ times, most frequent first."""
    kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return [PAD, UNK, *kept]


def load_conll2000(
    train: str | os.PathLike,
    test: str | os.PathLike,
    val_fraction: OpenFraction = 0.2,
    split_seed: Count = 0,
    min_count: Size = 1,
    lowercase: bool = False,
) -> TokenSequenceSplits:
    """Load CoNLL-2000: x int64 `[N, T, 2 + C]`, y int64 `[N, T]` tag indices (-1 = padding).

    `min_count` drops rarer training words to the unknown id; `lowercase` applies to the word
    vocabulary only (the character ids keep the capitalisation). `vocab` holds the "words",
    "pos" and "chars" lists (index -> token); all splits share T, the longest sentence.
    """
    if min_count < 1:
        raise DspError(f"data.min_count must be at least 1, got {min_count}")
    train_sents, test_sents = read_conll(train), read_conll(test)
    # Hold out sentence indices with the same permutation rule as every other task.
    idx = torch.arange(len(train_sents))
    fit_ds, val_ds = holdout(idx, idx, val_fraction, split_seed)
    fit = [train_sents[i] for i in fit_ds.tensors[0].tolist()]
    val = [train_sents[i] for i in val_ds.tensors[0].tolist()]
    if not fit:
        raise DspError(f"{train} has {len(train_sents)} sentence(s): too few to hold out data.val_fraction={val_fraction}")

    norm = str.lower if lowercase else str
    words = _vocab(Counter(norm(w) for s in fit for w, _, _ in s), min_count)
    pos = _vocab(Counter(p for s in fit for _, p, _ in s))
    chars = _vocab(Counter(c for s in fit for w, _, _ in s for c in w))
    label_names = sorted({tag for s in train_sents + test_sents for _, _, tag in s})
    word_id, pos_id, char_id = ({t: i for i, t in enumerate(v)} for v in (words, pos, chars))
    label_id = {t: i for i, t in enumerate(label_names)}

    everything = train_sents + test_sents
    num_chars = min(MAX_WORD_CHARS, max(len(w) for s in everything for w, _, _ in s))
    max_len = max(len(s) for s in everything)

    def char_ids(word: str) -> list[int]:
        ids = [char_id.get(c, UNK_ID) for c in word[:num_chars]]
        return ids + [0] * (num_chars - len(ids))

    def encode(sentences: list[Sentence]) -> TensorDataset:
        tokens = [token for s in sentences for token in s]
        # Encode each distinct word once (~20k word types against ~200k tokens), then gather.
        types = {w: i for i, w in enumerate(dict.fromkeys(w for w, _, _ in tokens))}
        per_type = torch.tensor([[word_id.get(norm(w), UNK_ID), *char_ids(w)] for w in types], dtype=torch.int64)
        feats = per_type[torch.tensor([types[w] for w, _, _ in tokens])]
        pos_ids = torch.tensor([[pos_id.get(p, UNK_ID)] for _, p, _ in tokens], dtype=torch.int64)
        x = torch.cat([feats[:, :1], pos_ids, feats[:, 1:]], 1)  # word id, POS id, character ids
        y = torch.tensor([label_id[tag] for _, _, tag in tokens], dtype=torch.int64)
        lengths = [len(s) for s in sentences]
        return TensorDataset(
            pad_sequences(list(x.split(lengths)), 0, max_len), pad_sequences(list(y.split(lengths)), -1, max_len)
        )

    return TokenSequenceSplits(
        encode(fit),
        encode(val),
        encode(test_sents),
        label_names=label_names,
        num_features=2 + num_chars,
        vocab={"words": words, "pos": pos, "chars": chars},
    )
