"""Detector binning on a large detector: time, memory and quality per binning factor.

A simulated 48 x 48 scan of 256 x 256 px patterns (6 crystals, seed 4) is segmented by
both workflows with ``preprocess.detector_binning`` = 1, 2 and 4: each run is
``spedflow segment STORE --method M --out R -q --overwrite --no-cluster --set
preprocess.detector_binning=B`` in a subprocess (fresh stage cache), timed with its
process tree's peak RSS, and scored with ``spedflow.evaluate``::

    python benchmarks/bench_binning.py [--methods vdf nmf] [--factors 1 2 4]
                                       [--work DIR] [--out benchmarks/results/binning.json]
                                       [--scan 48] [--detector 256]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENE = dict(scan=(48, 48), detector=256, crystals=6, seed=4)


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE))
    from _measure import check_checkout, machine, run_tree, spedflow_cmd, write_json

    import spedflow
    from spedflow.evaluate import evaluate
    check_checkout()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", choices=["vdf", "nmf"], default=["vdf", "nmf"])
    ap.add_argument("--factors", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--work", type=Path, default=HERE / "work" / "binning")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "binning.json")
    ap.add_argument("--scan", type=int, default=SCENE["scan"][0], help="scan side (a smaller scene)")
    ap.add_argument("--detector", type=int, default=SCENE["detector"], help="detector side")
    args = ap.parse_args(argv)
    scene = {**SCENE, "scan": (args.scan, args.scan), "detector": args.detector}
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / f"scan{args.scan}_det{args.detector}.zarr"
    if not store.exists():
        spedflow.simulate(store, progress=False, **scene)
    rows = []
    for method in args.methods:
        for b in args.factors:
            out = args.work / f"{method}_b{b}.zarr"
            shutil.rmtree(Path(str(out) + ".cache"), ignore_errors=True)
            run = run_tree(spedflow_cmd() + ["segment", str(store), "--method", method, "--out",
                                             str(out), "-q", "--overwrite", "--no-cluster", "--set",
                                             f"preprocess.detector_binning={b}"])
            row = {"method": method, "detector_binning": b, "wall_s": run["wall_s"],
                   "cpu_s": run["cpu_s"], "peak_rss_mb": round(run["peak_rss_bytes"] / 2**20, 1),
                   "cmd": run["cmd"]}
            if run["returncode"]:
                row["error"] = run["stderr"].strip().splitlines()[-1:]
            else:
                s = evaluate(out, store)
                row.update(recall=round(s["recall"], 3), precision=round(s["precision"], 3),
                           mean_iou=round(float(s["mean_iou"]), 3))
            rows.append(row)
            print(f"{method} binning {b}: {row['wall_s']:.1f} s, {row['peak_rss_mb']:.0f} MB, "
                  f"recall {row.get('recall')} precision {row.get('precision')}", flush=True)
    write_json(args.out, {"spedflow": spedflow.__version__, "scene": scene, "machine": machine(),
                          "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
