"""Shared fixtures: tiny Mulan datasets written by the tests themselves (no ../shared/data)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def write_mulan(folder: Path, name: str = "tiny", n_train: int = 60, n_test: int = 30,
                n_features: int = 12, n_labels: int = 5, sparse: bool = True, seed: int = 0):
    """Write NAME-train.arff, NAME-test.arff and NAME.xml with labels that depend on the features."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w = rng.normal(size=(n_features, n_labels))
    header = [f"@relation {name}", ""]
    header += [f"@attribute f{i} numeric" for i in range(n_features)]
    header += [f"@attribute lab{j} {{0,1}}" for j in range(n_labels)]
    for split, n in (("train", n_train), ("test", n_test)):
        x = (rng.random((n, n_features)) < 0.3).astype(float)
        y = (x @ w > 0.2).astype(int)
        rows = []
        for xi, yi in zip(x, y):
            values = list(xi) + list(yi)
            if sparse:
                rows.append("{" + ",".join(f"{k} {v:g}" for k, v in enumerate(values) if v != 0) + "}")
            else:
                rows.append(",".join(f"{v:g}" for v in values))
        (folder / f"{name}-{split}.arff").write_text("\n".join(header + ["", "@data"] + rows) + "\n")
    labels = "".join(f'<label name="lab{j}"></label>\n' for j in range(n_labels))
    (folder / f"{name}.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<labels xmlns="http://mulan.sourceforge.net/labels">\n'
        + labels + "</labels>\n")
    return folder / f"{name}-train.arff", folder / f"{name}-test.arff", folder / f"{name}.xml"


@pytest.fixture
def tiny_mulan(tmp_path):
    return write_mulan(tmp_path / "mulan" / "tiny")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own parse cache and output folder."""
    monkeypatch.setenv("DSP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DSP_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


def write_ocr(path: Path, words_per_fold: int = 6, folds: int = 4, seed: int = 0) -> Path:
    """A tiny letter.data.gz in Taskar's format: random words over `folds` folds, each letter's
    16×8 image a noisy class template, so a letter network can learn something in a few steps."""
    import gzip

    rng = np.random.default_rng(seed)
    templates = rng.random((26, 128)) < 0.3
    lines, letter_id, word_id = [], 1, 1
    for fold in range(folds):
        for _ in range(words_per_fold):
            length = int(rng.integers(1, 6))
            for pos in range(1, length + 1):
                k = int(rng.integers(0, 26))
                pixels = (templates[k] ^ (rng.random(128) < 0.05)).astype(int)
                nxt = letter_id + 1 if pos < length else -1
                lines.append("\t".join(map(str, [letter_id, chr(97 + k), nxt, word_id, pos, fold, *pixels])))
                letter_id += 1
            word_id += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return path


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
