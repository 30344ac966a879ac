"""How long the `spedflow segment` command takes to end after a Ctrl-C.

Runs `python -m spedflow segment STORE --no-cluster` on a small simulated set again and
again, sends SIGINT (what a terminal's Ctrl-C sends) a random time after pass 1 wrote its
first block, and measures the time from the signal to the process's exit, and its exit
status. With `--fresh-numba-cache` every run compiles spedflow's kernels again (a fresh
`NUMBA_CACHE_DIR`): a first run on a machine, where a task still compiling a kernel held
the process for seconds after it had said "interrupted".

    python benchmarks/bench_interrupt.py --runs 12 --fresh-numba-cache   # -> results/interrupt.json

With `--double-during-cluster-start` the command starts a local cluster (`--workers 2
--threads 1`) and gets Ctrl-C twice, 0.3 s apart, to its whole process group (as from a
terminal) 2.6-3.6 s after it started, while the cluster comes up: the time from the second
interrupt to the exit, and whether anything printed "leaked" (distributed's semaphores,
when a close is cut short).

    python benchmarks/bench_interrupt.py --runs 8 --double-during-cluster-start --out results/interrupt_cluster_start.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _child_start():
    # a terminal's foreground job takes SIGINT; a job started in the background of a
    # script has it ignored, which its children inherit
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_or_kill(proc, timeout: float) -> int | None:
    """The process's exit status, or None if it still ran after ``timeout`` s (killed)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def one_run(store: Path, work: Path, *, fresh_cache: bool, max_delay: float, timeout: float) -> dict:
    out = work / "r.zarr"
    cache = Path(str(out) + ".cache")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if fresh_cache:
        env["NUMBA_CACHE_DIR"] = str(work / "numba")
    log = open(work / "log.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "spedflow", "segment", str(store), "--method",
                             "vdf", "--out", str(out), "--no-cluster"], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=_child_start)
    started = time.monotonic()
    while not any(cache.glob("beam_peaks-*/blocks/*.npz")) and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, max_delay))
    if proc.poll() is not None:
        log.close()
        return {"finished_before_the_interrupt": True, "returncode": proc.returncode}
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    code = _wait_or_kill(proc, timeout)
    log.close()
    return {"returncode": code, "exit_s": round(time.monotonic() - sent, 3),
            "interrupted_after_s": round(sent - started, 3),
            "said": (work / "log.txt").read_text().strip().splitlines()[-1:]}


def double_during_start(store: Path, work: Path, *, timeout: float) -> dict:
    out = work / "r.zarr"
    log = open(work / "log.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "spedflow", "segment", str(store), "--method",
                             "vdf", "--out", str(out), "--workers", "2", "--threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True,
                            preexec_fn=_child_start)
    first = random.uniform(2.6, 3.6)
    time.sleep(first)
    for _ in range(2):
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            break
        sent = time.monotonic()
        time.sleep(0.3)
    code = _wait_or_kill(proc, timeout)
    log.close()
    text = (work / "log.txt").read_text()
    return {"returncode": code, "exit_s": round(max(0.0, time.monotonic() - sent), 3),
            "interrupted_after_s": round(first, 3), "leaked": "leaked" in text,
            "said": text.strip().splitlines()[-1:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--fresh-numba-cache", action="store_true",
                    help="compile the kernels in every run (a first run on a machine)")
    ap.add_argument("--max-delay", type=float, default=2.5,
                    help="the interrupt comes 0..this many s after pass 1's first block")
    ap.add_argument("--double-during-cluster-start", action="store_true",
                    help="two Ctrl-C while a local cluster starts (see the module's notes)")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "interrupt.json")
    args = ap.parse_args()
    random.seed(args.seed)
    from _measure import check_checkout, machine
    from spedflow.simulate import simulate

    check_checkout()

    root = Path(tempfile.mkdtemp(prefix="spedflow-interrupt-"))
    try:
        store = simulate(root / "sim.zarr", scan=(48, 48), detector=64, crystals=8, seed=0,
                         chunks=(12, 12), progress=False)
        runs = []
        for i in range(args.runs):
            work = root / f"run{i}"
            work.mkdir()
            if args.double_during_cluster_start:
                runs.append(double_during_start(store, work, timeout=args.timeout))
            else:
                runs.append(one_run(store, work, fresh_cache=args.fresh_numba_cache,
                                    max_delay=args.max_delay, timeout=args.timeout))
            print(i, runs[-1], file=sys.stderr, flush=True)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    times = [r["exit_s"] for r in runs if r.get("exit_s") is not None and r["returncode"] is not None]
    summary = {"runs": len(runs), "interrupted": len(times),
               "exit_130": sum(r.get("returncode") == 130 for r in runs),
               "hung": sum("exit_s" in r and r["returncode"] is None for r in runs),
               "exit_s_median": statistics.median(times) if times else None,
               "exit_s_max": max(times) if times else None,
               "leaked": sum(bool(r.get("leaked")) for r in runs)}
    result = {"step": "interrupt", "machine": machine(), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary), file=sys.stderr)


if __name__ == "__main__":
    main()
