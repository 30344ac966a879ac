"""Page faults, CPU and peak RSS of every process of one `spedflow segment` run.

Runs ``python -m spedflow segment STORE --method M --out OUT -q --workers 2 --threads 1
--memory-limit LIMIT`` and samples ``/proc/<pid>/stat`` (minor faults, user + system
CPU) and the RSS of the client and its worker processes every 0.1 s; prints one line per
process and the result's stage times as JSON. Linux only. ``--code DIR`` runs the
spedflow found in DIR instead (e.g. a ``git worktree`` of an earlier commit), to compare
two versions on the same machine:

    python benchmarks/bench_worker_faults.py benchmarks/work/suite/large/sim_128x128_128.zarr
    git worktree add /tmp/old f04e9a4
    python benchmarks/bench_worker_faults.py benchmarks/work/suite/large/sim_128x128_128.zarr --code /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _stat(pid: int) -> tuple[int, float]:
    """Minor page faults and CPU seconds (user + system) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[7]), (int(fields[11]) + int(fields[12])) / tick


def main(argv=None) -> int:
    import psutil
    import zarr
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--method", choices=["vdf", "nmf"], default="vdf")
    ap.add_argument("--memory-limit", default="1GB")
    ap.add_argument("--code", type=Path, help="run the spedflow package found in this directory")
    args = ap.parse_args(argv)
    out = Path(tempfile.mkdtemp()) / "result.zarr"
    env = dict(os.environ)
    if args.code:
        env["PYTHONPATH"] = str(args.code.resolve())
    # run outside the repository: `python -m` puts the working directory first on the
    # path, which would shadow --code with the checkout it is started from
    cmd = [sys.executable, "-m", "spedflow", "segment", str(Path(args.store).resolve()),
           "--method", args.method,
           "--out", str(out), "-q", "--workers", "2", "--threads", "1",
           "--memory-limit", args.memory_limit]
    proc = subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    last: dict[int, dict] = {}
    while proc.poll() is None:
        try:
            procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                faults, cpu = _stat(p.pid)
                rss = p.memory_info().rss
                role = "client" if p.pid == proc.pid else "worker/other"
            except (OSError, psutil.Error):
                continue
            prev = last.get(p.pid, {"max_rss_mb": 0.0})
            last[p.pid] = {"role": role, "minor_faults": faults, "cpu_s": round(cpu, 1),
                           "max_rss_mb": round(max(prev["max_rss_mb"], rss / 2**20), 1)}
        time.sleep(0.1)
    if proc.returncode:
        print(proc.stderr.read().decode()[-2000:], file=sys.stderr)
        return proc.returncode
    rows = [dict(pid=pid, **v) for pid, v in last.items() if v["cpu_s"] > 0.5]
    timings = zarr.open_group(str(out), mode="r").attrs["spedflow"]["timings"]
    version = subprocess.run([sys.executable, "-c", "import spedflow; print(spedflow.__file__)"],
                             env=env, cwd=out.parent, capture_output=True, text=True).stdout.strip()
    print(json.dumps({"cmd": " ".join(cmd), "spedflow": version,
                      "processes": rows, "timings_s": timings}, indent=1))
    shutil.rmtree(out.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
