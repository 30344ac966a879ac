"""Heap reuse inside the passes (spedflow._heap): fewer page faults while a task runs, the
heap handed back when it ends. Each case runs in a fresh interpreter started with
distributed's worker setting (MALLOC_TRIM_THRESHOLD_=65536), counting page faults and RSS."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from spedflow import _heap

pytestmark = pytest.mark.skipif(_heap._libc is None, reason="glibc only")

_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from spedflow import _heap

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def churn():  # a kernel's batch temporaries: 1 MB arrays, made and freed
        for _ in range(200):
            a = np.ones(2**18, np.float32)
            a *= 2
            del a

    out = {"rss_before": rss()}
    f0 = faults(); churn(); out["plain_faults"] = faults() - f0
    with _heap.reusing_heap():
        f0 = faults(); churn(); out["reuse_faults"] = faults() - f0
        # and a working set that is freed inside the task: 200 MB of 1 MB arrays
        keep = [np.ones(2**18, np.float32) for _ in range(200)]
        out["rss_inside"] = rss()
        del keep
    out["rss_after"] = rss()
    f0 = faults(); churn(); out["after_faults"] = faults() - f0
    out["active"] = _heap._active
    print(json.dumps(out))
""")


def _run(**settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(settings)
    res = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_task_temporaries_reuse_the_heap_and_it_is_returned_after():
    out = _run(MALLOC_TRIM_THRESHOLD_="0x10000")  # distributed's worker setting
    # every 1 MB temporary is a fresh mmap (256 pages) without; reused with
    assert out["plain_faults"] > 200 * 200
    assert out["reuse_faults"] < out["plain_faults"] / 20
    # the 200 MB freed inside the task is not kept once it ends
    assert out["rss_inside"] - out["rss_before"] > 190 * 2**20
    assert out["rss_after"] - out["rss_before"] < 20 * 2**20
    assert out["active"] == 0
    # the worker's own setting is back after the task: fresh mmaps again
    assert out["after_faults"] > out["plain_faults"] / 2


def test_a_process_without_allocator_settings_keeps_reusing_its_heap():
    """glibc's dynamic thresholds end with the first mallopt; such a process is left at
    16 MiB / 64 MiB instead of glibc's static 128 kB (every 1 MB temporary a fresh mmap)."""
    out = _run()
    assert out["after_faults"] < out["plain_faults"] / 20 + 1000
    assert out["rss_after"] - out["rss_before"] < 20 * 2**20


def test_nested_and_failing_tasks_restore_the_count():
    with pytest.raises(ZeroDivisionError):
        with _heap.reusing_heap():
            with _heap.reusing_heap():
                assert _heap._active == 2
                1 / 0
    assert _heap._active == 0
    assert _heap.task_reusing_heap(sum)([1, 2, 3]) == 6
    assert _heap.task_reusing_heap(sum).__name__ == "sum"
    assert _heap._active == 0


_FRAGMENTED = textwrap.dedent("""
    import json
    import numpy as np
    from spedflow import _heap

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    a = np.ones(2**22, np.float32)  # a freed 16 MB array: glibc's dynamic threshold rises
    del a
    out = {"rss_before": rss()}
    big, pins = [], []
    for _ in range(200):  # 1 MB arrays from the heap, each pinned in place by a small one
        big.append(np.ones(2**18, np.float32))
        pins.append(np.ones(100))
    out["rss_full"] = rss()
    del big
    out["rss_freed"] = rss()
    _heap.return_free_heap()
    out["rss_returned"] = rss()
    print(json.dumps(out))
""")


def test_free_heap_between_stages_is_returned_to_the_os():
    """The client between stages: freed arrays between live small ones stay resident
    until :func:`spedflow._heap.return_free_heap`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    res = subprocess.run([sys.executable, "-c", _FRAGMENTED], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["rss_full"] - out["rss_before"] > 190 * 2**20
    assert out["rss_freed"] - out["rss_before"] > 150 * 2**20  # kept by the allocator
    assert out["rss_returned"] - out["rss_before"] < 20 * 2**20
