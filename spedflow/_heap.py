"""Heap reuse inside the passes over the data (glibc only; a no-op elsewhere).

The kernels allocate batch temporaries of 0.1-4 MB by the hundred per chunk. Where
glibc's mmap threshold is at its default or pinned at 128 kB -- as in every worker that
distributed's nanny starts with ``MALLOC_TRIM_THRESHOLD_=65536``, the setting of workers
under 2 GiB (:mod:`spedflow.cluster`) -- each of them is a fresh ``mmap``, page-faulted
in and unmapped again: on 1 GB workers (128 x 128 benchmark set) pass 1 of the VDF
workflow took 12.1 s with 3.7-4.0 M page faults per worker, 7.4 s and 0.3-0.4 M with
this module.

:func:`reusing_heap` raises the mmap and trim thresholds while a task runs, so those
temporaries come from the heap and are reused; when the last running task leaves, it
hands the free heap back to the OS (``malloc_trim``), so the heap a task used is not kept
between tasks -- what made permanent settings unsafe on small workers (a worker paused at
80 % of its limit for good).

After the task the thresholds go back to the values the process was started with
(``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, as distributed's nanny sets).
A process started without them (an in-process run, a notebook) had glibc's *dynamic*
thresholds, which rise as large blocks are freed; any ``mallopt`` call ends that
adaptation for good, so such a process is left at the values of
:data:`spedflow.cluster.WORKER_MALLOC_ENV` (16 MiB / 64 MiB), about where the adaptation
takes a NumPy process anyway.
Linux with glibc only; elsewhere everything here is a no-op.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["reusing_heap", "task_reusing_heap", "return_free_heap"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Arrays up to this size come from the heap while a task runs (chunk-sized arrays,
#: ~16-64 MB, stay mmapped; glibc accepts at most 32 MiB here).
_TASK_MMAP_THRESHOLD = 16 * 2**20
#: Free heap kept while a task runs (trimmed when it ends).
_TASK_TRIM_THRESHOLD = 256 * 2**20

_lock = threading.Lock()
_active = 0


def _load_glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc has both; musl does not)
        libc.gnu_get_libc_version  # noqa: B018
    except Exception:  # noqa: BLE001 (any failure: no allocator tuning)
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


_libc = _load_glibc()


#: Thresholds left in a process started without allocator settings (module notes).
_UNSET_AFTER = {"MALLOC_MMAP_THRESHOLD_": 16 * 2**20, "MALLOC_TRIM_THRESHOLD_": 64 * 2**20}
#: glibc's largest accepted mmap threshold (64-bit), and the largest C int.
_MAX_MMAP = 32 * 2**20
_MAX_INT = 2**31 - 1


def _process_setting(name: str) -> int:
    """The threshold this process was started with (its environment, in C's integer
    syntax as glibc reads it), else the value left after a task (:data:`_UNSET_AFTER`)."""
    try:
        value = int(os.environ[name], 0)
    except (KeyError, ValueError):
        value = _UNSET_AFTER[name]
    return max(0, min(value, _MAX_MMAP if name == "MALLOC_MMAP_THRESHOLD_" else _MAX_INT))


def _set(param: int, value: int) -> None:
    if not _libc.mallopt(param, int(value)):
        logging.getLogger("spedflow").debug("mallopt(%d, %d) was refused", param, value)


@contextmanager
def reusing_heap() -> Iterator[None]:
    """Within: batch temporaries are reused from the heap; afterwards the process's
    allocator settings are back and the free heap is returned to the OS.

    Nested and concurrent uses (threads of one worker) count: the settings change on
    the first entry and are restored on the last exit.
    """
    global _active
    if _libc is None:
        yield
        return
    with _lock:
        if _active == 0:
            _set(_M_MMAP_THRESHOLD, max(_TASK_MMAP_THRESHOLD,
                                        _process_setting("MALLOC_MMAP_THRESHOLD_")))
            _set(_M_TRIM_THRESHOLD, max(_TASK_TRIM_THRESHOLD,
                                        _process_setting("MALLOC_TRIM_THRESHOLD_")))
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                _set(_M_MMAP_THRESHOLD, _process_setting("MALLOC_MMAP_THRESHOLD_"))
                _set(_M_TRIM_THRESHOLD, _process_setting("MALLOC_TRIM_THRESHOLD_"))
                _libc.malloc_trim(0)


def return_free_heap() -> None:
    """Hand the free heap back to the OS (``malloc_trim``), between the stages of a
    workflow in the client. The client's glibc runs with dynamic thresholds: once a
    large array is freed, arrays up to 32 MB come from the heap, and the holes the
    gathered chunks and the merging's temporaries leave would otherwise stay resident
    (a 512 x 512 scan's client: ~700 MB more at the end of the run)."""
    if _libc is not None:
        with _lock:
            if _active == 0:
                _libc.malloc_trim(0)


def task_reusing_heap(fn):
    """Decorator of a function that dask runs as a task: each call runs within
    :func:`reusing_heap`. The wrapper keeps ``fn``'s name (task names in the dashboard).
    Used as a decorator it replaces ``fn`` in its module and pickles by reference; a
    wrapper stored under another name is pickled by value (cloudpickle does that)."""
    @functools.wraps(fn)
    def task(*args, **kwargs):
        with reusing_heap():
            return fn(*args, **kwargs)
    return task
