"""Compiled kernels: whether numba is there and wanted.

The NumPy/SciPy kernels are the reference and run everywhere. Where a pass over the
data is one fused per-pattern loop (align, remove the background, integrate), a numba
version keeps each pattern in cache through every step and runs 3-4x faster (see
``benchmarks/spikes/numba_pass2``). Those versions are used when numba imports and
``SPEDFLOW_JIT`` is not ``0``; the tests compare each with its NumPy reference.

Compiled code is cached on disk (numba's ``cache=True``): the first run on a machine
compiles for a few seconds, later processes load it in a fraction of a second.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

__all__ = ["enabled", "compiled", "ENV"]

log = logging.getLogger(__name__)

#: Environment variable: ``0`` turns the compiled kernels off (the NumPy ones run).
ENV = "SPEDFLOW_JIT"


@functools.lru_cache(maxsize=1)
def _numba_imports() -> bool:
    try:
        import numba  # noqa: F401
    except Exception:  # not installed, or a broken llvmlite: the NumPy kernels run
        return False
    return True


def enabled() -> bool:
    """True if the compiled kernels run: numba imports and ``SPEDFLOW_JIT`` is not 0."""
    if os.environ.get(ENV, "1").strip() in ("0", "false", "no", "off"):
        return False
    return _numba_imports()


def compiled(module: str):
    """The compiled kernels of ``module`` (e.g. ``"spedflow.peaks._compiled"``), or None
    where they are off or cannot load (then the NumPy kernels run, with a warning once:
    a numba that does not work, or no writable place for its cache, must not stop a run)."""
    return _load(module) if enabled() else None


@functools.lru_cache(maxsize=None)
def _load(module: str):
    try:
        return importlib.import_module(module)
    except Exception as e:
        log.warning("compiled kernels unavailable, running the NumPy ones (%s: %s)",
                    type(e).__name__, e)
        return None
