#!/usr/bin/env bash
# Install everything into ./.venv and run the benchmark on the present device (a GPU if there is
# one, else the CPU); extra arguments go to `python -m logitstd_kernels bench` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh "bench"
exec .venv/bin/python -m logitstd_kernels bench "$@"
