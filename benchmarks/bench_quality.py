"""Segmentation quality of both workflows with default parameters on varied simulated sets.

Nine sets vary the scan, detector size, number and shape of crystals, dose, 8-bit
saturation and detector defects (all with the paper-like layout: an overlapping same-orientation pair and a weak
off-axis crystal over a strong one). Each set is simulated, segmented with defaults
(in-process) and scored with ``spedflow.evaluate``; the JSON lists recall, precision, mean
IoU and which truth crystals were missed (with their best IoU).

    python benchmarks/bench_quality.py [--methods vdf nmf] [--sets demo mgo ...]
                                       [--work DIR] [--out benchmarks/results/quality.json]
                                       [--set nmf.extra_components=1.0 --out OTHER.json]

``--set KEY=VALUE`` (repeatable, as ``spedflow segment --set``) runs with other
parameters; it needs its own ``--out`` (the default file holds the defaults' figures).

``--suite variety`` runs eleven other sets of the same simulator instead (into
``work/variety`` and ``results/variety.json``): detectors of 64 x 64 to 256 x 256 and
96 x 160, a 40 x 100 scan, rods (two of one orientation side by side), thirty crystals,
doses of 300 to 3000 counts per pattern (the default is 30,000), defects and 8-bit
clipping together.

``--suite lowdose`` runs 300, 1000 and 3000 counts per pattern on four other scenes
(seeds 31-34; ``work/lowdose``, ``results/lowdose.json``).

``--suite flicker`` runs three scenes (seeds 0, 3, 19) with a beam current that varies
from line to line, from position to position, or drifts down over the scan
(``work/flicker``, ``results/flicker.json``).

``--suite largegrains`` runs eight scans of three or four crystals 30-70 % of the scan's side
across (seeds 41-48; ``work/largegrains``, ``results/largegrains.json``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

SETS = {
    "small": dict(scan=(48, 48), detector=64, crystals=8, seed=0),
    "mgo": dict(scan=(64, 64), detector=96, crystals=9, seed=1),
    "demo": dict(scan=(64, 64), detector=128, crystals=10, seed=0),
    "seed3": dict(scan=(64, 64), detector=128, crystals=10, seed=3),
    "spheres": dict(scan=(40, 40), detector=96, crystals=6, seed=5, shape="sphere",
                    saturate="8bit"),
    "rods": dict(scan=(32, 48), detector=128, crystals=5, seed=7, shape="rod"),
    "twelve": dict(scan=(56, 56), detector=80, crystals=12, seed=11),
    # an 8-bit camera at high dose (~30 counts per pixel): beam and glare clipped at 255
    "dense8bit": dict(scan=(64, 64), detector=128, crystals=10, seed=4, dose=4_000_000,
                      saturate="8bit"),
    # the demo set on a detector with 8 hot pixels (4x the beam's peak) and 8 dead ones,
    # as a Medipix3 has: the rest of the data is the demo set's
    "hotpix": dict(scan=(64, 64), detector=128, crystals=10, seed=0, hot_pixels=8,
                   dead_pixels=8),
}

#: ``--suite variety``: each set varies one thing more than SETS does.
VARIETY = {
    "det256": dict(scan=(48, 48), detector=256, seed=11),
    "det64": dict(scan=(64, 64), detector=64, seed=12),
    "rods_side": dict(scan=(64, 64), shape="rod", seed=13),  # a pair side by side, 1 px apart
    "thirty": dict(scan=(96, 96), crystals=30, seed=14),
    "dose300": dict(scan=(64, 64), dose=300, seed=15),
    "dose1000": dict(scan=(64, 64), dose=1000, seed=15),
    "dose3000": dict(scan=(64, 64), dose=3000, seed=15),
    "rect_scan": dict(scan=(40, 100), shape="mixed", seed=16),
    "rect_det": dict(scan=(48, 48), detector=(96, 160), seed=17),
    "defects8bit": dict(scan=(64, 64), hot_pixels=20, dead_pixels=20, saturate="8bit", seed=18),
    "seed19": dict(scan=(64, 64), seed=19),
}
#: ``--suite lowdose``: the variety suite's three doses on four more scenes, to tell a
#: change at low dose from the luck of one scene (session 31).
LOWDOSE = {f"d{dose}_s{seed}": dict(scan=(64, 64), dose=dose, seed=seed)
           for seed in (31, 32, 33, 34) for dose in (300, 1000, 3000)}
#: ``--suite largegrains``: a few crystals 30-70 % of the scan's side across (a pair of one
#: orientation among them), where one crystal's loading map can cover more of the scan
#: than ``nmf.max_coverage`` and most of its watershed mask (session 34).
LARGEGRAINS = {
    **{f"four_s{seed}": dict(scan=(64, 64), crystals=4, size_range=(0.3, 0.5), seed=seed)
       for seed in (41, 42, 43, 44)},
    **{f"three_s{seed}": dict(scan=(64, 64), crystals=3, size_range=(0.45, 0.7), seed=seed)
       for seed in (45, 46, 47, 48)}}
#: ``--suite flicker``: the beam current varies during the scan (a cold field-emission
#: gun), made by binomial thinning of the simulated counts (still Poisson, at the lower
#: dose) by a factor per scan position (``flicker``: :func:`flicker_factors`).
FLICKER = {f"{mode}_s{seed}": dict(scan=(64, 64), seed=seed, flicker=mode)
           for seed in (0, 3, 19) for mode in ("rows", "pixels", "drift")}
SUITES = {"quality": SETS, "variety": VARIETY, "lowdose": LOWDOSE, "largegrains": LARGEGRAINS,
          "flicker": FLICKER}


def flicker_factors(mode: str, shape, seed: int) -> np.ndarray:
    """Dose factors in (0, 1] per scan position: "rows" one per scan line, uniform in
    0.6-1 (slow-scan flicker); "pixels" one per position (fast flicker); "drift" a decay
    to half over the scan with five 15 % drops at random times (a cold field-emission
    gun's current after its flash), scaled to a largest factor of 1."""
    rng = np.random.default_rng(1000 + seed)
    ny, nx = shape
    if mode == "rows":
        return np.repeat(rng.uniform(0.6, 1.0, (ny, 1)), nx, axis=1)
    if mode == "pixels":
        return rng.uniform(0.6, 1.0, (ny, nx))
    if mode == "drift":
        f = 1.0 - 0.5 * np.arange(ny * nx) / (ny * nx)
        for j in rng.integers(0, ny * nx, 5):
            f[j:] *= 0.85
        return (f / f.max()).reshape(ny, nx)
    raise ValueError(f"unknown flicker mode {mode!r}")


def simulate_set(store: Path, options: dict) -> None:
    """``spedflow.simulate`` with ``options``; a ``flicker`` option thins the counts of
    every pattern by its factor (binomial: a Poisson count stays Poisson)."""
    import zarr
    from spedflow.simulate import simulate
    options = dict(options)
    mode = options.pop("flicker", None)
    simulate(store, progress=False, **options)
    if mode is not None:
        data = zarr.open_group(str(store), mode="r+")["data"]
        a = data[:]
        f = flicker_factors(mode, a.shape[:2], options.get("seed", 0))
        rng = np.random.default_rng(2000 + options.get("seed", 0))
        data[:] = rng.binomial(a.astype(np.int64), f[:, :, None, None]).astype(a.dtype)


def main(argv=None) -> int:
    from _measure import check_checkout
    from spedflow.evaluate import evaluate
    check_checkout()

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=list(SUITES), default="quality")
    ap.add_argument("--methods", nargs="+", choices=["vdf", "nmf"], default=["vdf", "nmf"])
    ap.add_argument("--sets", nargs="+", help="names of the suite's sets (default: all)")
    ap.add_argument("--work", type=Path, help="default: benchmarks/work/SUITE")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/SUITE.json")
    add_set_option(ap)
    args = ap.parse_args(argv)
    sets = SUITES[args.suite]
    overrides = suite_args(ap, args, sets, args.suite, f"--suite {args.suite}")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.sets:
        store = args.work / f"{name}.zarr"
        if not store.exists():
            simulate_set(store, sets[name])
        for method in args.methods:
            out = args.work / f"{name}.{method}.zarr"
            t0 = time.perf_counter()
            segment_fresh(store, out, method, overrides)
            s = evaluate(out, store)
            row = {"set": name, "simulation": sets[name], "method": method,
                   "seconds": round(time.perf_counter() - t0, 1), **score_fields(s)}
            if overrides:
                row["overrides"] = overrides
            rows.append(row)
            print(f"{name:11s} {method}  recall {s['recall']:.2f}  precision {s['precision']:.2f}  "
                  f"mean IoU {s['mean_iou']:.2f}  missed {[m['truth'] for m in row['missed']]}",
                  flush=True)
    write_rows(rows, args.out, sets)
    return 0


