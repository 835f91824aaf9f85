#!/usr/bin/env bash
# Create ./.venv with torch, triton and this package (its C++ extension included), plus the extras
# named in $1 (comma-separated, default "test"). TORCH_SPEC overrides the torch requirement (default
# torch==2.13.0, which pip takes from this project's CI machine's disk; on a GPU machine pass e.g.
# TORCH_SPEC=torch).
#
# Idempotent: .venv/.logitstd-stamp holds a hash of what the install depends on (TORCH_SPEC, the
# Python version, the build switches LOGITSTD_SKIP_EXTENSION, LOGITSTD_SKIP_CUDA and
# TORCH_CUDA_ARCH_LIST, setup.py, pyproject.toml, every file under csrc/ and this script) and the
# extras installed so far. When the hash matches, the requested extras are installed already and the
# package imports from this checkout (and its extension loads, with LOGITSTD_REQUIRE_EXTENSION=1),
# nothing is installed: a second run takes seconds. Otherwise the installs run again (pip keeps the
# packages that are already satisfied; the extension is rebuilt, minutes). `rm -rf .venv` starts over.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
py=.venv/bin/python
stamp=.venv/.logitstd-stamp

extras_list() {  # comma-separated extras -> sorted, unique, comma-separated
  tr ', ' '\n\n' | tr -d '\t\r' | awk 'NF' | LC_ALL=C sort -u | paste -sd, -
}

inputs_hash() {
  {
    printf 'torch: %s\npython: %s\n' "$torch_spec" "$(python3 -VV)"
    for name in LOGITSTD_SKIP_EXTENSION LOGITSTD_SKIP_CUDA TORCH_CUDA_ARCH_LIST; do
      printf '%s=%s\n' "$name" "${!name:-}"
    done
    find setup.py pyproject.toml scripts/setup-venv.sh csrc -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
}

# The package imports from this checkout (the editable install points here), with its extension when
# it is required; prints the version and the backends.
check_install() {
  "$py" - <<'EOF'
import os
import sys

import logitstd_kernels as lsk

here = os.path.realpath("logitstd_kernels")
if os.path.realpath(os.path.dirname(lsk.__file__)) != here:
    sys.exit(f"logitstd_kernels imports from {lsk.__file__}, not from {here}")
if os.environ.get("LOGITSTD_REQUIRE_EXTENSION", "").strip().lower() in ("1", "true", "yes", "on"):
    import logitstd_kernels._C  # noqa: F401  (LOGITSTD_REQUIRE_EXTENSION=1: the C++ extension must load)
print("logitstd_kernels", lsk.__version__, "backends:", lsk.available_backends())
EOF
}

requested="$(printf '%s' "${1:-test}" | extras_list)"
hash="$(inputs_hash)"

if ! "$py" -c "import sys" >/dev/null 2>&1; then
  echo "setup-venv: creating .venv"
  python3 -m venv --clear .venv
fi
stamp_hash="" installed=""
if [ -f "$stamp" ]; then
  stamp_hash="$(sed -n 's/^inputs //p' "$stamp")"
  installed="$(sed -n 's/^extras //p' "$stamp")"
fi
missing="$(LC_ALL=C comm -23 <(printf '%s' "$requested" | tr ',' '\n' | awk 'NF') \
                    <(printf '%s' "$installed" | tr ',' '\n' | awk 'NF'))"

if [ "$stamp_hash" = "$hash" ] && [ -z "$missing" ] && check_install 2>/dev/null; then
  echo "setup-venv: .venv is up to date (extras: ${installed:-none}); nothing to install"
  exit 0
fi

extras="$(printf '%s,%s' "$installed" "$requested" | extras_list)"
echo "setup-venv: installing into .venv (extras: ${extras:-none}; the C++ extension takes minutes to build)"
rm -f "$stamp"
# triton pinned: the committed static cost report (benchmarks/results/static-cost.json) is this
# version's SASS; another version's counts are reported, not checked.
"$py" -m pip install -q "$torch_spec" "triton==3.9.0" numpy setuptools wheel ninja
# A stale extension from an earlier build must not stand in for one that now fails to build.
rm -f logitstd_kernels/_C.*.so logitstd_kernels/_C.so
MAX_JOBS="${MAX_JOBS:-2}" "$py" -m pip install -q --no-build-isolation -e ".${extras:+[$extras]}"
check_install
printf 'inputs %s\nextras %s\n' "$hash" "$extras" > "$stamp"
