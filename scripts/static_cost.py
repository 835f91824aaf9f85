#!/usr/bin/env python3
"""The static cost report of the GPU kernels: SASS instructions per element, registers, spills.

Shared by ``triton_aot_check.py`` (the Triton kernels) and ``cuda_sass_check.py`` (the CUDA
kernel): parsing ``ptxas -v`` and the SASS, the occupancy the registers allow, the report's entries
and the check against the committed report (``benchmarks/results/static-cost.json``). Run alone it
prints the committed report as a table (``--markdown``: the table docs/performance.md shows).

An entry: ``backend`` (triton, cuda), ``kernel``, ``path`` (register, blocked, cluster), ``entry``
(the launch-table entry), ``dtype``, ``objective`` (kd: standardized KD with the student gradient;
plain: without standardization; objective: with labels), ``divergence``, ``instructions_per_element``
(the sum over the passes every row takes), ``passes`` (each loop's instructions per element),
``mufu_per_element``, ``registers``, ``spills`` (bytes stored), ``ctas_per_sm``, and the compiler's
version.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "results" / "static-cost.json"
# The check's tolerance: a default kernel may cost at most this much more than committed.
TOLERANCE = 1.10

_PTXAS = {"registers": r"Used (\d+) registers", "stack_bytes": r"(\d+) bytes stack frame",
          "spill_store_bytes": r"(\d+) bytes spill stores", "spill_load_bytes": r"(\d+) bytes spill loads"}


def parse_ptxas(log: str) -> dict:
    found = {key: int(m.group(1)) for key, pattern in _PTXAS.items() if (m := re.search(pattern, log))}
    if "spill_store_bytes" in found:
        found["spills"] = found["spill_store_bytes"] + found.get("spill_load_bytes", 0)
    return found


def _triton_tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def find_tool(name: str, nvcc: Optional[str] = None) -> Optional[str]:
    """A CUDA toolkit binary (nvdisasm, cuobjdump): next to ``nvcc``, in $CUDA_HOME/bin, on PATH, else
    the copy Triton ships; None if there is none."""
    import os
    import shutil

    places = [Path(nvcc).resolve().parent / name] if nvcc else []
    places += [Path(os.environ["CUDA_HOME"]) / "bin" / name] if os.environ.get("CUDA_HOME") else []
    found = next((str(p) for p in places if p.exists()), None) or shutil.which(name)
    if found is None:
        try:
            triton_copy = _triton_tool(name)
        except ImportError:
            return None
        found = triton_copy if Path(triton_copy).exists() else None
    return found


def ptxas_log(ptx: str, arch: int) -> str:
    """``ptxas -v`` on PTX, with Triton's own ptxas."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        gpu = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)
        done = subprocess.run([_triton_tool("ptxas"), "-v", f"--gpu-name={gpu.group(1) if gpu else f'sm_{arch}'}",
                               str(src), "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    return done.stdout + done.stderr


def sass_text(cubin: bytes, nvdisasm: Optional[str] = None) -> str:
    """``nvdisasm -c`` of a cubin (Triton's nvdisasm unless another is given)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([nvdisasm or _triton_tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True,
                              check=True).stdout


def disassemble(cubin: bytes, function: Optional[str] = None) -> list[str]:
    """The SASS instructions of a cubin (``nvdisasm``), of ``function`` only when given, with labels."""
    text = sass_text(cubin)
    lines, inside = [], function is None
    for line in text.splitlines():
        if line.startswith("//----") or line.lstrip().startswith(".section"):
            inside = function is None or f".text.{function}" in line
            continue
        if inside and (line.startswith(".L_") or "/*" in line):
            lines.append(line)
    return lines


_INSTRUCTION = re.compile(r"/\*[0-9a-f]+\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"BRA\s+`?\(?(\.L_x_\d+)\)?")


def loops(sass: list[str]) -> list[list[str]]:
    """The loop bodies of a kernel, in code order: the instructions from a label to a branch back to
    it. Innermost only: a backward branch whose span holds a loop is the compiler's out-of-line code
    (e.g. the divergent-warp path of a reduction) returning, not a loop; nor is the trap's one
    instruction self loop."""
    labels, body, spans = {}, [], []
    for line in sass:
        if line.startswith(".L_"):
            labels[line.rstrip(":")] = len(body)
            continue
        match = _INSTRUCTION.search(line)
        if not match:
            continue
        body.append(match.group(1))
        branch = _BRANCH.search(match.group(1))
        if branch and branch.group(1) in labels and len(body) - labels[branch.group(1)] > 2:
            spans.append((labels[branch.group(1)], len(body)))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    return [body[a:b] for a, b in inner]


_SECTION = re.compile(r"\.text\.(\S+?)(?:,|\s|$)")
_CALLEE = re.compile(r"^\$(\S+?)\$(\S+):$")


def sass_functions(text: str) -> dict[tuple[str, str], list[str]]:
    """The functions of nvdisasm's output, keyed by (kernel, function) mangled names: a kernel's own
    code (function == kernel) and the device functions it calls, which ptxas places in the kernel's
    section under the label ``$kernel$function:``; each a list of SASS lines (labels, instructions)."""
    functions: dict[tuple[str, str], list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("//----") or line.lstrip().startswith(".section"):
            match = _SECTION.search(line)
            current = (match.group(1), match.group(1)) if match else None
            continue
        callee = _CALLEE.match(line)
        if callee:
            current = (callee.group(1), callee.group(2))
            continue
        if current is not None and (line.startswith(".L_") or "/*" in line):
            functions.setdefault(current, []).append(line)
    return functions


_PROPERTIES = re.compile(r"Function properties for (\S+)")
_ENTRY = re.compile(r"Compiling entry function '(\S+)'")


def ptxas_functions(log: str) -> dict[tuple[str, str], dict]:
    """``ptxas -v`` per (kernel, function), as sass_functions keys them (ptxas compiles a kernel's
    device functions with it and lists them after it): registers (kernels), stack and spill bytes
    (parse_ptxas's keys)."""
    found: dict[tuple[str, str], dict] = {}
    kernel = current = None
    for line in log.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            kernel = entry.group(1)
            continue
        props = _PROPERTIES.search(line)
        if props and kernel is not None:
            current = (kernel, props.group(1))
            found.setdefault(current, {})
            continue
        if current is not None:
            found[current].update(parse_ptxas(line))
    return found


def element_loop(sass: list[str], load: str, loads_per_pack: int, pack: int) -> tuple[list[str], int]:
    """The per-element loop of a function: its innermost loop with the most ``load`` instructions (e.g.
    LDS: the loads of the row's packs), and the elements one iteration handles, ``pack`` per
    ``loads_per_pack`` loads (an unrolled loop handles several packs). ([], 0) if it has none."""
    scored = [(sum(1 for i in body if i.split()[0 if not i.startswith("@") else 1].startswith(load)), body)
              for body in loops(sass)]
    count, body = max(scored, key=lambda cb: cb[0], default=(0, []))
    return (body, pack * count // loads_per_pack) if count else ([], 0)


def instructions(sass: list[str]) -> list[str]:
    return [m.group(1) for line in sass if (m := _INSTRUCTION.search(line))]


def per_element(sass: list[str], passes: list[tuple[str, bool]], elements: int) -> dict:
    """Instructions (and MUFU) per element: of each loop named by ``passes`` (name, taken by every
    row), or of the whole kernel when it has no loop (``passes`` empty)."""
    def mufu(body):
        return sum(1 for i in body if "MUFU" in i)

    if not passes:
        body = instructions(sass)
        return dict(passes={"kernel": round(len(body) / elements, 2)},
                    instructions_per_element=round(len(body) / elements, 2),
                    mufu_per_element=round(mufu(body) / elements, 2))
    bodies = loops(sass)
    names = [name for name, _ in passes] if len(bodies) == len(passes) else [f"loop{i}" for i in range(len(bodies))]
    every = {name for name, always in passes if always} if len(bodies) == len(passes) else set(names)
    per = {name: round(len(body) / elements, 2) for name, body in zip(names, bodies)}
    counted = [body for name, body in zip(names, bodies) if name in every]
    return dict(passes=per, instructions_per_element=round(sum(len(b) for b in counted) / elements, 2),
                mufu_per_element=round(sum(mufu(b) for b in counted) / elements, 2))


def ctas_per_sm(registers: int, threads: int, shared: int, *, regs=65536, max_threads=2048, max_ctas=32,
                smem=228 * 1024) -> int:
    """CTAs per Hopper SM the registers (allocated per warp in units of 256), threads and shared memory allow."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = regs // (per_warp * -(-threads // 32))
    by_smem = smem // shared if shared else max_ctas
    return int(max(0, min(by_regs, max_threads // threads, max_ctas, by_smem)))


def entry(record: dict, backend: str, compiler: str) -> dict:
    """The report's entry of a compiled report variant."""
    return dict(backend=backend, kernel=record["kernel"], path=record["path"], entry=record["entry"],
                dtype=record["dtypes"], objective=record["objective"], divergence=record["divergence"],
                instructions_per_element=record.get("instructions_per_element"), passes=record.get("passes", {}),
                mufu_per_element=record.get("mufu_per_element"), registers=record.get("registers"),
                spills=record.get("spills", 0), ctas_per_sm=record.get("ctas_per_sm"), compiler=compiler)


def _key(e: dict) -> tuple:
    return (e["backend"], e["kernel"], e["entry"], e["dtype"], e["objective"], e["divergence"])


def write_entries(path: Path, backend: str, entries: list[dict]) -> None:
    """Replace ``backend``'s entries of the report at ``path`` (the other backend's stay)."""
    kept = [e for e in json.loads(path.read_text())["entries"] if e["backend"] != backend] if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"entries": sorted(kept + entries, key=_key)}, indent=1) + "\n")


def check(entries: list[dict], committed: Path, backend: str) -> list[str]:
    """What fails against the committed report: a spill, or more than ``TOLERANCE`` times its
    instructions per element (entries the report does not have, or of another compiler version,
    are reported, not failed)."""
    problems, notes = [], []
    known = {_key(e): e for e in json.loads(committed.read_text())["entries"]} if committed.exists() else {}
    for e in entries:
        if e.get("spills"):
            problems.append(f"{_key(e)} spills {e['spills']} bytes")
        old = known.get(_key(e))
        if old is None or old.get("compiler") != e.get("compiler"):
            notes.append(f"note: {_key(e)} is not in the committed report for {e.get('compiler')}")
            continue
        if e["instructions_per_element"] > TOLERANCE * old["instructions_per_element"]:
            problems.append(f"{_key(e)}: {e['instructions_per_element']} instructions per element, committed "
                            f"{old['instructions_per_element']} (more than {TOLERANCE:.2f}x)")
    missing = [k for k in known if k[0] == backend and k not in {_key(e) for e in entries}]
    notes += [f"note: committed entry {k} was not measured" for k in missing]
    return problems + notes[:5]


def row(r: dict) -> str:
    if not r.get("ok"):
        return f"COMPILE ERROR {r['kernel']} {r['entry']} {r['dtypes']} {r.get('flags', '')}: {r.get('error')}"
    cost = f" {r['instructions_per_element']:>6} instr/elem" if "instructions_per_element" in r else ""
    return (f"{r['kernel']:<20} {r['entry']:<22} {r['block']:>6} {r['num_warps']:>2} {r['dtypes']:<9} "
            f"{r.get('objective') or '-':<9} {r.get('divergence') if r.get('report') else '':<10} regs "
            f"{r.get('registers', '?'):>3} spill {r.get('spills', 0):>4}{cost}")


def summary(records: list[dict], wall: float) -> str:
    ok = [r for r in records if r["ok"]]
    spilled = [r for r in ok if r.get("spills")]
    regs = [r["registers"] for r in ok if "registers" in r]
    return (f"{len(records)} variants: {len(ok)} compiled, {len(records) - len(ok)} compile errors, {len(spilled)} "
            f"spill; registers {min(regs, default='?')}-{max(regs, default='?')}; wall {wall:.0f} s")


def markdown(path: Path = REPORT, backend: Optional[str] = None) -> str:
    """The report as the table of docs/performance.md (one backend's entries when given)."""
    entries = [e for e in json.loads(path.read_text())["entries"] if backend in (None, e["backend"])]
    lines = ["| backend | entry | dtype | objective | divergence | instructions / element | MUFU / element | "
             "registers | spills | CTAs / SM |", "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for e in entries:
        lines.append(f"| {e['backend']} | {e['entry']} | {e['dtype']} | {e['objective']} | {e['divergence']} | "
                     f"{e['instructions_per_element']} | {e['mufu_per_element']} | {e['registers']} | {e['spills']} | "
                     f"{e['ctas_per_sm']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--backend", choices=("triton", "cuda"), default=None, help="only this backend's entries")
    args = parser.parse_args()
    print(markdown(backend=args.backend))
    sys.exit(0)