def segment_fresh(store: Path, out: Path, method: str, overrides: dict | None = None) -> None:
    """Segment ``store`` with defaults (or ``overrides``, dotted names), in-process, into
    ``out`` after removing any earlier result and its stage cache (so nothing is reused)."""
    import spedflow
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(Path(str(out) + ".cache"), ignore_errors=True)
    spedflow.segment(store, method=method, out=out, local=True, progress=False,
                     overrides=overrides or None)


def suite_args(ap, args, sets: dict, name: str, what: str) -> dict:
    """Check ``--sets`` against ``sets`` and fill in the defaults: every set,
    ``--work`` work/NAME, ``--out`` results/NAME.json; returns the ``--set`` overrides
    (:func:`parse_sets`). ``what`` names the suite in the error."""
    unknown = sorted(set(args.sets or ()) - set(sets))
    if unknown:
        ap.error(f"unknown sets {unknown}; {what} has {list(sets)}")
    args.sets = args.sets or list(sets)
    args.work = args.work or HERE / "work" / name
    default_out = HERE / "results" / f"{name}.json"
    args.out = args.out or default_out
    return parse_sets(ap, args, default_out)


def add_set_option(ap) -> None:
    ap.add_argument("--set", dest="sets_", action="append", default=[], metavar="KEY=VALUE",
                    help="a parameter other than its default, as `spedflow segment --set` "
                         "(repeatable; needs --out)")


