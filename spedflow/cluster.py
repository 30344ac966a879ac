"""Where spedflow runs: a local cluster, a remote scheduler, TLS, progress display.

This is the only library module that imports :mod:`distributed`; compute modules
build lazy dask graphs and never know where they will run.

* :func:`client_for` -- a context manager yielding a :class:`distributed.Client`,
  either connected to an existing scheduler (argument, ``SPEDFLOW_SCHEDULER``,
  dask config ``scheduler-address``) or to a :class:`~distributed.LocalCluster`
  started on 127.0.0.1 only.
* :func:`local_scheduler` -- dask's threaded scheduler with a bounded thread pool,
  for small data and tests.
* :func:`compute` / :func:`persist_with_progress` -- like :func:`dask.compute` /
  :func:`dask.persist` with a one-line progress bar on stderr, on whichever
  scheduler dask would use.
* :func:`set_progress` -- the module switch for the progress display.

Why one thread per worker process by default
--------------------------------------------
The heavy kernels are NumPy/SciPy calls that release the GIL, so threads would not
lose much on them; but the pipeline also runs Python-level code that holds it
(scikit-image peak finding and watershed bookkeeping, zarr's codec pipeline,
per-chunk label relabelling), and processes run those in parallel too. One task per
process also makes the per-worker memory limit mean "the working set of one chunk",
so dask's spill/pause thresholds act on what one task really uses. BLAS runs one
thread per task: the passes over the data pin it themselves
(``workflows._common._block_task``), because the nanny's pins of
``OMP/MKL/OPENBLAS_NUM_THREADS`` did not reach the workers of a bare ``dask worker``
here (OpenBLAS ran with every core, oversubscribed and with different rounding from
in-process runs). The cost -- data moved between processes -- is small here: tasks read their
chunks straight from the Zarr store and pass on reduced partials.

Worker memory allocator
-----------------------
distributed's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` so that freed
memory goes back to the OS at once. Setting it also freezes glibc's mmap threshold
at 128 kB, so every array above that -- each 1 MB batch temporary of the kernels --
is a fresh ``mmap`` that is page-faulted in and unmapped again: on the 128 x 128 scan
the VDF workers spent 7 s of 27 s CPU each in the kernel doing that. Local clusters
start their workers with :data:`WORKER_MALLOC_ENV` instead (arrays up to 16 MB reuse
the heap, which is trimmed above 64 MB free): the VDF run is ~20 % faster (peaks stage
16.0 -> 12.5 s) for ~150 MB more resident memory per worker. Only workers with at least
:data:`MALLOC_MIN_WORKER_MEMORY` (2 GiB) get it: dask pauses a worker at 80 % of its
limit, and heap kept for reuse does not go away, so a tight limit (``--memory-limit
1GB``) could leave a worker paused for good; those keep distributed's setting. The deploy image
(``deploy/Dockerfile``) and the SLURM script set the same for ``dask worker``
through ``DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import dask
import numpy as np
from dask.callbacks import Callback
from dask.system import CPU_COUNT
from dask.utils import parse_bytes

from .config import check_range
from .errors import ClusterError, InputError, ParameterError

__all__ = [
    "client_for", "starting", "ready", "compute", "store", "persist_with_progress",
    "local_scheduler", "set_progress",
    "progress_switched",
    "progress_enabled", "parse_memory_limit", "resolve_address", "default_n_workers",
    "ENV_SCHEDULER", "MIN_WORKER_MEMORY", "WORKER_MALLOC_ENV", "MALLOC_MIN_WORKER_MEMORY",
    "worker_environ",
]

#: Environment variable naming a scheduler address (after the explicit argument).
ENV_SCHEDULER = "SPEDFLOW_SCHEDULER"

#: Smallest per-worker memory limit accepted. A chunk holds ~16 MiB of patterns
#: (``spedflow.io.TARGET_CHUNK_BYTES``); the largest per-chunk working set is the
#: multi-scale Laplacian-of-Gaussian stack (~10 float32 copies) plus input, output
#: and Python overhead, a few hundred MiB. Below this a worker would pause or be
#: killed on its first task instead of failing with a clear message.
MIN_WORKER_MEMORY = 256 * 2**20

#: Memory a local worker should have to run any stage comfortably (twice the
#: largest per-chunk working set above); bounds the default number of workers.
_COMFORT_WORKER_MEMORY = 2**30

#: Share of physical memory given to a local cluster: the rest is left to the OS
#: page cache (which serves the Zarr chunks) and the client process.
_MEMORY_FRACTION = 0.8

_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx", "inproc")
_DEFAULT_TIMEOUT = 5.0
_DASHBOARD_PORT = 8787

#: glibc allocator settings for worker processes (module docstring): arrays up to
#: 16 MiB come from the heap and are reused, larger ones are mmapped and returned at
#: once; free heap above 64 MiB is trimmed back to the OS.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": 16 * 2**20, "MALLOC_TRIM_THRESHOLD_": 64 * 2**20}
#: Smallest per-worker memory limit given :data:`WORKER_MALLOC_ENV`: the heap it keeps
#: (~150-250 MB per worker) counts towards the limit, and a worker paused at 80 % of
#: a 1 GB limit never came back (a 512 x 512 NMF run hung with one worker paused).
MALLOC_MIN_WORKER_MEMORY = 2 * 2**30

_progress = True


class _RoutineShuffles(logging.Filter):
    """Drops the two warnings distributed's scheduler logs for every p2p rechunk (the VDF
    image stack's regrouping), its start and its end ("Shuffle ... initialized by task
    ...", "Shuffle ... deactivated due to stimulus ..."): routine events, which printed
    on every run, under ``-q`` too, as if something had gone wrong. Its other warnings
    stay."""

    ROUTINE = ("Shuffle %s initialized by task", "Shuffle %s deactivated due to stimulus")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.ROUTINE))


#: the logger of distributed's shuffle on the scheduler (in this process for a local cluster)
_SHUFFLE_LOGGER = "distributed.shuffle._scheduler_plugin"
logging.getLogger(_SHUFFLE_LOGGER).addFilter(_RoutineShuffles())


def worker_environ() -> dict:
    """The nanny's ``pre-spawn-environ`` for spedflow's local workers.

    distributed's configured environment (thread pins ``OMP/MKL/OPENBLAS_NUM_THREADS``)
    with :data:`WORKER_MALLOC_ENV` in place of its ``MALLOC_TRIM_THRESHOLD_`` -- unless
    the user's dask config already sets ``MALLOC_MMAP_THRESHOLD_`` or a trim
    threshold other than distributed's default, which is then kept.
    """
    import distributed  # noqa: F401  (registers distributed's config defaults)

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    if "MALLOC_MMAP_THRESHOLD_" in env or env.get("MALLOC_TRIM_THRESHOLD_", 65536) != 65536:
        return env
    env.update(WORKER_MALLOC_ENV)
    return env


# --------------------------------------------------------------------------- switches

def set_progress(enabled: bool) -> None:
    """Turn the stderr progress bar of :func:`compute` on or off (default on)."""
    global _progress
    if not isinstance(enabled, bool):
        raise ParameterError(f"`enabled` must be True or False (got {enabled!r})")
    _progress = enabled


def progress_enabled() -> bool:
    """Whether :func:`compute` draws a progress bar."""
    return _progress


@contextmanager
def progress_switched(enabled: bool) -> Iterator[None]:
    """The progress bar on or off inside the block, as it was after it."""
    previous = _progress
    set_progress(enabled)
    try:
        yield
    finally:
        set_progress(previous)


# --------------------------------------------------------------------------- resources

def _physical_memory() -> int:
    from distributed.system import MEMORY_LIMIT  # respects cgroup / rlimit

    return int(MEMORY_LIMIT)


def default_n_workers(memory: int | None = None, cores: int | None = None) -> int:
    """Default number of local worker processes.

    One per core (``dask.system.CPU_COUNT`` respects CPU affinity and cgroup
    quotas), but no more than physical memory allows at
    ``_COMFORT_WORKER_MEMORY`` (1 GiB) per worker, and at least one.
    """
    memory = _physical_memory() if memory is None else int(memory)
    cores = CPU_COUNT if cores is None else int(cores)
    by_memory = int(memory * _MEMORY_FRACTION // _COMFORT_WORKER_MEMORY)
    return max(1, min(cores, by_memory))


def parse_memory_limit(value: str | int | float | None, n_workers: int) -> int:
    """Per-worker memory limit in bytes.

    Parameters
    ----------
    value : str, int, float or None
        ``None`` or ``"auto"``: 80 % of physical memory divided by ``n_workers``.
        An int is bytes; a string is a size with units (``"2GB"``, ``"1.5 GiB"``);
        a float in (0, 1] is a fraction of physical memory *per worker*.
    n_workers : int
        Number of worker processes sharing the machine.

    Returns
    -------
    int
        Bytes, at least :data:`MIN_WORKER_MEMORY`.
    """
    total = _physical_memory()
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return max(MIN_WORKER_MEMORY, int(total * _MEMORY_FRACTION / n_workers))
    if isinstance(value, bool):
        raise ParameterError(f"`memory_limit` must be a size like '4GB' (got {value!r})")
    if isinstance(value, float) and 0 < value <= 1:
        nbytes = int(total * value)
    elif isinstance(value, (int, float)):
        nbytes = int(value)
    elif isinstance(value, str):
        try:
            nbytes = int(parse_bytes(value.strip()))
        except (ValueError, TypeError):
            raise ParameterError(
                f"`memory_limit` must be a size like '4GB', '1.5GiB' or 'auto' "
                f"(got {value!r})") from None
    else:
        raise ParameterError(f"`memory_limit` must be a size like '4GB' (got {value!r})")
    if nbytes < MIN_WORKER_MEMORY:
        raise ParameterError(
            f"`memory_limit` must be >= {MIN_WORKER_MEMORY // 2**20} MiB per worker "
            f"(got {value!r}); one chunk's working set needs that much")
    if nbytes * n_workers > total:
        warnings.warn(
            f"memory_limit {_fmt_bytes(nbytes)} x {n_workers} workers exceeds physical "
            f"memory {_fmt_bytes(total)}; workers may be killed by the OS",
            RuntimeWarning, stacklevel=3)
    return nbytes


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


# --------------------------------------------------------------------------- addresses

def refuse_tls_without_scheduler(address: str | None, tls_given: bool) -> None:
    """TLS certificates are for a ``tls://`` scheduler: refuse them without a scheduler
    address (``address`` as :func:`resolve_address` gives it), where a local cluster,
    which listens on 127.0.0.1 only, would ignore them."""
    if tls_given and address is None:
        raise ParameterError(
            "TLS certificates were given without a scheduler address; they are for a "
            "tls:// scheduler (--scheduler tls://HOST:PORT; a local cluster listens on "
            "127.0.0.1 only)")


def resolve_address(scheduler: str | None = None) -> str | None:
    """The scheduler address to use, or None for a new local cluster.

    Order: the ``scheduler`` argument, the ``SPEDFLOW_SCHEDULER`` environment
    variable, dask config ``scheduler-address``. A bare ``host:port`` means
    ``tcp://host:port``.
    """
    for source, value in (("scheduler", scheduler),
                          (ENV_SCHEDULER, os.environ.get(ENV_SCHEDULER)),
                          ("dask config scheduler-address",
                           dask.config.get("scheduler-address", None))):
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if not isinstance(value, str):
            raise ParameterError(f"`{source}` must be an address string (got {value!r})")
        return _normalise_address(value.strip(), source)
    return None


def _normalise_address(addr: str, source: str) -> str:
    if "://" in addr:
        scheme, rest = addr.split("://", 1)
        if scheme.lower() not in _SCHEMES:
            raise ParameterError(
                f"`{source}` has unknown protocol {scheme!r}; expected one of "
                f"{', '.join(s + '://' for s in _SCHEMES)} (got {addr!r})")
        addr = f"{scheme.lower()}://{rest}"
    else:
        rest = addr
        addr = "tcp://" + addr
    if not rest or rest.startswith(":"):
        raise ParameterError(f"`{source}` must look like tcp://HOST:PORT (got {addr!r})")
    if _scheme(addr) != "inproc":  # the network protocols: HOST:PORT, a whole-number port
        port = rest.rpartition(":")[2] if ":" in rest else ""
        if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ParameterError(f"`{source}` must look like tcp://HOST:PORT with a port number "
                                 f"from 1 to 65535 (got {addr!r})")
    return addr


def _scheme(addr: str) -> str:
    return addr.split("://", 1)[0]


def _check_file(name: str, path) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise InputError(f"`{name}` file {str(p)!r} does not exist")
    return str(p)


def _build_security(security, tls_ca_file, tls_cert, tls_key):
    """A Security from explicit files, an explicit object, or dask's config."""
    from distributed.security import Security

    files = {"tls_ca_file": _check_file("tls_ca_file", tls_ca_file),
             "tls_cert": _check_file("tls_cert", tls_cert),
             "tls_key": _check_file("tls_key", tls_key)}
    if security is not None:
        if any(v is not None for v in files.values()):
            raise ParameterError("give either `security` or the tls_* files, not both")
        if not isinstance(security, Security):
            raise ParameterError(
                f"`security` must be a distributed.security.Security "
                f"(got {type(security).__name__})")
        return security
    if any(v is not None for v in files.values()):
        if files["tls_ca_file"] is None or files["tls_cert"] is None:
            raise ParameterError(
                "TLS needs both `tls_ca_file` and `tls_cert` (and `tls_key` unless the "
                "key is in the cert file)")
        return Security(require_encryption=True,
                        tls_ca_file=files["tls_ca_file"],
                        tls_client_cert=files["tls_cert"],
                        tls_client_key=files["tls_key"])
    # Dask reads distributed.comm.tls.* and require-encryption from its config here.
    return Security()


