#!/usr/bin/env bash
# The OCR protocol of Shevchenko & Osokin (2019) §6.1: fold 0 validates, 9-fold cross-validation
# over folds 1-9; prints the per-fold table and mean ± std of char_acc (Table 2).
#   DSP_DATA_DIR=../shared/data bash scripts/crf_ocr_folds.sh crf_ocr_online [outputs/ocr] [overrides...]
# Finished folds are skipped and interrupted ones resume from their last.pt, so the script can be
# re-run until every fold is done; FOLDS="1 2" runs a subset.
set -euo pipefail
preset=${1:?usage: crf_ocr_folds.sh PRESET [OUT_DIR] [overrides...]}; shift
out=${1:-outputs/ocr}; shift || true
for k in ${FOLDS:-1 2 3 4 5 6 7 8 9}; do
  run="$out/$preset/fold$k"
  if [ -f "$run/metrics.json" ]; then echo "$preset fold $k: done already"; continue; fi
  dsp-train experiment="$preset" data.test_fold="$k" trainer.progress=false trainer.resume=true \
    hydra.run.dir="$run" "$@"
done
python "$(dirname "$0")/collect_results.py" --mean "$out/$preset"/fold*
