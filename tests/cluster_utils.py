"""Start real ``dask scheduler`` / ``dask worker`` processes on 127.0.0.1 for tests.

Usage (any test module; ``tests/`` is on ``sys.path`` under pytest)::

    from cluster_utils import ProcessCluster

    @pytest.fixture(scope="module")
    def dask_processes(tmp_path_factory):
        with ProcessCluster(n_workers=2, workdir=tmp_path_factory.mktemp("dask")) as pc:
            yield pc            # pc.address == "tcp://127.0.0.1:PORT"

Robustness:

* no port guessing: the scheduler binds port 0 and reports its address through
  ``--scheduler-file``; workers bind random ports on 127.0.0.1;
* readiness is waited for (scheduler file written, each worker's "Registered to"
  log line), with a deadline; a process that dies early raises at once with the
  tail of its log;
* every process runs in its own session/process group with stdin closed and output
  to a log file (no TTY needed); teardown sends SIGTERM to that group, then SIGKILL
  after a grace period, so nanny children go too. A ``weakref.finalize`` does the
  same if a test forgets to stop the cluster.
* the child environment drops ``SPEDFLOW_SCHEDULER`` / ``DASK_SCHEDULER_ADDRESS``
  so a developer's settings cannot redirect the test cluster, and puts ``tests/``
  on ``PYTHONPATH`` so functions defined in test modules can run on the workers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

__all__ = ["free_port", "TLSFiles", "DaskProcess", "start_scheduler", "start_worker",
           "ProcessCluster", "child_env", "start_cli", "wait_exit"]

_DROP_ENV = ("SPEDFLOW_SCHEDULER", "DASK_SCHEDULER_ADDRESS", "DASK_SCHEDULER-ADDRESS")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for "nothing listens here" tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of one role: the CA to trust, this process' certificate and key."""

    ca_file: str
    cert: str
    key: str

    def cli_args(self) -> list[str]:
        return ["--tls-ca-file", str(self.ca_file), "--tls-cert", str(self.cert),
                "--tls-key", str(self.key)]


def _kill_group(pid: int, grace: float, reap=None) -> None:
    """SIGTERM the process group led by ``pid``, SIGKILL it after ``grace`` s.

    ``reap`` (e.g. ``Popen.poll``) collects the leader once it exits: an unreaped
    zombie would still count as a member of the group.
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if reap is not None:
                reap()
            try:
                os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.02)


def _die_with_parent() -> None:
    """In the child (Linux): SIGKILL when the test process dies, however it dies (a
    killed or timed-out pytest runs no teardown), so no scheduler or worker outlives
    the run."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: teardown still kills the group
        pass


def child_start() -> None:
    """In the child, before it runs: die with the parent (:func:`_die_with_parent`), and
    take Ctrl-C (SIGINT) as from a terminal. A pytest started in the background of a
    non-interactive shell (``cmd &`` in a script) has SIGINT ignored, and children
    inherit that: a run sent Ctrl-C by a test then went on to finish (exit 0)."""
    import signal
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class DaskProcess:
    """One child process (own process group), its log file and its teardown."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str]):
        self.name = name
        self.cmd = cmd
        self.log_path = Path(log_path)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True, close_fds=True, preexec_fn=child_start)
        self._finalizer = weakref.finalize(self, _kill_group, self.proc.pid, 0.5,
                                          self.proc.poll)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 25) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}; "
                               f"log {self.log_path}:\n{self.log_tail()}")

    def terminate(self) -> None:
        """Send SIGTERM to the process group without waiting (see :meth:`stop`)."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float = 5.0) -> None:
        """Terminate the whole process group (SIGTERM, then SIGKILL) and reap it."""
        self._finalizer.detach()
        _kill_group(self.proc.pid, grace, self.proc.poll)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:  # pragma: no cover - group was SIGKILLed
            self.proc.kill()
            self.proc.wait()
        self._log.close()


_TESTS_DIR = str(Path(__file__).resolve().parent)


def _child_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    # Functions defined in test modules are pickled by reference (module name):
    # workers must be able to import them, as the pytest process can.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment test children get: no scheduler redirection, tests/ importable."""
    return _child_env(extra)


def start_cli(args: list[str], log_path: str | os.PathLike,
              env: dict[str, str] | None = None) -> DaskProcess:
    """Start ``python -m spedflow ARGS`` in its own process group, output to ``log_path``.

    Returns at once; see :func:`wait_exit`. Signals can be sent to ``proc.pid``
    (e.g. SIGINT for a Ctrl-C); teardown happens as for dask processes.
    """
    return DaskProcess("spedflow " + " ".join(map(str, args[:1])),
                       [sys.executable, "-m", "spedflow", *map(str, args)], Path(log_path),
                       _child_env(env))


def wait_exit(proc: DaskProcess, timeout: float = 120.0) -> int:
    """Wait for ``proc`` to exit and return its code; on timeout kill it and raise."""
    try:
        code = proc.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.stop(grace=1.0)
        raise TimeoutError(f"{proc.name} still running after {timeout:g} s; log "
                           f"{proc.log_path}:\n{proc.log_tail()}") from None
    proc.stop(grace=1.0)  # reap any children, close the log
    return code

def _wait(predicate, proc: DaskProcess, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        proc.check_alive()
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout:g} s; log {proc.log_path}:\n"
                       f"{proc.log_tail()}")


