"""scripts/bench.py: every suite runs on tiny shapes and writes rows with the interface keys.

No timing is asserted; the rows' agreement checks are (the fast paths must compute what the
reference loops compute). The third-party references are turned off (--no-references), so the
test needs neither pytorch-struct nor pytorch-crf.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO

KEYS = {"name", "device", "median_ms", "min_ms", "max_ms", "shapes"}
BENCH = str(REPO / "scripts" / "bench.py")


def run_bench(*args):
    return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, timeout=600)


def test_every_suite_runs_on_tiny_shapes_and_writes_the_interface(tmp_path):
    out = tmp_path / "rows.json"
    proc = run_bench("--suite", "all", "--quick", "--repeats", "1", "--warmup", "0", "--no-references",
                     "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    names = [r["name"] for r in rows]
    for prefix in ("spen_inference", "chain_", "mrf_", "e2e_", "dvn_"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert "spen_inference_reference_handwritten" in names and "spen_inference_dsp" in names
    for r in rows:
        assert KEYS <= set(r), r["name"]
        assert r["device"] == "cpu" and 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert ("reference" in r["name"]) == (not r["name"].endswith(("_dsp", "_dsp_autograd")))
    spen = {r["name"]: r for r in rows if r["name"].startswith("spen_inference")}
    # dsp's loop (hand-written or autograd gradient, device-side convergence tests) lands where the
    # bare loops land; only dsp's clamp of ȳ to [1e-6, 1 - 1e-6] may differ.
    assert all(r["max_abs_diff_vs_handwritten"] < 1e-5 for r in spen.values())
    e2e = [r for r in rows if r["name"].startswith("e2e_")]
    assert all(0 < r["profile"]["kernel_share"] <= 1.5 and r["profile"]["aten_ops"] > 0 for r in e2e)


def test_one_suite_and_a_missing_gpu_are_reported():
    proc = run_bench("--suite", "spen_inference", "--quick", "--repeats", "1", "--warmup", "0")
    assert proc.returncode == 0 and "spen_inference_dsp " in proc.stdout
    if not torch.cuda.is_available():
        proc = run_bench("--suite", "chain_crf", "--device", "cuda")
        assert proc.returncode == 2 and "torch.cuda.is_available() is False" in proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph reference loop needs a GPU")
def test_cuda_graph_reference_agrees_with_the_eager_loop(tmp_path):
    out = tmp_path / "rows.json"
    proc = run_bench("--suite", "spen_inference", "--quick", "--device", "cuda", "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert rows["spen_inference_reference_cuda_graph"]["max_abs_diff_vs_handwritten"] < 1e-5
