"""The environment record of a run (dsp.training.provenance): what it names and how it is kept."""
from __future__ import annotations

import json

import torch

from dsp.training.provenance import append_environment, cpu_description, environment


def test_cpu_description_reads_the_model_name_and_the_vector_extensions(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n"
                       "flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 sha_ni\n\nprocessor\t: 1\n")
    assert cpu_description(cpuinfo) == ("Test CPU 9000", ["avx2", "fma", "avx512f", "avx512_bf16"])
    name, flags = cpu_description(tmp_path / "absent")  # not Linux: the platform's name, no flags
    assert flags == [] and isinstance(name, str)


def test_the_record_names_software_threads_and_kernel_pinning(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    record = environment("cpu")
    assert record["torch"] == torch.__version__ and record["device"] == "cpu"
    assert record["torch_threads"] == torch.get_num_threads()
    assert record["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["pinning"]["ONEDNN_MAX_CPU_ISA"] == "AVX2" and "MKL_ENABLE_INSTRUCTIONS" not in record["pinning"]
    assert "gpu" not in record
    json.dumps(record)  # plain values only


def test_each_start_appends_and_an_unreadable_file_is_kept_aside(tmp_path):
    path = tmp_path / "environment.json"
    append_environment(path)
    append_environment(path)
    assert len(json.loads(path.read_text())) == 2
    path.write_text("{half written")
    append_environment(path)
    assert len(json.loads(path.read_text())) == 1
    assert (tmp_path / "environment.json.unreadable").read_text() == "{half written"


def test_the_source_commit_is_the_checkout_head():
    import re
    import subprocess
    from pathlib import Path

    import dsp
    from dsp.training.provenance import source_commit

    root = Path(dsp.__file__).resolve().parent.parent
    commit = source_commit()
    if not (root / ".git").exists():  # an installed copy: no commit to name
        assert commit is None
        return
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit) and commit.split("+")[0] == head
