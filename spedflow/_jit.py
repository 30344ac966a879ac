"""Compiled kernels: whether numba is there and wanted.

The NumPy/SciPy kernels are the reference and run everywhere. Where a pass over the
data is one fused per-pattern loop (align, remove the background, integrate), a numba
version (:mod:`spedflow._compiled`) keeps each pattern in cache through every step and
runs 2-3x faster. Those versions are used when numba imports, ``SPEDFLOW_JIT`` is not
``0`` and the process is not a small dask worker; the tests compare each with its
NumPy reference.

Compiled code is cached on disk (numba's ``cache=True``): the first run on a machine
compiles for a few seconds, later processes load it in a fraction of a second.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import threading

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
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
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
    """The compiled kernels of ``module`` (e.g. ``"spedflow._compiled"``), or None
    where they are off or cannot load (then the NumPy kernels run, with a warning once:
    a numba that does not work, or no writable place for its cache, must not stop a run)."""
    return _load(module) if enabled() else None


def _load(module: str):
    with _LOAD_LOCK:  # one import (and one message) when the tasks' threads ask at once
        return _load_once(module)


_LOAD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _load_once(module: str):
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        log.warning("compiled kernels unavailable, running the NumPy ones (%s: %s)",
                    type(e).__name__, e)
        return None
    return mod


def announce_compile(kernel) -> None:
    """Say, once per process, that spedflow's kernels are being compiled, just before
    ``kernel`` (one of the slow-to-compile numba dispatchers) is first called with no
    entry in numba's disk cache: a first run otherwise sits at 0 % for ~10 s without a
    word. Asked by each kernel when it is about to run, not of all of them when the
    module loads: a kernel a run never calls (pass 2's in the NMF workflow, or where
    the compiled pass 2 does not apply) has no cache entry, and said "compiling" on
    every run."""
    global _announced
    if _announced or kernel.signatures or not _cache_missing(kernel):
        return
    with _ANNOUNCE_LOCK:
        if not _announced:
            _announced = True
            log.warning("compiling spedflow's kernels for this machine (once, ~10 s; numba "
                        "keeps them on disk)")


_announced = False
_ANNOUNCE_LOCK = threading.Lock()


def _cache_missing(kernel) -> bool:
    """True if numba's disk cache has no index for ``kernel``, i.e. its first call
    compiles (a guess from numba's internals: False when it cannot tell)."""
    try:
        return not os.path.exists(kernel._cache._cache_file._index_path)
    except Exception:
        return False


def warm_up() -> None:
    """Load the compiled kernels into this process (compile them if no cache has them
    yet) by running the peak finder and pass 2 on a few tiny patterns, through the
    same calls as the workflows (so with the same argument types): a fresh dask worker
    does this while the client plans the run, not in its first task."""
    import numpy as np
    if compiled("spedflow._compiled") is None:
        return
    from .peaks.noise import find_peaks_counting
    from .vdf.kernels import disc_masks, preprocessed_sums
    shape = (48, 48)
    frames = np.zeros((2,) + shape, np.float32)
    find_peaks_counting(frames, [1.0, 2.0], threshold=5.0, exclude_border=1, gain=1.0,
                        read_var=0.0)
    masks = disc_masks([[8.0, 5.0]], 2.0, shape)
    centres = np.full((2, 2), 24.0)
    for dtype in (np.uint16, np.uint8, np.float32):  # what detectors write
        preprocessed_sums(frames.astype(dtype), centres, masks, sigma_low=1.0, sigma_high=8.0,
                          counts=(1.0, 0.0))
