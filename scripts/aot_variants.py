"""The variants ``triton_aot_check.py`` compiles, and their ``ASTSource`` as a launch specializes them.

- the *report* variants, the default launches: every entry of the float32 launch table with 16-byte
  runs x bf16/bf16 and fp32/fp32 x (standardized KD, student gradient, with each divergence; plain
  KD; the objective with labels; decoupled KD, which takes labels, standardized with the student
  gradient);
- compile-only variants: every entry of both tables at the run width they get (16-byte and scalar
  runs) x mixed bf16/fp32 and float64 inputs x the heaviest switches (both gradients, a mask,
  labels, label smoothing, forward KL and jsd) for the forward and for the in-place recompute, and
  decoupled KD's forward with the same switches;
- the row-scaling kernel and the vocabulary-parallel phase kernels (standardized with labels, each
  divergence's sums, pointwise phase and gradients).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

DTYPES = {"bf16": ("bf16", 2), "fp16": ("fp16", 2), "fp32": ("fp32", 4), "fp64": ("fp64", 8)}
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "jeffreys", "tvd")
DKD = 5  # decoupled KD's code (config.DIVERGENCE_CODES): a divergence of the objective with labels
VP_SLICE = 65536


@dataclass
class Variant:
    kernel: str  # kd_register_kernel, kd_blocked_kernel, scale_rows_kernel, vp_*_kernel
    entry: str  # the launch-table entry, e.g. "f32 V<=4096 register"
    path: str  # register, blocked, scale, vocab-parallel
    block: int
    num_warps: int
    vec: int
    dtypes: str  # "x/y", or the gradient's dtype for the row scaling
    acc64: bool
    constexprs: dict = field(default_factory=dict)
    vocab: int = 0  # the V whose launch arguments give the specialization
    objective: str = ""  # report variants: kd, plain or objective
    divergence: str = "forward_kl"
    report: bool = False

    def elements_per_thread(self) -> int:
        return max(self.block // (32 * self.num_warps), 1)

    def passes(self) -> list[tuple[str, bool]]:
        """The loops of the blocked kernel in code order, each with whether every row takes it."""
        if self.path != "blocked":
            return []
        div = self.constexprs.get("DIV", 0)
        loops = [("stats", True)]
        if self.constexprs.get("STANDARDIZE"):
            loops.append(("stats_minima", False))  # only when the bounds leave the scale open
        loops += [("stats_rescaled", False), ("sums", True)]
        if div in (0, 1, 3, DKD):
            loops.append(("refine", False))
        if div in (2, 4):
            loops.append(("pointwise", True))
        if self.constexprs.get("GRAD_S") or self.constexprs.get("GRAD_T"):
            loops.append(("grads", True))
        return loops

    def describe(self) -> dict:
        record = asdict(self)
        record["flags"] = ",".join(k.lower() for k, v in self.constexprs.items() if v is True)
        return record


def _table(acc64: bool) -> list[tuple[str, str, int, int, bool, int, bool]]:
    """(entry, path, BLOCK, warps, 16-byte runs, V, eviction hints) of every launch-table entry, at the
    run widths a launch gets (register entries at their largest BLOCK)."""
    from logitstd_kernels._triton import config

    out = []
    for largest, path, block, warps, evict in (config._TABLE_F64 if acc64 else config._TABLE_F32):
        label = f"{'f64' if acc64 else 'f32'} V<={largest if largest < (1 << 40) else 'inf'} {path}"
        if path == "register":
            top = max(largest, config._MIN_BLOCK)
            out.append((label, path, top, warps, True, top, evict))
        else:
            vocab = largest if largest < (1 << 40) else 131072
            out.append((label, path, block, warps, True, vocab, evict))
            out.append((label, path, block // 2, warps, False, vocab - 1, evict))
    return out


def _kd_constexprs(path: str, evict: bool, **switches) -> dict:
    flags = dict(STANDARDIZE=True, GRAD_S=True, GRAD_T=False, HAS_MASK=False, ZERO_EXCLUDED=True, HAS_LABELS=False,
                 DIV=0)
    flags.update(switches)
    if path == "blocked":
        flags.setdefault("EVICT_HINTS", evict)
        flags.setdefault("SMOOTH", False)
    return flags


REPORT_KINDS = [("kd", d, dict(DIV=i)) for i, d in enumerate(DIVERGENCES)] + [
    ("plain", "forward_kl", dict(STANDARDIZE=False)), ("objective", "forward_kl", dict(HAS_LABELS=True)),
    ("objective", "dkd", dict(HAS_LABELS=True, DIV=DKD))]


def _report_variants() -> list[Variant]:
    out = []
    for label, path, block, warps, full, vocab, evict in _table(False):
        if not full:
            continue
        kernel = "kd_register_kernel" if path == "register" else "kd_blocked_kernel"
        for pair in ("bf16/bf16", "fp32/fp32"):
            vec = min(16 // DTYPES[pair.split("/")[0]][1], block)
            for objective, divergence, switches in REPORT_KINDS:
                out.append(Variant(kernel, label, path, block, warps, vec, pair, False,
                                   _kd_constexprs(path, evict, **switches), vocab, objective, divergence, True))
    return out


def _compile_variants() -> list[Variant]:
    out = []
    heavy = [dict(GRAD_T=True, HAS_MASK=True, HAS_LABELS=True, SMOOTH=True, DIV=div, ZERO_EXCLUDED=zero)
             for div in (0, 2) for zero in (True, False)]
    heavy.append(dict(GRAD_T=True, HAS_MASK=True, HAS_LABELS=True, SMOOTH=True, DIV=DKD, ZERO_EXCLUDED=True))
    for acc64, pairs in ((False, ("bf16/fp32",)), (True, ("fp64/fp64",))):
        for label, path, block, warps, full, vocab, evict in _table(acc64):
            kernel = "kd_register_kernel" if path == "register" else "kd_blocked_kernel"
            for pair in pairs:
                width = 16 // max(DTYPES[d][1] for d in pair.split("/"))
                vec = min(width, block) if full else 1
                for switches in heavy:
                    flags = _kd_constexprs(path, evict, **switches)
                    if path == "register":
                        flags.pop("SMOOTH", None)
                    out.append(Variant(kernel, label, path, block, warps, vec, pair, acc64, flags, vocab))
    return out


def _vp_kernels() -> list[tuple[str, dict, str]]:
    """(kernel, constexprs, divergence) of the vocabulary-parallel phases, standardized with labels:
    the sums of each group of divergences (forward KL, reverse KL, Jeffreys; jsd and tvd share theirs),
    the pointwise phase of jsd and tvd, and the gradients of each divergence with both gradients."""
    from logitstd_kernels._triton.vocab_parallel import sums_constexprs
    from logitstd_kernels.distributed import layout

    out = [("vp_stats_kernel", {}, "forward_kl")]
    for divergence in ("forward_kl", "reverse_kl", "jeffreys", "jsd"):
        sums = layout.sum_layout(True, True, DIVERGENCES.index(divergence))
        out.append(("vp_sums_kernel", sums_constexprs(sums), divergence))
    for divergence in ("jsd", "tvd"):
        out.append(("vp_pointwise_kernel", {"STANDARDIZE": True, "DIV": DIVERGENCES.index(divergence),
                                            "P": layout.pointwise_count(True)}, divergence))
    for code, divergence in enumerate(DIVERGENCES):
        out.append(("vp_grads_kernel", {"STANDARDIZE": True, "HAS_LABELS": True, "GRAD_S": True, "GRAD_T": True,
                                        "DIV": code}, divergence))
    return out


def _other_variants() -> list[Variant]:
    from logitstd_kernels._triton import config

    out = [Variant("scale_rows_kernel", "row scaling", "scale", config.SCALE_BLOCK, config.SCALE_WARPS, 0, g, acc64,
                   {}, 131072) for g, acc64 in (("fp32", False), ("fp64", True))]
    for pair, acc64 in (("bf16/bf16", False), ("fp32/fp32", False), ("fp64/fp64", True)):
        for kernel, flags, divergence in _vp_kernels():
            block = config.vp_block(acc64, flags.get("S", 0))
            out.append(Variant(kernel, "vocab-parallel phase", "vocab-parallel", block, config.VP_WARPS, 0, pair,
                               acc64, dict(flags), VP_SLICE, divergence=divergence))
    return out


def build_variants() -> list[Variant]:
    return _report_variants() + _compile_variants() + _other_variants()


# ------------------------------------------------------------------------------------------------
# The ASTSource of a variant
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
              "scale_stride": 0, "stride_s": 0, "W": v.vocab, "stride_x": v.vocab, "stride_y": v.vocab}
    return values.get(name, -100)  # e.g. ignore_index: an int that is neither 1 nor a multiple of 16


def _kernel_fn(name: str):
    from logitstd_kernels._triton import blocked_kernel, register_kernel, scale_kernel, vocab_parallel

    for module in (register_kernel, blocked_kernel, scale_kernel, vocab_parallel):
        if hasattr(module, name):
            return getattr(module, name)
    raise KeyError(name)


def source_of(v: Variant):
    """The ASTSource of a variant, specialized as Triton's launcher would specialize a real launch."""
    from triton.compiler import ASTSource

    fn = _kernel_fn(v.kernel)
    given = dict(BLOCK=v.block, VEC=v.vec, ACC64=v.acc64, ROUND_BF16=False, **v.constexprs)
    if v.kernel.startswith("vp_"):
        import torch

        from logitstd_kernels._triton import vocab_parallel
        from logitstd_kernels.distributed import layout

        columns = {"vp_grads_kernel": layout.GRADS_COLUMNS, "vp_pointwise_kernel": layout.POINTWISE_COLUMNS}
        given.update(TINY=vocab_parallel._tiny(torch.float64 if v.acc64 else torch.float32),
                     C=columns.get(v.kernel, layout.SUMS_COLUMNS))
    signature, constexprs, attrs = {}, {}, {}
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
