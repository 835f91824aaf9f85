"""Repository-wide pytest configuration (tests/ and benchmarks/): reproducible random inputs.

Every test draws its random inputs from a seed derived from its own node id (a hash of
``request.node.nodeid``), seeding ``torch`` (CPU and CUDA), ``numpy.random`` and ``random`` before
it runs. So a test sees the same inputs on every run and every machine and cannot fail by chance.

``LOGITSTD_TEST_SEED`` changes the draws:

- unset (or empty): the seed is the hash of the node id alone (CI);
- ``<int>``: that int is mixed into every test's seed (a different, still reproducible, draw);
- ``random``: a fresh int per session, mixed in the same way, for fuzzing; it is printed in the
  header, and a failure prints ``LOGITSTD_TEST_SEED=<that int>``, which reproduces it.

The property-based tests (hypothesis) follow the same variable: by default the registered
``logitstd-ci`` profile (``derandomize=True``: the examples are a function of the test alone),
otherwise the ``logitstd-fuzz`` profile, each property test seeding hypothesis with its
``node_seed`` (the int mixed with the node id, as for every other test).
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Optional

import pytest

SEED_ENV = "LOGITSTD_TEST_SEED"
_SEED_KEY = pytest.StashKey[int]()


def _parse_base(value: str) -> Optional[int]:
    value = value.strip()
    if not value:
        return None
    if value.lower() == "random":
        return int.from_bytes(os.urandom(4), "little")
    try:
        return int(value, 0)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV} must be unset, an integer or 'random', got {value!r}") from None


# Parsed once per process (import time), so that every test of a session, and the hypothesis
# settings chosen below, see the same base.
SEED_BASE: Optional[int] = _parse_base(os.environ.get(SEED_ENV, ""))


def mix_seed(base: Optional[int], key: str) -> int:
    """A 32-bit seed from ``key`` (a node id or a test name), mixed with ``base`` when there is one."""
    text = key if base is None else f"{base}\0{key}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def reproduce_hint() -> str:
    """The environment setting that reproduces this session's draws."""
    return f"{SEED_ENV} unset" if SEED_BASE is None else f"{SEED_ENV}={SEED_BASE}"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    import torch

    torch.manual_seed(seed)  # also seeds every CUDA device


try:  # hypothesis is in the "test" extra; without it only the property tests cannot run
    from hypothesis import HealthCheck, settings as _hypothesis_settings

    _common = dict(deadline=None, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.filter_too_much])
    _hypothesis_settings.register_profile("logitstd-ci", derandomize=True, max_examples=60, **_common)
    _hypothesis_settings.register_profile("logitstd-fuzz", derandomize=False, max_examples=60, **_common)
    _hypothesis_settings.load_profile(os.environ.get(
        "HYPOTHESIS_PROFILE", "logitstd-ci" if SEED_BASE is None else "logitstd-fuzz"))
except ImportError:
    pass


def pytest_report_header(config):
    drawn = " (drawn for this session)" if os.environ.get(SEED_ENV, "").strip().lower() == "random" else ""
    return f"logitstd test seeds: per node id, {reproduce_hint()}{drawn}"


@pytest.fixture(autouse=True)
def _seed_from_node_id(request):
    """Seed torch, numpy and random from this test's node id (and ``LOGITSTD_TEST_SEED``)."""
    seed = mix_seed(SEED_BASE, request.node.nodeid)
    request.node.stash[_SEED_KEY] = seed
    request.node.user_properties.append(("seed", seed))
    _seed_everything(seed)
    return seed


@pytest.fixture
def node_seed(request, _seed_from_node_id) -> int:
    """This test's seed, for tests that build their own generators."""
    return _seed_from_node_id


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seed = item.stash.get(_SEED_KEY, None)
    if report.failed and seed is not None:
        report.sections.append((
            "random seed",
            f"inputs seeded with {seed}, derived from the node id with {reproduce_hint()}; reproduce with:\n"
            f"  {'' if SEED_BASE is None else reproduce_hint() + ' '}python -m pytest '{item.nodeid}'",
        ))
    return report
