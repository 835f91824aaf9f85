#!/usr/bin/env python3
"""The static cost of the CUDA kernel for sm_90, without a GPU: SASS instructions per element per pass.

Compiles csrc/cuda/kd_cuda.cu to a cubin with nvcc (``.ci/check_cuda_compile.sh`` with
``CUDA_CHECK_CUBIN``: the same flags; ``-DLOGITSTD_CUDA_REPORT_ONLY`` instantiates only the report's
kernels, bf16 and float32 inputs with 16-byte packs), disassembles it (nvdisasm) and, for each
report variant (standardized KD with the student gradient for every divergence, plain KD, the
objective with labels), reads the functions of the kernel's passes (kd_phases.cuh: each pass is a
device function of its own, ``__noinline__``): the per-element loop of each (its innermost loop with
the most LDS, the loads of the row's packs from shared memory), its instructions divided by the
elements an iteration handles, and its MUFU instructions. The cost of a launch is the sum over the
passes every row takes: statistics, sums, the pointwise pass (jsd, tvd) and the gradients; the
rare rows' passes (the exact max, the rescaled statistics, the Bregman refinement) and the short
rows' terms pass are listed, not counted. Registers from ``ptxas -v``; ``spills``: the local-memory
instructions (LDL, STL) in the per-element loops every row takes (the check fails on any);
``row_spills``: the spill bytes ptxas reports for the kernel and all its functions, which are in the
code around the loops and the calls (once per row and thread, e.g. a pass's result returned through
the stack). CTAs per SM from the registers, 256 threads and the 64 KB of row data per CTA
(launch_config.h).

``--json PATH`` writes the "cuda" entries of the report (static_cost.write_entries keeps the Triton
ones); ``--check PATH`` compares with a committed report and fails on a spill or on more than 10%
more instructions per element. Exits 0 with a note when nvcc is absent.

Usage::

    python scripts/cuda_sass_check.py [--json PATH] [--check PATH] [--quiet]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import static_cost as sc  # noqa: E402  (the report's format and check, shared with the Triton script)

DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "jeffreys": 3, "tvd": 4}  # logitstd/divergence.h
DTYPES = {"bf16": ("__nv_bfloat16", 2, 8), "fp32": ("float", 4, 4)}  # C++ type, bytes, pack (16 bytes)
THREADS = 256  # kThreads
CTA_SHARED = 64 * 1024  # kTargetCtaBytes: the row data of one CTA
WANT_YES, WANT_NO = "(logitstd::cuda::Want)1", "(logitstd::cuda::Want)0"


def variants() -> list[dict]:
    """The report variants: (dtype, objective, divergence) with the template arguments of their passes."""
    out = []
    for dtype in DTYPES:
        cases = [("kd", d) for d in DIVERGENCES] + [("plain", "forward_kl"), ("objective", "forward_kl")]
        out += [dict(dtype=dtype, objective=objective, divergence=divergence) for objective, divergence in cases]
    return out


def pass_names(v: dict) -> list[tuple[str, str, bool]]:
    """(pass, demangled-name prefix, taken by every row) of a variant's pass functions."""
    ctype, _, pack = DTYPES[v["dtype"]]
    std = "false" if v["objective"] == "plain" else "true"
    div = f"(logitstd::Divergence){DIVERGENCES[v['divergence']]}"
    labels = WANT_YES if v["objective"] == "objective" else WANT_NO
    tail = f"{ctype}, {ctype}, {pack}, true, float>"
    passes = [("stats", f"logitstd::cuda::stats_pass<{std}, false, {tail}", True)]
    if std == "true":
        passes += [("stats_exact", f"logitstd::cuda::stats_pass<false, false, {tail}", False),
                   ("stats_scaled", f"logitstd::cuda::stats_pass<true, true, {tail}", False)]
    passes.append(("sums", f"logitstd::cuda::sums_pass<{div}, {std}, {WANT_YES}, {WANT_NO}, {labels}, {tail}", True))
    if v["divergence"] in ("jsd", "tvd"):
        passes.append(("pointwise", f"logitstd::cuda::pointwise_pass<{div}, {tail}", True))
    else:
        passes.append(("refine", f"logitstd::cuda::refine_pass<{div}, {tail}", False))
    if std == "true":
        passes.append(("terms", f"logitstd::cuda::terms_pass<{div}, {tail}", False))
    passes.append(("grads", f"logitstd::cuda::grads_pass<{div}, {std}, false, {WANT_YES}, {WANT_NO}, {labels}, {tail}",
                   True))
    return passes


def kernel_name(v: dict) -> str:
    ctype, _, pack = DTYPES[v["dtype"]]
    return f"void logitstd::cuda::kd_fused_kernel<{ctype}, {ctype}, {pack}, true, " \
           f"(logitstd::Divergence){DIVERGENCES[v['divergence']]}>"


