"""Where a run was computed: the record dsp-train appends to `<run>/environment.json` each time it
starts (a resumed run may land on another machine) and dsp-eval writes beside its metrics.

Why it is worth a file: on CPU, one seed and one commit give bit-identical runs only on machines
whose processors offer the same instruction sets. oneDNN (PyTorch's CPU convolutions) picks its
kernels by what the processor offers, and AVX2 and AVX-512 kernels round differently; measured on
`unet_horses`: a 3-epoch run scores 68.30 test mean IoU with AVX-512 kernels and 68.43 with
`ONEDNN_MAX_CPU_ISA=AVX2`, each bit-identical when repeated (docs/RESULTS.md, "Reproducing a run
bit for bit"). The record names the processor's vector extensions and these pinning variables, so
two runs that differ can be told apart from a bug.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

import dsp
from dsp.training.checkpoint import write_json

# Variables that fix which kernels the CPU libraries pick (set one to make hosts agree).
PINNING_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR",
                     "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG")
# The vector extensions that decide oneDNN's and MKL's kernels, as /proc/cpuinfo names them.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile")


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, list[str]]:
    """The processor's model name and which of VECTOR_FLAGS it has ([] where there is no cpuinfo)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break  # every core lists the same flags
    except OSError:
        pass
    return name, [f for f in VECTOR_FLAGS if f in flags]


def source_commit() -> str | None:
    """The git commit of the dsp source that ran, with "+dirty" for uncommitted changes to dsp/ or
    conf/ (what a run executes), or None outside dsp's own git checkout (an installed wheel)."""
    root = Path(dsp.__file__).resolve().parent.parent
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None  # an installed copy inside some other repository (a venv in a project)
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "dsp", "conf"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def environment(device: torch.device | str = "cpu") -> dict:
    """One record: software, processor, accelerator, threads and the kernel-pinning variables."""
    device = torch.device(device)
    cpu, vector = cpu_description()
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv),
        "dsp": dsp.__version__,
        "commit": source_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device.type,
        "cpu": cpu,
        "cpu_vector_extensions": vector,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "pinning": {k: os.environ[k] for k in PINNING_VARIABLES if k in os.environ},
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        record.update(gpu=torch.cuda.get_device_name(index), cuda=torch.version.cuda,
                      cudnn=torch.backends.cudnn.version())
    return record


def append_environment(path: Path, device: torch.device | str = "cpu") -> None:
    """Add this start's record to the list in `path` (written atomically). An unreadable file is
    kept as `<name>.unreadable` rather than overwritten."""
    records = []
    if path.exists():
        try:
            records = json.loads(path.read_text())
            if not isinstance(records, list):
                raise ValueError("not a list")
        except (OSError, ValueError):
            path.replace(path.with_name(path.name + ".unreadable"))
            records = []
    write_json(records + [environment(device)], path)
