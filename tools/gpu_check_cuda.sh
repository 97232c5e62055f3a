#!/usr/bin/env bash
# GPU check of the CUDA C++ backend alone, on a fresh GPU machine, from the repository root:
#
#   bash tools/gpu_check_cuda.sh              # GALA_CUDA_ARCHS defaults to this GPU's arch
#
# 1. builds gala_kernels._C with its CUDA kernels for one architecture (CMake + Ninja, as setup.py
#    does; no pip, no network), into build/gpu-cuda and gala_kernels/;
# 2. runs the GPU tests of tests/test_cuda_backend.py;
# 3. `bench step` on four shapes, the CUDA and Triton ops and steps against the copy floor and
#    F.cross_entropy (written under build/gpu-cuda-bench, or $OUT when set), then `bench crossover`,
#    the cuda-against-triton sweep behind backend="auto" (written under bench/results).
# Budget: about 4 minutes (build ~1-1.5 min with MAX_JOBS=16, tests ~1 min, benchmarks ~1.5 min).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
START=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }

ARCH=${GALA_CUDA_ARCHS:-$($PYTHON -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')}
export GALA_CUDA_ARCHS=$ARCH
# torch's CMake config adds -gencode flags from TORCH_CUDA_ARCH_LIST (all common archs when it is
# unset); one arch keeps the build short.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"${ARCH%?}.${ARCH: -1}"}
export MAX_JOBS=${MAX_JOBS:-16}
BUILD_DIR=${GALA_BUILD_DIR:-build/gpu-cuda}
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)

stage "build: sm_${ARCH}, torch CUDA arch list ${TORCH_CUDA_ARCH_LIST}, ${MAX_JOBS} jobs, ${BUILD_DIR}"
$PYTHON -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
nvcc --version | tail -1
# The binding calls c10_cuda (getCurrentCUDAStream, C10_CUDA_CHECK): link it explicitly, in case
# the torch CMake target does not bring it (harmless when it does).
mkdir -p "$(dirname "$BUILD_DIR")"
TORCH_LIB=$($PYTHON -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
cmake -S . -B "$BUILD_DIR" "${GENERATOR[@]}" -DPython_EXECUTABLE="$(command -v "$PYTHON")" \
  -DCMAKE_BUILD_TYPE=Release -DGALA_CUDA_ARCHS="$ARCH" \
  -DCMAKE_MODULE_LINKER_FLAGS="-L$TORCH_LIB -Wl,--no-as-needed -lc10_cuda -Wl,--as-needed" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/gala_kernels" > "$BUILD_DIR.configure.log" 2>&1 \
  || { cat "$BUILD_DIR.configure.log"; exit 1; }
grep -iE "cuda|warning" "$BUILD_DIR.configure.log" | head -20 || true
cmake --build "$BUILD_DIR" -j "$MAX_JOBS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PYTHON - <<'PY'
import torch
from gala_kernels import backends
ok, reason = backends.availability("cuda", torch.device("cuda"))
print("backend 'cuda' available:", ok, reason)
raise SystemExit(0 if ok else 1)
PY

stage "tests: tests/test_cuda_backend.py (GPU tests)"
LOG_DIR=${OUT:-build/gpu-cuda-bench}
mkdir -p "$LOG_DIR"
TEST_STATUS=0
timeout 240 $PYTHON -m pytest tests/test_cuda_backend.py -m cuda -q -x -p no:cacheprovider 2>&1 \
  | tee "$LOG_DIR/test_cuda_backend.log" || TEST_STATUS=$?

stage "benchmark: bench step, the CUDA and Triton ops and steps at four shapes"
timeout 150 $PYTHON -m gala_kernels bench step --device cuda --no-progress --out "$LOG_DIR" \
  --shapes 512x8142:float32,1024x1000:float32,4096x8142:bfloat16,8192x32768:bfloat16 \
  --implementations copy_floor,fused_cuda,fused_op_cuda,fused_triton,fused_op_triton,cross_entropy

stage "benchmark: bench crossover"
timeout 240 $PYTHON -m gala_kernels bench crossover --rep-ms "${GALA_BENCH_REP_MS:-100}" --out bench/results

stage "done (tests exit status ${TEST_STATUS})"
exit "$TEST_STATUS"
