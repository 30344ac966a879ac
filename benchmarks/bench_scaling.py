"""Weak scaling, strong scaling and bounded memory of the two workflows.

- Weak scaling: simulated sets of growing scan size (same detector, same 10 crystals:
  the simulator scales crystal sizes with the scan, so the problem is self-similar and
  only the amount of data grows); wall time and process-tree peak RSS per method. Time
  should grow linearly with the data, memory should stay flat (bounded by chunks, not
  by the data set).
- Strong scaling: one set, ``--workers 1`` vs ``--workers 2`` local worker processes
  (one thread each).
- Bounded memory: a set at least 4x the total worker memory limit, e.g.
  ``--workers 2 --memory-limit 512MB`` on 4+ GB; must complete.

    python benchmarks/bench_scaling.py weak --scans 16 24 32 48 --detector 128 --json W.json
    python benchmarks/bench_scaling.py strong --scans 48 --json S.json
    python benchmarks/bench_scaling.py bounded --scans 384 --memory-limit 512MB --json B.json
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure as M  # noqa: E402
from bench_workflows import run_segment  # noqa: E402


def data_bytes(scan: int, detector: int, itemsize: int = 2) -> int:
    return scan * scan * detector * detector * itemsize


def ensure_store(path: str | Path, scan: int, detector: int, *, seed: int = 0,
                 timeout: float | None = None) -> dict:
    """Simulate ``path`` (scan x scan patterns of detector x detector) unless it exists.

    Returns a description: path, shape, bytes in memory and on disk, simulate seconds
    (None when reused).
    """
    import zarr
    path = Path(path)
    want = [scan, scan, detector, detector]
    sim_s = None
    if path.exists():
        try:
            g = zarr.open_group(str(path), mode="r")
            ok = list(g["data"].shape) == want and g.attrs.get("spedflow", {}).get("complete", True)
        except Exception:
            ok = False
        if not ok:
            shutil.rmtree(path)
    if not path.exists():  # in this process: not measured, no interpreter start-up to pay
        from spedflow.simulate import simulate
        t0 = time.perf_counter()
        simulate(path, scan=scan, detector=detector, seed=seed, overwrite=True,
                          progress=False)
        sim_s = round(time.perf_counter() - t0, 2)
    g = zarr.open_group(str(path), mode="r")
    arr = g["data"]
    return {"path": str(path), "shape": list(arr.shape), "dtype": str(arr.dtype),
            "nbytes": int(math.prod(arr.shape) * arr.dtype.itemsize),
            "gb": float(f"{math.prod(arr.shape) * arr.dtype.itemsize / 1e9:.4g}"),
            "stored_bytes": M.store_bytes(path / "data"), "chunks": list(arr.chunks),
            "simulate_s": sim_s}


def _slim(rec: dict) -> dict:
    """A run record without the bulky fields (for scaling tables)."""
    keep = ("method", "returncode", "wall_s", "cpu_s", "peak_rss_mb", "peak_client_rss_mb", "rss_samples", "patterns",
            "nav_binning", "timings", "stage_sum_s", "overhead_s", "patterns_per_s", "quality",
            "cmd", "segment_args", "load_avg_before", "load_avg_after", "error", "counts")
    return {k: rec[k] for k in keep if k in rec}


def weak_scaling(stores: list[dict], methods, *, work: Path, segment_args=(),
                 method_args: dict | None = None, floor: bool = True,
                 timeout: float | None = None) -> list[dict]:
    """One row per (store, method): data size, I/O floor, wall time, peak RSS.

    ``method_args`` maps ``(method, scan)`` (or ``method``) to extra segment arguments,
    e.g. ``--set preprocess.nav_binning=2`` for the NMF on the largest sets.
    """
    method_args = method_args or {}
    rows = []
    for st in stores:
        fl = M.io_floor(st["path"]) if floor else None
        for m in methods:
            extra = list(method_args.get((m, st["shape"][0]), method_args.get(m, [])))
            rec = run_segment(st["path"], m, work / f"weak_{st['shape'][0]}_{m}.zarr",
                              segment_args=[*segment_args, *extra], timeout=timeout)
            row = {"scan": st["shape"][0], "detector": st["shape"][2], "gb": st["gb"],
                   "stored_gb": round(st["stored_bytes"] / 1e9, 4), "extra_args": extra,
                   "io_floor_s": fl["seconds"] if fl else None, **_slim(rec)}
            if fl and rec.get("returncode") == 0:
                row["ratio_to_io_floor"] = round(rec["wall_s"] / fl["seconds"], 2)
            rows.append(row)
            print(f"[weak] {m} scan {row['scan']} ({row['gb']:.3f} GB): {row['wall_s']:.1f} s, "
                  f"{row['peak_rss_mb']:.0f} MB (client {row.get('peak_client_rss_mb', 0):.0f} MB)",
                  file=sys.stderr, flush=True)
    return rows


def loglog_slope(x, y) -> float | None:
    """Least-squares slope of log y on log x (1 = linear growth, 0 = flat)."""
    import numpy as np
    pts = [(a, b) for a, b in zip(x, y) if a and b and a > 0 and b > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return round(float(np.polyfit(lx, ly, 1)[0]), 3)


def summarise_weak(rows: list[dict]) -> dict:
    out = {}
    for m in sorted({r["method"] for r in rows}):
        rs = [r for r in rows if r["method"] == m and r.get("returncode") == 0]
        out[m] = {"time_vs_size_loglog_slope": loglog_slope([r["gb"] for r in rs], [r["wall_s"] for r in rs]),
                  "cpu_vs_size_loglog_slope": loglog_slope([r["gb"] for r in rs],
                                                           [r.get("cpu_s") for r in rs]),
                  "stage_time_vs_size_loglog_slope": loglog_slope([r["gb"] for r in rs],
                                                                  [r["stage_sum_s"] for r in rs]),
                  "memory_vs_size_loglog_slope": loglog_slope([r["gb"] for r in rs],
                                                              [r["peak_rss_mb"] for r in rs]),
                  "peak_rss_mb_min_max": [min((r["peak_rss_mb"] for r in rs), default=None),
                                          max((r["peak_rss_mb"] for r in rs), default=None)]}
    return out


def strong_scaling(store: dict, methods, *, work: Path, workers=(1, 2), extra=(),
                   timeout: float | None = None) -> list[dict]:
    """The same store with 1 and 2 local worker processes (1 thread each)."""
    rows = []
    for m in methods:
        for w in workers:
            args = ["--workers", str(w), "--threads", "1", *extra]
            rec = run_segment(store["path"], m, work / f"strong_{m}_{w}.zarr", segment_args=args,
                              timeout=timeout)
            rows.append({"workers": w, "threads": 1, "gb": store["gb"], "scan": store["shape"][0],
                         **_slim(rec)})
            print(f"[strong] {m} workers={w}: {rec['wall_s']:.1f} s", file=sys.stderr, flush=True)
        base = next((r for r in rows if r["method"] == m and r["workers"] == workers[0]), None)
        for r in rows:
            if r["method"] == m and base and r.get("returncode") == 0 and base.get("returncode") == 0:
                r["speedup_wall"] = round(base["wall_s"] / r["wall_s"], 2)
                r["speedup_stages"] = round(base["stage_sum_s"] / r["stage_sum_s"], 2)
                r["cpu_ratio"] = round(r["cpu_s"] / base["cpu_s"], 2) if base.get("cpu_s") else None
    return rows


def bounded_memory(store: dict, method: str, *, work: Path, workers: int = 2,
                   memory_limit: str = "512MB", extra=(), timeout: float | None = None) -> dict:
    """A run whose data is several times the total worker memory limit."""
    from dask.utils import parse_bytes
    limit = parse_bytes(memory_limit)
    args = ["--workers", str(workers), "--threads", "1", "--memory-limit", memory_limit, *extra]
    rec = run_segment(store["path"], method, work / f"bounded_{method}.zarr", segment_args=args,
                      timeout=timeout)
    return {"gb": store["gb"], "scan": store["shape"][0], "workers": workers,
            "memory_limit_per_worker": memory_limit,
            "data_over_total_limit": round(store["nbytes"] / (workers * limit), 2),
            "completed": rec.get("returncode") == 0, **_slim(rec)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["weak", "strong", "bounded"])
    ap.add_argument("--scans", type=int, nargs="+", required=True)
    ap.add_argument("--detector", type=int, default=128)
    ap.add_argument("--methods", nargs="+", default=["vdf", "nmf"], choices=["vdf", "nmf"])
    ap.add_argument("--memory-limit", default="512MB")
    ap.add_argument("--work", type=Path, default=M.HERE / "work" / "scaling")
    ap.add_argument("--json", type=Path)
    args, extra = ap.parse_known_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    stores = [ensure_store(args.work / f"sim_{s}x{s}_{args.detector}.zarr", s, args.detector)
              for s in args.scans]
    res = {"machine": M.machine()}
    if args.kind == "weak":
        res["rows"] = weak_scaling(stores, args.methods, work=args.work, segment_args=extra)
        res["summary"] = summarise_weak(res["rows"])
    elif args.kind == "strong":
        res["rows"] = strong_scaling(stores[0], args.methods, work=args.work, extra=extra)
    else:
        res["rows"] = [bounded_memory(stores[0], m, work=args.work, memory_limit=args.memory_limit,
                                      extra=extra) for m in args.methods]
    res["load_avg_after"] = M.load_avg()
    if args.json:
        M.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
