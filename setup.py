"""Build script of the optional C++/CUDA extension ``logitstd_kernels._C``; metadata lives in pyproject.toml.

The extension holds the C++ CPU kernel (always built) and the CUDA kernel (built when the installed
torch has CUDA, ``torch.version.cuda``, and nvcc is found). It is optional: when it cannot be built
the package still installs and works with the reference and Triton backends, and
``logitstd_kernels.backend_status()`` says why the "cpu"/"cuda" backends are missing.

Build against the installed torch (its headers and ABI)::

    pip install --no-build-isolation -e .                     # CPU kernel, + CUDA kernel if possible
    TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .

Environment switches:

- ``LOGITSTD_SKIP_EXTENSION=1``: build no extension (pure Python package).
- ``LOGITSTD_SKIP_CUDA=1``: build only the CPU kernel even where the CUDA kernel could be built.
- ``LOGITSTD_REQUIRE_EXTENSION=1``: fail the build when the extension does not compile (CI), instead
  of warning and installing the package without it.
- ``TORCH_CUDA_ARCH_LIST``: GPU architectures; defaults to "9.0" (Hopper: the kernel uses thread-block
  clusters) when no GPU is visible, else torch picks the visible GPUs' architectures.
- ``MAX_JOBS``: parallel compile jobs (ninja).

The CPU kernel sources ``csrc/cpu/kd_cpu_kernel.cpp`` and ``csrc/cpu/sparse_cpu_kernel.cpp`` are
compiled once per instruction set (a generic
build, and AVX2 and AVX512 builds on x86-64), the way ATen compiles its own CPU kernels; the
extension picks the widest one the CPU supports at run time.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _capability_builds() -> list[tuple[str, list[str]]]:
    """(CPU_CAPABILITY, extra compiler flags) of each build of the CPU kernel source."""
    builds = [("DEFAULT", [])]
    machine = platform.machine().lower()
    if sys.platform.startswith("linux") and machine in ("x86_64", "amd64"):
        builds += [
            ("AVX2", ["-mavx2", "-mfma", "-mf16c"]),
            ("AVX512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]),
        ]
    return builds


def _extension_modules():
    """The extension (or nothing) and the build_ext command class that compiles it."""
    if _flag("LOGITSTD_SKIP_EXTENSION"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # no torch in the build environment: pure Python install
        warnings.warn(f"logitstd-kernels: torch is not importable ({exc}); building without the C++ extension. "
                      f"Install torch first and use pip install --no-build-isolation.")
        return [], {}

    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    with_cuda = (torch.version.cuda is not None and not _flag("LOGITSTD_SKIP_CUDA")
                 and bool(nvcc) and os.path.exists(nvcc) and CUDA_HOME is not None)
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"

    capability_builds = _capability_builds()
    defines = [f"-DLOGITSTD_CPU_{name}" for name, _ in capability_builds if name != "DEFAULT"]
    cxx = ["-O3", "-fopenmp", *defines] if sys.platform.startswith("linux") else ["-O3", *defines]
    link = ["-fopenmp"] if sys.platform.startswith("linux") else []
    sources = [os.path.join(CSRC, "logitstd.cpp"), os.path.join(CSRC, "cpu", "kd_cpu.cpp"),
               os.path.join(CSRC, "cpu", "sparse_cpu.cpp")]
    include_dirs = [os.path.join(ROOT, CSRC, "include")]
    # compiled once per instruction set (the dense kernel and the sparse-teacher kernel)
    kernel_sources = [os.path.join(CSRC, "cpu", "kd_cpu_kernel.cpp"), os.path.join(CSRC, "cpu", "sparse_cpu_kernel.cpp")]

    if with_cuda:
        sources.append(os.path.join(CSRC, "cuda", "kd_cuda.cu"))
        ext = CUDAExtension(
            "logitstd_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]}, extra_link_args=link,
        )
    else:
        ext = CppExtension(
            "logitstd_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=link,
        )
    # the headers every source includes: a change to one rebuilds the extension
    ext.depends = [os.path.join(CSRC, folder, name) for folder in (os.path.join("include", "logitstd"), "cuda", "cpu")
                   for name in os.listdir(os.path.join(ROOT, CSRC, folder)) if name.endswith((".h", ".cuh"))]

    class BuildExtensionWithCapabilities(BuildExtension):
        """Compiles the CPU kernel once per instruction set, then builds the extension as usual.

        Unless LOGITSTD_REQUIRE_EXTENSION=1, a compile error is reported and the package is installed
        without the extension.
        """

        def build_extensions(self) -> None:
            self._failed: list = []
            super().build_extensions()
            # A failed extension has no output to copy or install.
            self.extensions = [e for e in self.extensions if e not in self._failed]

        def build_extension(self, extension) -> None:
            try:
                extension.extra_objects = self._capability_objects(extension) + list(extension.extra_objects or [])
                super().build_extension(extension)
            except Exception as exc:
                if _flag("LOGITSTD_REQUIRE_EXTENSION"):
                    raise
                self._failed.append(extension)
                warnings.warn(f"logitstd-kernels: building {extension.name} failed ({exc}); the package works "
                              f"without it (reference and Triton backends). Set LOGITSTD_REQUIRE_EXTENSION=1 "
                              f"to make this an error.")

        def _capability_objects(self, extension) -> list[str]:
            base = extension.extra_compile_args
            base_cxx = list(base["cxx"]) if isinstance(base, dict) else list(base)
            objects: list[str] = []
            for name, flags in capability_builds:
                postargs = {"cxx": base_cxx + [f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}", *flags],
                            "nvcc": []}
                objects += self.compiler.compile(
                    kernel_sources, output_dir=os.path.join(self.build_temp, f"cpu_{name.lower()}"),
                    macros=extension.define_macros, include_dirs=extension.include_dirs, debug=self.debug,
                    extra_postargs=postargs, depends=extension.depends,
                )
            return objects

    return [ext], {"build_ext": BuildExtensionWithCapabilities}


ext_modules, cmdclass = _extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