# --------------------------------------------------------------------------- client_for

def client_for(scheduler: str | None = None, *, n_workers: int | None = None,
               threads_per_worker: int | None = None,
               memory_limit: str | int | None = None, security=None,
               tls_ca_file: str | os.PathLike | None = None,
               tls_cert: str | os.PathLike | None = None,
               tls_key: str | os.PathLike | None = None, dashboard: bool = True,
               quiet: bool = False, timeout: float = _DEFAULT_TIMEOUT):
    """A context manager yielding a :class:`distributed.Client` for the run; it closes
    the client (and any cluster it started) on exit. The arguments are checked here,
    at the call, before anything starts.

    Parameters
    ----------
    scheduler : str, optional
        Scheduler address (``tcp://host:8786``, ``tls://host:8786``, or bare
        ``host:port`` meaning tcp). If None: env ``SPEDFLOW_SCHEDULER``, then dask
        config ``scheduler-address``; if none is set, a ``LocalCluster`` is started
        with scheduler, workers and dashboard bound to 127.0.0.1 only.
    n_workers : int, optional
        Local cluster only. Default: one process per core, at most one per GiB of
        80 % of physical memory (:func:`default_n_workers`).
    threads_per_worker : int, optional
        Local cluster only. Default 1 (see the module docstring).
    memory_limit : str or int, optional
        Local cluster only: per-worker limit, e.g. ``"2GB"`` or bytes. Default 80 %
        of physical memory divided by ``n_workers``.
    security : distributed.security.Security, optional
        Ready-made TLS settings; exclusive with the ``tls_*`` files.
    tls_ca_file, tls_cert, tls_key : path, optional
        PEM files: the CA that signed the cluster's certificates, this client's
        certificate and key. Without them, a ``tls://`` address uses dask's config
        (``distributed.comm.tls.ca-file``, ``.client.cert``, ``.client.key``).
    dashboard : bool
        Local cluster only: serve the dashboard on 127.0.0.1 (port 8787 if free,
        else a random port).
    quiet : bool
        Do not print the scheduler/dashboard line to stderr.
    timeout : float
        Seconds to wait for a remote scheduler before giving up.

    Yields
    ------
    distributed.Client
        Set as the default client, so plain ``dask.compute`` uses it too.

    Raises
    ------
    InputError
        Unreachable or refusing scheduler, ``tls://`` without certificates, a
        certificate file that does not exist.
    ParameterError
        Bad address, worker counts or memory limit.
    """
    check_range("n_workers", n_workers, low=1, integer=True, allow_none=True)
    check_range("threads_per_worker", threads_per_worker, low=1, integer=True,
                allow_none=True)
    check_range("timeout", timeout, low=0, low_open=True)
    address = resolve_address(scheduler)
    sec = _build_security(security, tls_ca_file, tls_cert, tls_key)
    explicit_tls = security is not None or tls_ca_file is not None or tls_cert is not None

    if address is not None:
        local_only = {"n_workers": n_workers, "threads_per_worker": threads_per_worker,
                      "memory_limit": memory_limit}
        given = [k for k, v in local_only.items() if v is not None]
        if given:
            warnings.warn(f"{', '.join(given)} apply to a local cluster only; ignored for "
                          f"the scheduler at {address}", RuntimeWarning, stacklevel=2)
        scheme = _scheme(address)
        if scheme in ("tls", "wss"):
            if not sec.tls_ca_file or not sec.tls_client_cert:
                raise InputError(
                    f"scheduler {address} uses TLS but no client certificate was given: "
                    f"pass --tls-ca-file/--tls-cert/--tls-key (tls_ca_file=, tls_cert=, "
                    f"tls_key=) or set distributed.comm.tls.ca-file and "
                    f"distributed.comm.tls.client.cert/key in the dask config")
        elif explicit_tls:
            raise ParameterError(
                f"TLS certificates were given but the scheduler address {address} is "
                f"not tls://; use tls://{address.split('://', 1)[1]}")
        elif sec.require_encryption:
            raise InputError(
                f"dask config requires encryption (distributed.comm.require-encryption) "
                f"but the scheduler address {address} is not tls://")
        return _remote_client(address, sec, timeout, quiet)

    n = int(n_workers) if n_workers is not None else default_n_workers()
    threads = int(threads_per_worker) if threads_per_worker is not None else 1
    mem = parse_memory_limit(memory_limit, n)
    refuse_tls_without_scheduler(address, explicit_tls)
    # Another process may take port 8787 between our check and the scheduler's bind;
    # distributed then moves to a free port with a three-line warning. The line spedflow
    # prints names the port the dashboard really has, so that warning is noise. A filter
    # set here, in the caller's thread, and kept: not a `catch_warnings` block around the
    # start, which runs in a thread of its own (:func:`starting`), and those blocks are
    # not thread-safe.
    warnings.filterwarnings("ignore", message=r"Port \d+ is already in use")
    return _local_client(n, threads, mem, sec, dashboard, quiet)


