#!/usr/bin/env bash
# The GPU check (Triton and CUDA backends, re-balancing, fused linear), on a fresh GPU machine with
# no network, from the repository root:
#
#   bash tools/gpu_check.sh [OUT_DIR]            # OUT_DIR (benchmark results) defaults to bench/results
#
# 1. installs the package with no network (`pip install --no-build-isolation --no-deps --no-index
#    -e .`; the extension is built for this GPU's architecture only). If the build fails the check
#    goes on from the source tree: the Triton backend does not need the compiled extension;
# 2. checks that bad input raises Python errors from the compiled ops (tests/test_error_paths.py),
#    then runs the CUDA variants of the tests: the device training step (no host sync, CUDA-graph
#    replay, torch.compile with CUDA graphs, deferred bad labels), weight / label_smoothing, the
#    CUDA C++ ops, Triton, fused linear, re-balancing;
# 3. benchmarks, each writing <benchmark>_cuda_<gpu>.md and .json under OUT_DIR:
#    `bench step` (every implementation side by side, CUDA-graph replays and the loss options
#    included; the traffic model columns come from the CPU runs), then with the time left
#    `bench crossover` (cuda against triton over B x C, the evidence for backend="auto"),
#    `bench mass --device cuda` and `bench linear --device cuda`.
# GALA_SKIP_LINEAR skips the linear benchmark; GALA_SKIP_GPU_BENCH stops after the tests;
# GALA_SKIP_CROSSOVER skips the crossover sweep.
# The log goes to build/gpu_check/ (and, with the results packed as gpu_results.tar.gz, to $OUT
# when that is set).
# Budget: under 7.5 minutes in all (GALA_GPU_CHECK_SECONDS, default 440). Each stage has a timeout
# taken from what is left (install <= 150 s, error paths <= 60 s, tests <= 200 s, the step
# benchmark <= 150 s, then crossover, mass and linear with what is left); the step and crossover
# benchmarks rewrite their files after every shape, so a timeout keeps what was measured.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
OUT_DIR=${1:-bench/results}
LOG_DIR=build/gpu_check
mkdir -p "$OUT_DIR" "$LOG_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOG="$LOG_DIR/gpu_check_${STAMP}.log"
START=$(date +%s)
DEADLINE=$(( START + ${GALA_GPU_CHECK_SECONDS:-440} ))
left() { echo $(( DEADLINE - $(date +%s) )); }
stage() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }
# $OUT (a return folder, when the machine is lent) takes few files: the benchmarks write only to
# OUT_DIR, and at exit everything this run wrote there goes back as one tarball, beside the log.
RETURN_DIR=${OUT:-}
unset OUT
MARK=$(mktemp)
pack_results() {
  if [ -n "$RETURN_DIR" ]; then
    mkdir -p "$RETURN_DIR" && cp "$LOG" "$RETURN_DIR/"
    find "$OUT_DIR" -type f -newer "$MARK" -print0 | tar --null -czf "$RETURN_DIR/gpu_results.tar.gz" -T -
  fi
}
trap pack_results EXIT
exec > >(tee -a "$LOG") 2>&1

unset TRITON_INTERPRET  # kernels must run on the GPU, not in the interpreter
stage "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
$PYTHON - <<'PY'
import sys, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| triton", triton.__version__, "|", torch.cuda.get_device_name(0))
PY
nvcc --version | tail -1 || true
echo "host compiler: $(c++ --version 2>/dev/null | head -1)"

