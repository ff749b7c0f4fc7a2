#!/usr/bin/env bash
# Reproduce SPEN Tables 1 and 3 (docs/RESULTS.md): every preset, one after the other, then a table.
#   DSP_DATA_DIR=../shared/data bash scripts/reproduce_spen.sh [outputs/repro] [extra overrides...]
set -euo pipefail
out=${1:-outputs/repro}; shift || true
for preset in spen_synthetic mlp_synthetic mlp_bibtex spen_bibtex mlp_delicious spen_delicious; do
  if [ -f "$out/$preset/metrics.json" ]; then echo "$preset: done already"; continue; fi
  # resume=true: a run that was interrupted continues from its last.pt
  dsp-train experiment=$preset trainer.progress=false trainer.resume=true hydra.run.dir="$out/$preset" "$@"
done
python "$(dirname "$0")/collect_results.py" "$out"/*
