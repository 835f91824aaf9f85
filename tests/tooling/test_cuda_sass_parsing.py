"""The SASS and ptxas parsing of the static cost report (scripts/static_cost.py, used by
scripts/cuda_sass_check.py) on fixed snippets of nvdisasm's and ptxas's output: a kernel's section
with a device function of its own, a per-element loop that handles two packs an iteration."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import static_cost as sc  # noqa: E402

SASS = """
//--------------------- .text._Z6kernelv --------------------------
        .section        .text._Z6kernelv,"ax",@progbits
_Z6kernelv:
.text._Z6kernelv:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   CALL.REL.NOINC `($_Z6kernelv$_Z4passv) ;
        /*0020*/                   EXIT ;
$_Z6kernelv$_Z4passv:
        /*0030*/                   MOV R2, RZ ;
.L_x_1:
        /*0040*/                   LDS.128 R4, [R2] ;
        /*0050*/                   LDS.128 R8, [R2+0x10] ;
        /*0060*/                   FADD R12, R4, R8 ;
        /*0070*/                   MUFU.EX2 R13, R12 ;
        /*0080*/                   STL [R1], R13 ;
        /*0090*/                   ISETP.GE.AND P0, PT, R2, R3, PT ;
        /*00a0*/              @!P0 BRA `(.L_x_1) ;
        /*00b0*/                   RET.REL.NODEC R20 `($_Z6kernelv) ;
"""

PTXAS = """ptxas info    : Compiling entry function '_Z6kernelv' for 'sm_90'
ptxas info    : Function properties for _Z6kernelv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 1024 bytes smem
ptxas info    : Function properties for _Z4passv
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
"""


def test_functions_of_a_kernel_section():
    functions = sc.sass_functions(SASS)
    assert set(functions) == {("_Z6kernelv", "_Z6kernelv"), ("_Z6kernelv", "_Z4passv")}
    assert [i.split()[0] for i in sc.instructions(functions[("_Z6kernelv", "_Z6kernelv")])] == ["MOV", "CALL.REL.NOINC",
                                                                                                  "EXIT"]


def test_the_loop_and_its_elements():
    body = sc.loops(sc.sass_functions(SASS)[("_Z6kernelv", "_Z4passv")])
    assert [len(b) for b in body] == [7]  # the label to the branch back, both included
    loop, elements = sc.element_loop(sc.sass_functions(SASS)[("_Z6kernelv", "_Z4passv")], "LDS", loads_per_pack=1,
                                     pack=4)
    assert len(loop) == 7 and elements == 8  # two 16-byte loads of 4 elements: two packs an iteration
    assert sum("MUFU" in i for i in loop) == 1 and sum(i.startswith("STL") for i in loop) == 1


def test_ptxas_per_function_of_its_kernel():
    found = sc.ptxas_functions(PTXAS)
    assert found[("_Z6kernelv", "_Z6kernelv")]["registers"] == 80
    assert found[("_Z6kernelv", "_Z4passv")] == dict(stack_bytes=8, spill_store_bytes=4, spill_load_bytes=12, spills=16)
