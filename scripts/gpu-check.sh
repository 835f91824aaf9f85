#!/usr/bin/env bash
# The one prepared command for a GPU machine (H100/H200; torch, triton, pytest, pytest-benchmark,
# transformers and accelerate installed; no network). In order of value, each step with its own log
# in OUTDIR:
#
#   1. wheels     with --wheels DIR: pip install --no-index every wheel in DIR (scripts/fetch-wheels.sh
#                 fills it: the peers Liger-Kernel, orda-kernel and TRL, with the datasets, dill and
#                 multiprocess that TRL imports; the image's transformers and accelerate meet TRL's
#                 minimums, so they are not carried), then import each peer's module   (wheels.log)
#   2. build      TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation --no-deps -e .  (build.log)
#   3. gpu-tests  pytest -m gpu (the files holding gpu tests; with pytest-xdist, 8 workers) (junit-gpu.xml)
#   4. matrix     pytest -k cuda -m "not gpu": every test file's CUDA cases (the backends triton-cuda,
#                 cuda-cuda), every divergence among them, and the benchmark gates  (junit-matrix.xml)
#   5. bench      the KD loss against its memory floor: 8192 rows, V in {32768, 131072, 262144}, bf16
#                 then float32, providers torch, triton, cuda, modes no_grad (the loss alone: reads x and
#                 y) and full (forward + backward: reads x and y, writes the student gradient); each
#                 result's "x floor" is its time over those bytes at the copy bandwidth the run
#                 measures, and the summary prints the floor in ms at each V. torch.compile (20-40 s of
#                 compilation per shape and mode) is not timed here: GPU_CHECK_ARGS_<STEP> adds it
#                                                                                (bench/*.json|csv)
#   6. bench-small  the paper's class counts (CIFAR-100, ImageNet): 65536 rows, V in {100, 1000}, bf16
#                 and float32, the same providers and modes                          (bench-small/)
#   7. bench-objective  the distillation objective with labels (bench --objective: 0.1 CE + 9 LS-KD)
#                 beside the KD term alone through the same kernels (triton_kd_only, cuda_kd_only) and
#                 our KD kernel plus torch's CE: 8192 rows, V in {131072, 32768}, bf16  (bench-objective/)
#   8. bench-divergences  every divergence (forward_kl, reverse_kl, jsd, jeffreys, tvd), providers
#                 torch, triton, cuda: 8192 rows, V = 131072, bf16                  (bench-divergences/)
#   9. bench-fused-linear  a full step through the lm_heads (bench --fused-linear): 8192 tokens,
#                 H = 4096, V = 131072, bf16: the fused step with a float32 and a bf16 weight-gradient
#                 accumulator (time, peak memory), its four GEMMs alone (gemms), eager PyTorch; then the
#                 peers on the plain objectives: Liger's LigerFusedLinearJSDLoss, orda-kernel, and on the
#                 forward KL alone TRL's _chunked_divergence_loss            (bench-fused-linear/)
#  10. bench-kd   plain KD (--no-standardize) against Liger-Kernel's KL-divergence loss, when liger-kernel
#                 imports: 8192 rows, V in {131072, 32768, 262144}, bf16          (bench-kd/)
#
# then prints a short summary table last (also in OUTDIR/summary.txt; steps.json holds each step's
# status, exit code, seconds and log). A failing step is recorded and the next one still runs; every
# step has a time cap and the whole script a budget (--budget, default 550 s), after which the steps
# left are recorded as skipped. Each step is guaranteed a minimum (its share of the budget that the
# steps before it cannot take); a benchmark step starts no new case near its cap, and writes its
# files after every case, so an interrupted run keeps what it measured. Exit status: 0 when every
# step that ran passed (skips for a missing --wheels folder or an already built extension count as
# passed), else 1; 2 for bad arguments.
#
#   bash scripts/gpu-check.sh OUTDIR [--smoke] [--wheels DIR] [--tar FILE] [--budget SECONDS] [--steps LIST]
#
# --smoke  the same steps at tiny sizes on whatever device is present (CI runs it on the CPU, so the
#          script cannot rot): the build is skipped when the extension already imports, the tests
#          are a few fast cases, each benchmark one tiny case; about 1.5 minutes on 2 cores.
# --wheels a folder of wheels to install first (scripts/fetch-wheels.sh; git-ignored .whl/ by default).
# --tar    also keep FILE (a .tar.gz of OUTDIR) up to date after every step: the device machine
#          returns at most 8 files, so pass e.g. --tar "$OUT/gpu-check.tgz".
# --steps  run only these steps (comma-separated names as above, e.g. build,gpu-tests,matrix), for a
#          second call that finishes what a first one left; the others are recorded as not selected
#          and reserve no time.
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3), MAX_JOBS (build jobs,
# default: all cores), GPU_CHECK_CAP_<STEP> (seconds, e.g. GPU_CHECK_CAP_BENCH=300) per step,
# GPU_CHECK_WORKERS (pytest-xdist workers of the test steps, default 8; 1 for none),
# GPU_CHECK_ARGS_<STEP> (bench arguments appended to a bench step's own, which they override: e.g.
# GPU_CHECK_ARGS_BENCH="--dtypes float32" times the main benchmark's float32 cases only;
# GPU_CHECK_ARGS_BENCH_SMALL="--providers torch,torch_compile,triton,cuda" adds torch.compile there),
# LOGITSTD_GIT_COMMIT (the commit recorded in env.txt and the results, in place of what git says: a
# copy of the tree on a lent machine can carry a .git that does not match it).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

OUTDIR="" SMOKE=0 WHEELS="" TARFILE="" BUDGET="" STEPS_SELECTED=""
STEP_ORDER=(wheels build gpu-tests matrix bench bench-small bench-objective bench-divergences bench-fused-linear
            bench-kd)
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
    --tar) TARFILE="${2:?--tar needs a file name}"; shift ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    --steps) STEPS_SELECTED="${2:?--steps needs a list}"; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu-check: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) if [ -n "$OUTDIR" ]; then echo "gpu-check: one OUTDIR only" >&2; exit 2; fi; OUTDIR="$1" ;;
  esac
  shift
