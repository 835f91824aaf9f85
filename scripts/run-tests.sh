#!/usr/bin/env bash
# Install everything into ./.venv and run the whole test suite (CPU-only machines run the Triton
# kernels through the Triton interpreter; a CUDA machine also runs the tests marked `gpu`).
set -euo pipefail
cd "$(dirname "$0")/.."
LOGITSTD_REQUIRE_EXTENSION=1 bash scripts/setup-venv.sh "test,examples,bench"  # a broken C++ build fails the run
if [ -f .ci/check_cuda_compile.sh ]; then
  bash .ci/check_cuda_compile.sh
fi
exec .venv/bin/python -m pytest -q --benchmark-disable "$@"
