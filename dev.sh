#!/usr/bin/env bash
# One entry point for a fresh machine (Python 3.11, gcc; nvcc optional):
#   ./dev.sh bench [args]   set everything up, then run python -m gala_kernels bench (the main job)
#   ./dev.sh demo [args]    set everything up, then run the long-tailed training demo
#   ./dev.sh test [args]    set everything up, then lint and run the test suite
#   ./dev.sh setup          only set up
# Set-up: a virtual environment in .venv (GALA_VENV overrides), torch==2.13.0 (the CPU build on
# this project's machines), the dev requirements, and the compiled extension
# (pip install --no-build-isolation -e ., an incremental CMake/Ninja build).
set -euo pipefail
cd "$(dirname "$0")"

VENV="${GALA_VENV:-.venv}"
TORCH_SPEC="${GALA_TORCH_SPEC:-torch==2.13.0}"

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[dev.sh] creating $VENV"
    python3 -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  if ! python -c "import torch" >/dev/null 2>&1; then
    echo "[dev.sh] installing $TORCH_SPEC"
    python -m pip install -q --upgrade pip
    python -m pip install -q "$TORCH_SPEC"
  fi
  python -m pip install -q -r requirements-dev.txt
  echo "[dev.sh] building gala_kernels._C"
  python -m pip install -q --no-build-isolation --no-deps -e .
  python -c "import gala_kernels, torch; print('[dev.sh] gala_kernels ready: torch', torch.__version__, \
'| cpu op:', gala_kernels.backends.availability('cpu', torch.device('cpu'))[0])"
}

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
  setup) setup ;;
  bench) setup; python -m gala_kernels bench "$@" ;;
  demo) setup; python -m gala_kernels demo "$@" ;;
  test)
    setup
    ruff check .
    python -m pytest -q "$@"
    ;;
  *)
    sed -n '2,9p' "$0"
    exit 2
    ;;
esac
