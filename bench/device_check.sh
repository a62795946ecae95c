#!/usr/bin/env bash
# GPU check, run from the repository root on a machine with an NVIDIA GPU, nvcc, torch and
# Triton already installed (no network needed): builds memkern._C with its CUDA kernels,
# runs the gpu-marked tests and `memkern bench --device cuda --quick`, and prints a short
# summary last. Logs and the results CSV go to $OUT (default build/device-check).
# Meant to finish within about 8 minutes on one H200.
set -uo pipefail
OUT_DIR=${OUT:-build/device-check}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
STAMP=$(date -u +%F)
export MEMKERN_BUILD_CUDA=1
export MEMKERN_CUDA_ARCHS=${MEMKERN_CUDA_ARCHS:-90}   # the machine's own architecture builds fastest
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  nvcc --version | tail -1; } 2>&1 | tee "$OUT_DIR/machine.txt"

echo "== build (MEMKERN_BUILD_CUDA=1, archs $MEMKERN_CUDA_ARCHS)"
start=$(date +%s)
if ! timeout 300 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$OUT_DIR/build.log" 2>&1; then
  tail -40 "$OUT_DIR/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
"$PY" -m memkern.cli info | tee "$OUT_DIR/info.txt"

echo "== gpu tests"
timeout 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT_DIR/gpu-tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

echo "== gpu benchmarks (quick)"
csv="$OUT_DIR/cuda-h200-$STAMP.csv"
timeout 300 "$PY" -m memkern.cli bench --device cuda --quick --csv "$csv" >"$OUT_DIR/bench.txt" 2>&1
bench_rc=$?

echo "== summary"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT_DIR/gpu-tests.log" | tail -12
cat "$OUT_DIR/bench.txt"
echo "tests exit $tests_rc, bench exit $bench_rc; results in $csv"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
