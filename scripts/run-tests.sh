#!/usr/bin/env bash
# Install everything into ./.venv and run the whole test suite (CPU-only machines run the Triton
# kernels through the Triton interpreter; a CUDA machine also runs the tests marked `gpu`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh "test,examples,bench"
if [ -f .ci/check_cuda_compile.sh ]; then
  bash .ci/check_cuda_compile.sh
fi
exec .venv/bin/python -m pytest -q --benchmark-disable "$@"
