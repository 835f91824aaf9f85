#!/usr/bin/env bash
# Download the wheels that scripts/gpu-check.sh --wheels DIR installs on the GPU machine, which has no
# network: the peers of the benchmarks at the versions pyproject.toml's `peers` extra pins
# (liger-kernel, orda-kernel, trl), and what trl imports that the machine's image lacks (datasets,
# with its dill and multiprocess). All are pure-Python wheels, about 3 MB together; the image's
# transformers, accelerate, huggingface_hub, pyarrow and pandas serve trl and datasets.
#
#   bash scripts/fetch-wheels.sh [DIR]     (default DIR: .whl, which git ignores)
#
# Then name DIR in the device call's carry list and pass --wheels DIR to scripts/gpu-check.sh.
# PYTHON (default: .venv/bin/python if present, else python3) runs pip; the wheels are chosen for the
# machine's Python (TARGET_PYTHON, default 3.12), whatever the local one.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.whl}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# trl's imports the image does not have, at the versions the peers' environment resolves with trl 1.16
TRL_DEPS=("datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19")
mapfile -t PEERS < <("$PYTHON" - <<'EOF'
import re
from pathlib import Path

text = Path("pyproject.toml").read_text()
peers = re.search(r"^peers = \[(.*?)\]", text, re.M | re.S).group(1)
for pin in re.findall(r'"([^"]+)"', peers):
    if pin.split("==")[0] in ("liger-kernel", "orda-kernel", "trl"):
        print(pin)
EOF
)
if [ "${#PEERS[@]}" -ne 3 ]; then echo "fetch-wheels: expected 3 peer pins in pyproject.toml, got: ${PEERS[*]}" >&2; exit 1; fi
mkdir -p "$DIR"
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "${TARGET_PYTHON:-3.12}" --implementation cp \
  -d "$DIR" "${PEERS[@]}" "${TRL_DEPS[@]}"
echo "fetch-wheels: $(find "$DIR" -type f -name '*.whl' | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
