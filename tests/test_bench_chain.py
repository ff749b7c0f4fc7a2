"""scripts/bench_chain.py runs on tiny shapes and writes rows with the interface keys.

No timing is asserted. The reference libraries (pytorch-struct, pytorch-crf) are never required:
their import is made to fail, or they are turned off with --no-references.
"""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import REPO

KEYS = {"name", "device", "median_ms", "min_ms", "max_ms", "shapes"}
TINY = ["--device", "cpu", "--batch", "4", "--length", "3", "--labels", "3", "--repeats", "1",
        "--warmup", "1"]


@pytest.fixture
def bench():
    spec = importlib.util.spec_from_file_location("bench_chain", REPO / "scripts" / "bench_chain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path):
    rows = json.loads(path.read_text())
    assert isinstance(rows, list) and rows
    for row in rows:
        assert KEYS <= set(row), row
        assert row["device"] == "cpu"
        assert 0 <= row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["shapes"]["batch"] == 4 and row["shapes"]["length"] == 3 and row["shapes"]["labels"] == 3
    return rows


def test_without_reference_libraries(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch_struct", None)  # `import torch_struct` raises ImportError
    monkeypatch.setitem(sys.modules, "torchcrf", None)
    out = tmp_path / "rows.json"
    assert bench.main([*TINY, "--json", str(out)]) == 0
    rows = _rows(out)
    assert {r["name"] for r in rows} == {"chain_logz_marginals_dsp", "chain_nll_grad_dsp", "chain_viterbi_dsp"}
    printed = capsys.readouterr().out
    assert "pytorch-struct not available" in printed and "pytorch-crf not available" in printed
    assert "| `chain_viterbi_dsp` |" in printed


def test_no_references_flag_with_mixed_lengths(bench, tmp_path):
    out = tmp_path / "rows.json"
    assert bench.main([*TINY, "--mixed-lengths", "--no-references", "--json", str(out)]) == 0
    rows = _rows(out)
    assert all("reference" not in r["name"] for r in rows)
    assert all(r["shapes"]["mixed_lengths"] for r in rows)


def test_reference_rows_when_installed(bench, tmp_path):
    """Only where the references are installed (not in CI): they must agree with dsp."""
    pytest.importorskip("torch_struct")
    pytest.importorskip("torchcrf")
    out = tmp_path / "rows.json"
    assert bench.main([*TINY, "--mixed-lengths", "--json", str(out)]) == 0
    rows = _rows(out)
    names = {r["name"] for r in rows}
    assert {"chain_logz_marginals_reference_pytorch_struct", "chain_logz_marginals_reference_pytorch_crf",
            "chain_viterbi_reference_pytorch_struct", "chain_viterbi_reference_pytorch_crf"} <= names
    agreement = rows[0]["agreement"]
    for key in ("pytorch_struct_logz", "pytorch_struct_marginals", "pytorch_crf_logz", "pytorch_crf_marginals"):
        assert agreement[key] < 1e-4, (key, agreement)
    assert agreement["pytorch_struct_map_mismatches"] == 0 and agreement["pytorch_crf_map_mismatches"] == 0