stage "install (no network)"
ARCH=${GALA_CUDA_ARCHS:-$($PYTHON -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')}
export GALA_CUDA_ARCHS=$ARCH
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"${ARCH%?}.${ARCH: -1}"}
export MAX_JOBS=${MAX_JOBS:-16}
export GALA_BUILD_DIR=${GALA_BUILD_DIR:-build/gpu-triton}
INSTALL_STATUS=0
timeout 150 $PYTHON -m pip install --no-build-isolation --no-deps --no-index -q -e . || INSTALL_STATUS=$?
echo "pip install exit status: $INSTALL_STATUS (non-zero: continuing from the source tree)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PYTHON - <<'PY'
import torch
import gala_kernels as gk
from gala_kernels import backends
for name in ("triton", "cuda"):
    print(f"backend {name!r} on CUDA:", backends.availability(name, torch.device("cuda")))
print("backend 'auto' on CUDA picks", repr(backends.auto_cuda_backend(torch.empty(1, 1, device="cuda"))))
PY

stage "error paths: tests/test_error_paths.py (bad input must raise, never kill the process)"
ERROR_PATHS_STATUS=0
timeout 60 $PYTHON -m pytest tests/test_error_paths.py -q -p no:cacheprovider -rs || ERROR_PATHS_STATUS=$?

stage "tests: CUDA variants (device step, options, cuda, triton, linear, rebalance)"
TEST_STATUS=0
TEST_BUDGET=$(( $(left) - 150 ))
[ "$TEST_BUDGET" -gt 200 ] && TEST_BUDGET=200
[ "$TEST_BUDGET" -lt 90 ] && TEST_BUDGET=90
# pytest-xdist, where installed, spreads the Triton JIT compiles over the machine's cores; timeout
# signals pytest's whole process group, its workers included. The training-step tests first: they
# are what a GPU must confirm.
PARALLEL=$($PYTHON -c "import xdist" 2>/dev/null && echo "-n 8")
timeout "$TEST_BUDGET" $PYTHON -m pytest $PARALLEL tests/test_device_step.py tests/test_options.py \
  tests/test_cuda_backend.py tests/test_triton.py tests/test_linear.py tests/test_rebalance.py \
  -m "not slow" -k "cuda and not compile_check and not against_torch_headers" \
  -q -p no:cacheprovider -rs --durations=10 || TEST_STATUS=$?
echo "pytest exit status: $TEST_STATUS"

if [ -n "${GALA_SKIP_GPU_BENCH:-}" ]; then
  stage "done: install $INSTALL_STATUS, error paths $ERROR_PATHS_STATUS, tests $TEST_STATUS"
  [ "$TEST_STATUS" -eq 0 ] && [ "$ERROR_PATHS_STATUS" -eq 0 ]
  exit
fi

stage "benchmark: bench step (every implementation side by side, graph replays, loss options)"
REMAINING=$(( $(left) - 30 ))
[ "$REMAINING" -gt 150 ] && REMAINING=150
[ "$REMAINING" -lt 60 ] && REMAINING=60
# torch.compile of the eager step costs ~40 s per shape on a cold machine: only the first shape
COMPILE_MAX=$(( 512 * 8142 ))
BENCH_STATUS=0
timeout "$REMAINING" $PYTHON -m gala_kernels bench step --device cuda --compile-max-elements "$COMPILE_MAX" \
  --no-traffic-model --no-progress --out "$OUT_DIR" || BENCH_STATUS=$?

EXTRA_STATUS=0
if [ "$(left)" -gt 30 ] && [ -z "${GALA_SKIP_CROSSOVER:-}" ]; then
  stage "benchmark: bench crossover (cuda against triton over B x C)"
  timeout $(( $(left) > 90 ? 90 : $(left) - 5 )) $PYTHON -m gala_kernels bench crossover --rep-ms 50 \
    --out "$OUT_DIR" || EXTRA_STATUS=$?
fi

if [ "$(left)" -gt 30 ]; then
  stage "benchmark: bench mass --device cuda (the mass pass against a read of the logits)"
  timeout $(( $(left) > 60 ? 60 : $(left) - 5 )) $PYTHON -m gala_kernels bench mass --device cuda \
    --classes 8142 --repeats 10 --out "$OUT_DIR" || EXTRA_STATUS=$?
fi

if [ "$(left)" -gt 30 ] && [ -z "${GALA_SKIP_LINEAR:-}" ]; then
  stage "benchmark: bench linear --device cuda (chunked against the matmuls + fused kernel)"
  timeout $(( $(left) - 5 )) $PYTHON -m gala_kernels bench linear --device cuda --chunk-mib 256,4096 \
    --out "$OUT_DIR" || EXTRA_STATUS=$?
fi

stage "done: install $INSTALL_STATUS, error paths $ERROR_PATHS_STATUS, tests $TEST_STATUS, benchmark $BENCH_STATUS, extra $EXTRA_STATUS"
[ "$TEST_STATUS" -eq 0 ] && [ "$BENCH_STATUS" -eq 0 ] && [ "$ERROR_PATHS_STATUS" -eq 0 ]