def start_scheduler(workdir: str | os.PathLike, *, protocol: str = "tcp",
                    tls: TLSFiles | None = None, dashboard: bool = False,
                    env: dict[str, str] | None = None,
                    timeout: float = 30.0) -> tuple[DaskProcess, str]:
    """Start ``dask scheduler`` on 127.0.0.1, a random port; return (process, address)."""
    workdir = Path(workdir)
    sched_file = workdir / "scheduler.json"
    sched_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "distributed.cli.dask_scheduler",
           "--host", "127.0.0.1", "--port", "0", "--protocol", protocol,
           "--scheduler-file", str(sched_file)]
    # The HTTP server (/health, /metrics) runs even with --no-dashboard: keep it on
    # 127.0.0.1 and a random port so parallel test clusters never collide on 8787.
    cmd += ["--dashboard-address", "127.0.0.1:0",
            "--dashboard" if dashboard else "--no-dashboard"]
    if tls is not None:
        cmd += tls.cli_args()
    proc = DaskProcess("dask scheduler", cmd, workdir / "scheduler.log", _child_env(env))

    def address():
        try:
            return json.loads(sched_file.read_text())["address"]
        except (OSError, ValueError, KeyError):
            return None

    try:
        addr = _wait(address, proc, timeout, "dask scheduler")
    except BaseException:
        proc.stop(grace=1.0)
        raise
    return proc, addr


def start_worker(address: str, workdir: str | os.PathLike, *, name: str,
                 nthreads: int = 1, memory_limit: str = "1GB", nanny: bool = True,
                 tls: TLSFiles | None = None, env: dict[str, str] | None = None,
                 wait: bool = True, timeout: float = 30.0) -> DaskProcess:
    """Start ``dask worker`` on 127.0.0.1 and (by default) wait until it registered."""
    workdir = Path(workdir)
    local_dir = workdir / name
    local_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "distributed.cli.dask_worker", address,
           "--host", "127.0.0.1", "--nthreads", str(nthreads),
           "--memory-limit", str(memory_limit), "--name", name, "--no-dashboard",
           "--local-directory", str(local_dir), "--nanny" if nanny else "--no-nanny"]
    if tls is not None:
        cmd += tls.cli_args()
    proc = DaskProcess(f"dask worker {name}", cmd, workdir / f"{name}.log",
                       _child_env(env))
    if wait:
        wait_registered(proc, timeout)
    return proc


def wait_registered(proc: DaskProcess, timeout: float = 30.0) -> None:
    """Block until the worker's log says it registered with the scheduler."""
    try:
        _wait(lambda: "Registered to:" in proc.log(), proc, timeout, proc.name)
    except BaseException:
        proc.stop(grace=1.0)
        raise


class ProcessCluster:
    """A scheduler and ``n_workers`` worker processes on 127.0.0.1 (context manager).

    Parameters
    ----------
    n_workers : int
        Worker processes (each ``nthreads`` threads, ``memory_limit``).
    workdir : path, optional
        Logs, scheduler file and worker spill directories; a temporary directory
        (removed on stop) if not given.
    protocol : {"tcp", "tls"}
    scheduler_tls, worker_tls : TLSFiles, optional
        Certificates passed on the command line (``--tls-*``).
    scheduler_env, worker_env : dict, optional
        Extra environment, e.g. ``DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True``
        or ``DASK_CONFIG=<dir with a YAML>``.
    nanny : bool
        Run workers under a nanny, as in production (restarts, memory limit
        enforcement). Off by default: start and graceful stop take ~1 s more each.
    """

    def __init__(self, n_workers: int = 2, *, workdir=None, protocol: str = "tcp",
                 scheduler_tls: TLSFiles | None = None, worker_tls: TLSFiles | None = None,
                 scheduler_env: dict[str, str] | None = None,
                 worker_env: dict[str, str] | None = None, nthreads: int = 1,
                 memory_limit: str = "1GB", nanny: bool = False, timeout: float = 30.0):
        self.n_workers = n_workers
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="spedflow-dask-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.protocol = protocol
        self.scheduler_tls, self.worker_tls = scheduler_tls, worker_tls
        self.scheduler_env, self.worker_env = scheduler_env, worker_env
        self.nthreads, self.memory_limit, self.nanny = nthreads, memory_limit, nanny
        self.timeout = timeout
        self.scheduler: DaskProcess | None = None
        self.workers: list[DaskProcess] = []
        self.address: str | None = None

    def start(self) -> "ProcessCluster":
        try:
            self.scheduler, self.address = start_scheduler(
                self.workdir, protocol=self.protocol, tls=self.scheduler_tls,
                env=self.scheduler_env, timeout=self.timeout)
            # Start all workers first, then wait: they boot in parallel.
            self.workers = [
                start_worker(self.address, self.workdir, name=f"worker-{i}",
                             nthreads=self.nthreads, memory_limit=self.memory_limit,
                             nanny=self.nanny, tls=self.worker_tls, env=self.worker_env,
                             wait=False, timeout=self.timeout)
                for i in range(self.n_workers)]
            for w in self.workers:
                wait_registered(w, self.timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def logs(self) -> str:
        procs = ([self.scheduler] if self.scheduler else []) + self.workers
        return "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in procs)

    def stop(self) -> None:
        for w in self.workers:  # all shut down in parallel, then reaped one by one
            w.terminate()
        for w in self.workers:
            w.stop()
        self.workers = []
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "ProcessCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
