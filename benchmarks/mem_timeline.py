"""Run a command and sample the resident memory of every process in its tree.

The benchmarks' `_measure.run_tree` reports the peaks; this shows *when* and *where*
(client, each worker, scheduler) memory is held, which is what a diagnosis needs.
Every ``--every`` seconds the RSS of the command's process ("client") and of each of
its descendants ("worker" for multiprocessing-spawned processes, else "other") is
recorded; the timeline goes to ``--json``, a summary to stdout.

    python benchmarks/mem_timeline.py --json T.json -- \\
        python -m spedflow segment S.zarr --method vdf --out R.zarr --overwrite \\
        --workers 2 --threads 1 --memory-limit 1GB

To compare two versions of spedflow, run the same command with ``PYTHONPATH`` set to a
checkout of the other version (``git worktree add /tmp/old <commit>``), from a directory
outside the repository, with a fresh ``--out`` (and so a fresh stage cache) each time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil


def sample(cmd: list[str], every: float = 0.25) -> tuple[int, float, list]:
    """Run ``cmd``; return its exit code, wall time and ``[(t, {kind:pid: rss_mb})]``."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    rows = []
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        snap = {}
        for q in procs:
            try:
                line = " ".join(q.cmdline())
                kind = ("client" if q.pid == proc.pid else
                        "worker" if "spawn" in line or "multiprocessing" in line else "other")
                snap[f"{kind}:{q.pid}"] = round(q.memory_info().rss / 1e6, 1)
            except psutil.Error:
                pass
        rows.append((round(time.time() - t0, 2), snap))
        time.sleep(every)
    return proc.wait(), time.time() - t0, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the timeline here")
    ap.add_argument("--every", type=float, default=0.25, help="seconds between samples")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("no command given (put it after --)")
    code, wall, rows = sample(cmd, a.every)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"cmd": cmd, "exit": code, "wall_s": wall, "rows": rows}, fh)
    print(f"exit {code}, wall {wall:.1f} s")
    if rows:
        t, snap = max(rows, key=lambda r: sum(r[1].values()))
        print(f"peak of the tree {sum(snap.values()):,.0f} MB at {t:.1f} s:",
              ", ".join(f"{k} {v:,.0f}" for k, v in sorted(snap.items())))
        for k in sorted({k for _, s in rows for k in s}):
            v, when = max((s.get(k, 0.0), t) for t, s in rows)
            print(f"  {k:>16s} peak {v:7,.0f} MB at {when:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
