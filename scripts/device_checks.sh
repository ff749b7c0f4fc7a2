#!/usr/bin/env bash
# The GPU figures the issues still lack, in one call on a machine with a GPU (issue 3's unrolled
# benchmark, issue 8's speed suite and time-to-accuracy runs, issue 6's MRF iteration time, mixed
# precision and torch.compile against fp32 eager training), after the CUDA-only tests. Run from the
# repository root. Four files go to $OUT (the device tool's result folder, which brings back few
# files) or outputs/gpu: device_checks.log (every step's
# output), unrolled.json, bench.json and precision.json; training run folders go to outputs/gpu_runs.
#
#   bash scripts/device_checks.sh                      # every step
#   STEPS="tests unrolled" bash scripts/device_checks.sh
#   STEPS=precision bash scripts/device_checks.sh      # fp32 / bf16 / fp16 / compiled training, two presets
#   STEPS=dvn DVN_SECONDS=420 bash scripts/device_checks.sh   # issue 4's horses DVN on a time budget (opt-in)
#   DEVICE=cpu QUICK=1 bash scripts/device_checks.sh   # rehearsal on a CPU (tiny shapes, 1 epoch)
#
# The device image has torch, h5py, tensorboard, tqdm and pytest but not hydra-core, omegaconf,
# antlr4 or liac-arff; carry them (and the benchmark-only references) as pure-Python wheels, made
# here once:   python -m pip wheel --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 \
#                antlr4-python3-runtime==4.9.3 liac-arff==2.5.0 pytorch-crf==0.7.2 torch-struct==0.5
# and the data the time-to-accuracy and DVN steps read:
#   mkdir -p .data && cp -r ../shared/data/{mulan,ocr,weizmann_horse_db} .data/
# (.whl/ and .data/ are git-ignored; name both in the device tool's `carry`).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-outputs/gpu}
device=${DEVICE:-cuda}
steps=${STEPS:-"tests unrolled suite mrf precision accuracy"}
for s in $steps; do  # a mistyped step name would otherwise run nothing and exit 0
  case " tests unrolled suite mrf precision accuracy dvn " in *" $s "*) ;;
    *) echo "error: STEPS has an unknown step '$s'; choose among tests unrolled suite mrf precision accuracy dvn" >&2; exit 2 ;;
  esac
done
quick=${QUICK:-}
runs=outputs/gpu_runs
log="$out/device_checks.log"
mkdir -p "$out" "$runs"

if [ -d .whl ] && ! python3 -c "import hydra" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
# No pip install of dsp itself on the device: import it from the tree. Its configs are the dsp.conf
# package, which setuptools maps to conf/; a link stands in for that mapping while we run.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import dsp.conf" 2>/dev/null; then
  ln -s ../conf dsp/conf && trap 'rm -f dsp/conf' EXIT
fi
export DSP_DATA_DIR=${DSP_DATA_DIR:-$PWD/.data}
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee "$log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$log" 2>/dev/null

failed=0
step() {  # step NAME COMMAND...: run one step, keep its log, go on after a failure
  local name=$1; shift
  case " $steps " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name: $*" | tee -a "$log"
  local start=$SECONDS
  "$@" > "$runs/$name.log" 2>&1
  local rc=$?
  cat "$runs/$name.log" >> "$log"
  tail -n 25 "$runs/$name.log"
  echo "== $name: rc $rc, $((SECONDS - start)) s" | tee -a "$log"
  [ $rc -eq 0 ] || failed=1
}

accuracy() {  # time to accuracy (issue 8): SPEN on Bibtex to 44 validation example F1 (42.39 test on the CPU: docs/PERFORMANCE.md), one OCR fold to 97 char_acc
  local cap=${quick:+trainer.max_epochs=1}
  python3 -m dsp.cli.train experiment=spen_bibtex trainer.device="$device" trainer.stop_at=44 \
    trainer.progress=false hydra.run.dir="$runs/tta_spen_bibtex" $cap || return 1
  python3 -m dsp.cli.train experiment=crf_ocr_stage data.test_fold=1 trainer.device="$device" trainer.stop_at=97 \
    trainer.progress=false hydra.run.dir="$runs/tta_crf_ocr_stage" $cap  # each prints train/time_to_target_s and its test metric
}

dvn() {  # issue 4: dvn_horses with many more updates than a CPU affords (the CPU runs: ~2.8k steps of
  # 4 fresh tuples; the paper ~180k tuples), stopped by a wall-clock budget so it fits one device call.
  # Opt-in (STEPS=dvn): it takes the call's whole time. DVN_ARGS adds overrides, e.g. trainer.batch_size=16.
  local cap=${quick:+trainer.max_epochs=1 data.test_crops=1}
  python3 -m dsp.cli.train experiment=dvn_horses trainer.device="$device" seed=0 trainer.progress=false \
    trainer.max_time_s="${DVN_SECONDS:-420}" trainer.stage_epochs=100000 hydra.run.dir="$runs/dvn_horses" \
    $cap ${DVN_ARGS:-}  # prints test mean_iou / global_iou (36 crops averaged) of best.pt
}

step tests python3 -m pytest -q -rs tests/test_chain.py tests/test_hdf5_stream.py tests/test_bench.py tests/test_precision.py
step unrolled python3 scripts/bench_unrolled.py --device "$device" ${quick:+--steps 3 --repeats 1 --warmup 0 --batch 1} \
  --json "$out/unrolled.json"
step suite python3 scripts/bench.py --suite all --device "$device" ${quick:+--quick} --json "$out/bench.json"
step mrf python3 scripts/bench_mrf.py --device "$device" ${quick:+--iters 2}
# trainer.precision / trainer.compile (docs/PERFORMANCE.md has the CPU rows): each mode in a fresh
# process, 3 epochs per stage, ms per training step after each stage's first epoch
precision_epochs=3; [ -n "$quick" ] && precision_epochs=2
step precision python3 scripts/bench_precision.py --device "$device" --presets spen_bibtex crf_ocr_joint \
  --modes fp32 bf16 fp16 compile bf16+compile --epochs "$precision_epochs" ${quick:+--synthetic} --json "$out/precision.json"
step accuracy accuracy
step dvn dvn
exit $failed