done
if [ -z "$OUTDIR" ]; then usage >&2; exit 2; fi
for step in ${STEPS_SELECTED//,/ }; do
  if [[ " ${STEP_ORDER[*]} " != *" $step "* ]]; then echo "gpu-check: unknown step $step in --steps" >&2; exit 2; fi
done
selected() { [ -z "$STEPS_SELECTED" ] || [[ ",$STEPS_SELECTED," == *",$1,"* ]]; }
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then echo "gpu-check: --wheels $WHEELS is not a folder" >&2; exit 2; fi
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
[ -n "$WHEELS" ] && WHEELS="$(cd "$WHEELS" && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "$SMOKE" = 1 ]; then BUDGET="${BUDGET:-300}"; else BUDGET="${BUDGET:-550}"; fi
START=$(date +%s)
# The least time each step is guaranteed: a step never runs into the sum of the minimums of the
# steps after it (its "reserve"), so a slow build or test step cannot starve the benchmarks.
EXPECT_LIGER=0
if [ -n "$WHEELS" ] || "$PYTHON" -c "import liger_kernel" >/dev/null 2>&1; then EXPECT_LIGER=1; fi
declare -A MIN
if [ "$SMOKE" = 1 ]; then
  MIN=([build]=60 [gpu-tests]=20 [matrix]=20 [bench]=40 [bench-small]=15 [bench-objective]=20
       [bench-divergences]=20 [bench-fused-linear]=30 [bench-kd]=$(( EXPECT_LIGER * 25 )))
else
  # Sized so that the minimums (505 s with liger, and the summary's 5 s) fit the default budget of
  # 550 s, which leaves a lease's machine start, the transfers and a second, shorter call room inside
  # its 15 minutes; what a step does not use goes to the next ones. From the H200 runs recorded in
  # benchmarks/results/gpu-check/: build 89-93 s, gpu-tests 77 s (8 workers), matrix 42-63 s for 353
  # tests (the divergences bring the CUDA matrix to about 450), each bench step 31-52 s, of which
  # 8-10 s start the process; each Triton or inductor compile of a new kernel variant takes seconds.
  MIN=([build]=95 [gpu-tests]=60 [matrix]=80 [bench]=65 [bench-small]=40 [bench-objective]=35
       [bench-divergences]=45 [bench-fused-linear]=60 [bench-kd]=$(( EXPECT_LIGER * 25 )))
fi
for step in "${STEP_ORDER[@]}"; do selected "$step" || MIN[$step]=0; done
SUMMARY_RESERVE=5
reserve_after() {  # the minimums of the steps after $1, and the summary's time
  local after=0 sum=$SUMMARY_RESERVE step
  for step in "${STEP_ORDER[@]}"; do
    [ "$after" = 1 ] && sum=$(( sum + ${MIN[$step]:-0} ))
    [ "$step" = "$1" ] && after=1
  done
  echo "$sum"
}
STEPS="$OUTDIR/steps.tsv"
: > "$STEPS"

elapsed() { echo $(( $(date +%s) - START )); }

update_tar() {
  [ -n "$TARFILE" ] || return 0
  mkdir -p "$(dirname "$TARFILE")" && tar -czf "$TARFILE.tmp" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")" \
    2>/dev/null && mv -f "$TARFILE.tmp" "$TARFILE"
}

record() {  # name status rc seconds log note
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >> "$STEPS"
  printf 'gpu-check: %-10s %-8s rc=%-4s %5ss  %s%s\n' "$1" "$2" "$3" "$4" "$(basename "$5")" "${6:+  ($6)}"
  update_tar
}

# run_step NAME LOG CAP CMD...: run CMD with its output in LOG, for at most CAP seconds and never
# into the last seconds of the budget that the steps after it reserve. On the cap, SIGINT first
# (pytest then still writes its junit XML), SIGKILL 20 s later.
run_step() {
  local name="$1" log="$2" cap="$3"; shift 3
  local var="GPU_CHECK_CAP_$(echo "$name" | tr 'a-z-' 'A-Z_')"
  cap="${!var:-$cap}"
  local left=$(( BUDGET - $(elapsed) - $(reserve_after "$name") ))
  [ "$left" -lt "$cap" ] && cap="$left"
  STEP_NOTE=""
  if ! selected "$name"; then
    STEP_STATUS=skipped STEP_RC=- STEP_SECS=0 STEP_NOTE="not selected (--steps)"
    return 0
  fi
  if [ "$cap" -lt 10 ]; then
    STEP_STATUS=skipped STEP_RC=- STEP_SECS=0 STEP_NOTE="out of time: budget ${BUDGET}s"
    return 0
  fi
  local t0; t0=$(date +%s)
  echo "gpu-check: $name (at most ${cap}s): $*" | tee "$log" >/dev/null
  timeout -s INT -k 20 "$cap" "$@" >> "$log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - t0 ))
  local status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout
  elif [ "$rc" -ne 0 ]; then status=failed; fi
  STEP_STATUS="$status" STEP_RC="$rc" STEP_SECS="$secs"
}

echo "gpu-check: $( [ "$SMOKE" = 1 ] && echo smoke || echo full ) run, results in $OUTDIR, budget ${BUDGET}s"

# ---- 0. environment ------------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "mode: $( [ "$SMOKE" = 1 ] && echo smoke || echo full )"
  if [ -n "${LOGITSTD_GIT_COMMIT:-}" ]; then echo "git: $LOGITSTD_GIT_COMMIT (LOGITSTD_GIT_COMMIT)"
  else echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)"; fi
  echo "host: $(uname -srm), $(nproc) cores"
  echo "python: $PYTHON"
  "$PYTHON" - <<'EOF' 2>&1