def _quiet_distributed() -> None:
    """In a worker: only distributed's critical messages from now on."""
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


def _hush(client) -> None:
    """After Ctrl-C, before a local cluster closes: its workers (which ignore the
    terminal's SIGINT, :func:`spedflow._interrupt.dask_setup`) log only critical
    messages, not the heartbeats and task results the closing scheduler no longer takes.
    Best effort: whatever goes wrong, the cluster is closed next all the same."""
    try:
        client.run(_quiet_distributed)
    except BaseException:  # noqa: BLE001 - a second Ctrl-C, a closed comm: close regardless
        pass


@contextmanager
def _distributed_logs_hushed(on: list) -> Iterator[None]:
    """While a local cluster closes after Ctrl-C (``on`` non-empty), this process's
    distributed logger (the scheduler's and nannies' messages) at critical only."""
    if not on:
        yield
        return
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _remote_client(address: str, sec, timeout: float, quiet: bool) -> Iterator[Any]:
    """:func:`client_for` with a scheduler address (its arguments checked)."""
    from distributed import Client

    client = _connect(Client, address, sec, timeout)
    try:
        _prepare_workers(client)
        if not quiet:
            _announce(client, address)
        yield client
    finally:
        _release_workers(client)
        client.close()


@contextmanager
def _local_client(n: int, threads: int, mem: int, sec, dashboard: bool,
                  quiet: bool) -> Iterator[Any]:
    """:func:`client_for`'s local cluster of ``n`` workers of ``threads`` threads and
    ``mem`` bytes each (its arguments checked)."""
    from distributed import Client, LocalCluster

    kwargs: dict[str, Any] = {}
    if sec.require_encryption:
        # The dask config demands encryption: encrypt the local cluster too, with the
        # configured scheduler/worker certificates or temporary self-signed ones.
        if not (sec.tls_ca_file and sec.tls_scheduler_cert and sec.tls_worker_cert):
            from distributed.security import Security
            sec = Security.temporary()
        kwargs.update(security=sec, protocol="tls://")
    dash = _dashboard_address() if dashboard else None
    env = worker_environ() if mem >= MALLOC_MIN_WORKER_MEMORY else None
    if env is None:
        # the nanny writes its environment into this process's os.environ (which then
        # overrides the dask config), so an earlier local cluster of this process may
        # have left the allocator settings there
        for key, value in WORKER_MALLOC_ENV.items():
            if os.environ.get(key) == str(value):
                del os.environ[key]
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env} if env else {}):
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=threads, processes=True, memory_limit=mem,
            host="127.0.0.1", dashboard_address=dash, worker_dashboard_address=None,
            preload=["spedflow._interrupt"],  # workers leave the terminal's Ctrl-C to us
            **kwargs)
    hushed = []  # set on Ctrl-C: the close that follows is not reported line by line
    try:
        client = Client(cluster, security=kwargs.get("security"), set_as_default=True)
        _warm_up(client)
        try:
            if not quiet:
                _announce(client, cluster.scheduler_address,
                          extra=f"{n} worker{'s' if n != 1 else ''} x {threads} "
                                f"thread{'s' if threads != 1 else ''}, "
                                f"{_fmt_bytes(mem)} each")
            yield client
        except KeyboardInterrupt:
            hushed.append(True)
            _hush(client)  # its workers, stopped mid-task, report every broken comm
            raise
        finally:
            client.close()
    finally:
        with _distributed_logs_hushed(hushed):
            cluster.close()


