#!/usr/bin/env bash
# Compile check of the CUDA kernel without a GPU: `nvcc -c` of csrc/cuda/kd_cuda.cu (which includes
# the other csrc/cuda files) for sm_90
# against the installed torch headers, with the flags torch's BuildExtension passes to nvcc. A CUDA
# syntax or type error fails CI even on a machine that can neither build nor run the CUDA extension
# (a CPU-only torch). Exits 0 with a note when nvcc is absent.
#
# A CPU-only torch wheel ships the ATen/c10 CUDA headers but not the build-generated
# c10/cuda/impl/cuda_cmake_macros.h; its only content is C10_CUDA_BUILD_SHARED_LIBS, which matters
# for Windows DLL exports only, so the check then defines C10_CUDA_NO_CMAKE_CONFIGURE_FILE (the
# switch c10 provides to skip that header). The kernel includes c10/cuda headers only (no
# ATen/cuda/CUDAContext.h), so no cuBLAS/cuSPARSE headers are needed: the CUDA toolkit that
# provides nvcc is enough.
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3), NVCC (default: nvcc on
# PATH, else $CUDA_HOME/bin/nvcc), CUDA_CHECK_ARCH (default 90), CUDA_CHECK_EXTRA_FLAGS, and
# CUDA_CHECK_CUBIN: write a cubin there instead of an object (scripts/cuda_sass_check.py reads it).
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  NVCC="$CUDA_HOME/bin/nvcc"
fi
if [ -z "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found; skipping the CUDA compile check"
  exit 0
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
ARCH="${CUDA_CHECK_ARCH:-90}"

mapfile -t FLAGS < <("$PYTHON" - <<'EOF'
import inspect
import os
import sysconfig

import torch
import torch.utils.cpp_extension as ext

includes = ext.include_paths()
flags = [f"-I{path}" for path in includes] + [f"-I{sysconfig.get_paths()['include']}"]
flags += list(ext.COMMON_NVCC_FLAGS)
flags.append("-std=c++20" if "'c++20'" in inspect.getsource(ext) else "-std=c++17")
flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}")
if not any(os.path.exists(os.path.join(path, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for path in includes):
    flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
print("\n".join(flags))
EOF
)

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
echo "check_cuda_compile: $("$NVCC" --version | tail -1)"
if [ -n "${CUDA_CHECK_CUBIN:-}" ]; then OUTPUT=(-cubin -o "$CUDA_CHECK_CUBIN"); else OUTPUT=(-c -o "$OUT/kd_cuda.o"); fi
echo "check_cuda_compile: nvcc ${OUTPUT[0]} csrc/cuda/kd_cuda.cu for sm_${ARCH}"
"$NVCC" "${OUTPUT[@]}" csrc/cuda/kd_cuda.cu \
  -gencode "arch=compute_${ARCH},code=sm_${ARCH}" \
  -Icsrc/include -Icsrc/cuda "${FLAGS[@]}" \
  -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
  -O3 -Xcompiler -fPIC -Xptxas -warn-spills \
  ${CUDA_CHECK_EXTRA_FLAGS:-}
echo "check_cuda_compile: OK"