def demangle(names: list[str]) -> dict[str, str]:
    done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, done.stdout.splitlines()))


def analyze(v: dict, functions: dict, names: dict[str, str], ptxas: dict[str, dict]) -> dict:
    """The report record of one variant (static_cost.entry's fields)."""
    _, size, pack = DTYPES[v["dtype"]]
    kernel = next(k for (k, f) in functions if k == f and names[k].startswith(kernel_name(v)))
    own = {names[f]: f for (k, f) in functions if k == kernel}
    record = dict(kernel="kd_fused_kernel", path="cluster", entry="cluster, 16-byte packs",
                  dtypes=f"{v['dtype']}/{v['dtype']}", objective=v["objective"], divergence=v["divergence"],
                  passes={}, registers=ptxas.get((kernel, kernel), {}).get("registers"))
    counted, mufu, spills = 0.0, 0.0, 0
    loads_per_pack = 2 * (pack * size // 16)  # one 16-byte LDS per word of x and of y
    for name, prefix, every_row in pass_names(v):
        mangled = next((f for d, f in own.items() if prefix in d), None)
        if mangled is None:
            raise SystemExit(f"cuda_sass_check: no function {prefix}... in {kernel}")
        body, elements = sc.element_loop(functions[(kernel, mangled)], "LDS", loads_per_pack, pack)
        if not elements:
            raise SystemExit(f"cuda_sass_check: no per-element loop in {names[mangled]}")
        record["passes"][name] = round(len(body) / elements, 2)
        if every_row:
            counted += len(body) / elements
            mufu += sum(1 for i in body if "MUFU" in i) / elements
            spills += sum(1 for i in body if re.search(r"\b(LDL|STL)\b", i))
    record.update(instructions_per_element=round(counted, 2), mufu_per_element=round(mufu, 2), spills=spills,
                  row_spills=sum(p.get("spills", 0) for (k, _), p in ptxas.items() if k == kernel))
    record["ctas_per_sm"] = sc.ctas_per_sm(record["registers"] or 0, THREADS, CTA_SHARED)
    return record


def compile_cubin(out: Path) -> Optional[str]:
    """nvcc of the report's kernels to ``out`` with ``ptxas -v``: its log, or None without nvcc."""
    env = dict(os.environ, CUDA_CHECK_CUBIN=str(out),
               CUDA_CHECK_EXTRA_FLAGS=(os.environ.get("CUDA_CHECK_EXTRA_FLAGS", "") + " -Xptxas -v"
                                       " -DLOGITSTD_CUDA_REPORT_ONLY").strip())
    done = subprocess.run(["bash", str(ROOT / ".ci" / "check_cuda_compile.sh")], env=env, capture_output=True,
                          text=True, cwd=ROOT)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"cuda_sass_check: the compile failed:\n{log[-4000:]}")
    return log if out.exists() else None


def nvcc_version() -> str:
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or ""
    text = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else ""
    match = re.search(r"release (\d+\.\d+)", text)
    return f"nvcc {match.group(1)}" if match else "nvcc"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write the report here (the CUDA entries)")
    parser.add_argument("--check", type=Path, default=None, help="compare with this committed report")
    parser.add_argument("--quiet", action="store_true", help="print only problems and the verdict")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cuda-sass-") as tmp:
        cubin = Path(tmp) / "kd.cubin"
        log = compile_cubin(cubin)
        if log is None:
            print("cuda_sass_check: nvcc not found; skipped")
            return 0
        nvdisasm = sc.find_tool("nvdisasm", os.environ.get("NVCC") or shutil.which("nvcc"))
        if nvdisasm is None:
            print("cuda_sass_check: no nvdisasm (CUDA toolkit or triton); skipped")
            return 0
        functions = sc.sass_functions(sc.sass_text(cubin.read_bytes(), nvdisasm))
    names = demangle(sorted({f for _, f in functions}))
    ptxas = sc.ptxas_functions(log)
    compiler = nvcc_version()
    entries = []
    for v in variants():
        record = analyze(v, functions, names, ptxas)
        entry = sc.entry(record, "cuda", compiler)
        entry["row_spills"] = record["row_spills"]
        entries.append(entry)
        if not args.quiet:
            print(f"{record['dtypes']:<10} {record['objective']:<9} {record['divergence']:<10} "
                  f"{record['instructions_per_element']:>6} instr/elem {record['mufu_per_element']:>5} MUFU/elem "
                  f"regs {record['registers']} spills {record['spills']} (row {record['row_spills']}) "
                  f"CTAs/SM {record['ctas_per_sm']}  {record['passes']}")
    if args.json is not None:
        sc.write_entries(args.json, "cuda", entries)
    problems = sc.check(entries, args.check, "cuda") if args.check is not None else []
    for line in problems:
        print(f"cuda_sass_check: {line}")
    ok = not [p for p in problems if not p.startswith("note:")]
    print(f"cuda_sass_check: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
