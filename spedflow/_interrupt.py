"""Ctrl-C while the ``spedflow`` command is still importing its libraries: one line.

The command's own Ctrl-C handling (:func:`spedflow.cli.main`) starts only once the
package is imported, about a second of numpy, scipy, dask and zarr imports in which an
interrupt used to print a 40-line traceback from inside scipy. When this process *is*
the command (the ``spedflow`` script or ``python -m spedflow``), an interrupt that
nothing caught prints ``spedflow: interrupted`` instead; the process still ends by
SIGINT (exit status 130 in a shell), as Python ends it for an uncaught interrupt. In
any other process (a notebook, a script importing spedflow) nothing is changed.

Ctrl-C reaches every process of the terminal's foreground group, the workers of a
local cluster too, which printed their own tracebacks and warnings while the command
was shutting them down. The command's local clusters preload :func:`dask_setup` into
their workers, which makes them ignore SIGINT: the command stops them itself.
"""

from __future__ import annotations

import os
import sys

__all__ = ["install_for_command", "is_command", "exit_now", "dask_setup"]


def is_command(argv: list[str] | None = None, orig_argv: list[str] | None = None) -> bool:
    """Whether this process runs the ``spedflow`` command, or is a worker process it
    spawned (which inherits its ``sys.argv``): ``sys.argv[0]`` is the installed script
    or ``spedflow/__main__.py``, or the interpreter was started with ``-m spedflow``."""
    argv = sys.argv if argv is None else argv
    orig = getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    first = os.path.normpath(argv[0]) if argv and argv[0] else ""
    if (os.path.splitext(os.path.basename(first))[0] in ("spedflow", "spedflow-script")
            or first.endswith(os.path.join("spedflow", "__main__.py"))):
        return True
    i = 1  # the interpreter's options, up to -m MODULE, -c CODE or a script
    while i < len(orig):
        arg = orig[i]
        if arg == "-m":
            return i + 1 < len(orig) and orig[i + 1] == "spedflow"
        if arg.startswith("-m"):
            return arg[2:] == "spedflow"
        if arg.startswith("-c") or not arg.startswith("-") or arg == "-":
            return False
        i += 2 if arg in ("-X", "-W") else 1  # options with a separate value
    return False


def install_for_command() -> None:
    """Chain a :data:`sys.excepthook` for an uncaught :class:`KeyboardInterrupt` if
    this process is the command or one of its workers (:func:`is_command`): the
    command prints one line; a worker, interrupted while it starts, prints nothing
    (the command says it)."""
    if not is_command():
        return
    import multiprocessing
    worker = multiprocessing.current_process().name != "MainProcess"  # set before a spawned
    previous = sys.excepthook                                  # process imports the script

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            if not worker:
                print("spedflow: interrupted", file=sys.stderr)
                said_interrupted()
            return
        previous(kind, value, tb)

    sys.excepthook = hook
    if not worker:
        _install_watchdog()


#: Seconds after a Ctrl-C by which the command has ended, or is ended
#: (:func:`_install_watchdog`); the command's own exit takes under 3 s.
_GRACE = 20.0
#: Set once the command has said it was interrupted (:func:`said_interrupted`).
_said = False
#: The line the watchdog prints for the command (:func:`set_interrupt_line`).
_line = "spedflow: interrupted"


def set_interrupt_line(line: str) -> None:
    """What the command says when interrupted (what a rerun resumes from)."""
    global _line
    _line = line


def said_interrupted() -> None:
    """The command printed its interrupt line: the watchdog need not."""
    global _said
    _said = True


def _install_watchdog() -> None:
    """Make the command's Ctrl-C end it even where Python drops the interrupt.

    Python raises :class:`KeyboardInterrupt` in whatever code the main thread runs
    when the signal is handled; raised inside a finaliser (``__del__``) or a callback,
    it is printed as "Exception ignored" and lost, and the command would run on to the
    end (a safety net: no such loss has been seen in a run). The handler raises the
    interrupt as Python's own does, and the first one also starts a
    thread that ends the process with status 130 if it still runs :data:`_GRACE`
    seconds later. Not where SIGINT was ignored when the command started (a background
    job of a shell script keeps ignoring it), nor outside the main thread."""
    import signal
    import threading
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return
    started = []

    def watchdog():  # no waiting for anything here: the command's own exit did not come
        import time
        time.sleep(_GRACE)
        if not _said:
            print(_line, file=sys.stderr)
        _flush_and_exit(130)

    def on_sigint(signum, frame):
        if not started:
            started.append(threading.Thread(target=watchdog, name="spedflow-interrupt",
                                             daemon=True))
            started[0].start()
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        pass


def exit_now(code: int) -> None:
    """End the command's process at once with ``code``, after its output is flushed.

    A Python process ending normally first waits for every thread it started: the
    threaded scheduler's tasks still running when Ctrl-C came (a chunk's kernels, or
    numba compiling them on a first run: 5-10 s, longer on a busy machine) held the
    command for as long after it had said "interrupted". Nothing is lost by not
    waiting: a block of pass 1 is written under a temporary name and renamed when
    whole, an ingest marks a unit done only after writing it, a download appends to
    its ``.part`` file, and a stage or a result counts only once marked complete. The
    stage cache's locks are released and a local cluster is closed before this runs,
    or, if Ctrl-C came while it was still starting, by its start's thread, which this
    waits for (:func:`spedflow.cluster.wait_for_closing`); a close that a second Ctrl-C
    cut short is finished here, as Python's exit would (a further Ctrl-C ends the wait);
    a worker process whose nanny dies with this process ends too (distributed's
    parent watch). Only for the command (:func:`is_command`), never in a notebook.
    """
    import logging
    try:
        cluster = sys.modules.get("spedflow.cluster")
        if cluster is not None:
            cluster.wait_for_closing()
        spec = sys.modules.get("distributed.deploy.spec")
        for c in list(getattr(getattr(spec, "SpecCluster", None), "_instances", ())):
            # a close a second Ctrl-C cut short: finished as Python's exit would
            # (distributed's atexit, which os._exit skips), with a shorter timeout
            if getattr(c, "shutdown_on_close", False) and \
                    getattr(getattr(c, "status", None), "name", "closed") != "closed":
                c.close(timeout=3)
    except (KeyboardInterrupt, Exception):  # noqa: BLE001 (a further Ctrl-C: end now)
        pass
    logging.shutdown()  # flush the log handlers
    _flush_and_exit(code)


def _flush_and_exit(code: int) -> None:
    """Flush stdout and stderr, then end the process with ``code`` at once."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):  # closed or replaced
            pass
    os._exit(code)


def dask_setup(worker) -> None:
    """Preload of the workers of the command's local clusters (``LocalCluster(preload=
    ["spedflow._interrupt"])``): ignore SIGINT, which the terminal sends them with the
    command's; the command closes them."""
    import logging
    import signal
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the process's main thread: leave it
        pass
    # the tasks the command cancels as it stops are each reported as a warning
    logging.getLogger("distributed.worker.state_machine").addFilter(_not_cancelled_task)


def _not_cancelled_task(record) -> bool:
    """Drop a worker's log line of a task that ended cancelled (the command's stop)."""
    return "ended with CancelledError" not in record.getMessage()
