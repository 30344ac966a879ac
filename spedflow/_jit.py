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
#: Smallest memory limit of a dask worker that runs the compiled kernels. numba and the
#: loaded kernels add ~150 MB to a process's RSS (~90 MB of its own memory): on a
#: 512 MB worker, whose libraries already take ~300 MB, that is past distributed's
#: pause threshold (80 %) before any task starts, and the run stalls. Smaller workers
#: run the NumPy kernels (same results, ~1.4x the time).
MIN_WORKER_MEMORY = 750 * 2**20


@functools.lru_cache(maxsize=1)
def _numba_imports() -> bool:
    try:
        import numba  # noqa: F401
    except Exception:  # not installed, or a broken llvmlite: the NumPy kernels run
        return False
    return True


def enabled() -> bool:
    """True if the compiled kernels run: numba imports, ``SPEDFLOW_JIT`` is not 0, and
    this is not a dask worker with a memory limit under :data:`MIN_WORKER_MEMORY`."""
    if os.environ.get(ENV, "1").strip() in ("0", "false", "no", "off"):
        return False
    limit = _worker_memory_limit()
    if limit is not None and limit < MIN_WORKER_MEMORY:
        return False
    return _numba_imports()


def _worker_memory_limit():
    """The memory limit of the dask worker running this task (bytes), or None (not in a
    worker, or no limit)."""
    try:
        from distributed import get_worker
        worker = get_worker()
    except (ImportError, ValueError):
        return None
    return getattr(getattr(worker, "memory_manager", None), "memory_limit", None) or None


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


def warm_up() -> None:
    """Load the compiled kernels into this process (compile them if no cache has them
    yet) by running each on a tiny input of the types the workflows give it: a fresh
    dask worker does this while the client plans the run, not in its first task."""
    import numpy as np
    peaks = compiled("spedflow.peaks._compiled")
    vdf = compiled("spedflow.vdf._compiled")
    if peaks is None or vdf is None:
        return
    shape = (24, 24)
    frames = np.zeros((1,) + shape, np.float32)
    background, residual = peaks.ring_residual(frames, 1.0, 0.0)
    smooth = np.zeros((1, 1) + shape, np.float32)
    rings = peaks.ring_tables(shape)
    peaks.local_maxima(smooth, background[None], rings[3], rings[4], rings[5], 5.0, 1)
    ops = vdf.operators((48, 48), 1.0, 8.0)  # a wide Gaussian of low rank, as in use
    if ops.ok:
        idx, w = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.float32)
        for dtype in (np.uint16, np.uint8, np.float32):  # what detectors write
            vdf.pass2_sums(np.zeros((1, 48, 48), dtype), np.zeros((1, 2)), ops, idx, w, 1.0, 0.0)
