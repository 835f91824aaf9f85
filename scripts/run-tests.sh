#!/usr/bin/env bash
# Install everything into ./.venv and run the whole test suite (CPU-only machines run the Triton
# kernels through the Triton interpreter; a CUDA machine also runs the tests marked `gpu`).
set -euo pipefail
cd "$(dirname "$0")/.."
# The same extras as scripts/run-benchmark.sh, so that either script reuses the .venv the other one made;
# LOGITSTD_REQUIRE_EXTENSION=1: a broken C++ build fails the run.
LOGITSTD_REQUIRE_EXTENSION=1 bash scripts/setup-venv.sh "test,examples,bench,hf,peers"
if [ -f .ci/check_cuda_compile.sh ]; then
  # The nvcc compile check (a minute) runs again only when what it compiles or compiles with changed.
  cuda_check_hash="$( {
    find .ci/check_cuda_compile.sh csrc -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    cat .venv/lib/python*/site-packages/torch/version.py
    printf '%s\n' "${NVCC:-}" "${CUDA_HOME:-}" "${CUDA_CHECK_ARCH:-}" "${CUDA_CHECK_EXTRA_FLAGS:-}"
    "${NVCC:-nvcc}" --version || true
  } 2>/dev/null | sha256sum | cut -d' ' -f1)"
  cuda_check_stamp=.venv/.logitstd-cuda-check-stamp
  if [ "$(cat "$cuda_check_stamp" 2>/dev/null)" = "$cuda_check_hash" ]; then
    echo "check_cuda_compile: passed before on the same sources, torch and nvcc; skipped"
  else
    bash .ci/check_cuda_compile.sh
    echo "$cuda_check_hash" > "$cuda_check_stamp"
  fi
fi
# The Triton kernels compiled ahead of time for sm_90 (no GPU needed): every launch-table entry,
# registers and spills per variant, and the static cost of the default launches checked against the
# committed report (benchmarks/results/static-cost.json): a compile error, a spill or more than 10%
# more SASS instructions per element fails the run (3-5 minutes on 2 cores). Like the nvcc check, it
# runs again only when the kernels, the check scripts, the report or triton changed.
triton_check_hash="$( {
  find scripts/triton_aot_check.py scripts/aot_variants.py scripts/static_cost.py \
    benchmarks/results/static-cost.json logitstd_kernels/_triton -type f \( -name '*.py' -o -name '*.json' \) -print0 \
    | LC_ALL=C sort -z \
    | xargs -0 sha256sum
  .venv/bin/python -c "import triton; print(triton.__version__)" || true
} 2>/dev/null | sha256sum | cut -d' ' -f1)"
triton_check_stamp=.venv/.logitstd-triton-aot-stamp
if [ "$(cat "$triton_check_stamp" 2>/dev/null)" = "$triton_check_hash" ]; then
  echo "triton_aot_check: passed before on the same kernels and triton; skipped"
else
  .venv/bin/python scripts/triton_aot_check.py --quiet --check benchmarks/results/static-cost.json
  echo "$triton_check_hash" > "$triton_check_stamp"
fi
exec .venv/bin/python -m pytest -q --benchmark-disable "$@"
