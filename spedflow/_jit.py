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
import os

__all__ = ["enabled", "ENV"]

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
