"""Test configuration: without a GPU, run the Triton kernels through the Triton interpreter.

``TRITON_INTERPRET`` must be set before triton is imported, hence here, before any test module
imports the package. On a CUDA machine the real compiler is used.

Seeding (every test's inputs come from a seed derived from its node id, ``LOGITSTD_TEST_SEED``) is
in the repository's root ``conftest.py``, which covers ``benchmarks/`` too. Requirements that are
skips by default and failures under ``LOGITSTD_REQUIRE_ALL=1`` are in ``support.py``
(:func:`support.require_or_skip`, :func:`support.needs`).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from support import NEEDS_MARK, require_or_skip  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"{NEEDS_MARK}(available, reason, required=True): skip the test when not available, "
                   "fail it instead under LOGITSTD_REQUIRE_ALL=1 (see tests/support.py)")


def pytest_runtest_setup(item):
    for mark in item.iter_markers(NEEDS_MARK):
        require_or_skip(*mark.args, **mark.kwargs)
