"""Optional dependencies of the experiments (the ``examples`` extra) and progress reporting."""

from __future__ import annotations

import importlib
import sys
import time
from types import ModuleType
from typing import Iterable, Iterator, Optional, TypeVar

__all__ = ["EXTRA_HINT", "MissingExtraError", "require", "missing_extra", "check_extras", "progress"]

T = TypeVar("T")

# The package is not on PyPI: the extra is installed from a checkout of the repository.
EXTRA_HINT = ('install the "examples" extra (scikit-learn, matplotlib, tqdm) from the repository checkout: '
              'pip install --no-build-isolation -e ".[examples]"')


class MissingExtraError(ImportError):
    """An optional dependency of an experiment is not installed; the message names the extra."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` saying what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"{purpose} needs the Python package {module.split('.')[0]!r}, which is not "
                                f"installed ({exc}); {EXTRA_HINT}") from exc


def missing_extra(purpose: str, *modules: str) -> Optional[str]:
    """None if every module imports, else the :class:`MissingExtraError` message for the first that does not.

    Commands call this first and print the message (exit status 2) instead of a traceback.
    """
    for module in modules:
        try:
            require(module, purpose)
        except MissingExtraError as exc:
            return f"error: {exc}"
    return None


def check_extras(purpose: str, *modules: str) -> bool:
    """True if every module imports; else print :func:`missing_extra`'s message to stderr and return False.

    A command's ``run`` starts with ``if not check_extras(...): return 2``.
    """
    message = missing_extra(purpose, *modules)
    if message is not None:
        print(message, file=sys.stderr)
    return message is None


class _TextProgress:
    """A minimal stand-in for tqdm (used when tqdm is missing): a line on stderr every few seconds."""

    def __init__(self, iterable: Iterable[T], total: Optional[int], desc: str) -> None:
        self._iterable, self._total, self._desc = iterable, total, desc

    def __iter__(self) -> Iterator[T]:
        start = last = time.monotonic()
        count = 0
        for count, item in enumerate(self._iterable, 1):
            yield item
            now = time.monotonic()
            if now - last >= 5.0:
                of = f"/{self._total}" if self._total else ""
                print(f"{self._desc}: {count}{of} ({now - start:.0f} s)", file=sys.stderr, flush=True)
                last = now
        print(f"{self._desc}: done, {count} in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)


def progress(iterable: Iterable[T], *, total: Optional[int] = None, desc: str = "",
             enable: bool = True) -> Iterable[T]:
    """Wrap ``iterable`` in a progress bar on stderr: tqdm when installed, else periodic text lines.

    ``enable=False`` returns ``iterable`` unchanged (for tests and ``--quiet``).
    """
    if not enable:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextProgress(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
