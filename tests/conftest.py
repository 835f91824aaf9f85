"""Test configuration: without a GPU, run the Triton kernels through the Triton interpreter.

``TRITON_INTERPRET`` must be set before triton is imported, hence here, before any test module
imports the package. On a CUDA machine the real compiler is used.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run, but reproducible from the printed seed when a test fails."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(f"torch seed for {request.node.nodeid}: {seed}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call = report