#: The start of the run's cluster while the client does its first work
#: (:func:`starting`), or None; the thread it runs in.
_starting = None
_START_THREAD = "spedflow-cluster-start"


@contextmanager
def starting(context) -> Iterator[None]:
    """Enter ``context`` (a :func:`client_for`) in a thread while the body runs, and
    exit it after the body, as ``with context:`` would.

    Starting a local cluster takes ~2 s (processes, imports) that the client used to
    wait out before the stages measured on a sample of the data (the bad pixels, the
    beam radius, the detector's noise), which need no cluster and take ~1-2 s. Every
    dask call made through this module waits for the start first (:func:`ready`), and
    the workflows call it before their first pass, so nothing big runs in the client.
    The start's error (an unreachable scheduler) is raised by the first call that
    waits; an error of the body is raised as it is, after the cluster is closed. One
    run at a time per process (the start is module state, as dask's default client is).
    """
    from concurrent.futures import ThreadPoolExecutor

    global _starting
    pool = ThreadPoolExecutor(1, thread_name_prefix=_START_THREAD)
    entered = pool.submit(context.__enter__)
    pool.shutdown(wait=False)
    _starting = entered
    try:
        yield
    except BaseException:
        _starting = None
        _exit_after_start(context, entered, sys.exc_info())  # the body's error is the one raised
        raise
    _starting = None
    error = _exit_after_start(context, entered, (None, None, None))
    if error is not None:  # the body needed no cluster, and the start failed
        raise error


def _exit_after_start(context, entered, exc_info) -> BaseException | None:
    """Exit ``context`` once :func:`starting` has entered it (waiting for that) with
    ``exc_info``; return the start's own error instead, if it failed (nothing to exit).
    If the wait is interrupted (Ctrl-C), the start's thread exits it when it is done."""
    try:
        error = entered.exception()  # waits; the start's error, not raised
    except BaseException:
        closed = threading.Event()

        def exit_later(done):
            try:
                if not done.cancelled() and done.exception() is None:
                    context.__exit__(None, None, None)
            finally:
                closed.set()
        _closing.append(closed)
        entered.add_done_callback(exit_later)
        raise
    if error is None:
        context.__exit__(*exc_info)
    return error


#: Clusters whose interrupted start closes them once they are up (events set when closed).
_closing: list[threading.Event] = []


def wait_for_closing(timeout: float = 30.0) -> None:
    """Wait, at most ``timeout`` s, for the clusters a start interrupted by Ctrl-C is
    still to close (:func:`starting`): the command ends its process at once after an
    interrupt (:func:`spedflow._interrupt.exit_now`), which would otherwise cut that
    close short (the workers end with their nannies anyway, but Python's resource
    tracker then reports the cluster's semaphores as leaked)."""
    deadline = time.monotonic() + timeout
    for closed in list(_closing):
        closed.wait(max(0.0, deadline - time.monotonic()))


