"""Measurement helpers shared by the benchmark scripts.

- :func:`run_tree`: run a command, sampling the resident memory of its whole process
  tree (client + scheduler + nanny + worker processes) every ``interval`` seconds.
- :func:`machine`: cores, memory, CPU model, library versions, load average.
- :func:`io_floor`: one plain decompressing read pass over a store's ``data``, the
  lower bound on any pass of a workflow over the same store.
- :func:`drop_page_cache`: ask the kernel to forget a store's files, so that each
  measured run starts from the disk rather than from whatever the previous run left.
- :func:`check_checkout`: warn when ``import spedflow`` loads another copy than this
  checkout's (a non-editable install in site-packages measures old code).

No timing here is asserted anywhere: these are measurements, recorded with the load
average of the (shared) machine before and after.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


def check_checkout() -> bool:
    """Whether ``import spedflow`` (and ``python -m spedflow``) loads this checkout's
    package; warns on stderr if not. A script in ``benchmarks/`` finds ``spedflow`` on
    ``sys.path`` after its own folder: a non-editable install in site-packages then
    shadows the checkout, and every figure measures that copy's code."""
    import hashlib

    import spedflow

    def source_hash(pkg: Path) -> str:  # as spedflow's code_fingerprint hashes its source
        h = hashlib.sha256()
        for f in sorted(pkg.rglob("*.py")):
            h.update(f.relative_to(pkg.parent).as_posix().encode() + b"\0" + f.read_bytes())
        return h.hexdigest()

    mine = Path(__file__).resolve().parent.parent / "spedflow"
    got = Path(spedflow.__file__).resolve().parent
    if got != mine and source_hash(got) != source_hash(mine):
        print(f"WARNING: benchmarking the spedflow at {got}, whose code differs from this "
              f"checkout's (`pip install -e .` here to measure this code)", file=sys.stderr,
              flush=True)
        return False
    return True

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

LIBRARIES = ("spedflow", "numpy", "scipy", "dask", "distributed", "zarr", "numcodecs",
             "skimage", "sklearn", "psutil", "matplotlib")


def tree_rss(proc: psutil.Process, cpu: dict | None = None) -> int:
    """Resident bytes of ``proc`` and all its descendants (0 for vanished ones).

    If ``cpu`` is given, it is updated in place with ``pid -> user + system CPU seconds``
    of every process seen (the last value seen is kept: a process's CPU time only grows).
    """
    return _tree_rss_parts(proc, cpu)[0]


def _tree_rss_parts(proc: psutil.Process, cpu: dict | None = None) -> tuple[int, int]:
    """:func:`tree_rss` and, from the same reading, the resident bytes of ``proc`` alone."""
    total = root = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for p in procs:
        try:
            with p.oneshot():
                rss = p.memory_info().rss
                total += rss
                if p.pid == proc.pid:
                    root = rss
                if cpu is not None:
                    t = p.cpu_times()
                    cpu[p.pid] = max(cpu.get(p.pid, 0.0), t.user + t.system)
        except psutil.Error:
            pass
    return total, root


class TreeSampler:
    """Sample the process-tree RSS of ``pid`` in a background thread; keep the peak.

    Use as a context manager around the lifetime of the process. ``peak`` is in bytes,
    ``samples`` is the number of samples taken (a peak from fewer than a few samples
    means the process was shorter than the sampling interval).
    """

    def __init__(self, pid: int, interval: float = 0.2):
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.peak_root = 0  # the process started itself (the client of a workflow run)
        self.samples = 0
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            # the process's own RSS from the same reading as the tree's, so that
            # peak_root <= peak (read apart, a growing process could exceed its tree)
            total, root = _tree_rss_parts(self.proc, self.cpu)
            self.peak = max(self.peak, total)
            self.peak_root = max(self.peak_root, root)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu_seconds(self) -> float:
        return float(sum(self.cpu.values()))


