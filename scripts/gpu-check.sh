#!/usr/bin/env bash
# The one prepared command for a GPU machine (H100/H200; torch, triton, pytest, pytest-benchmark
# installed; no network). In order of value, each step with its own log in OUTDIR:
#
#   1. wheels     with --wheels DIR: pip install --no-index --find-links DIR liger-kernel
#   2. build      TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation --no-deps -e .  (build.log)
#   3. gpu-tests  pytest -m gpu (the files holding gpu tests; with pytest-xdist, 8 workers) (junit-gpu.xml)
#   4. matrix     pytest -k cuda -m "not gpu": every test file's CUDA cases (the backends triton-cuda,
#                 cuda-cuda) and the benchmark gates on the GPU        (junit-matrix.xml)
#   5. bench      python -m logitstd_kernels bench: 8192 rows, V in {32768, 131072, 262144}, bf16 and
#                 float32, providers torch, torch_compile, triton, cuda        (bench/*.json|csv|png)
#   6. bench-objective  the distillation objective (bench --objective: CE + LS-KD with labels), 8192
#                 tokens, V in {32768, 131072}, bf16: fused vs eager vs torch.compile vs our KD kernel
#                 plus torch's CE                                               (bench-objective/)
#   7. bench-fused-linear  a full step through the lm_heads (bench --fused-linear): 8192 tokens, H = 4096,
#                 V = 131072, bf16; the fused linear loss vs the eager composition (and Liger's
#                 LigerFusedLinearJSDLoss for plain KD)                         (bench-fused-linear/)
#   8. bench-kd   plain KD (--no-standardize) with liger, when liger-kernel imports (bench-kd/)
#
# then prints a short summary table last (also in OUTDIR/summary.txt; steps.json holds each step's
# status, exit code, seconds and log). A failing step is recorded and the next one still runs; every
# step has a time cap and the whole script a budget (--budget, default 600 s), after which the steps
# left are recorded as skipped. The benchmark writes its files after every case, so an interrupted
# run keeps what it measured. Exit status: 0 when every step that ran passed (skips for a missing
# --wheels folder or an already built extension count as passed), else 1; 2 for bad arguments.
#
#   bash scripts/gpu-check.sh OUTDIR [--smoke] [--wheels DIR] [--tar FILE] [--budget SECONDS] [--steps LIST]
#
# --smoke  the same steps at tiny sizes on whatever device is present (CI runs it on the CPU, so the
#          script cannot rot): the build is skipped when the extension already imports, the tests
#          are a few fast loss-matrix cases, the benchmarks are one 8 x 256 case; ~1 minute on 2 cores.
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
# GPU_CHECK_ARGS_BENCH="--dtypes float32" times the main benchmark's float32 cases only),
# LOGITSTD_GIT_COMMIT (the commit recorded in env.txt and the results, in place of what git says: a
# copy of the tree on a lent machine can carry a .git that does not match it).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

OUTDIR="" SMOKE=0 WHEELS="" TARFILE="" BUDGET="" STEPS_SELECTED=""
ALL_STEPS=",wheels,build,gpu-tests,matrix,bench,bench-objective,bench-fused-linear,bench-kd,"
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
  if [[ "$ALL_STEPS" != *",$step,"* ]]; then echo "gpu-check: unknown step $step in --steps" >&2; exit 2; fi
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
if [ "$SMOKE" = 1 ]; then BUDGET="${BUDGET:-240}"; else BUDGET="${BUDGET:-600}"; fi
START=$(date +%s)
# The least time each step is guaranteed: a step never runs into the sum of the minimums of the
# steps after it (its "reserve"), so a slow build cannot starve the benchmark.
EXPECT_LIGER=0
if [ -n "$WHEELS" ] || "$PYTHON" -c "import liger_kernel" >/dev/null 2>&1; then EXPECT_LIGER=1; fi
if [ "$SMOKE" = 1 ]; then
  MIN_BUILD=60 MIN_GPU=20 MIN_MATRIX=20 MIN_BENCH=40 MIN_OBJ=20 MIN_FL=20 MIN_KD=$(( EXPECT_LIGER * 25 ))
else
  # Sized so that the minimums (535 s with liger) fit a budget that leaves a lease's machine start
  # and transfers room inside its 15 minutes (--budget 560). Measured on an H200: build 89-93 s,
  # gpu-tests 77 s (8 workers), matrix 42-63 s, each bench step 31-52 s.
  MIN_BUILD=100 MIN_GPU=80 MIN_MATRIX=70 MIN_BENCH=110 MIN_OBJ=50 MIN_FL=45 MIN_KD=$(( EXPECT_LIGER * 40 ))
