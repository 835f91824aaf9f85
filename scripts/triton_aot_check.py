#!/usr/bin/env python3
"""Ahead-of-time compile check of the Triton kernels for sm_90 (Hopper), without a GPU.

``triton.compile`` with a CUDA target runs Triton's whole pipeline (TTIR, TTGIR, LLVM IR, PTX) and
Triton's own ``ptxas`` (the cubin) on a machine that has no GPU and no CUDA driver. This script
compiles the fused loss kernels and the row-scaling kernel for every entry of the launch table
(``logitstd_kernels/_triton/config.py``), with the argument specializations a real launch would
get (16-byte aligned pointers; integer arguments divisible by 16 marked so, as Triton's launcher
marks them), and reports per variant what ``ptxas -v`` says: registers per thread, stack frame and
spill bytes, plus the shared memory Triton reserves.

A compile error fails the check (exit 1). Spills are reported, not failed on.

Variant sets (the kernels' boolean switches are read from the kernels, so a new one is compiled too):

- default (CI): every launch-table entry (register entries at their largest BLOCK with 16-byte
  runs; blocked entries at their BLOCK with 16-byte runs and at the halved BLOCK with scalar runs
  that rows without 16-byte alignment get) x the dtype pairs bf16/bf16, bf16 student/fp32 teacher,
  fp32/fp32 (float32 table) and fp64/fp64 (float64 table) x four switch sets: the KD switches
  (STANDARDIZE, GRAD_S, GRAD_T, HAS_MASK) all on with ZERO_EXCLUDED on (the forward) and off (the
  in-place gradient recompute), the unstandardized forward, and every switch on (switches added
  since, e.g. HAS_LABELS); plus the row-scaling kernel for float32 and float64 gradients. Every
  blocked variant has its entry's eviction hints (the table's column).
- ``--all``: register entries with scalar runs too, fp16/fp16 too, every valid switch combination,
  a per-row gradient factor (its stride specializes to a constant) on the heaviest combination, and
  the row-scaling kernel for four gradient dtypes and both factor layouts.

Usage::

    python scripts/triton_aot_check.py [--all] [--every K] [--jobs N] [--json PATH] [--quiet] [--arch 90]

Exits 0 with a note when triton cannot be imported (e.g. not Linux).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

# The kernels must be compiled, not interpreted: the interpreter replaces @triton.jit functions.
os.environ.pop("TRITON_INTERPRET", None)
# Triton 3.9 warns once per process that its default will change; the check takes the default.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# dtype name -> (Triton signature type, bytes)
DTYPES = {"bf16": ("bf16", 2), "fp16": ("fp16", 2), "fp32": ("fp32", 4), "fp64": ("fp64", 8)}
FLAG_NAMES = ("STANDARDIZE", "GRAD_S", "GRAD_T", "HAS_MASK", "ZERO_EXCLUDED")
# The blocked path's eviction hints (the table's column); config.tuning_constexprs maps them.
TUNING_CONSTEXPRS = ("EVICT_HINTS",)
NON_FLAG_CONSTEXPRS = ("BLOCK", "VEC", "ACC64", "ROUND_BF16") + TUNING_CONSTEXPRS
# The vocabulary-parallel phase kernels (_triton/vocab_parallel.py), each with its heaviest flags, on a
# 65536-class slice (131072 classes on two ranks).
VP_VARIANTS = (("vp_stats_kernel", {}),
               ("vp_sums_kernel", {"STANDARDIZE": True, "HAS_LABELS": True}),
               ("vp_grads_kernel", {"STANDARDIZE": True, "HAS_LABELS": True, "GRAD_S": True, "GRAD_T": True}))
VP_SLICE = 65536


@dataclass
class Variant:
    kernel: str  # kd_register_kernel, kd_blocked_kernel, scale_rows_kernel, vp_*_kernel
    entry: str  # the launch-table entry, e.g. "f32 V<=4096 register"
    block: int
    num_warps: int
    vec: int  # 0 for scale_rows_kernel
    dtypes: str  # "x/y" (the gradients have the inputs' dtypes), or the gradient dtype for scale_rows
    acc64: bool
    flags: dict = field(default_factory=dict)
    vocab: int = 0  # the V whose launch arguments give the specialization
    scale_stride: int = 0  # 0: one grad_scale value; 1: one per row (a constexpr after specialization)
    evict_hints: bool = False  # the blocked entry's eviction hints

    @property
    def flag_text(self) -> str:
        short = {"STANDARDIZE": "std", "GRAD_S": "gs", "GRAD_T": "gt", "HAS_MASK": "mask", "ZERO_EXCLUDED": "zero"}
        on = [short.get(name, name.lower()) for name, value in self.flags.items() if value]
        text = ",".join(on) if on else "-"
        return (text + (",rowscale" if self.scale_stride == 1 else "")
                + ("+evict" if self.evict_hints else ""))

    def constexprs(self) -> dict:
        """The kernel's tuning constexprs: the entry's eviction hints."""
        from logitstd_kernels._triton import config

        if self.kernel != "kd_blocked_kernel":
            return {}
        return config.tuning_constexprs(config.KernelConfig(register=False, block=self.block, num_warps=self.num_warps,
                                                            evict_hints=self.evict_hints))


@dataclass
class Outcome:
    variant: Variant
    ok: bool
    seconds: float
    registers: Optional[int] = None
    stack_bytes: Optional[int] = None
    spill_store_bytes: Optional[int] = None
    spill_load_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    error: Optional[str] = None

    @property
    def spills(self) -> int:
        return (self.spill_store_bytes or 0) + (self.spill_load_bytes or 0)


# ------------------------------------------------------------------------------------------------
# The variants
# ------------------------------------------------------------------------------------------------
def _entries(acc64: bool, scalar_register: bool) -> list[tuple[str, str, int, int, bool, int]]:
    """(entry label, path, BLOCK, num_warps, full_vectors, V) of every launch-table entry.

    Register entries at their largest BLOCK (the most elements per thread: a smaller V of the same
    entry gets a smaller power-of-two BLOCK at the same warp count), with 16-byte runs, and also with
    scalar runs when ``scalar_register``. Blocked entries at their BLOCK with 16-byte runs and at the
    halved BLOCK that ``kd_config(..., full_vectors=False)`` gives rows without them (scalar runs).
    V, whose launch arguments give the specialization, is BLOCK (register) or the entry's largest V
    (131072 for the last, unbounded one) with 16-byte runs, and that V - 1 (odd) with scalar runs.
    """
    from logitstd_kernels._triton import config

    table = config._TABLE_F64 if acc64 else config._TABLE_F32
    out = []
    for largest, path, block, warps, evict in table:
        label = f"{'f64' if acc64 else 'f32'} V<={largest if largest < (1 << 40) else 'inf'} {path}"
        if path == "register":
            top = max(largest, config._MIN_BLOCK)
            out.append((label, path, top, warps, True, top, evict))
            if scalar_register:
                out.append((label, path, top, warps, False, top - 1, evict))
        else:
            vocab = largest if largest < (1 << 40) else 131072
            out.append((label, path, block, warps, True, vocab, evict))
            out.append((label, path, block // 2, warps, False, vocab - 1, evict))
    return out


def kernel_flags() -> tuple[str, ...]:
    """The boolean constexpr switches of the fused kernels, read from the kernels themselves (every
    constexpr but BLOCK, VEC, ACC64, ROUND_BF16 and the tuning switches), so that a new switch is
    compiled too."""
    from logitstd_kernels._triton import kd_kernels

    names: dict = {}
    for kernel in (kd_kernels.kd_register_kernel, kd_kernels.kd_blocked_kernel):
        for p in kernel.params:
            if p.is_constexpr and p.name not in NON_FLAG_CONSTEXPRS:
                names[p.name] = None
    return tuple(names)


def _flag_sets(everything: bool) -> list[dict]:
    flags = kernel_flags()
    extra = [f for f in flags if f not in FLAG_NAMES]
    if not everything:
        heavy = {f: f in FLAG_NAMES for f in flags}  # the KD launch's switches on, newer ones off
        sets = [dict(heavy, ZERO_EXCLUDED=True), dict(heavy, ZERO_EXCLUDED=False),
                dict(heavy, STANDARDIZE=False, ZERO_EXCLUDED=True)]
        if extra:
            sets.append(dict(heavy, ZERO_EXCLUDED=True, **{f: True for f in extra}))
        return sets
    sets = []
    for values in itertools.product((True, False), repeat=len(flags)):
        chosen = dict(zip(flags, values))
        # ZERO_EXCLUDED off is the in-place gradient recompute: a mask ("active" rows) and a gradient
        if not chosen.get("ZERO_EXCLUDED", True) and not (
                chosen.get("HAS_MASK") and (chosen.get("GRAD_S") or chosen.get("GRAD_T"))):
            continue
        sets.append(chosen)
    return sets


def build_variants(everything: bool) -> list[Variant]:
    from logitstd_kernels._triton import config

    pairs32 = [("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32")]
    pairs64 = [("fp64", "fp64")]
    if everything:
        pairs32.insert(1, ("fp16", "fp16"))
    flag_sets = _flag_sets(everything)
    variants: list[Variant] = []
    for acc64, pairs in ((False, pairs32), (True, pairs64)):
        for label, path, block, warps, full, vocab, evict in _entries(acc64, everything):
            kernel = "kd_register_kernel" if path == "register" else "kd_blocked_kernel"
            for x, y in pairs:
                width = 16 // max(DTYPES[x][1], DTYPES[y][1])
                vec = min(width, block) if full else 1
                for flags in flag_sets:
                    variants.append(Variant(kernel, label, block, warps, vec, f"{x}/{y}", acc64, flags, vocab, 0,
                                            evict))
                if everything:  # one gradient factor per row (the backward's recompute): a constexpr stride
                    variants.append(Variant(kernel, label, block, warps, vec, f"{x}/{y}", acc64, flag_sets[0],
                                            vocab, 1, evict))
    grads = [("fp32", False), ("fp64", True)] + ([("bf16", False), ("fp16", False)] if everything else [])
    for g, acc64 in grads:
        for stride in ((0, 1) if everything else (0,)):
            variants.append(Variant("scale_rows_kernel", "row scaling", config.SCALE_BLOCK, config.SCALE_WARPS, 0, g,
                                    acc64, {}, 131072, stride))
    for pair, acc64 in (("bf16/bf16", False), ("fp32/fp32", False), ("fp64/fp64", True)):
        for kernel, flags in VP_VARIANTS:
            block = config.VP_BLOCK_F64 if acc64 else config.VP_BLOCK
            variants.append(Variant(kernel, "vocab-parallel phase", block, config.VP_WARPS, 0, pair, acc64,
                                    dict(flags), VP_SLICE))
    return variants


# ------------------------------------------------------------------------------------------------
# Compiling one variant
# ------------------------------------------------------------------------------------------------
def _int_spec(value: int) -> tuple[str, Optional[object]]:
    """Triton's launcher specialization of an int argument: 1 becomes a constexpr, a multiple of 16
    is marked divisible by 16 (``tt.divisibility``)."""
    if value == 1:
        return "constexpr", 1
    return ("i32" if -2**31 <= value < 2**31 else "i64"), ("D" if value % 16 == 0 else None)


def _pointer_dtype(name: str, v: Variant) -> str:
    """The element type of a pointer argument, from its name (the launchers' conventions)."""
    acc = "fp64" if v.acc64 else "fp32"
    if v.kernel == "scale_rows_kernel":
        return DTYPES[v.dtypes][0] if name == "g_ptr" else acc
    x, y = v.dtypes.split("/")
    if v.kernel.startswith("vp_"):  # gradients and coefficients in the accumulation dtype, sums in float64
        return {"x_ptr": x, "y_ptr": y, "labels_ptr": "i64", "out_ptr": "fp64"}.get(name, acc)
    known = {"x_ptr": x, "gx_ptr": x, "y_ptr": y, "gy_ptr": y, "keep_ptr": "u8", "labels_ptr": "i64"}
    return known.get(name, acc)  # the other pointers (gradient factors, per-row outputs): accumulation dtype


def _int_value(name: str, v: Variant) -> int:
    """A launch's value of an int argument, from its name: what Triton's specialization sees."""
    runs = v.vocab // v.vec if v.vec else v.vocab  # contiguous rows: row stride V, in runs of VEC
    values = {"V": v.vocab, "v_runs": runs, "runs_x": runs, "runs_y": runs, "stride_g": v.vocab,
              "scale_stride": v.scale_stride, "stride_s": v.scale_stride, "W": v.vocab, "stride_x": v.vocab,
              "stride_y": v.vocab}
    return values.get(name, -100)  # e.g. ignore_index: an int that is neither 1 nor a multiple of 16


def _source(v: Variant):
    """The ASTSource of a variant, specialized as Triton's launcher would specialize a real launch."""
    from triton.compiler import ASTSource

    from logitstd_kernels._triton import kd_kernels, vocab_parallel
    from logitstd_kernels.distributed import layout

    fn = getattr(vocab_parallel if v.kernel.startswith("vp_") else kd_kernels, v.kernel)
    given = dict(BLOCK=v.block, VEC=v.vec, ACC64=v.acc64, ROUND_BF16=False, **v.flags, **v.constexprs())
    if v.kernel.startswith("vp_"):
        import torch

        sums = 3 + 4 * v.flags.get("STANDARDIZE", False) + 4 * v.flags.get("HAS_LABELS", False)
        given.update(TINY=vocab_parallel._tiny(torch.float64 if v.acc64 else torch.float32), S=sums,
                     C=layout.GRADS_COLUMNS if v.kernel == "vp_grads_kernel" else layout.SUMS_COLUMNS)
    signature: dict = {}
    constexprs: dict = {}
    attrs: dict = {}
    divisible = [["tt.divisibility", 16]]
    for index, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = given.get(p.name, False)  # a switch this check does not know: off
        elif p.annotation_type:  # e.g. tau_s: tl.float64 (floats are not specialized)
            signature[p.name] = p.annotation_type
        elif p.name.endswith("_ptr"):
            signature[p.name] = "*" + _pointer_dtype(p.name, v)
            attrs[(index,)] = divisible  # torch allocations are (at least) 16-byte aligned
        else:
            kind, spec = _int_spec(_int_value(p.name, v))
            signature[p.name] = kind
            if kind == "constexpr":
                constexprs[p.name] = spec
            elif spec == "D":
                attrs[(index,)] = divisible
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)


