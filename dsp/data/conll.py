"""CoNLL column files: one token per line, columns separated by spaces or tabs, a blank line
between sentences. `load_conll2000` reads CoNLL-2000 chunking (`word POS chunk-tag`); `load_conll`
any such file, its label column chosen by `label_column` (`data.label_column=1`: part-of-speech tags
from the CoNLL-2000 files' second column), the words from `word_column` and, optionally, one more
token-level input from `feature_column` (CoNLL-2000's POS tags for chunking).

Each split's x is one int64 tensor `[N, T, 2 + C]` so it fits a TensorDataset: per token the
word id, the feature id (the POS id for CoNLL-2000; the unknown id on every token when a file has no
feature column), then the word's character ids (C = longest word, capped at MAX_WORD_CHARS;
longer words are cut). In every vocabulary index 0 is padding and 1 the unknown token.

Input vocabularies come from the training sentences left after holding out validation, so
validation meets unknown words the way test does. The labels come from both files instead: the
official CoNLL-2000 test set uses a tag that training never does (I-LST), and the metrics have to
score it.

Files that are not what they seem are refused in one line naming the file and line: a line with
another number of columns than the file's first token line, and a "sentence" longer than
`max_sentence_length` tokens, which is what a file without blank lines between its sentences (or
one of another format) looks like: padded to one length, a single 200,000-token sentence would ask
for tens of gigabytes. CoNLL-2003's `-DOCSTART-` lines separate documents and are skipped.
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

Sentence = list[tuple[str, ...]]  # (word, POS, chunk tag) for CoNLL-2000


MAX_SENTENCE_LENGTH = 1000  # tokens; longer "sentences" are refused (module docstring)


def read_columns(path: str | os.PathLike, max_length: int = MAX_SENTENCE_LENGTH, what: str = "CoNLL",
                 key: str = "data.max_sentence_length", check=None) -> tuple[list[list[tuple[str, ...]]], int]:
    """Sentences of a column file as lists of field tuples, and the number of columns.

    Every token line must have as many fields as the first; `check(fields, lineno, line)` may refuse
    a line further. UTF-8, read as Latin-1 where it is not (Latin-1 never fails)."""
    path = Path(path)
    if not path.is_file():
        raise DspError(f"{what} file not found: {path}. {DOWNLOAD_HINT if what == 'CoNLL-2000' else ''}".rstrip())
    try:
        return _read_columns(path, max_length, key, check, "utf-8")
    except UnicodeDecodeError:
        return _read_columns(path, max_length, key, check, "latin-1")


def _read_columns(path: Path, max_length: int, key: str, check, encoding: str):
    sentences, current, start, width, first = [], [], 0, None, 0
    with open(path, encoding=encoding) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":  # sentence break (several blank lines count as one)
                if current:
                    sentences.append(current)
                    current = []
                continue
            if width is None:
                width, first = len(fields), lineno
            if check is not None:
                check(fields, lineno, line)
            if len(fields) != width:
                raise DspError(f"{path}, line {lineno}: {len(fields)} column(s), but the file's first token line "
                               f"(line {first}) has {width}; every token line needs the same columns, separated by "
                               f"spaces or tabs; got {line.strip()!r}")
            if not current:
                start = lineno
            current.append(tuple(fields))
            if len(current) > max_length:
                end = lineno
                for end, rest in enumerate(f, lineno + 1):  # find where this run of token lines ends
                    if not rest.split():
                        end -= 1
                        break
                raise DspError(f"{path}, lines {start}-{end}: {end - start + 1} token lines with no blank line between "
                               f"them, more than {key}={max_length} tokens in one sentence; blank lines must separate "
                               f"sentences (one token per line, an empty line after each sentence), or raise {key} "
                               f"if the sentences really are that long")
    if current:  # the last sentence need not end with a blank line
        sentences.append(current)
    return sentences, width or 0


def read_conll(path: str | os.PathLike, max_length: int = MAX_SENTENCE_LENGTH) -> list[Sentence]:
    """Sentences as lists of (word, POS, chunk tag)."""
    path = Path(path)

    def check(fields, lineno, line):
        if len(fields) != 3 or not TAG.fullmatch(fields[2]):
            raise DspError(
                f"{path}, line {lineno}: expected `word POS chunk-tag` (3 space-separated fields, "
                f"the tag O or B-/I-TYPE), got {line.strip()!r}"
            )

    sentences, _ = read_columns(path, max_length, "CoNLL-2000", check=check)
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
    max_sentence_length: Size = MAX_SENTENCE_LENGTH,
) -> TokenSequenceSplits:
    """Load CoNLL-2000: x int64 `[N, T, 2 + C]`, y int64 `[N, T]` tag indices (-1 = padding).

    `min_count` drops rarer training words to the unknown id; `lowercase` applies to the word
    vocabulary only (the character ids keep the capitalisation). `vocab` holds the "words",
    "pos" and "chars" lists (index -> token); all splits share T, the longest sentence.
    """
    if min_count < 1:
        raise DspError(f"data.min_count must be at least 1, got {min_count}")
    train_sents, test_sents = read_conll(train, max_sentence_length), read_conll(test, max_sentence_length)
    return _token_splits(train, train_sents, test_sents, val_fraction, split_seed, min_count, lowercase)


def load_conll(
    train: str | os.PathLike,
    test: str | os.PathLike,
    label_column: int = -1,
    word_column: int = 0,
    feature_column: int | None = None,
    val_fraction: OpenFraction = 0.2,
    split_seed: Count = 0,
    min_count: Size = 1,
    lowercase: bool = False,
    max_sentence_length: Size = MAX_SENTENCE_LENGTH,
) -> TokenSequenceSplits:
    """Any CoNLL-format column file: labels from `label_column`, words from `word_column`.

    Columns count from 0; negative ones from the end (-1: the last column, where CoNLL chunking and
    NER files keep their tags). `feature_column` (optional) is one more token-level input, such as
    the POS column for chunking; it may not be the label column. Both files must have the same
    columns. The splits are those of `load_conll2000`: validation carved from the training file,
    labels gathered from both files; chunk F1 is reported when the labels are B-/I- tags, token
    accuracy (`char_acc`) always.
    """
    if min_count < 1:
        raise DspError(f"data.min_count must be at least 1, got {min_count}")
    files = {}
    for split, path in (("train", train), ("test", test)):
        sentences, width = read_columns(path, max_sentence_length)
        if not sentences:
            raise DspError(f"{path} holds no sentences (no token lines); give a CoNLL-format file: one token per "
                           f"line, columns separated by spaces, a blank line between sentences")
        files[split] = (Path(path), sentences, width)
    (_, train_sents, width), (test_path, test_sents, test_width) = files["train"], files["test"]
    if test_width != width:
        raise DspError(f"{train} has {width} columns but {test_path} has {test_width}; both files must have the same "
                       f"columns for data.label_column / data.word_column to mean the same thing")

    def column(key: str, value) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not -width <= value < width:
            raise DspError(f"data.{key}={value!r}: {train} has {width} columns, so give 0 to {width - 1} "
                           f"(or -1 to -{width}, counting from the end)")
        return value % width

    label, word, feature = column("label_column", label_column), column("word_column", word_column), \
        column("feature_column", feature_column)
    if word == label:
        raise DspError(f"data.word_column={word_column} and data.label_column={label_column} are the same column "
                       f"({label}); the words are the input, the labels what is predicted: choose two columns")
    if feature is not None and feature in (label, word):
        raise DspError(f"data.feature_column={feature_column} is the {'label' if feature == label else 'word'} "
                       f"column ({feature}); a model may not read its own labels, nor the words twice: choose "
                       f"another column or null")

    def triples(sentences):
        return [[(t[word], None if feature is None else t[feature], t[label]) for t in s] for s in sentences]

    return _token_splits(train, triples(train_sents), triples(test_sents), val_fraction, split_seed, min_count,
                         lowercase)


def _token_splits(train, train_sents, test_sents, val_fraction, split_seed, min_count, lowercase) -> TokenSequenceSplits:
    """The three splits of (word, feature or None, label) sentences, encoded as the module docstring says."""
    # Hold out sentence indices with the same permutation rule as every other task.
    idx = torch.arange(len(train_sents))
    fit_ds, val_ds = holdout(idx, idx, val_fraction, split_seed, source=f"{train} (sentences)")
    fit = [train_sents[i] for i in fit_ds.tensors[0].tolist()]
    val = [train_sents[i] for i in val_ds.tensors[0].tolist()]

    norm = str.lower if lowercase else str
    words = _vocab(Counter(norm(w) for s in fit for w, _, _ in s), min_count)
    pos = _vocab(Counter(p for s in fit for _, p, _ in s if p is not None))
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
