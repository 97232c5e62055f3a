#!/usr/bin/env bash
# The one GPU check (Triton and CUDA backends, the mass pass), on a fresh GPU machine, from the
# repository root:
#
#   bash bench/gpu_check.sh [OUT_DIR]            # OUT_DIR defaults to bench/results
#
# 1. installs the package with no network (`pip install --no-build-isolation --no-deps --no-index
#    -e .`; the extension is built for this GPU's architecture only). If the build fails the check
#    goes on from the source tree: the Triton backend does not need the compiled extension;
# 2. checks that bad input raises Python errors from the compiled ops (bench/gpu_error_paths.py),
#    then runs the CUDA variants of the tests (CUDA C++, re-balancing, fused linear, Triton);
# 3. the open issues' GPU targets first: bench/bench_mass.py --device cuda (issue 5: the mass pass
#    vs a read of the logits) and bench/bench_linear_cuda.py (issue 7: chunked fused linear vs the
#    matmuls + fused kernel);
# 4. bench/bench_gpu.py (issue 3's shapes, every implementation side by side, the CUDA C++ backend
#    included when built); Markdown + JSON with GPU name, versions and date under OUT_DIR (and, packed
#    as gpu_results.tar.gz with the log, under $OUT when set);
# 5. with the time left: bench/bench_cuda.py (cuda vs triton crossover, for backend="auto"; skipped
#    when GALA_SKIP_CROSSOVER is set).
# GALA_SKIP_LINEAR skips bench_linear_cuda.py; GALA_SKIP_GPU_BENCH stops after the mass and linear
# benchmarks (steps 4 and 5 skipped).
# bench/gpu_check_cuda.sh is a longer, CUDA-only sibling (all CUDA tests, the full sweep).
# Budget: under 7.5 minutes in all. Each stage has a timeout taken from what is left of a 440 s
# deadline (install <= 150 s, error paths <= 90 s, tests <= 130 s, mass <= 90 s + 2 x 45 s, linear <= 90 s, the
# benchmark the rest), so every stage gets its turn; the benchmarks write their files after every shape.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
OUT_DIR=${1:-bench/results}
mkdir -p "$OUT_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOG="$OUT_DIR/gpu_check_triton_${STAMP}.log"
START=$(date +%s)
DEADLINE=$(( START + ${GALA_GPU_CHECK_SECONDS:-440} ))
left() { echo $(( DEADLINE - $(date +%s) )); }
stage() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }
# $OUT (the device tool's return folder) takes few files: the benchmarks write only to OUT_DIR,
# and at exit everything this run wrote there goes back as one tarball, beside the log.
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

stage "error paths: bench/gpu_error_paths.py (bad input must raise, never kill the process)"
ERROR_PATHS_STATUS=0
timeout 90 $PYTHON bench/gpu_error_paths.py || ERROR_PATHS_STATUS=$?

stage "tests: CUDA variants (cuda, rebalance, linear, triton)"
TEST_STATUS=0
TEST_BUDGET=$(( $(left) - 150 ))
[ "$TEST_BUDGET" -gt 130 ] && TEST_BUDGET=130
[ "$TEST_BUDGET" -lt 90 ] && TEST_BUDGET=90  # the 240 CUDA tests took 33-41 s on 8 workers
# pytest-xdist, where installed, spreads the Triton JIT compiles over the machine's cores
PARALLEL=$($PYTHON -c "import xdist" 2>/dev/null && echo "-n 8")
timeout "$TEST_BUDGET" $PYTHON -m pytest $PARALLEL tests/test_cuda_backend.py tests/test_rebalance.py tests/test_linear.py \
  tests/test_triton.py -m "not slow" -k "cuda and not compile_check and not against_torch_headers" \
  -q -p no:cacheprovider -rs --durations=5 || TEST_STATUS=$?
pkill -f "pytest.*test_cuda_backend" 2>/dev/null  # xdist workers outlive a timed-out run: keep them off the timings
echo "pytest exit status: $TEST_STATUS"

EXTRA_STATUS=0
stage "benchmark: bench/bench_mass.py --device cuda (issue 5: mass pass vs a read)"
timeout 90 $PYTHON bench/bench_mass.py --device cuda --repeats 10 --sweep --out "$OUT_DIR/mass_cuda" \
  || EXTRA_STATUS=$?
# the CUDA op's widest row kernel and its two-pass path against Triton (the auto rule's bound)
for C in 16384 65536; do
  timeout 45 $PYTHON bench/bench_mass.py --device cuda --repeats 5 --classes $C --rows $(( 24426 * 8142 / C )) \
    --out "$OUT_DIR/mass_cuda_c$C" || EXTRA_STATUS=$?
done

if [ -z "${GALA_SKIP_LINEAR:-}" ]; then
  stage "benchmark: bench/bench_linear_cuda.py (issue 7: chunked vs matmuls + fused kernel)"
  timeout 90 $PYTHON bench/bench_linear_cuda.py --chunk-mib 256 4096 --out "$OUT_DIR/linear_cuda" \
    || EXTRA_STATUS=$?
fi

if [ -n "${GALA_SKIP_GPU_BENCH:-}" ]; then
  stage "done: install $INSTALL_STATUS, error paths $ERROR_PATHS_STATUS, tests $TEST_STATUS, extra $EXTRA_STATUS"
  [ "$TEST_STATUS" -eq 0 ] && [ "$ERROR_PATHS_STATUS" -eq 0 ]
  exit
fi

stage "benchmark: bench/bench_gpu.py"
REMAINING=$(( $(left) - 50 ))
[ "$REMAINING" -lt 60 ] && REMAINING=60
# torch.compile of the eager step costs ~40 s per shape on a cold machine: only the first shape
# when time is short
COMPILE_MAX=$(( 4096 * 8142 ))
[ "$REMAINING" -lt 220 ] && COMPILE_MAX=$(( 512 * 8142 ))
BENCH_STATUS=0
timeout "$REMAINING" $PYTHON bench/bench_gpu.py --out "$OUT_DIR" --rep-ms "${GALA_BENCH_REP_MS:-100}" \
  --compile-max-elements "$COMPILE_MAX" || BENCH_STATUS=$?

if [ "$(left)" -gt 30 ] && [ -z "${GALA_SKIP_CROSSOVER:-}" ]; then
  stage "benchmark: bench/bench_cuda.py (cuda vs triton crossover)"
  timeout $(( $(left) - 5 )) $PYTHON bench/bench_cuda.py --out "$OUT_DIR" --rep-ms 50 || EXTRA_STATUS=$?
fi

stage "done: install $INSTALL_STATUS, error paths $ERROR_PATHS_STATUS, tests $TEST_STATUS, benchmark $BENCH_STATUS, extra $EXTRA_STATUS"
[ "$TEST_STATUS" -eq 0 ] && [ "$BENCH_STATUS" -eq 0 ] && [ "$ERROR_PATHS_STATUS" -eq 0 ]
