#!/usr/bin/env bash
# GPU check, run from the repository root on a machine with an NVIDIA GPU, nvcc, torch and
# Triton (no network needed). One deadline covers every stage, so the whole script ends
# within DEADLINE_S seconds (default 500: a 600 s command limit with margin). The most
# valuable numbers come first and each CSV row is written the moment it is measured, so a
# run cut short still returns everything it measured:
#   1. build memkern._C with its CUDA kernels (the benchmarks run without it if it fails)
#   2. benchmarks in order of value: linear_kd_loss 8192 x 4096 x 128256 bf16 (time and
#      memory), int8_linear against cuBLAS fp16, masked_matmul 2048 x 4096 @ 4096 x 4096,
#      weight-only and fp16 decode at M = 1 and 16
#   3. the gpu-marked tests, stopped with SIGINT at their share of the deadline so pytest
#      still prints its summary
#   4. the remaining quick benchmarks
# Results, at most 6 files, go to $OUT (default build/device-check): machine.txt,
# build.log, bench.csv, bench.log, gpu-tests.log, summary.txt.
#
# Missing Python packages travel as wheels in .whl/ (git-ignored) and are installed
# offline into /tmp/site first: bench/device_wheels.sh fetches them on a machine with pip.
# On a machine without a CUDA device the GPU stages are skipped (each says so) and the
# gpu tests are collected and skipped: a check of the script itself. Exit status: 1 if a
# stage that ran failed, else 0.
set -uo pipefail
T0=$(date +%s)
DEADLINE=$((T0 + ${DEADLINE_S:-500}))
OUT_DIR=${OUT:-build/device-check}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
CSV="$OUT_DIR/bench.csv"
LOG="$OUT_DIR/bench.log"
SUMMARY="$OUT_DIR/summary.txt"
export MEMKERN_BUILD_CUDA=1
export MEMKERN_CUDA_ARCHS=${MEMKERN_CUDA_ARCHS:-90}   # the machine's own architecture builds fastest
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
: >"$SUMMARY"

FAILED=0
exec 3>&1   # notes go to the terminal and the summary, whatever a stage's output is redirected to
note() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$SUMMARY" >&3; }

# Seconds a stage may take: its own cap, or what is left before the deadline less `reserve`
# (kept for the stages after it), whichever is smaller; 0 when nothing is left.
budget() {
  local cap=$1 reserve=${2:-0} left
  left=$(( DEADLINE - $(date +%s) - reserve ))
  (( left < cap )) && cap=$left
  (( cap < 0 )) && cap=0
  echo "$cap"
}

# run_stage NAME CAP RESERVE SIGNAL CMD...: CMD under `timeout`, its exit code noted.
run_stage() {
  local name=$1 cap=$2 reserve=$3 sig=$4 secs rc
  shift 4
  secs=$(budget "$cap" "$reserve")
  if (( secs < 10 )); then note "$name: skipped, ${secs} s left"; return 0; fi
  timeout -s "$sig" -k 15 "$secs" "$@"
  rc=$?
  case $rc in
    124|137) note "$name: stopped at its ${secs} s share of the deadline" ;;
    0) note "$name: ok" ;;
    *) note "$name: exit $rc"; FAILED=$((FAILED + 1)) ;;
  esac
  return 0
}

gpu_stage() {  # a stage that needs the GPU: skipped, with a note, where there is none
  if [ "$HAVE_GPU" != 1 ]; then note "$1: skipped, no CUDA device"; return 0; fi
  run_stage "$@"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} && note "installed $(ls .whl | wc -l) carried wheels"
fi

HAVE_GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  "$PY" -c 'import sys, torch, triton, numpy; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "triton", triton.__version__, "numpy", numpy.__version__)'
  nvcc --version | tail -1; date -u +%FT%TZ; } >"$OUT_DIR/machine.txt" 2>&1

# 1. build (setup.py says which CUDA toolkit it found)
gpu_stage build 240 300 TERM \
  "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . >"$OUT_DIR/build.log" 2>&1
grep -E "memkern: CUDA toolkit|error" "$OUT_DIR/build.log" | head -5 | tee -a "$SUMMARY"
"$PY" -m memkern.cli info >>"$OUT_DIR/machine.txt" 2>&1

bench() {  # bench NAME CAP RESERVE ARGS...: one `memkern bench` stage appending to the CSV
  local name=$1 cap=$2 reserve=$3
  shift 3
  echo "== $name" >>"$LOG"
  gpu_stage "$name" "$cap" "$reserve" TERM "$PY" -m memkern.cli bench --device cuda --quick --csv "$CSV" "$@" >>"$LOG" 2>&1
}

# 2. the most valuable measurements
bench "linear_kd_loss 8192x4096x128256" 150 240 --ops linear_kd_loss --match 8192x4096x128256
bench "int8_linear vs cuBLAS fp16" 90 200 --ops int8_linear
bench "masked_matmul 2048x4096@4096x4096" 60 180 --ops masked_matmul --match 2048x4096@4096x4096
bench "weight-only and fp16 decode" 60 160 --ops int8_weight_only_linear,fp16_linear

# 3. the gpu tests: SIGINT makes pytest stop and still print its summary
run_stage "gpu tests" 240 60 INT "$PY" -m pytest -m gpu -q -p no:cacheprovider -o addopts="" -rfE tests \
  >"$OUT_DIR/gpu-tests.log" 2>&1
tail -15 "$OUT_DIR/gpu-tests.log" >>"$SUMMARY" 2>/dev/null

# 4. the rest
bench "kd_loss and quantize_rowwise" 120 0 --ops kd_loss,quantize_rowwise

rows=$( [ -f "$CSV" ] && tail -n +2 "$CSV" | wc -l || echo 0)
note "done: $rows CSV rows in $CSV, $FAILED failed stage(s)"
[ "$FAILED" = 0 ]