fi
selected build || MIN_BUILD=0; selected gpu-tests || MIN_GPU=0; selected matrix || MIN_MATRIX=0
selected bench || MIN_BENCH=0; selected bench-objective || MIN_OBJ=0
selected bench-fused-linear || MIN_FL=0; selected bench-kd || MIN_KD=0
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

# run_step NAME LOG CAP RESERVE CMD...: run CMD with its output in LOG, for at most CAP seconds and
# never into the last RESERVE seconds of the budget (those belong to the steps after it). On the
# cap, SIGINT first (pytest then still writes its junit XML), SIGKILL 20 s later.
run_step() {
  local name="$1" log="$2" cap="$3" reserve="$4"; shift 4
  local var="GPU_CHECK_CAP_$(echo "$name" | tr 'a-z-' 'A-Z_')"
  cap="${!var:-$cap}"
  local left=$(( BUDGET - $(elapsed) - reserve ))
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

# ---- 1. wheels (liger-kernel) ---------------------------------------------------------------------
LOG="$OUTDIR/wheels.log"
if [ -z "$WHEELS" ]; then
  record wheels skipped - 0 "$LOG" "no --wheels folder"
else
  # Dependencies from the folder or the environment; if they cannot be resolved offline, the
  # wheel alone (liger-kernel needs only torch and triton, which are installed).
  run_step wheels "$LOG" 60 $(( MIN_BUILD + MIN_GPU + MIN_MATRIX + MIN_BENCH + MIN_OBJ + MIN_FL + MIN_KD )) bash -c '"$0" -m pip install --no-index --find-links "$1" liger-kernel ||
    { echo "retrying without dependencies"; "$0" -m pip install --no-index --find-links "$1" --no-deps liger-kernel; }' \
    "$PYTHON" "$WHEELS"
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
  LOGITSTD_REQUIRE_EXTENSION=1 run_step build "$LOG" 300 $(( MIN_GPU + MIN_MATRIX + MIN_BENCH + MIN_OBJ + MIN_FL + MIN_KD )) \
    "$PYTHON" -m pip install -v --no-build-isolation --no-deps -e .
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
  run_step gpu-tests "$LOG" 60 $(( MIN_MATRIX + MIN_BENCH + MIN_OBJ + MIN_FL + MIN_KD )) "${PYTEST[@]}" -m gpu "${GPU_FILES[@]}" --junitxml="$OUTDIR/junit-gpu.xml"
else
  # A missing CUDA kernel or extra fails instead of skipping (tests/support.py).
  LOGITSTD_REQUIRE_ALL=1 run_step gpu-tests "$LOG" 150 $(( MIN_MATRIX + MIN_BENCH + MIN_OBJ + MIN_FL + MIN_KD )) \
    "${PYTEST[@]}" -m gpu "${GPU_FILES[@]}" --junitxml="$OUTDIR/junit-gpu.xml"
fi
record gpu-tests "$STEP_STATUS" "$STEP_RC" "$STEP_SECS" "$LOG" "${STEP_NOTE:-${GPU_FILES[*]}}"

LOG="$OUTDIR/matrix.log"
if [ "$SMOKE" = 1 ]; then
  run_step matrix "$LOG" 60 $(( MIN_BENCH + MIN_OBJ + MIN_FL + MIN_KD )) "${PYTEST[@]}" tests/kernels/test_loss_matrix.py --junitxml="$OUTDIR/junit-matrix.xml" \
    -k "test_a_fused_backend_runs_here or test_zero_rows or test_student_grad_only or test_mask"
  NOTE="a few fast cases"
else
  # Every CUDA case (triton-cuda, cuda-cuda) outside the gpu-marked tests (step 3), and the
  # benchmark gates, whose inputs are on the GPU there; the CPU kernel's cases, and the host emulation
  # of the CUDA kernel's row math, run in CI.
  LOGITSTD_REQUIRE_ALL=1 run_step matrix "$LOG" 240 $(( MIN_BENCH + MIN_OBJ + MIN_FL + MIN_KD )) \
    "${PYTEST[@]}" tests -m "not gpu" \
    -k "(cuda and not emulated_on_host) or gate" --junitxml="$OUTDIR/junit-matrix.xml"
  NOTE="-k cuda: every test file; the benchmark gates"
fi
record matrix "$STEP_STATUS" "$STEP_RC" "$STEP_SECS" "$LOG" "${STEP_NOTE:-$NOTE}"

# ---- 5.-8. benchmark --------------------------------------------------------------------------------
# Each bench step's cap, and the margin at its end in which it starts no new case (one case,
# compilation included, must fit in it); the fused-linear step's cases are fewer and shorter.
if [ "$SMOKE" = 1 ]; then BENCH_CAP=120 BENCH_MARGIN=20 FL_CAP=60 FL_MARGIN=15
else BENCH_CAP=420 BENCH_MARGIN=90 FL_CAP=150 FL_MARGIN=35; fi
bench_step() {  # name reserve cap margin extra-args...
  local name="$1" reserve="$2" cap="$3" margin="$4"; shift 4
  local log="$OUTDIR/$name.log"
  local var="GPU_CHECK_CAP_$(echo "$name" | tr 'a-z-' 'A-Z_')"
  cap="${!var:-$cap}"
  local left=$(( BUDGET - $(elapsed) - reserve ))
  [ "$left" -lt "$cap" ] && cap="$left"
  local tb=$(( cap - margin )); [ "$tb" -lt 0 ] && tb=0
  local args_var="GPU_CHECK_ARGS_$(echo "$name" | tr 'a-z-' 'A-Z_')" extra=()
  read -ra extra <<< "${!args_var:-}"
  run_step "$name" "$log" "$cap" "$reserve" \
    "$PYTHON" -m logitstd_kernels bench --modes full --rows-sweep "" --time-budget "$tb" \
    --out "$OUTDIR/$name" "$@" "${extra[@]}"
  local note="${STEP_NOTE:-time budget ${tb}s}"
  if [ "$STEP_STATUS" = ok ] && grep -q "case(s) skipped" "$log"; then
    STEP_STATUS=partial note="cases skipped for time (see $name.log)"
  fi
  record "$name" "$STEP_STATUS" "$STEP_RC" "$STEP_SECS" "$log" "$note"
}
if [ "$SMOKE" = 1 ]; then
  GRID=(--rows 8 --vocab 256 --dtypes float32 --cpu-budget 0.05)
  PROVIDERS=torch,torch_compile,triton,cuda,cpu
else
  GRID=(--device cuda --rows 8192 --vocab 32768,131072,262144 --dtypes bfloat16,float32)
  PROVIDERS=torch,torch_compile,triton,cuda
fi
HAVE_LIGER=$("$PYTHON" -c "import liger_kernel; print(1)" 2>/dev/null || echo 0)
bench_step bench "$(( MIN_OBJ + MIN_FL + (HAVE_LIGER == 1 ? MIN_KD : 5) ))" "$BENCH_CAP" "$BENCH_MARGIN" \
  "${GRID[@]}" --providers "$PROVIDERS"
if [ "$SMOKE" = 1 ]; then
  OBJ_GRID=(--rows 8 --vocab 256 --dtypes float32 --cpu-budget 0.05)
  OBJ_PROVIDERS=torch,torch_compile,triton,cuda,cpu,cpu_kd+torch_ce
else
  OBJ_GRID=(--device cuda --rows 8192 --vocab 32768,131072 --dtypes bfloat16)
  OBJ_PROVIDERS=torch,torch_compile,triton,cuda,triton_kd+torch_ce
fi
bench_step bench-objective "$(( MIN_FL + (HAVE_LIGER == 1 ? MIN_KD : 5) ))" "$BENCH_CAP" "$BENCH_MARGIN" \
  --objective "${OBJ_GRID[@]}" --providers "$OBJ_PROVIDERS"
# A full step through the lm_heads (bench --fused-linear): the fused linear loss vs the eager
# composition vs torch.compile of it (and Liger's fused JSD for plain KD when it imports), V = 32768
# first; each case also has the plain-KD objective.
if [ "$SMOKE" = 1 ]; then
  FL_GRID=(--rows 64 --hidden 16 --vocab 256 --dtypes float32 --cpu-budget 0.05)
  FL_PROVIDERS=fused,torch
else
  # V = 131072 (Llama-3's 128256 rounded up), both objectives; torch.compile of the composition is
  # left to the objective step, which times it at this V without the lm_head's compile cost.
  FL_GRID=(--device cuda --rows 8192 --hidden 4096 --vocab 131072 --dtypes bfloat16)
  FL_PROVIDERS=fused,torch$( [ "$HAVE_LIGER" = 1 ] && echo ,liger )
fi
bench_step bench-fused-linear "$(( HAVE_LIGER == 1 ? MIN_KD : 5 ))" "$FL_CAP" "$FL_MARGIN" --fused-linear \
  "${FL_GRID[@]}" --providers "$FL_PROVIDERS"
if [ "$HAVE_LIGER" = 1 ]; then
  # Liger-Kernel has no standardization: plain KD, bf16 only (the peer's regime)
  if [ "$SMOKE" = 1 ]; then KD_GRID=("${GRID[@]}"); else
    KD_GRID=(--device cuda --rows 8192 --vocab 32768,131072,262144 --dtypes bfloat16); fi
  bench_step bench-kd 5 "$BENCH_CAP" "$BENCH_MARGIN" --no-standardize "${KD_GRID[@]}" --providers torch,liger,triton,cuda
else
  record bench-kd skipped - 0 "$OUTDIR/bench-kd.log" \
    "liger-kernel not importable$( [ -z "$WHEELS" ] && echo '; no --wheels folder')"
fi

# ---- summary ---------------------------------------------------------------------------------------
"$PYTHON" - "$OUTDIR" "$(elapsed)" "$BUDGET" <<'EOF' > "$OUTDIR/summary.txt" 2>&1
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, total, budget = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, rc, secs, log, note = (line.split("\t") + [""] * 6)[:6]
    steps.append({"step": name, "status": status, "rc": None if rc == "-" else int(rc), "seconds": int(secs),
                  "log": Path(log).name, "note": note})


def junit(path):
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    count["passed"] = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    failed = [f"{c.get('classname', '').split('.')[-1]}::{c.get('name')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return count, failed


for step in steps:
    xml = {"gpu-tests": "junit-gpu.xml", "matrix": "junit-matrix.xml"}.get(step["step"])
    result = junit(out / xml) if xml else None
    if result:
        step["tests"], step["failed_tests"] = result
        c = result[0]
        step["note"] = (f"{c['passed']} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped"
                        + (f"; {step['note']}" if step["note"] else ""))

width = max(len(s["step"]) for s in steps)
print(f"== gpu-check summary ({total} s of a {budget} s budget; files in {out}) ==")
print(f"{'step':<{width}}  {'status':<8} {'rc':>4} {'s':>5}  log / note")
for s in steps:
    rc = "-" if s["rc"] is None else s["rc"]
    print(f"{s['step']:<{width}}  {s['status']:<8} {rc:>4} {s['seconds']:>5}  {s['log']}"
          + (f"  ({s['note']})" if s["note"] else ""))
    for name in s.get("failed_tests", [])[:8]:
        print(f"{'':<{width}}    FAILED {name}")

for name in ("bench", "bench-objective", "bench-fused-linear", "bench-kd"):
    files = sorted((out / name).glob("*.json"))
    if not files:
        continue
    data = json.loads(files[-1].read_text())
    meta, results = data["metadata"], data["results"]
    if meta.get("fused_linear"):
        print(f"\n{name}: {meta['device']}, H = {meta['hidden']}, forward + backward: median ms, peak MiB; "
              f"{files[-1].name}")
        for r in results:
            if not r["status"].startswith("unavailable"):
                shown = f"{r['median_ms']:.2f} ms, {r['peak_mem_mb'] or 0:.0f} MiB" if r["status"] == "ok" else r["status"][:150]
                print(f"  {r['sweep']:>18} rows={r['rows']} V={r['vocab']} {r['dtype']} {r['provider']:>13}: {shown}")
        continue
    print(f"\n{name}: {meta['device']}, copy {meta['copy_bandwidth_gbps']} GB/s, "
          f"{'standardized' if meta.get('standardize', True) else 'plain'} KD, mode full: median ms "
          f"(x memory floor); {files[-1].name}")
    providers = list(dict.fromkeys(r["provider"] for r in results if not r["status"].startswith("unavailable")))
    print(f"{'rows':>6} {'V':>7} {'dtype':>9}  " + "  ".join(f"{p:>16}" for p in providers))
    for key in dict.fromkeys((r["rows"], r["vocab"], r["dtype"]) for r in results):
        cells = []
        for p in providers:
            r = next((r for r in results if (r["rows"], r["vocab"], r["dtype"]) == key and r["provider"] == p
                      and r["mode"] == "full"), None)
            if r is None:
                cells.append(f"{'-':>16}")
            elif r["status"] != "ok":
                cells.append(f"{r['status'].split(':')[0]:>16}")
            else:
                cells.append(f"{r['median_ms']:>9.3f} ({r['x_floor']:.1f}f)".rjust(16))
        print(f"{key[0]:>6} {key[1]:>7} {key[2]:>9}  " + "  ".join(cells))
    for r in results:
        if r["status"].startswith("failed"):
            print(f"  {r['provider']} rows={r['rows']} V={r['vocab']} {r['dtype']}: {r['status'][:150]}")

passed = all(s["status"] in ("ok", "skipped") and not s["note"].startswith("out of time") for s in steps)
print(f"\ngpu-check: {'PASSED' if passed else 'FAILED'}: "
      + ", ".join(f"{s['step']} {s['status']}" for s in steps))
(out / "steps.json").write_text(json.dumps({"passed": passed, "seconds": total, "budget": budget, "steps": steps},
                                           indent=1))
sys.exit(0 if passed else 1)
EOF
RC=$?
update_tar
echo
cat "$OUTDIR/summary.txt"
exit $(( RC == 0 ? 0 : 1 ))