import platform
print("python version:", platform.python_version())
try:
    import torch
    print("torch:", torch.__version__, "cuda:", torch.version.cuda, "available:", torch.cuda.is_available())
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"gpu {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
except Exception as exc:
    print("torch: not importable:", exc)
try:
    import triton
    print("triton:", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
EOF
  command -v nvcc >/dev/null && nvcc --version | tail -1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
} > "$OUTDIR/env.txt" 2>&1
HAVE_CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$SMOKE" = 0 ] && [ "$HAVE_CUDA" != 1 ]; then
  echo "gpu-check: no CUDA device visible to torch (see $OUTDIR/env.txt); use --smoke on a machine without a GPU" >&2
  exit 2
fi

# ---- 1. wheels (the peers) ------------------------------------------------------------------------
# Every wheel of the folder, with dependencies from the folder or the environment; if they cannot be
# resolved offline (an installed package older than a pin asks), the wheels alone. Then each peer's
# module that the benchmarks import: one that is installed but does not import fails this step (the
# benchmarks then report that peer as unavailable, with the error).
install_wheels() {  # PYTHON DIR
  local python="$1" dir="$2" wheels
  shopt -s nullglob
  wheels=("$dir"/*.whl)
  if [ "${#wheels[@]}" -eq 0 ]; then echo "no wheels in $dir (bash scripts/fetch-wheels.sh fills it)"; return 1; fi
  "$python" -m pip install --no-index --find-links "$dir" "${wheels[@]}" ||
    { echo "retrying without dependencies"; "$python" -m pip install --no-index --no-deps "${wheels[@]}"; } || return 1
  "$python" -m pip check || echo "(pip check: conflicts above; the imports below decide)"
  "$python" - <<'PY'
import importlib
import importlib.metadata
import sys

failed = 0
for package, module in (("liger-kernel", "liger_kernel.chunked_loss"), ("orda-kernel", "orda_kernel"),
                        ("trl", "trl.trainer.distillation_trainer")):
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        print(f"{package}: not installed")
        continue
    try:
        importlib.import_module(module)
        print(f"{package} {version}: import {module} ok")
    except Exception as exc:
        failed += 1
        print(f"{package} {version}: import {module} FAILED: {type(exc).__name__}: {exc}")
sys.exit(1 if failed else 0)
PY
}
export -f install_wheels
LOG="$OUTDIR/wheels.log"
if [ -z "$WHEELS" ]; then
  record wheels skipped - 0 "$LOG" "no --wheels folder"
else
  run_step wheels "$LOG" 90 bash -c 'install_wheels "$@"' install_wheels "$PYTHON" "$WHEELS"
  record wheels "$STEP_STATUS" "$STEP_RC" "$STEP_SECS" "$LOG" "$STEP_NOTE"
fi

# ---- 2. build ---------------------------------------------------------------------------------------
LOG="$OUTDIR/build.log"
if ! selected build; then
  record build skipped - 0 "$LOG" "not selected (--steps)"
elif [ "$SMOKE" = 1 ] && "$PYTHON" -c "import logitstd_kernels._C" >/dev/null 2>&1; then
  record build skipped - 0 "$LOG" "smoke: the extension already imports"
else
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  LOGITSTD_REQUIRE_EXTENSION=1 run_step build "$LOG" 300 "$PYTHON" -m pip install -v --no-build-isolation --no-deps -e .
  record build "$STEP_STATUS" "$STEP_RC" "$STEP_SECS" "$LOG" "${STEP_NOTE:-TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST}"
fi
"$PYTHON" -c "import json, logitstd_kernels as l; print(json.dumps(l.backend_status(), indent=1, default=str))" \
  > "$OUTDIR/backends.txt" 2>&1

# ---- 3./4. tests ------------------------------------------------------------------------------------
PYTEST=("$PYTHON" -m pytest -q -rfE -p no:cacheprovider)
"$PYTHON" -c "import pytest_benchmark" >/dev/null 2>&1 && PYTEST+=(--benchmark-disable)
# On the GPU most of a test step's time is Triton and inductor compiling kernels on one core each:
# with pytest-xdist the compiles of different cases run side by side (GPU_CHECK_WORKERS, default 8).
if [ "$SMOKE" = 0 ] && [ "${GPU_CHECK_WORKERS:-8}" -gt 1 ] && "$PYTHON" -c "import xdist" >/dev/null 2>&1; then
  PYTEST+=(-n "${GPU_CHECK_WORKERS:-8}")
fi
mapfile -t GPU_FILES < <(grep -rl "mark\.gpu" tests --include='test_*.py' | sort)
LOG="$OUTDIR/gpu-tests.log"
if [ "${#GPU_FILES[@]}" -eq 0 ]; then
  STEP_STATUS=failed STEP_RC=- STEP_SECS=0 STEP_NOTE="no test file under tests/ has a gpu mark"
elif [ "$SMOKE" = 1 ]; then
  # the eviction-hint cases run the Triton interpreter for a minute on the CPU (the test suite runs them)
  run_step gpu-tests "$LOG" 60 "${PYTEST[@]}" -m gpu "${GPU_FILES[@]}" -k "not hinted" --junitxml="$OUTDIR/junit-gpu.xml"
else
  # A missing CUDA kernel or extra fails instead of skipping (tests/support.py).
  LOGITSTD_REQUIRE_ALL=1 run_step gpu-tests "$LOG" 150 \
    "${PYTEST[@]}" -m gpu "${GPU_FILES[@]}" --junitxml="$OUTDIR/junit-gpu.xml"
fi
record gpu-tests "$STEP_STATUS" "$STEP_RC" "$STEP_SECS" "$LOG" "${STEP_NOTE:-${GPU_FILES[*]}}"

LOG="$OUTDIR/matrix.log"
if [ "$SMOKE" = 1 ]; then
  run_step matrix "$LOG" 60 "${PYTEST[@]}" tests/kernels/test_loss_matrix.py --junitxml="$OUTDIR/junit-matrix.xml" \
    -k "test_a_fused_backend_runs_here or test_zero_rows or test_student_grad_only or test_mask"
  NOTE="a few fast cases"
else
  # Every CUDA case (triton-cuda, cuda-cuda) outside the gpu-marked tests (step 3), and the
  # benchmark gates, whose inputs are on the GPU there; the CPU kernel's cases, and the host emulation
  # of the CUDA kernel's row math, run in CI.
  LOGITSTD_REQUIRE_ALL=1 run_step matrix "$LOG" 240 \
    "${PYTEST[@]}" tests -m "not gpu" \
    -k "(cuda and not emulated_on_host) or gate" --junitxml="$OUTDIR/junit-matrix.xml"
  NOTE="-k cuda: every test file; the benchmark gates"
fi
record matrix "$STEP_STATUS" "$STEP_RC" "$STEP_SECS" "$LOG" "${STEP_NOTE:-$NOTE}"

# ---- 5.-10. benchmarks -----------------------------------------------------------------------------
# bench_step NAME CAP MARGIN ARGS...: one `python -m logitstd_kernels bench` run; it starts no new case
# in the last MARGIN seconds of its cap (one case, compilation included, must fit in them).
bench_step() {
  local name="$1" cap="$2" margin="$3"; shift 3
  local log="$OUTDIR/$name.log"
  local var="GPU_CHECK_CAP_$(echo "$name" | tr 'a-z-' 'A-Z_')"
  cap="${!var:-$cap}"
  local left=$(( BUDGET - $(elapsed) - $(reserve_after "$name") ))
  [ "$left" -lt "$cap" ] && cap="$left"
  local tb=$(( cap - margin )); [ "$tb" -lt 0 ] && tb=0
  local args_var="GPU_CHECK_ARGS_$(echo "$name" | tr 'a-z-' 'A-Z_')" extra=()
  read -ra extra <<< "${!args_var:-}"
  run_step "$name" "$log" "$cap" \
    "$PYTHON" -m logitstd_kernels bench --modes full --rows-sweep "" --time-budget "$tb" \
    --out "$OUTDIR/$name" "$@" "${extra[@]}"
  local note="${STEP_NOTE:-time budget ${tb}s}"
  if [ "$STEP_STATUS" = ok ] && grep -qs "skipped: time budget" "$OUTDIR/$name"/*.json; then
    STEP_STATUS=partial note="cases skipped for time (see $name.log)"
  fi
  record "$name" "$STEP_STATUS" "$STEP_RC" "$STEP_SECS" "$log" "$note"
}
# The fused-linear providers, the same in both modes (the peers are reported unavailable where they
# are not installed, and on the objectives they do not compute)
FL_PROVIDERS=fused,fused_accum_bf16,gemms,torch,liger,orda,trl
DIVERGENCES=forward_kl,reverse_kl,jsd,jeffreys,tvd
if [ "$SMOKE" = 1 ]; then
  TINY=(--rows 8 --vocab 256 --dtypes float32 --cpu-budget 0.05)
  GRID=("${TINY[@]}" --providers torch,torch_compile,triton,cuda,cpu)
  SMALL_GRID=(--rows 64 --vocab 100 --dtypes float32 --cpu-budget 0.05 --modes no_grad,full --providers torch,cpu)
  OBJ_GRID=("${TINY[@]}" --providers torch,torch_compile,triton,cuda,cpu,cpu_kd_only,cpu_kd+torch_ce)
  DIV_GRID=("${TINY[@]}" --providers torch,cpu)
  FL_GRID=(--rows 64 --hidden 16 --vocab 256 --dtypes float32 --cpu-budget 0.05)
  KD_GRID=("${TINY[@]}" --providers torch,liger,cpu)
  CAPS=([1]=120 [2]=60 [3]=90 [4]=90 [5]=120 [6]=90) MARGINS=([1]=20 [2]=10 [3]=15 [4]=15 [5]=20 [6]=15)
else
  GRID=(--device cuda --rows 8192 --vocab 32768,131072,262144 --dtypes bfloat16,float32 --modes no_grad,full
        --providers torch,triton,cuda)
  SMALL_GRID=(--device cuda --rows 65536 --vocab 100,1000 --dtypes bfloat16,float32 --modes no_grad,full
              --providers torch,triton,cuda)
  OBJ_GRID=(--device cuda --rows 8192 --vocab 131072,32768 --dtypes bfloat16
            --providers torch,triton,cuda,triton_kd_only,cuda_kd_only,triton_kd+torch_ce)
  DIV_GRID=(--device cuda --rows 8192 --vocab 131072 --dtypes bfloat16 --providers torch,triton,cuda)
  FL_GRID=(--device cuda --rows 8192 --hidden 4096 --vocab 131072 --dtypes bfloat16)
  KD_GRID=(--device cuda --rows 8192 --vocab 131072,32768,262144 --dtypes bfloat16 --providers torch,liger,triton,cuda)
  CAPS=([1]=200 [2]=90 [3]=120 [4]=150 [5]=150 [6]=90) MARGINS=([1]=30 [2]=20 [3]=20 [4]=30 [5]=40 [6]=20)
fi
bench_step bench "${CAPS[1]}" "${MARGINS[1]}" "${GRID[@]}"
bench_step bench-small "${CAPS[2]}" "${MARGINS[2]}" "${SMALL_GRID[@]}"
bench_step bench-objective "${CAPS[3]}" "${MARGINS[3]}" --objective "${OBJ_GRID[@]}"
bench_step bench-divergences "${CAPS[4]}" "${MARGINS[4]}" --divergences "$DIVERGENCES" "${DIV_GRID[@]}"
bench_step bench-fused-linear "${CAPS[5]}" "${MARGINS[5]}" --fused-linear "${FL_GRID[@]}" --providers "$FL_PROVIDERS"
HAVE_LIGER=$("$PYTHON" -c "import liger_kernel; print(1)" 2>/dev/null || echo 0)
if [ "$HAVE_LIGER" = 1 ]; then
  # Liger-Kernel has no standardization: plain KD, bf16 only (the peer's regime)
  bench_step bench-kd "${CAPS[6]}" "${MARGINS[6]}" --no-standardize "${KD_GRID[@]}"
else
  record bench-kd skipped - 0 "$OUTDIR/bench-kd.log" \
    "liger-kernel not importable$( [ -z "$WHEELS" ] && echo '; no --wheels folder')"
fi

# ---- summary ---------------------------------------------------------------------------------------
"$PYTHON" scripts/gpu_check_summary.py "$OUTDIR" "$(elapsed)" "$BUDGET" > "$OUTDIR/summary.txt" 2>&1
RC=$?
update_tar
echo
cat "$OUTDIR/summary.txt"
exit $(( RC == 0 ? 0 : 1 ))
