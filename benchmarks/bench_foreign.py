"""Segmentation quality with default parameters on data spedflow's simulator did not make.

Ten sets from ``benchmarks/foreign_sim.py`` (an independent simulator: flat-top spots of
radius 2-6 px, detectors of 64-256 px, one non-square, the beam 20-200x brighter than the
spots and off the detector centre, halo and amorphous ring, polygon / ellipse / elongated
grains, doses from 5 to 1000 counts per spot, 8-bit clipping, float data), both workflows,
in-process, scored with ``spedflow.evaluate``:

    python benchmarks/bench_foreign.py [--methods vdf nmf] [--sets s01_d64_poly ...]
                                       [--work DIR] [--out benchmarks/results/foreign.json]
                                       [--set nmf.extra_components=1.0 --out OTHER.json]

The sets are simulated once into ``--work`` (~3 min for all ten) and reused.

``--simulator third`` runs the thirteen sets of ``benchmarks/third_sim.py`` instead (bent
grains, wedges with thickness fringes, twins, a dense aggregate of small grains, small
grains of the same phase inside larger ones, a Medipix cross, a CCD with its dark level,
a descan wandering with scan time; ~1 min to simulate), into ``work/third`` and
``results/third.json`` by default.
``--simulator kinematic``: ``benchmarks/kinematic_sim.py``, real MgO/ZnO at random 3-D orientations.
``--seed-offset N`` adds N to every set's seed: the same scenes drawn anew, into
``work/SIMULATOR_seed+N`` and ``results/SIMULATOR_seed+N.json`` by default (defaults
tuned on the committed seeds meet data they have not seen).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
#: --simulator: its module in benchmarks/ and its default --work / --out names
SIMULATORS = {"foreign": "foreign_sim", "third": "third_sim", "kinematic": "kinematic_sim"}


def main(argv=None) -> int:
    from spedflow.evaluate import evaluate
    import importlib
    sys.path.insert(0, str(HERE))
    from _measure import check_checkout
    from bench_quality import add_set_option, score_fields, segment_fresh, suite_args, write_rows
    check_checkout()

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simulator", choices=list(SIMULATORS), default="foreign")
    ap.add_argument("--methods", nargs="+", choices=["vdf", "nmf"], default=["vdf", "nmf"])
    ap.add_argument("--sets", nargs="+", help="names of the simulator's SETS (default: all)")
    ap.add_argument("--work", type=Path, help="default: benchmarks/work/SIMULATOR")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/SIMULATOR.json")
    ap.add_argument("--seed-offset", type=int, default=0, metavar="N",
                    help="add N to every set's seed: the same scenes, new draws (default "
                         "--work / --out: work/SIMULATOR_seed+N, results/SIMULATOR_seed+N.json)")
    add_set_option(ap)
    args = ap.parse_args(argv)
    sim = importlib.import_module(SIMULATORS[args.simulator])
    suite = args.simulator + (f"_seed+{args.seed_offset}" if args.seed_offset else "")
    overrides = suite_args(ap, args, sim.SETS, suite, args.simulator)
    sets = {k: {**v, "seed": v["seed"] + args.seed_offset} for k, v in sim.SETS.items()}
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.sets:
        store = args.work / f"{name}.zarr"
        if not store.exists():
            sim.simulate(name, out=args.work, **sets[name])
            sim.build(name, args.work)
        for method in args.methods:
            out = args.work / f"{name}.{method}.zarr"
            t0 = time.perf_counter()
            row = {"set": name, "simulation": sets[name], "method": method}
            try:
                segment_fresh(store, out, method, overrides)
            except Exception as exc:  # a failure is a result here, not a crash of the benchmark
                row.update(error=f"{type(exc).__name__}: {exc}", recall=0.0, precision=0.0)
                rows.append(row)
                print(f"{name:28s} {method}  FAILED {row['error']}", flush=True)
                continue
            s = evaluate(out, store)
            row.update({"seconds": round(time.perf_counter() - t0, 1), **score_fields(s)})
            if overrides:
                row["overrides"] = overrides
            rows.append(row)
            print(f"{name:28s} {method}  recall {s['recall']:.2f}  precision {s['precision']:.2f}  "
                  f"mean IoU {s['mean_iou']:.2f}", flush=True)
    write_rows(rows, args.out, sets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
