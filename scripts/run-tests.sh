#!/usr/bin/env bash
# Install everything into ./.venv and run the whole test suite (CPU-only machines run the Triton
# kernels through the Triton interpreter; a CUDA machine also runs the tests marked `gpu`).
set -euo pipefail
cd "$(dirname "$0")/.."
# The same extras as scripts/run-benchmark.sh, so that either script reuses the .venv the other one made;
# LOGITSTD_REQUIRE_EXTENSION=1: a broken C++ build fails the run.
LOGITSTD_REQUIRE_EXTENSION=1 bash scripts/setup-venv.sh "test,examples,bench,hf,peers"

# run_unless_passed NAME HASH COMMAND...: run a check unless it passed before on inputs of the same
# hash (the stamp .venv/.logitstd-NAME-stamp keeps the hash of its last pass).
run_unless_passed() {
  local name="$1" hash="$2" stamp=".venv/.logitstd-$1-stamp"
  shift 2
  if [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ]; then
    echo "$name: passed before on the same inputs; skipped"
  else
    "$@"
    echo "$hash" > "$stamp"
  fi
}

# The hash of the CUDA checks' inputs: the files given, torch's version, and nvcc and its settings.
cuda_inputs_hash() {
  {
    find "$@" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    cat .venv/lib/python*/site-packages/torch/version.py
    printf '%s\n' "${NVCC:-}" "${CUDA_HOME:-}" "${CUDA_CHECK_ARCH:-}" "${CUDA_CHECK_EXTRA_FLAGS:-}"
    "${NVCC:-nvcc}" --version || true
  } 2>/dev/null | sha256sum | cut -d' ' -f1
}

if [ -f .ci/check_cuda_compile.sh ]; then
  # The nvcc compile check (every instantiation of the CUDA kernel, a few CPU-minutes).
  run_unless_passed cuda-check "$(cuda_inputs_hash .ci/check_cuda_compile.sh csrc)" bash .ci/check_cuda_compile.sh
  # The CUDA kernel's static cost (its report's kernels compiled for sm_90 and disassembled, no GPU
  # needed) checked against the committed report (benchmarks/results/static-cost.json): a spill in a
  # per-element loop or more than 10% more SASS instructions per element fails the run (a minute).
  run_unless_passed cuda-sass "$(cuda_inputs_hash .ci/check_cuda_compile.sh csrc scripts/cuda_sass_check.py \
    scripts/static_cost.py benchmarks/results/static-cost.json)" \
    .venv/bin/python scripts/cuda_sass_check.py --quiet --check benchmarks/results/static-cost.json
fi
# The Triton kernels compiled ahead of time for sm_90 (no GPU needed): every launch-table entry,
# registers and spills per variant, and the static cost of the default launches checked against the
# committed report: a compile error, a spill or more than 10% more SASS instructions per element
# fails the run (3-5 minutes on 2 cores). It runs again only when the kernels, the check scripts,
# the report or triton changed.
triton_check_hash="$( {
  find scripts/triton_aot_check.py scripts/aot_variants.py scripts/static_cost.py \
    benchmarks/results/static-cost.json logitstd_kernels/_triton -type f \( -name '*.py' -o -name '*.json' \) -print0 \
    | LC_ALL=C sort -z \
    | xargs -0 sha256sum
  .venv/bin/python -c "import triton; print(triton.__version__)" || true
} 2>/dev/null | sha256sum | cut -d' ' -f1)"
run_unless_passed triton-aot "$triton_check_hash" \
  .venv/bin/python scripts/triton_aot_check.py --quiet --check benchmarks/results/static-cost.json
exec .venv/bin/python -m pytest -q --benchmark-disable "$@"