def ready() -> None:
    """Wait for the cluster :func:`starting` is bringing up (raising its start's error);
    nothing to do otherwise."""
    entered = _starting
    # (not from the starting thread itself, which would wait for its own end)
    if entered is not None and not threading.current_thread().name.startswith(_START_THREAD):
        entered.result()


#: Modules the workflows' tasks import: fresh local workers load them while the client
#: plans the run, instead of in their first tasks (~1 s per worker).
_WORKER_MODULES = ("zarr", "spedflow.workflows._cache", "spedflow.preprocess.kernels",
                   "spedflow.peaks.kernels", "spedflow.peaks.vectors", "spedflow.vdf.kernels",
                   "spedflow.segment")


def _import_modules(names) -> None:
    import importlib

    for name in names:
        importlib.import_module(name)


class _UserErrorFilter(logging.Filter):
    """Drops a worker's "Compute Failed" log record (the task, exception and traceback,
    ~15 lines on stderr) when the exception is one of spedflow's own errors: those are
    the user's mistakes (NaN in the data, say), which the client reports in one line.
    Any other failure is still logged in full."""

    def filter(self, record: logging.LogRecord) -> bool:
        from .errors import SpedflowError
        if not str(record.msg).startswith("Compute Failed") or len(record.args or ()) < 4:
            return True
        text = str(record.args[3])
        names, todo = set(), [SpedflowError]
        while todo:
            cls = todo.pop()
            names.add(cls.__name__)
            todo.extend(cls.__subclasses__())
        return not any(text.startswith(name + "(") for name in names)


def _quiet_user_errors() -> None:
    """Install :class:`_UserErrorFilter` on this (worker) process's worker logger."""
    logger = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _UserErrorFilter) for f in logger.filters):
        logger.addFilter(_UserErrorFilter())


def _one_blas_thread():
    """Pin this process's BLAS (OpenBLAS, MKL) to one thread, as in-process runs are
    (:func:`spedflow.api.segment`): a worker runs one task per core already, and a
    matrix product split over threads sums in another order (VDF images differing in
    the last bit from an in-process run's, on OpenBLAS 0.3.31 with a bare ``dask
    worker``, which does not set ``OPENBLAS_NUM_THREADS``). Returns the limiter, whose
    ``restore_original_limits()`` undoes it."""
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=1, user_api="blas")


#: Name of :func:`_worker_plugin` on a cluster.
WORKER_PLUGIN = "spedflow-worker"


def _worker_plugin():
    """A :class:`distributed.WorkerPlugin` that sets up every worker of a run, those
    that join later included: :func:`_one_blas_thread` (undone when it is removed:
    :func:`_release_workers`) and :func:`_quiet_user_errors`."""
    from distributed import WorkerPlugin

    class SpedflowWorker(WorkerPlugin):
        name = WORKER_PLUGIN

        def setup(self, worker):
            self._limits = _one_blas_thread()
            _quiet_user_errors()

        def teardown(self, worker):
            limits = getattr(self, "_limits", None)
            if limits is not None:
                limits.restore_original_limits()

    return SpedflowWorker()


def _prepare_workers(client) -> None:
    """Register :func:`_worker_plugin` on the cluster (replacing an earlier run's)."""
    client.register_plugin(_worker_plugin())


@contextmanager
def given_client(client):
    """A client the caller made (``spedflow.segment(client=...)``), its workers set up
    by :func:`_worker_plugin` for the run and released after it; if it has no workers
    (a client of the synchronous or threaded scheduler), as it is."""
    distributed_client = hasattr(client, "register_plugin")
    if distributed_client:
        _prepare_workers(client)
    try:
        yield client
    finally:
        if distributed_client:
            _release_workers(client)


def _release_workers(client) -> None:
    """Remove :func:`_worker_plugin` from a cluster spedflow does not own (a scheduler
    it connected to, a client it was given): its workers' BLAS threads are theirs again.
    A cluster already gone is left as it is."""
    try:
        client.unregister_worker_plugin(WORKER_PLUGIN)
    except Exception as exc:  # the scheduler or the connection went first
        logging.getLogger("spedflow").debug("worker plugin not removed: %s", exc)


def scheduler_workers(client) -> dict:
    """The scheduler's workers now, ``{address: info}``, asked of the scheduler itself.

    ``Client.scheduler_info()`` returns the client's cached copy when its query fails
    (an ``OSError``, logged at debug level), and the copy the client's periodic refresh
    keeps lists no workers: a passing network hiccup would read as "no workers" (a
    run's memory budget taken from the client's machine, its warm-up skipped; seen
    once in a test under load). Asked directly, a failure raises instead.
    """
    info = client.sync(client.scheduler.identity, n_workers=-1)
    return dict(info.get("workers", {}))


def _warm_up(client) -> None:
    """One import task per worker, not waited for; then each loads the compiled kernels
    (:func:`spedflow._jit.warm_up`: ~0.5 s per process from numba's cache, ~10 s of
    compiling on a machine's first run). Each is also set up by :func:`_worker_plugin`
    (one BLAS thread; spedflow's own errors not logged in full)."""
    from distributed import fire_and_forget

    from ._jit import warm_up
    _prepare_workers(client)
    try:
        workers = scheduler_workers(client)
    except Exception as exc:  # a hiccup: the workers then load the kernels in their first tasks
        logging.getLogger("spedflow").debug("workers not warmed up: %s", exc)
        return
    for addr in workers:
        fire_and_forget(client.submit(_import_modules, _WORKER_MODULES, workers=[addr],
                                      allow_other_workers=False, pure=False))
        fire_and_forget(client.submit(warm_up, workers=[addr], allow_other_workers=False,
                                      pure=False))


def _connect(Client, address: str, sec, timeout: float):
    try:
        return Client(address, security=sec, timeout=timeout, set_as_default=True)
    except (OSError, TimeoutError) as exc:
        hint = ("check that the certificates are signed by the cluster's CA and that "
                "the scheduler runs with TLS" if _scheme(address) in ("tls", "wss") else
                "start one with `dask scheduler`, check host/port/firewall, or omit the "
                "address to run on a local cluster")
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot connect to the dask scheduler at {address} "
                         f"(timeout {timeout:g} s: {cause}); {hint}") from None