def run_tree(cmd: list[str], *, interval: float = 0.2, timeout: float | None = None,
             env: dict | None = None, cwd: str | Path | None = None) -> dict:
    """Run ``cmd``; wall time, peak process-tree RSS, exit code and output.

    Returns
    -------
    dict with ``wall_s`` (s), ``cpu_s`` (user + system CPU seconds of the tree; on a
    shared, loaded machine this is the load-robust measure of work), ``peak_rss_bytes``, ``peak_root_rss_bytes`` (of the process started alone), ``rss_samples``, ``returncode``,
    ``stdout``, ``stderr`` (text) and ``cmd`` (the command as one shell-quoted string).
    """
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    ru0 = ru.ru_utime + ru.ru_stime
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd)
    with TreeSampler(proc.pid, interval) as sampler:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            out, err = proc.communicate()
            err += f"\n[bench] killed after {timeout} s"
    wall = time.perf_counter() - t0
    # CPU of the tree: the rusage of the reaped child includes every descendant that was
    # waited for (exact when the tree cleans up after itself); the sampled sum covers
    # descendants that were not reaped, up to their last sample. Take the larger.
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    reaped_cpu = ru.ru_utime + ru.ru_stime - ru0
    return {"cmd": " ".join(_quote(c) for c in cmd), "wall_s": round(wall, 3),
            "cpu_s": round(max(reaped_cpu, sampler.cpu_seconds), 2),
            "peak_rss_bytes": int(sampler.peak), "peak_root_rss_bytes": int(sampler.peak_root),
            "rss_samples": sampler.samples,
            "returncode": proc.returncode, "stdout": out, "stderr": err}


def _kill_tree(pid: int) -> None:
    """Kill the process we started and its descendants (by pid, never by name)."""
    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def _quote(s: str) -> str:
    import shlex
    return shlex.quote(str(s))


def load_avg() -> list[float]:
    """1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            out[name] = None
    return out


def machine() -> dict:
    """Description of this machine and of the software measured on it."""
    vm = psutil.virtual_memory()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {"cpu_model": cpu_model(), "logical_cores": psutil.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False), "usable_cores": affinity,
            "memory_gb": round(vm.total / 1e9, 2), "memory_available_gb": round(vm.available / 1e9, 2),
            "platform": platform.platform(), "versions": versions(), "load_avg": load_avg(),
            "disk_free_gb": round(shutil.disk_usage(REPO).free / 1e9, 1)}


def drop_page_cache(path: str | Path) -> int:
    """``posix_fadvise(DONTNEED)`` every file under ``path``; number of files advised.

    Unprivileged and local to these files (no global cache drop). Dirty pages are
    flushed first, otherwise the kernel keeps them.
    """
    if not hasattr(os, "posix_fadvise"):
        return 0
    n = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                fd = os.open(os.path.join(root, f), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    return n


def store_bytes(path: str | Path) -> int:
    """Bytes on disk under ``path``."""
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def io_floor(store: str | Path, *, cold: bool = True) -> dict:
    """One plain read pass over ``store/data`` with the store's own chunks.

    Every chunk is read, decompressed and summed (so no lazy short cut can skip the
    decode) with dask's threaded scheduler, all cores. This is the floor for one pass
    of any workflow over the same store on this machine.

    Returns
    -------
    dict with ``seconds``, ``mb_per_s`` (uncompressed MB/s), ``stored_mb_per_s``,
    ``patterns_per_s``, ``patterns``, ``nbytes``, ``stored_bytes``, ``chunks``, ``cold``.
    """
    import dask
    import dask.array as da
    import numpy as np
    import zarr

    store = Path(store)
    arr = zarr.open_group(store, mode="r")["data"]
    data = da.from_zarr(arr)
    if cold:
        drop_page_cache(store / "data")
    sums = data.map_blocks(lambda b: np.array(b.sum(dtype=np.uint64), ndmin=4), chunks=(1,) * 4,
                           dtype=np.uint64, meta=np.empty((0,) * 4, np.uint64))
    t0 = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        total = int(sums.sum().compute())
    sec = time.perf_counter() - t0
    n = int(np.prod(data.shape[:2]))
    stored = store_bytes(store / "data")
    return {"seconds": round(sec, 4), "patterns": n, "nbytes": int(data.nbytes),
            "stored_bytes": stored, "chunks": [int(c) for c in arr.chunks],
            "n_chunks": int(np.prod(data.numblocks)), "cold": cold,
            "mb_per_s": round(data.nbytes / 1e6 / sec, 1),
            "stored_mb_per_s": round(stored / 1e6 / sec, 1),
            "patterns_per_s": round(n / sec, 1), "checksum": total,
            "scheduler": "dask threaded", "threads": os.cpu_count()}


def write_json(path: str | Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_default) + "\n")
    return path


def _default(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    return str(o)


def spedflow_cmd() -> list[str]:
    """The spedflow CLI of this interpreter (``python -m spedflow``)."""
    return [sys.executable, "-m", "spedflow"]
