"""A tiny CoNLL-2000-format corpus written by the tests themselves (no ../shared/data)."""
from __future__ import annotations

import random
from pathlib import Path

# POS -> words; the test split also draws words training never saw (unknown ids, new characters).
LEXICON = {
    "DT": ["the", "a", "this"],
    "JJ": ["big", "red", "old", "quick"],
    "NN": ["dog", "cat", "market", "price", "share"],
    "VBZ": ["rises", "falls", "sees", "likes"],
    "MD": ["will", "can"],
    "VB": ["rise", "fall", "see"],
    "IN": ["in", "of", "on"],
}
UNSEEN = {"NN": ["zebra", "yield"], "JJ": ["vast"], "VBZ": ["jumps"]}


def _noun_phrase(rng: random.Random) -> list[tuple[str, str]]:
    pos = (["DT"] if rng.random() < 0.7 else []) + ["JJ"] * rng.randint(0, 2) + ["NN"] * rng.randint(1, 2)
    return [(p, "B-NP" if i == 0 else "I-NP") for i, p in enumerate(pos)]


def _sentence(rng: random.Random) -> list[tuple[str, str]]:
    """(POS, tag) pairs: NP VP [IN NP] . — every tag follows from the POS and its left neighbour."""
    verb = [("VBZ", "B-VP")] if rng.random() < 0.6 else [("MD", "B-VP"), ("VB", "I-VP")]
    tail = [("IN", "B-PP"), *_noun_phrase(rng)] if rng.random() < 0.5 else []
    return [*_noun_phrase(rng), *verb, *_noun_phrase(rng), *tail, (".", "O")]


def write_conll(folder: Path, n_train: int = 40, n_test: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """Write train.txt and test.txt (`word POS tag` lines, blank line between sentences)."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in (("train", n_train), ("test", n_test)):
        lines = []
        for _ in range(n):
            for pos, tag in _sentence(rng):
                pool = LEXICON.get(pos, ["."]) + (UNSEEN.get(pos, []) if name == "test" else [])
                word = rng.choice(pool)
                lines.append(f"{word.capitalize() if not lines or lines[-1] == '' else word} {pos} {tag}")
            lines.append("")
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
        paths.append(folder / f"{name}.txt")
    return paths[0], paths[1]