_PTXAS_PATTERNS = {
    "registers": r"Used (\d+) registers",
    "stack_bytes": r"(\d+) bytes stack frame",
    "spill_store_bytes": r"(\d+) bytes spill stores",
    "spill_load_bytes": r"(\d+) bytes spill loads",
}


def _parse_ptxas(log: str) -> dict:
    found = {}
    for key, pattern in _PTXAS_PATTERNS.items():
        match = re.search(pattern, log)
        if match:
            found[key] = int(match.group(1))
    return found


def _ptxas_log_again(ptx: str, arch: int) -> str:
    """``ptxas -v`` on the compiled PTX, with Triton's own ptxas (when its log was not captured)."""
    from triton.backends.nvidia import compiler as nv

    ptxas = nv.get_ptxas(arch).path if hasattr(nv, "get_ptxas") else nv.knobs.nvidia.ptxas.path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        gpu = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)
        done = subprocess.run([ptxas, "-v", f"--gpu-name={gpu.group(1) if gpu else f'sm_{arch}'}", str(src), "-o",
                               str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    return done.stdout + done.stderr


def compile_variant(v: Variant, arch: int = 90) -> Outcome:
    import triton
    from triton.backends.compiler import GPUTarget

    try:
        from triton import knobs

        knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's log; captured below
    except (ImportError, AttributeError):
        pass
    start = time.perf_counter()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            kernel = triton.compile(_source(v), target=GPUTarget("cuda", arch, 32), options={"num_warps": v.num_warps})
    except Exception as exc:  # a compile error of any stage
        message = f"{type(exc).__name__}: {exc}".strip()
        return Outcome(v, False, time.perf_counter() - start, error=message[-2000:])
    seconds = time.perf_counter() - start
    found = _parse_ptxas(captured.getvalue())
    if "registers" not in found:
        found = _parse_ptxas(_ptxas_log_again(kernel.asm["ptx"], arch))
    shared = getattr(kernel.metadata, "shared", None)
    return Outcome(v, True, seconds, shared_bytes=shared, **found)


def _worker(args: tuple[Variant, int, str]) -> Outcome:
    variant, arch, cache = args
    os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: every variant really compiles
    return compile_variant(variant, arch)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _row(o: Outcome) -> str:
    v = o.variant
    name = v.kernel.replace("_kernel", "")
    if not o.ok:
        result = "COMPILE ERROR"
    else:
        spill = f"{o.spill_store_bytes}/{o.spill_load_bytes}" if o.registers is not None else "?"
        result = (f"{o.registers if o.registers is not None else '?':>4} {spill:>9} {o.stack_bytes or 0:>5} "
                  f"{o.shared_bytes if o.shared_bytes is not None else '?':>6}")
    mark = "  <- spills" if o.ok and o.spills else ""
    return (f"{name:<14} {v.entry:<26} {v.block:>6} {v.num_warps:>2} {v.vec:>3} {v.dtypes:<9} "
            f"{v.flag_text:<30} {result} {o.seconds:5.1f}{mark}")


HEADER = (f"{'kernel':<14} {'launch-table entry':<26} {'BLOCK':>6} {'nw':>2} {'VEC':>3} {'x/y':<9} {'flags':<30} "
          f"{'regs':>4} {'spill st/ld':>9} {'stack':>5} {'smem':>6} {'s':>5}")


def summarize(outcomes: list[Outcome], wall: float) -> str:
    ok = [o for o in outcomes if o.ok]
    errors = [o for o in outcomes if not o.ok]
    spilled = [o for o in ok if o.spills]
    regs = [o.registers for o in ok if o.registers is not None]
    lines = [f"{len(outcomes)} variants: {len(ok)} compiled, {len(errors)} compile errors, {len(spilled)} spill; "
             f"registers {min(regs) if regs else '?'}-{max(regs) if regs else '?'}; wall {wall:.0f} s"]
    by_entry: dict = {}
    for o in ok:
        tuned = "+evict" if o.variant.evict_hints else ""
        key = (o.variant.kernel, o.variant.entry, o.variant.block, tuned)
        by_entry.setdefault(key, []).append(o)
    lines.append("per entry: registers min-max, variants that spill (max spill bytes stored)")
    for (kernel, entry, block, tuned), group in by_entry.items():
        r = [o.registers for o in group if o.registers is not None]
        s = [o for o in group if o.spills]
        worst = max((o.spill_store_bytes or 0 for o in s), default=0)
        lines.append(f"  {kernel.replace('_kernel', ''):<14} {entry:<26} BLOCK {block:>6}{tuned}: "
                     f"{min(r) if r else '?'}-{max(r) if r else '?'} registers, "
                     f"{len(s)}/{len(group)} spill{f' (up to {worst} B)' if s else ''}")
    for o in errors:
        lines.append(f"COMPILE ERROR {_row(o)}\n    {o.error}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="the full cross product (see the module docstring)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int (default 90: sm_90)")
    parser.add_argument("--json", type=Path, default=None, help="write every variant's numbers here")
    parser.add_argument("--quiet", action="store_true", help="print only spilling variants, errors and the summary")
    parser.add_argument("--limit", type=int, default=None, help="compile only the first N variants (smoke test)")
    parser.add_argument("--every", type=int, default=1,
                        help="compile every K-th variant only (an even sample, e.g. to time --all)")
    args = parser.parse_args(argv)

    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as exc:
        print(f"triton_aot_check: triton is not importable ({exc}); skipped")
        return 0
    variants = build_variants(args.all)
    total = len(variants)
    variants = variants[::max(1, args.every)]
    if args.limit is not None:
        variants = variants[:args.limit]
    print(f"triton_aot_check: triton {triton.__version__}, target cuda sm_{args.arch}, {len(variants)} variants "
          f"({'all' if args.all else 'default set'}"
          f"{f', a sample of the {total}' if len(variants) < total else ''}), {args.jobs} job(s)", flush=True)
    if not args.quiet:
        print(HEADER, flush=True)
    start = time.perf_counter()
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="triton-aot-") as cache:
        work = [(v, args.arch, cache) for v in variants]
        if args.jobs > 1:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
                for outcome in pool.imap(_worker, work):
                    outcomes.append(outcome)
                    if not args.quiet or not outcome.ok or outcome.spills:
                        print(_row(outcome), flush=True)
        else:
            for item in work:
                outcome = _worker(item)
                outcomes.append(outcome)
                if not args.quiet or not outcome.ok or outcome.spills:
                    print(_row(outcome), flush=True)
    wall = time.perf_counter() - start
    print()
    print(summarize(outcomes, wall))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "triton": triton.__version__, "arch": args.arch, "all": args.all, "wall_s": round(wall, 1),
            "variants": [dict(asdict(o.variant), **{k: getattr(o, k) for k in (
                "ok", "seconds", "registers", "stack_bytes", "spill_store_bytes", "spill_load_bytes", "shared_bytes",
                "error")}) for o in outcomes]}, indent=1))
    failed = any(not o.ok for o in outcomes)
    print(f"triton_aot_check: {'FAILED (compile errors above)' if failed else 'OK'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