def _dashboard_address() -> str:
    """127.0.0.1:8787 if that port is free, else a random free port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", _DASHBOARD_PORT))
        except OSError:
            return "127.0.0.1:0"
    return f"127.0.0.1:{_DASHBOARD_PORT}"


def _announce(client, address: str, extra: str = "") -> None:
    parts = [f"spedflow: dask scheduler {address}", _dashboard_text(client)]
    if extra:
        parts.append(extra)
    print(", ".join(parts), file=sys.stderr, flush=True)


def _dashboard_text(client) -> str:
    try:
        served = bool(client.scheduler_info().get("services", {}).get("dashboard"))
    except Exception:  # pragma: no cover - info is best effort
        served = False
    if not served:
        return "no dashboard"
    text = f"dashboard {client.dashboard_link}"
    try:
        import bokeh  # noqa: F401  (the dashboard pages need it)
    except ImportError:
        text += " (pip install bokeh to see its pages)"
    return text


# --------------------------------------------------------------------------- local

@contextmanager
def local_scheduler(n_threads: int | None = None) -> Iterator[None]:
    """Use dask's threaded scheduler with at most ``n_threads`` threads.

    Overrides any default distributed client inside the block. Default: the
    number of cores (``dask.system.CPU_COUNT``).
    """
    check_range("n_threads", n_threads, low=1, integer=True, allow_none=True)
    n = int(n_threads) if n_threads is not None else CPU_COUNT
    with dask.config.set(scheduler="threads", num_workers=n):
        yield


# --------------------------------------------------------------------------- progress

def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class _ProgressLine:
    """Draws ``label: [#####     ] 45% 1234 patterns/s ETA 12s`` on a stream.

    On a terminal the line is redrawn in place (at most every ``min_interval`` s);
    elsewhere (CI logs, captured stderr) a new line is written at each 10 % step,
    so logs stay short.
    """

    def __init__(self, label: str, n_patterns: int | None, stream=None, width: int = 30,
                 min_interval: float = 0.1):
        self.label = label
        self.n_patterns = n_patterns
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.min_interval = min_interval
        self.start = time.perf_counter()
        self._last_draw = -math.inf
        self._last_decile = -1
        self._last = (0, 0)
        self.finished = False
        self._lock = threading.Lock()
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False

    def format(self, done: int, total: int, elapsed: float) -> str:
        frac = min(1.0, done / total) if total else 1.0
        bar = "#" * int(self.width * frac)
        if self.n_patterns is not None:
            rate, unit = self.n_patterns * frac / elapsed if elapsed > 0 else 0.0, "patterns"
        else:
            rate, unit = done / elapsed if elapsed > 0 else 0.0, "tasks"
        if frac >= 1:
            tail = f"in {_fmt_duration(elapsed)}"
        else:
            eta = elapsed * (1 - frac) / frac if frac > 0 else math.inf
            tail = f"ETA {_fmt_duration(eta)}"
        return (f"{self.label}: [{bar:<{self.width}}] {int(100 * frac):3d}% "
                f"{rate:.0f} {unit}/s {tail}")

    def update(self, done: int, total: int) -> None:
        now = time.perf_counter()
        with self._lock:
            if self.finished:
                return
            self._last = (done, total)
            if self.tty:
                if now - self._last_draw < self.min_interval:
                    return
                self._write("\r" + self.format(done, total, now - self.start))
            else:
                decile = int(10 * done / total) if total else 10
                if decile <= max(self._last_decile, 0) or decile >= 10:  # no "0 %" line
                    return
                self._write(self.format(done, total, now - self.start) + "\n")
                self._last_decile = decile
            self._last_draw = now

    def finish(self, done: int | None = None, total: int | None = None,
               ok: bool = True) -> None:
        """Write the final line once (later calls do nothing); counts default to
        the last update's. A bar that did not finish ends "FAILED", or "interrupted"
        when it is called while a Ctrl-C unwinds the computation."""
        with self._lock:
            if self.finished:
                return
            self.finished = True
            if done is None or total is None:
                done, total = self._last if self._last[1] else (1, 1)
            line = self.format(done, total, time.perf_counter() - self.start)
            if not ok:
                stopped = isinstance(sys.exc_info()[1], KeyboardInterrupt)
                line += " interrupted" if stopped else " FAILED"
            self._write(("\r" if self.tty else "") + line + "\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (ValueError, OSError):  # closed stream: progress is best effort
            pass


class _LocalProgress(Callback):
    """Progress of dask's local (threaded/synchronous/processes) schedulers."""

    def __init__(self, line: _ProgressLine, interval: float = 0.1):
        super().__init__()
        self.line = line
        self.interval = interval
        self._state = None
        self._running = False
        self._thread: threading.Thread | None = None

    def _counts(self):
        s = self._state
        if not s:
            return 0, 0
        total = sum(len(s[k]) for k in ("ready", "waiting", "running", "finished"))
        return len(s["finished"]), total

    def _start_state(self, dsk, state):
        self._state = state
        self._running = True
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()

    def _tick(self):
        while self._running:
            self.line.update(*self._counts())
            time.sleep(self.interval)

    def _finish(self, dsk, state, errored):
        self._running = False
        if self._thread is not None:
            self._thread.join()
        done, total = self._counts()
        self.line.finish(done if errored else total, total, ok=not errored)


def _distributed_bar_class():
    from distributed.diagnostics.progressbar import ProgressBar

    class _DistributedProgress(ProgressBar):
        """Progress of futures on a distributed scheduler (its ``Progress`` plugin)."""

        def __init__(self, futures, line: _ProgressLine, address: str):
            super().__init__(futures, scheduler=address, interval="100ms", complete=True)
            self.line = line
            self.ok = True

        def _draw_bar(self, remaining, all, **kwargs):
            self.line.update(all - remaining, all)

        def _draw_stop(self, remaining, all, status, **kwargs):
            self.ok = status != "error"
            self.line.finish(all - remaining, all, ok=self.ok)

    return _DistributedProgress


def _pick_client(client, kwargs):
    """The distributed Client dask would use for this call, or None for local (once
    the run's cluster has started: :func:`ready`)."""
    ready()
    if client is not None:
        return client
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    sched = kwargs.get("scheduler")
    if isinstance(sched, Client):
        return sched
    try:
        get = dask.base.get_scheduler(scheduler=sched)
    except (ValueError, RuntimeError):
        return None
    owner = getattr(get, "__self__", None)
    return owner if isinstance(owner, Client) else None


def scattered(values: list, *, broadcast: bool = False) -> list | None:
    """``values`` sent to the workers of the client dask would use now, as futures to
    put in a graph in their place (arrays the client makes between passes: inside the
    graph they are shipped with it, and distributed warns of a large graph); None
    without a distributed client (in-process, where the graph holds them at no cost)."""
    cl = _pick_client(None, {})
    if cl is None:
        return None
    return cl.scatter(values, broadcast=broadcast, hash=False)


def _check_label(label, n_patterns):
    if not isinstance(label, str) or not label:
        raise ParameterError(f"`label` must be a non-empty string (got {label!r})")
    check_range("n_patterns", n_patterns, low=0, integer=True, allow_none=True)


def compute(*collections, label: str, n_patterns: int | None = None, client=None,
            **kwargs) -> tuple:
    """Compute dask collections like :func:`dask.compute`, with a progress bar.

    Parameters
    ----------
    *collections : dask collections (or plain values, returned unchanged)
    label : str
        Stage name shown in front of the bar.
    n_patterns : int, optional
        Number of diffraction patterns the computation covers; the bar then shows
        patterns/s (assuming tasks take equal shares), otherwise tasks/s.
    client : distributed.Client, optional
        Run on this client. Default: whatever :func:`dask.compute` would use (the
        default client inside :func:`client_for`, else the local scheduler).
    **kwargs
        Passed to ``client.compute`` or ``dask.compute`` (e.g. ``scheduler=``,
        ``optimize_graph=``).

    Returns
    -------
    tuple
        One result per positional argument, as :func:`dask.compute`.
    """
    _check_label(label, n_patterns)
    cl = _pick_client(client, kwargs)
    if cl is None:
        if not _progress:
            return dask.compute(*collections, **kwargs)
        with _LocalProgress(_ProgressLine(label, n_patterns)):
            return dask.compute(*collections, **kwargs)
    kwargs.pop("scheduler", None)
    idx = [i for i, c in enumerate(collections) if dask.is_dask_collection(c)]
    if not idx:
        return tuple(collections)
    # arrays come back chunk by chunk and are assembled here: client.compute of an array
    # concatenates it in one task on a worker, which needs the whole result (twice) in
    # that worker's memory (a 512 x 512 scan's VDF labels: 215 MB on a 1 GB worker)
    targets, spans = [], []
    for i in idx:
        c = collections[i]
        if _is_chunked_array(c):
            parts = c.to_delayed().ravel().tolist()
            spans.append((i, len(targets), len(parts)))
            targets.extend(parts)
        else:
            spans.append((i, len(targets), None))
            targets.append(c)
    futures = cl.compute(targets, **kwargs)
    out = list(collections)
    try:
        if _progress:
            _follow(cl, futures, label, n_patterns)
        else:
            wait_for(cl, futures)
        # chunk by chunk into one preallocated array, each chunk's future released once
        # copied: the client then holds the result once (np.block of the gathered
        # chunks held it three times), and the workers drop their chunks as it fills
        whole = [(i, start) for i, start, n in spans if n is None]
        for (i, _), value in zip(whole, cl.gather([futures[start] for _, start in whole])):
            out[i] = value
        for i, start, n in spans:
            if n is not None:
                out[i] = _assemble(collections[i], futures[start:start + n])
    finally:
        for f in futures:
            f.release()
    return tuple(out)


def store(source, target, *, label: str, n_patterns: int | None = None, client=None) -> None:
    """Write dask array ``source`` into ``target`` (a zarr array of the same shape), each
    chunk by the task that computes it, with a progress bar; nothing comes back to the
    client.

    ``da.store(..., compute=False)`` returns an array whose chunks, computed one by one
    (as :func:`compute` does), carry the stored data back: a whole data set in the client.

    ``target``'s chunks must tile ``source``'s (every chunk boundary of ``source`` on a
    chunk boundary of ``target``), so that no two tasks write into one stored chunk.
    """
    _check_label(label, n_patterns)
    if tuple(source.shape) != tuple(target.shape):
        raise InputError(f"cannot store an array of shape {tuple(source.shape)} into one of "
                         f"shape {tuple(target.shape)}")
    for d, (c, step) in enumerate(zip(source.chunks, target.chunks)):
        if np.any(np.cumsum(c)[:-1] % step):
            raise InputError(f"chunks {c} along axis {d} do not tile the target's chunks of "
                             f"{step}: tasks would write into one stored chunk")
    if source.size == 0:
        return
    # one 1-element mark per chunk: the write is part of the task that makes the chunk
    # (dask fuses it with the chunk's blockwise producers), so no chunk waits in a
    # worker's memory for a separate store task
    marks = source.map_blocks(_store_chunk, target=target, dtype=np.int8,
                              chunks=tuple((1,) * len(c) for c in source.chunks),
                              meta=np.empty((0,) * source.ndim, np.int8))
    compute(marks, label=label, n_patterns=n_patterns, client=client)


def _store_chunk(block, target=None, block_info=None):
    target[tuple(slice(a, b) for a, b in block_info[0]["array-location"])] = block
    return np.ones((1,) * block.ndim, np.int8)


def _is_chunked_array(c) -> bool:
    import dask.array as da
    return isinstance(c, da.Array) and c.ndim > 0 and c.npartitions > 1


def _assemble(arr, futures, batch_bytes: int = 32 * 2**20):
    """The numpy array of dask array ``arr`` from the futures of its chunks (C order),
    gathered ~``batch_bytes`` at a time into one preallocated array."""
    client = futures[0].client
    offsets = [np.cumsum((0,) + tuple(c[:-1])) for c in arr.chunks]
    where = [tuple(slice(int(o[p]), int(o[p]) + int(c[p])) for o, c, p in zip(offsets, arr.chunks, pos))
             for pos in np.ndindex(*arr.numblocks)]
    per_chunk = max(1, arr.nbytes // max(1, len(futures)))
    step = max(1, batch_bytes // per_chunk)
    out = None
    for s in range(0, len(futures), step):
        batch = futures[s:s + step]
        parts = client.gather(batch)
        for f in batch:
            f.release()
        for k, part in enumerate(parts):
            part = np.asarray(part)
            if out is None:
                out = np.empty(arr.shape, dtype=part.dtype)
            out[where[s + k]] = part
        del parts
    return out


def persist_with_progress(*collections, label: str, n_patterns: int | None = None,
                          client=None, **kwargs) -> tuple:
    """Persist dask collections like :func:`dask.persist`, with a progress bar.

    Returns the persisted collections once all their chunks are in (distributed
    or local) memory; arguments as :func:`compute`.
    """
    _check_label(label, n_patterns)
    cl = _pick_client(client, kwargs)
    if cl is None:
        if not _progress:
            return dask.persist(*collections, **kwargs)
        with _LocalProgress(_ProgressLine(label, n_patterns)):
            return dask.persist(*collections, **kwargs)
    from distributed import futures_of

    kwargs.pop("scheduler", None)
    persisted = cl.persist(list(collections), **kwargs)
    futures = futures_of(persisted)
    if _progress and futures:
        _follow(cl, futures, label, n_patterns)
    wait_for(cl, futures)
    bad = [f for f in futures if f.status == "error"]
    if bad:
        bad[0].result()  # raises the task's exception
    return tuple(persisted)


#: Seconds a run waits while its cluster has no worker at all before it gives up.
NO_WORKERS_TIMEOUT = 120.0
#: Seconds a cluster whose workers are all paused (at dask's pause threshold, 80 % of
#: their memory limit) may go without finishing a task before the run fails. A worker
#: that cannot get below the threshold (memory it does not manage: a leak, a heap kept
#: by the allocator) stays paused for good, and the run would wait forever.
PAUSED_TIMEOUT = 300.0


def wait_for(client, futures, *, no_workers_timeout: float | None = None,
             paused_timeout: float | None = None, poll: float = 5.0) -> None:
    """Wait for ``futures``; fail when the cluster cannot make progress for a while.

    A scheduler whose workers all died (killed, out of memory, lost nodes) and were not
    replaced, or whose workers are all paused at their memory limit with no task
    finishing, would otherwise leave the client waiting forever. Raises
    :class:`~spedflow.errors.ClusterError` with what was seen and what to do.
    """
    from distributed import wait

    limit = NO_WORKERS_TIMEOUT if no_workers_timeout is None else no_workers_timeout
    plimit = PAUSED_TIMEOUT if paused_timeout is None else paused_timeout
    empty_since = paused_since = unreachable_since = None
    done_before = -1
    while True:
        try:
            wait(futures, timeout=poll)
            return
        except TimeoutError:
            pass
        now = time.monotonic()
        try:
            workers = scheduler_workers(client)
        except Exception:  # the scheduler unreachable: for a moment, or gone
            unreachable_since = unreachable_since or now
            if now - unreachable_since > limit:  # pragma: no cover - let gather raise
                return
            continue
        unreachable_since = None
        if workers:
            empty_since = None
            done = sum(f.done() for f in futures)
            if done == done_before and all(w.get("status") == "paused" for w in workers.values()):
                paused_since = paused_since or now
                if now - paused_since > plimit:
                    raise ClusterError(
                        f"all {len(workers)} dask workers have been paused at their memory limit "
                        f"for {plimit:.0f} s with no task finishing; give them more memory "
                        "(--memory-limit) or fewer patterns per chunk (finished stages are kept)")
            else:
                paused_since = None
            done_before = done
            continue
        empty_since = empty_since or now
        if now - empty_since > limit:
            raise ClusterError(f"the dask cluster at {client.scheduler.address} has had no workers "
                               f"for {limit:.0f} s; start workers or rerun (finished stages are kept)")


def _follow(client, futures, label, n_patterns) -> None:
    """Block until ``futures`` finish, drawing the bar from the scheduler's feed.

    The feed (distributed's ``Progress`` plugin) runs on the client's event loop;
    completion is decided by waiting on the futures themselves, because the feed
    never reports a task that failed before it was set up.
    """
    import asyncio

    line = _ProgressLine(label, n_patterns)
    bar = _distributed_bar_class()(futures, line, client.scheduler.address)
    listener = asyncio.run_coroutine_threadsafe(bar.listen(), client.loop.asyncio_loop)
    ok = False
    try:
        wait_for(client, futures)
        ok = all(f.status == "finished" for f in futures)
        if ok:  # let the feed deliver its last (100 %) message
            try:
                listener.result(timeout=2.0)
            except Exception:
                pass
    finally:
        if not listener.done():
            listener.cancel()
            comm = getattr(bar, "comm", None)
            if comm is not None:
                client.loop.add_callback(comm.abort)
        line.finish(ok=ok)  # no-op if the feed already drew the final line


#: Resident memory of a worker process before it holds any data (the scientific stack
#: imported); a budget for data only counts what is above it.
WORKER_BASELINE = 400 * 2**20


def worker_memory() -> tuple[int, int]:
    """``(total, smallest)`` memory available for data on the workers, in bytes.

    Summed and smallest per-worker memory limits above :data:`WORKER_BASELINE` for the
    current distributed client; the memory available to this process (both) when dask
    runs locally.
    """
    client = _pick_client(None, {})
    if client is not None:
        try:
            limits = [int(w.get("memory_limit") or 0)
                      for w in scheduler_workers(client).values()]
        except Exception:  # pragma: no cover - scheduler went away
            return 0, 0
        limits = [max(0, lim - WORKER_BASELINE) for lim in limits if lim > 0]
        if limits:
            return sum(limits), min(limits)
    import psutil
    avail = int(psutil.virtual_memory().available)
    return avail, avail


def memory_budget(fraction: float = 0.25) -> int:
    """Bytes an intermediate may occupy in memory where the computation runs:
    ``fraction`` of :func:`worker_memory`'s total. The workflows hold a product in
    memory (instead of re-reading it from disk on every pass) only when it fits."""
    check_range("fraction", fraction, low=0, high=1, low_open=True)
    return int(fraction * worker_memory()[0])
