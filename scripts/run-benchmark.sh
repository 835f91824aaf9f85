#!/usr/bin/env bash
# Install everything into ./.venv and run the benchmark on the present device (a GPU if there is
# one, else the CPU); extra arguments go to `python -m logitstd_kernels bench` (see --help). Results go
# to ./logitstd_results/bench/ (untracked); `--out benchmarks/results` writes a result to commit.
set -euo pipefail
cd "$(dirname "$0")/.."
# The same extras as scripts/run-tests.sh, so that either script reuses the .venv the other one made.
bash scripts/setup-venv.sh "test,examples,bench,hf,peers"
exec .venv/bin/python -m logitstd_kernels bench "$@"