def parse_sets(ap, args, default_out: Path) -> dict:
    """``--set`` values as dotted overrides (TOML values: numbers, true/false, strings)."""
    if not args.sets_:
        return {}
    if args.out.resolve() == default_out.resolve():
        ap.error("--set needs its own --out (the default file holds the defaults' figures)")
    import tomllib
    out = {}
    for item in args.sets_:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            ap.error(f"--set takes KEY=VALUE (got {item!r})")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


def write_rows(rows: list, path: Path, sets) -> dict:
    """Merge ``rows`` with the earlier rows of ``path`` (:func:`merge_earlier`), write
    them with their summary and print the summary; returns it."""
    import spedflow
    rows = merge_earlier(rows, path, sets)
    summary = summarise(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"spedflow": spedflow.__version__, "rows": rows,
                                "summary": summary}, indent=1))
    print(json.dumps(summary))
    return summary


def score_fields(scores: dict) -> dict:
    """The fields of a result row from ``spedflow.evaluate``'s scores."""
    return {**{k: scores[k] for k in ("n_truth", "n_segments", "n_matched", "recall",
                                      "precision", "mean_iou")},
            "missed": [{"truth": d["truth"], "best_iou": round(d["best_iou"], 3)}
                       for d in scores["per_crystal"] if d["segment"] is None]}


def summarise(rows: list) -> dict:
    """Mean recall and precision per method."""
    methods = sorted({r["method"] for r in rows}, key=["vdf", "nmf"].index)
    return {m: {f"mean_{k}": round(float(np.mean([r[k] for r in rows if r["method"] == m])), 3)
                for k in ("recall", "precision")} for m in methods}


def merge_earlier(rows: list, path: Path, sets=None) -> list:
    """``rows`` plus the rows of an earlier ``path`` for (set, method) pairs not re-run
    (marked ``carried_over``), in the order of ``sets`` (default ``SETS``) then method:
    a run of some sets or methods updates the file instead of dropping the others."""
    sets = SETS if sets is None else sets
    done = {(r["set"], r["method"]) for r in rows}
    earlier = []
    if path.exists():
        try:
            earlier = json.loads(path.read_text()).get("rows", [])
        except (OSError, ValueError):
            earlier = []
    kept = [{**r, "carried_over": True} for r in earlier
            if (r.get("set"), r.get("method")) not in done and r.get("set") in sets]
    order = {name: i for i, name in enumerate(sets)}
    return sorted(rows + kept, key=lambda r: (order[r["set"]], ["vdf", "nmf"].index(r["method"])))


if __name__ == "__main__":
    raise SystemExit(main())
