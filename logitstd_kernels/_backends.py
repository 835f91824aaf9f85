"""Backend registry: which fused kernels can run here, and why the others cannot.

Every fused backend module (``_triton`` for the Triton kernels, ``_cpp`` for the C++/CUDA
extension) exposes the same three functions, the kernel contract of the package:

``fused_forward(student, teacher, labels, mask, grad_scale, config, grad_student, grad_teacher)
-> (rows, grad_student, grad_teacher, ce_rows, kd_rows)``

- ``student``, ``teacher``: (N, V) tensors with unit stride along V and any row stride, any
  floating dtype each (they may differ), N >= 0, V >= 2 when ``config.standardize`` (V >= 1 otherwise).
- ``labels``: None (pure KD: the CE term is absent), or a contiguous (N,) int64 tensor; rows whose
  label is ``config.ignore_index`` are excluded like masked rows (labels outside [0, V): the CPU
  raises, CUDA gives that row NaN).
- ``mask``: None, or a contiguous bool (N,) tensor; excluded rows get loss 0 and gradient 0 and
  their data is never allowed to leak into other rows (NaN/Inf stay in their row).
- ``grad_scale``: a (1,) or (N,) tensor in the accumulation dtype (float64 if either input is
  float64, else float32) on the same device; row r's gradients are multiplied by its factor.
- ``config``: the :class:`~logitstd_kernels.config.DistillConfig` (its reduction is not used here).
- ``rows``: (N,) in the accumulation dtype, ``ce_weight * CE + kd_weight * tau_s**2 * KL`` of each
  row (0 if excluded; without labels ``kd_weight * tau_s**2 * KL``); ``ce_rows``/``kd_rows``: the
  two parts per row (CE; ``tau_s**2 KL``).
- ``grad_student``: contiguous (N, V) in ``student.dtype`` holding ``grad_scale * d rows[r] / d x[r]``
  when ``grad_student`` is True, else an empty (0,) tensor; ``grad_teacher`` likewise for the teacher.

``fused_regrad_(student, teacher, labels, active, grad_scale, config, grad_x, grad_y)``: in place, the
gradients of the rows where ``active`` is true recomputed with their factor (the backward's one
rounding of low-precision gradients); ``grad_x`` / ``grad_y`` are the buffers returned by
``fused_forward`` or empty (not recomputed).

``scale_rows_(grad, scale)``: in place, ``grad[r] *= scale[r]`` for a (N, V) gradient and a scale of
shape () or (N,); used by the backward pass to apply the incoming gradient to a float32/float64 one.
"""

from __future__ import annotations

import importlib
import os
import re
from types import ModuleType
from typing import Optional

import torch

from .config import BACKENDS

_FUSED = ("triton", "cuda", "cpu")


def _import(name: str) -> tuple[Optional[ModuleType], Optional[str]]:
    try:
        return importlib.import_module(f"logitstd_kernels.{name}"), None
    except Exception as exc:  # ImportError, or a broken extension/triton install: report, don't crash
        return None, f"{type(exc).__name__}: {exc}"


