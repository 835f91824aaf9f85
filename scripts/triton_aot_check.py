#!/usr/bin/env python3
"""Compile the Triton kernels for sm_90 without a GPU; report their static cost and check it.

``triton.compile`` with a CUDA target runs Triton's whole pipeline and its own ``ptxas`` on a
machine with no GPU and no driver. For every variant this script records what ``ptxas -v`` says
(registers, spill bytes) and, for the *report* variants (the default launches: every launch-table
entry of the float32 table with 16-byte runs x bf16 and float32 inputs x standardized KD with each
divergence, plain KD and the objective with labels), reads the SASS (``nvdisasm``, shipped with
Triton): the instructions of each loop body (a pass over a row's tiles) divided by the elements a
thread handles per iteration, the MUFU (special-function) instructions among them, and the CTAs per
SM the registers allow. The register path has no loop: its whole kernel is divided by the elements
per thread. The cost of a launch is the sum over the passes every row takes (the statistics again on
a row of extreme magnitude, and the Bregman refinement, are the rare rows' and not counted).

``--json PATH`` writes the report (``static_cost.py`` merges it with the CUDA kernel's);
``--check PATH`` compares with a committed report: the check fails when a default kernel (a report
variant) spills, or costs more than 10% more instructions per element than committed. A compile
error fails too.

Usage::

    python scripts/triton_aot_check.py [--report-only] [--jobs N] [--json PATH] [--check PATH] [--quiet]

Exits 0 with a note when triton cannot be imported (e.g. not Linux).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

os.environ.pop("TRITON_INTERPRET", None)  # compiled, not interpreted
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import static_cost as sc  # noqa: E402  (the report's format and check, shared with the CUDA script)
from aot_variants import Variant, build_variants  # noqa: E402


def compile_variant(v: Variant, arch: int = 90) -> dict:
    """The variant's record: compiled or not, ptxas's numbers, and the SASS analysis of a report variant."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget

    from aot_variants import source_of

    try:
        from triton import knobs

        knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's log; captured below
    except (ImportError, AttributeError):
        pass
    record = v.describe()
    start = time.perf_counter()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            kernel = triton.compile(source_of(v), target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": v.num_warps})
    except Exception as exc:  # a compile error of any stage
        record.update(ok=False, error=f"{type(exc).__name__}: {exc}"[-2000:], seconds=time.perf_counter() - start)
        return record
    record.update(ok=True, seconds=round(time.perf_counter() - start, 2), **sc.parse_ptxas(captured.getvalue()))
    if "registers" not in record:
        record.update(sc.parse_ptxas(sc.ptxas_log(kernel.asm["ptx"], arch)))
    record["shared_bytes"] = getattr(kernel.metadata, "shared", 0)
    if v.report:
        sass = sc.disassemble(kernel.asm["cubin"])
        record.update(sc.per_element(sass, v.passes(), v.elements_per_thread()))
        record["ctas_per_sm"] = sc.ctas_per_sm(record.get("registers", 0), 32 * v.num_warps, record["shared_bytes"])
    return record


def _worker(args: tuple[Variant, int, str]) -> dict:
    variant, arch, cache = args
    os.environ["TRITON_CACHE_DIR"] = cache
    return compile_variant(variant, arch)


def run(variants: list[Variant], jobs: int, arch: int, quiet: bool) -> list[dict]:
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="triton-aot-") as cache:
        work = [(v, arch, cache) for v in variants]
        if jobs > 1:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(jobs) as pool:
                results = pool.imap(_worker, work)
                for record in results:
                    records.append(record)
                    if not quiet or not record["ok"] or record.get("spills"):
                        print(sc.row(record), flush=True)
        else:
            for item in work:
                records.append(_worker(item))
                if not quiet or not records[-1]["ok"] or records[-1].get("spills"):
                    print(sc.row(records[-1]), flush=True)
    return records


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report-only", action="store_true", help="compile the report variants only")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int (default 90: sm_90)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here (the Triton entries)")
    parser.add_argument("--check", type=Path, default=None, help="compare with this committed report")
    parser.add_argument("--quiet", action="store_true", help="print only spills, errors and the summary")
    args = parser.parse_args(argv)
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as exc:
        print(f"triton_aot_check: triton is not importable ({exc}); skipped")
        return 0
    variants = [v for v in build_variants() if v.report or not args.report_only]
    print(f"triton_aot_check: triton {triton.__version__}, sm_{args.arch}, {len(variants)} variants, {args.jobs} job(s)",
          flush=True)
    start = time.perf_counter()
    records = run(variants, args.jobs, args.arch, args.quiet)
    print(sc.summary(records, time.perf_counter() - start))
    entries = [sc.entry(r, "triton", triton.__version__) for r in records if r["ok"] and r.get("report")]
    if args.json is not None:
        sc.write_entries(args.json, "triton", entries)
    failed = [r for r in records if not r["ok"]]
    problems = sc.check(entries, args.check, "triton") if args.check is not None else []
    for line in problems:
        print(f"triton_aot_check: {line}")
    ok = not failed and not [p for p in problems if not p.startswith("note:")]
    print(f"triton_aot_check: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
