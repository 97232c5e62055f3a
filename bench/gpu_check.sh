#!/usr/bin/env bash
# The one GPU check (Triton and CUDA backends, the mass pass), on a fresh GPU machine, from the
# repository root:
#
#   bash bench/gpu_check.sh [OUT_DIR]            # OUT_DIR defaults to bench/results
#
# 1. installs the package with no network (`pip install --no-build-isolation --no-deps --no-index
#    -e .`; the extension is built for this GPU's architecture only). If the build fails the check
#    goes on from the source tree: the Triton backend does not need the compiled extension;
# 2. runs the CUDA variants of the tests (Triton, CUDA C++, re-balancing, fused linear);
# 3. runs bench/bench_gpu.py (issue 3's shapes, every implementation side by side, the CUDA C++
#    backend included when built) and prints one table; Markdown + JSON with GPU name, versions
#    and date under OUT_DIR, and under $OUT when set;
# 4. with the time left (about 60 s kept for it): bench/bench_cuda.py (cuda vs triton crossover,
#    for backend="auto") and bench/bench_mass.py --device cuda (the mass pass vs a read).
# bench/gpu_check_cuda.sh is a longer, CUDA-only sibling (all CUDA tests, the full sweep).
# Budget: under 6 minutes in all. Each stage has a timeout taken from what is left of a 350 s
# deadline (install <= 140 s, tests <= 170 s leaving >= 110 s, the benchmark the rest), so the
# benchmark always gets its turn; it writes its files after every shape.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT_DIR=${1:-bench/results}
mkdir -p "$OUT_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOG="$OUT_DIR/gpu_check_triton_${STAMP}.log"
START=$(date +%s)
DEADLINE=$(( START + 350 ))
left() { echo $(( DEADLINE - $(date +%s) )); }
stage() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }
copy_log() { if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp "$LOG" "$OUT/"; fi; }
trap copy_log EXIT
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

stage "install (no network)"
ARCH=${GALA_CUDA_ARCHS:-$($PYTHON -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')}
export GALA_CUDA_ARCHS=$ARCH
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"${ARCH%?}.${ARCH: -1}"}
export MAX_JOBS=${MAX_JOBS:-16}
export GALA_BUILD_DIR=${GALA_BUILD_DIR:-build/gpu-triton}
INSTALL_STATUS=0
timeout 140 $PYTHON -m pip install --no-build-isolation --no-deps --no-index -q -e . || INSTALL_STATUS=$?
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

stage "tests: CUDA variants (triton, cuda, rebalance, linear)"
TEST_STATUS=0
TEST_BUDGET=$(( $(left) - 110 ))
[ "$TEST_BUDGET" -gt 170 ] && TEST_BUDGET=170
[ "$TEST_BUDGET" -lt 30 ] && TEST_BUDGET=30
timeout "$TEST_BUDGET" $PYTHON -m pytest tests/test_triton.py tests/test_cuda_backend.py tests/test_rebalance.py \
  tests/test_linear.py -m "not slow" -k "cuda and not compile_check and not against_torch_headers" \
  -q -p no:cacheprovider -rs --durations=5 || TEST_STATUS=$?
echo "pytest exit status: $TEST_STATUS"

stage "benchmark: bench/bench_gpu.py"
REMAINING=$(( $(left) - 60 ))
[ "$REMAINING" -lt 60 ] && REMAINING=60
# torch.compile of the eager step costs ~40 s per shape on a cold machine: only the first shape
# when time is short
COMPILE_MAX=$(( 4096 * 8142 ))
[ "$REMAINING" -lt 220 ] && COMPILE_MAX=$(( 512 * 8142 ))
BENCH_STATUS=0
timeout "$REMAINING" $PYTHON bench/bench_gpu.py --out "$OUT_DIR" --rep-ms "${GALA_BENCH_REP_MS:-100}" \
  --compile-max-elements "$COMPILE_MAX" || BENCH_STATUS=$?

EXTRA_STATUS=0
if [ "$(left)" -gt 40 ]; then
  stage "benchmark: bench/bench_cuda.py (cuda vs triton crossover)"
  timeout $(( $(left) - 20 )) $PYTHON bench/bench_cuda.py --out "$OUT_DIR" --rep-ms 50 || EXTRA_STATUS=$?
fi
if [ "$(left)" -gt 15 ]; then
  stage "benchmark: bench/bench_mass.py --device cuda"
  timeout "$(left)" $PYTHON bench/bench_mass.py --device cuda --repeats 5 --out "$OUT_DIR/mass_cuda" \
    || EXTRA_STATUS=$?
fi

stage "done: install $INSTALL_STATUS, tests $TEST_STATUS, benchmark $BENCH_STATUS, extra $EXTRA_STATUS"
[ "$TEST_STATUS" -eq 0 ] && [ "$BENCH_STATUS" -eq 0 ]
