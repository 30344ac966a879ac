"""End-to-end workflow benchmark: one store, both methods, against the I/O floor.

For each method, runs ``spedflow segment STORE --method M --out R.zarr -q`` in a
subprocess (fresh stage cache, the store's pages dropped from the page cache first),
samples the resident memory of the whole process tree every 0.2 s, reads the per-stage
timings and counts the workflow wrote into the result's attrs, and scores the result with
``spedflow.evaluate``. The I/O floor is one plain decompressing read pass over the same
store (``_measure.io_floor``).

    python benchmarks/bench_workflows.py STORE.zarr [--methods vdf nmf] [--json OUT.json]
        [--work DIR] [-- EXTRA SEGMENT ARGS, e.g. --workers 2 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure as M  # noqa: E402

QUALITY_KEYS = ("n_truth", "n_segments", "n_matched", "recall", "precision", "mean_iou",
                "mean_best_iou", "mean_correlation")


def read_result_attrs(result: str | Path) -> dict:
    """The ``spedflow`` attrs of a result store (timings, counts, params, ...)."""
    import zarr
    return dict(zarr.open_group(str(result), mode="r").attrs.get("spedflow", {}))


def quality(result: str | Path, store: str | Path) -> dict:
    """Summary scores of ``spedflow.evaluate`` (recall, precision, IoU, correlation)."""
    from spedflow.evaluate import evaluate
    scores = evaluate(str(result), str(store))
    return {k: scores.get(k) for k in QUALITY_KEYS}


def run_segment(store: str | Path, method: str, out: str | Path, *,
                segment_args: list[str] | tuple[str, ...] = (), interval: float = 0.2,
                evaluate: bool = True, timeout: float | None = None, cold: bool = True) -> dict:
    """Run one workflow in a subprocess and measure it.

    Parameters
    ----------
    store : path
        Input store (from ``spedflow simulate`` or ``ingest``).
    method : {"vdf", "nmf"}
    out : path
        Result store; it and its stage cache (``OUT.cache``) are deleted first.
    segment_args : sequence of str
        Extra ``spedflow segment`` arguments (``--workers 2``, ``--set k=v``, ...).
    interval : float
        Process-tree RSS sampling interval, seconds.

    Returns
    -------
    dict: ``wall_s``, ``cpu_s`` (CPU seconds of the process tree: robust to other work
    on a shared machine, unlike wall time), ``peak_rss_mb`` (whole process tree), ``peak_client_rss_mb`` (the spedflow process
    alone: with a local cluster, the client), ``timings`` (s per stage), ``stage_sum_s``,
    ``overhead_s`` (wall minus the stages: interpreter start, imports, cluster start and
    writing the result), ``patterns_per_s`` per stage and ``end_to_end``, ``counts``,
    ``quality`` and the exact command.
    """
    out = Path(out)
    for p in (out, Path(str(out) + ".cache")):
        shutil.rmtree(p, ignore_errors=True)
    if cold:
        M.drop_page_cache(store)
    load0 = M.load_avg()
    cmd = [*M.spedflow_cmd(), "segment", str(store), "--method", method, "--out", str(out),
           "-q", "--overwrite", *segment_args]
    run = M.run_tree(cmd, interval=interval, timeout=timeout)
    rec = {"method": method, "store": str(store), "cmd": run["cmd"],
           "segment_args": list(segment_args), "returncode": run["returncode"],
           "wall_s": run["wall_s"], "cpu_s": run["cpu_s"],
           "peak_rss_mb": round(run["peak_rss_bytes"] / 1e6, 1),
           "peak_client_rss_mb": round(run["peak_root_rss_bytes"] / 1e6, 1),
           "rss_samples": run["rss_samples"], "load_avg_before": load0,
           "load_avg_after": M.load_avg()}
    if run["returncode"] != 0:
        rec["error"] = (run["stderr"] or run["stdout"]).strip().splitlines()[-5:]
        return rec
    attrs = read_result_attrs(out)
    timings = {k: round(float(v), 4) for k, v in attrs.get("timings", {}).items()}
    counts = attrs.get("counts", {})
    n = int(counts.get("patterns", 0))
    stage_sum = sum(timings.values())
    rec.update({
        "patterns": n, "nav_binning": attrs.get("nav_binning"), "timings": timings,
        "stage_sum_s": round(stage_sum, 3), "overhead_s": round(run["wall_s"] - stage_sum, 3),
        "patterns_per_s": {**{k: round(n / v, 1) for k, v in timings.items() if v > 0},
                           "stages": round(n / stage_sum, 1) if stage_sum else None,
                           "end_to_end": round(n / run["wall_s"], 1),
                           "per_cpu_second": round(n / run["cpu_s"], 1) if run["cpu_s"] else None},
        "counts": counts,
    })
    if evaluate:
        try:
            rec["quality"] = quality(out, store)
        except Exception as exc:  # a benchmark records, it does not stop the suite
            rec["quality"] = {"error": f"{type(exc).__name__}: {exc}"}
    return rec


def bench_store(store: str | Path, methods=("vdf", "nmf"), *, work: str | Path,
                segment_args=(), floor: dict | None = None, timeout: float | None = None) -> dict:
    """I/O floor plus every method on one store; ratios end-to-end / floor."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    floor = floor or M.io_floor(store)
    runs = {}
    for m in methods:
        rec = run_segment(store, m, work / f"{Path(store).stem}_{m}.zarr",
                          segment_args=segment_args, timeout=timeout)
        if "wall_s" in rec and rec.get("returncode") == 0:
            rec["ratio_to_io_floor"] = {
                "end_to_end": round(rec["wall_s"] / floor["seconds"], 2),
                "stages": round(rec["stage_sum_s"] / floor["seconds"], 2)}
        runs[m] = rec
        print(f"[bench] {m}: {rec['wall_s']:.1f} s, peak {rec['peak_rss_mb']:.0f} MB "
              f"(exit {rec['returncode']})", file=sys.stderr, flush=True)
    return {"store": str(store), "io_floor": floor, "runs": runs}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--methods", nargs="+", default=["vdf", "nmf"], choices=["vdf", "nmf"])
    ap.add_argument("--work", type=Path, default=M.HERE / "work" / "bench")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    res = {"machine": M.machine(), **bench_store(args.store, args.methods, work=args.work,
                                                 segment_args=extra)}
    res["machine_after"] = {"load_avg": M.load_avg()}
    if args.json:
        M.write_json(args.json, res)
    print(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
