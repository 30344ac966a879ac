"""Heap reuse inside the passes over the data (glibc only; a no-op elsewhere).

The kernels allocate batch temporaries of 0.1-4 MB by the hundred per chunk. Where
glibc's mmap threshold is at its default or pinned at 128 kB -- as in every worker that
distributed's nanny starts with ``MALLOC_TRIM_THRESHOLD_=65536``, the setting of workers
under 2 GiB (:mod:`spedflow.cluster`) -- each of them is a fresh ``mmap``, page-faulted
in and unmapped again: on 1 GB workers pass 1 of the VDF workflow ran at half the speed
of larger ones (1,054 vs 2,200 patterns/s on the 128 x 128 benchmark set).

:func:`reusing_heap` raises the mmap and trim thresholds while a task runs, so those
temporaries come from the heap and are reused, and when the last running task leaves
it restores the process's settings and hands the free heap back to the OS
(``malloc_trim``). The heap a task used is therefore not kept between tasks, which is
what made the permanent settings unsafe on small workers (a worker paused at 80 % of its
limit for good).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["reusing_heap", "call_reusing_heap", "task_reusing_heap"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's defaults of both thresholds (when no environment variable sets them).
_GLIBC_DEFAULT = 128 * 1024
#: Arrays up to this size come from the heap while a task runs (chunk-sized arrays,
#: ~16-64 MB, stay mmapped; glibc accepts at most 32 MiB here).
_TASK_MMAP_THRESHOLD = 16 * 2**20
#: Free heap kept while a task runs (trimmed when it ends).
_TASK_TRIM_THRESHOLD = 256 * 2**20

_lock = threading.Lock()
_active = 0


def _load_glibc():
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc has both; musl and macOS do not)
        libc.gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


_libc = _load_glibc()


def _process_setting(name: str) -> int:
    """The threshold this process was started with (its environment), else glibc's default."""
    try:
        return int(os.environ.get(name, _GLIBC_DEFAULT))
    except ValueError:
        return _GLIBC_DEFAULT


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
            _libc.mallopt(_M_MMAP_THRESHOLD, max(_TASK_MMAP_THRESHOLD,
                                                 _process_setting("MALLOC_MMAP_THRESHOLD_")))
            _libc.mallopt(_M_TRIM_THRESHOLD, max(_TASK_TRIM_THRESHOLD,
                                                 _process_setting("MALLOC_TRIM_THRESHOLD_")))
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                _libc.mallopt(_M_MMAP_THRESHOLD, _process_setting("MALLOC_MMAP_THRESHOLD_"))
                _libc.mallopt(_M_TRIM_THRESHOLD, _process_setting("MALLOC_TRIM_THRESHOLD_"))
                _libc.malloc_trim(0)


def call_reusing_heap(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` within :func:`reusing_heap` (for dask tasks:
    ``functools.partial(call_reusing_heap, kernel)`` tokenizes like the kernel)."""
    with reusing_heap():
        return fn(*args, **kwargs)


def task_reusing_heap(fn):
    """Decorator of a function that dask runs as a task: each call runs within
    :func:`reusing_heap` (the name and module stay ``fn``'s, so it pickles by reference)."""
    @functools.wraps(fn)
    def task(*args, **kwargs):
        with reusing_heap():
            return fn(*args, **kwargs)
    return task
