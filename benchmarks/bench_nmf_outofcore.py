"""Out-of-core NMF: peak memory and wall time of the NMF workflow on 3 data sizes, the
largest more than 4x the total memory limit of the dask workers.

    python benchmarks/bench_nmf_outofcore.py [--scans 96 192 384] [--memory-limit 512MB]

Uses (or simulates) 128x128-pattern sets in benchmarks/work/suite/medium/, runs
`spedflow segment --method nmf` on a local cluster of 2 workers x 1 thread with the given
memory limit (the normalised matrix then streams from the stage cache on every pass),
with `preprocess.nav_binning=2` so the largest set fits a session, and records wall time,
CPU seconds and the peak RSS of the whole process tree. Writes
benchmarks/results/nmf_outofcore.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import zarr

sys.path.insert(0, str(Path(__file__).parent))
from _measure import load_avg, machine, run_tree, spedflow_cmd, write_json  # noqa: E402

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, nargs="+", default=[96, 192, 384])
    ap.add_argument("--memory-limit", default="512MB")
    ap.add_argument("--work", default=str(HERE / "work" / "suite" / "medium"))
    ap.add_argument("--out", default=str(HERE / "results" / "nmf_outofcore.json"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.scans:
        store = work / f"sim_{n}x{n}_128.zarr"
        if not store.exists():
            import spedflow
            spedflow.simulate(store, scan=(n, n), detector=128, crystals=10, seed=0, progress=False)
        shape = zarr.open_group(str(store), mode="r")["data"].shape
        out = work / "runs" / f"nmf_ooc_{n}.zarr"
        for p in (out, Path(str(out) + ".cache")):
            shutil.rmtree(p, ignore_errors=True)
        cmd = spedflow_cmd() + ["segment", str(store), "--method", "nmf", "--out", str(out), "-q",
                                "--workers", "2", "--threads", "1", "--memory-limit", args.memory_limit,
                                "--set", "preprocess.nav_binning=2"]
        before = load_avg()
        run = run_tree(cmd)
        row = {"scan": n, "data_gb": round(shape[0] * shape[1] * shape[2] * shape[3] * 2 / 1e9, 3),
               "memory_limit_per_worker": args.memory_limit, "workers": 2,
               "wall_s": run["wall_s"], "cpu_s": run["cpu_s"],
               "peak_rss_mb": round(run["peak_rss_bytes"] / 2**20, 1),
               "returncode": run["returncode"], "load_before": before, "load_after": load_avg(),
               "stderr_tail": run["stderr"][-500:]}
        if run["returncode"] == 0:
            a = zarr.open_group(str(out), mode="r").attrs["spedflow"]
            row.update(timings=a["timings"], counts=a["counts"], nmf_info={
                k: a["nmf_info"].get(k) for k in ("n_epochs", "converged", "relative_loss")})
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "stderr_tail"}), flush=True)
        shutil.rmtree(Path(str(out) + ".cache"), ignore_errors=True)
    write_json(args.out, {"benchmark": "NMF workflow out of core", "machine": machine(),
                          "note": "nav_binning=2 on every size; the matrix streams from the "
                                  "stage cache (it exceeds 25 % of the worker memory)",
                          "runs": rows})


if __name__ == "__main__":
    main()