def _triton_reason(device_type: str) -> Optional[str]:
    """None if the Triton kernels can run on ``device_type`` here, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({exc}); pip install triton"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device_type != "cpu":
        return f"the Triton kernels do not run on {device_type} tensors"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return ("Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 in the "
                "environment before importing triton or logitstd_kernels")
    module, error = _import("_triton")
    if module is None:
        return f"the Triton kernels failed to import ({error})"
    if not module.INTERPRETED:
        return ("the Triton kernels were imported before TRITON_INTERPRET=1 was set; set it before "
                "importing triton or logitstd_kernels")
    return _interpreter_reason(triton.__version__)


def _major_minor(version: str) -> tuple[int, int]:
    numbers = [int(n) for n in re.findall(r"\d+", version)[:2]] + [0, 0]
    return numbers[0], numbers[1]


def _interpreter_reason(triton_version: str) -> Optional[str]:
    """None if this triton's interpreter runs the kernels: before 3.7 it converts a loop's runtime
    bound with ``int()`` of a one-element array, which numpy 2.4 refuses."""
    import numpy

    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy.__version__) >= (2, 4):
        return (f"the Triton {triton_version} interpreter cannot run loops with numpy {numpy.__version__}: "
                "use triton>=3.7 or numpy<2.4 (compiled GPU kernels are unaffected)")
    return None


def _cpp_reason(device_type: str) -> Optional[str]:
    """None if the C++ kernel for ``device_type`` ("cpu" or "cuda") is built and can run here."""
    module, error = _import("_cpp")
    if module is None:
        return f"the C++ extension logitstd_kernels._C is not built or failed to load ({error})"
    if not module.has_kernel(device_type):
        return f"the C++ extension was built without the {device_type.upper()} kernel"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def unavailable_reason(backend: str, device_type: str) -> Optional[str]:
    """None if ``backend`` can compute the loss for tensors on ``device_type``, else the reason."""
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_reason(device_type)
    if backend in ("cpu", "cuda"):
        if device_type != backend:
            return f"the {backend!r} backend takes {backend.upper()} tensors, got {device_type} tensors"
        return _cpp_reason(backend)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device``; raises RuntimeError if a forced one can't run.

    ``"auto"`` prefers, on CUDA: triton, then the CUDA C++ kernel; on CPU: the C++ kernel; and falls
    back to the eager reference ("torch") when no fused kernel is available.
    """
    if backend != "auto":
        reason = unavailable_reason(backend, device.type)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot run on {device.type} tensors here: {reason}")
        return backend
    order = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    for name in order:
        if unavailable_reason(name, device.type) is None:
            return name
    return "torch"


@torch.compiler.assume_constant_result
def resolve_backend_name(backend: str, device_type: str) -> str:
    """:func:`resolve_backend` for a device type; a constant to torch.compile (no import is traced)."""
    return resolve_backend(backend, torch.device(device_type))


def backend_module(backend: str) -> ModuleType:
    """The module implementing the kernel contract for a fused backend name."""
    if backend not in _FUSED:
        raise ValueError(f"{backend!r} is not a fused backend; expected one of {_FUSED}")
    return importlib.import_module("logitstd_kernels._triton" if backend == "triton" else "logitstd_kernels._cpp")


#: The modules of the sparse-teacher kernels (``sparse_forward``, ``sparse_regrad_``, ``scale_rows_``,
#: the contract of ``_ops/sparse_op.py``); the CUDA C++ extension has none.
_SPARSE_MODULES = {"triton": "logitstd_kernels._triton.sparse_launch", "cpu": "logitstd_kernels._cpp_sparse"}


def _no_cuda_sparse() -> RuntimeError:
    return RuntimeError("backend='cuda': the CUDA C++ kernel has no sparse-teacher path; on CUDA tensors "
                        "backend='triton' (or 'auto') runs the sparse Triton kernel")


@torch.compiler.assume_constant_result
def resolve_sparse_backend_name(backend: str, device_type: str) -> str:
    """The concrete backend of a sparse-teacher loss: as :func:`resolve_backend_name`, but "auto" on
    CUDA is Triton (else the eager reference), and "cuda" raises."""
    if backend == "cuda":
        raise _no_cuda_sparse()
    if backend != "auto":
        return resolve_backend(backend, torch.device(device_type))
    name = "triton" if device_type == "cuda" else "cpu"
    return name if unavailable_reason(name, device_type) is None else "torch"


def sparse_backend_module(backend: str) -> ModuleType:
    """The module of the sparse-teacher kernels for a fused backend name."""
    if backend == "cuda":
        raise _no_cuda_sparse()
    if backend not in _SPARSE_MODULES:
        raise ValueError(f"{backend!r} is not a sparse-teacher kernel backend; expected one of {tuple(_SPARSE_MODULES)}")
    return importlib.import_module(_SPARSE_MODULES[backend])


def backend_status() -> dict[str, Optional[str]]:
    """For each backend: None if it can run on this machine (on some device), else the reason."""
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    status: dict[str, Optional[str]] = {}
    for name in ("torch", "triton", "cuda", "cpu"):
        reasons = [unavailable_reason(name, dt) for dt in device_types if name not in ("cpu", "cuda") or dt == name]
        if not reasons:
            reasons = ["no CUDA device is available"]
        status[name] = None if any(r is None for r in reasons) else "; ".join(r for r in reasons if r)
    return status


def available_backends() -> list[str]:
    """The backends that can run on this machine, e.g. ``["torch", "triton", "cpu"]``."""
    return [name for name, reason in backend_status().items() if reason is None]
