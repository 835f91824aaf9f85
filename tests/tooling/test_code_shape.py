"""The code stays in small pieces: functions under ~80 lines (Triton kernels and CUDA kernels under
~120), files under ~450 lines, in the package and its C++/CUDA sources.

The limits are the project's conventions (docs/development.md); a piece that must be longer names
itself here with the reason, so that the exception is a decision, not a drift.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FUNCTION_LINES = 80
KERNEL_LINES = 120
FILE_LINES = 450
# path relative to the repository: why it may be longer
LONG_FILES: dict[str, str] = {}


def _python_files() -> list[Path]:
    return sorted((ROOT / "logitstd_kernels").rglob("*.py"))


def _is_kernel(node: ast.FunctionDef) -> bool:
    """A ``@triton.jit`` function (its body is device code: straight-line tile math reads best whole)."""
    return any((isinstance(d, ast.Attribute) and d.attr == "jit") or (isinstance(d, ast.Name) and d.id == "jit")
               for d in node.decorator_list)


def test_python_functions_are_short():
    long = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > (KERNEL_LINES if _is_kernel(node) else FUNCTION_LINES):
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over the limit: " + "; ".join(long)


def _source_files() -> list[Path]:
    return _python_files() + sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu"))


def test_files_are_short():
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in _source_files()
            if (n := p.read_text().count("\n")) > FILE_LINES and str(p.relative_to(ROOT)) not in LONG_FILES]
    assert not long, "files over the limit: " + "; ".join(long)


_GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(")


def _body_lines(text: str, start: int) -> int:
    """Lines from the ``{`` after ``start`` to its matching ``}``."""
    open_at = text.index("{", start)
    depth = 0
    for index in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text.count("\n", open_at, index) + 1
    raise AssertionError("unbalanced braces")


def test_cuda_kernels_are_short():
    long = []
    for path in sorted((ROOT / "csrc").rglob("*.cu")) + sorted((ROOT / "csrc").rglob("*.cuh")):
        text = path.read_text()
        for match in _GLOBAL.finditer(text):
            if (lines := _body_lines(text, match.end())) > KERNEL_LINES:
                long.append(f"{path.relative_to(ROOT)} {match.group(1)} ({lines} lines)")
    assert not long, "CUDA kernels over the limit: " + "; ".join(long)
