#!/usr/bin/env bash
# Create ./.venv with torch, triton and this package (its C++ extension included), plus the extras
# named in $1 (default "test"). TORCH_SPEC overrides the torch requirement (default torch==2.13.0,
# which pip takes from this project's CI machine's disk; on a GPU machine pass e.g. TORCH_SPEC=torch).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" triton numpy setuptools wheel ninja
MAX_JOBS="${MAX_JOBS:-2}" "$py" -m pip install -q --no-build-isolation -e ".[${extras}]"
"$py" -c "import logitstd_kernels as lsk; print('logitstd_kernels', lsk.__version__, 'backends:', lsk.available_backends())"
