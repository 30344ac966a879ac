#!/usr/bin/env python
"""Run the reference implementation (pyxem) of Bergh et al. 2020 on a spedflow store.

Run with the python of the reference venv (see setup_env.py)::

    benchmarks/work/venv-pyxem/bin/python benchmarks/reference/run_reference.py \
        STORE.zarr --method vdf|nmf --out RESULT.zarr [--json timings.json]
        [--crop Y0:Y1,X0:X1 | --max-patterns N] [--num-sigma 30] [--components 11]

Both workflows follow pyxem-demos notebook 06 (nanocrystal segmentation, MgO) with the
published parameters, in detector pixels (the signal calibration is set to 1 px with the
origin at (ky//2, kx//2), so every reciprocal distance below is the published number of
pixels). Nothing is scaled to the detector size: the point is the published parameters.

The result is written in spedflow's result contract (docs/DESIGN.md): a Zarr v3 group
with ``segments/maps`` (S, Y, X), ``segments/patterns`` (S, Ky, Kx) and attrs
``spedflow = {kind: "result", method, nav_binning: 1, timings, tool, ...}`` so that
``spedflow evaluate RESULT.zarr STORE.zarr`` scores it. The JSON holds per-stage wall
times (``load`` is reported separately from the algorithm), the peak RSS and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _zarr3  # noqa: E402

# Published parameters (notebook 06 / Bergh et al. 2020), detector pixels.
VDF = dict(
    dog_sigma=(1.7, 13.2),
    beam_radius=(2, 6), beam_square=15,           # cross-correlation with a disc
    log=dict(min_sigma=0.7, max_sigma=10, num_sigma=30, threshold=0.046, overlap=0.5,
             exclude_border=True),
    com_square=4, edge_exclude=2,
    dbscan_eps=0.89, dbscan_min_samples=10, min_magnitude=10.0,
    vdf_radius=2.0,
    watershed=dict(min_distance=5.5, min_size=10, marker_radius=2, threshold=True,
                   exclude_border=2),
    merge=dict(corr_threshold=0.7, vector_threshold=5, segment_threshold=4),
    pattern_sigma=1.5,
)
NMF = dict(
    beam_radius=(2, 6), beam_square=15,
    beam_mask_radius=10.0, components=11,
    merge=dict(corr_th_loadings=0.3, corr_th_factors=0.45),
    watershed=dict(min_distance=10, min_size=50, marker_radius=2, threshold=True,
                   exclude_border=1),
    min_intensity=10000.0,
)


class Timer:
    """Wall time per stage, in order."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        print(f"[reference] {stage} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        yield
        self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - t0
        print(f"[reference] {stage}: {self.times[stage]:.2f} s", file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def parse_crop(text: str, shape) -> tuple[slice, slice]:
    try:
        ys, xs = text.split(",")
        (y0, y1), (x0, x1) = (tuple(int(v) for v in p.split(":")) for p in (ys, xs))
    except ValueError:
        raise SystemExit(f"error: --crop must look like Y0:Y1,X0:X1 (got {text!r})") from None
    if not (0 <= y0 < y1 <= shape[0] and 0 <= x0 < x1 <= shape[1]):
        raise SystemExit(f"error: --crop {text!r} outside the scan {shape[0]}x{shape[1]}")
    return slice(y0, y1), slice(x0, x1)


def crop_for_max_patterns(shape, n: int) -> tuple[slice, slice]:
    """Central square-ish crop with at most ``n`` patterns (aspect of the scan kept)."""
    Y, X = shape[:2]
    if n >= Y * X:
        return slice(0, Y), slice(0, X)
    f = np.sqrt(n / (Y * X))
    h, w = max(1, int(Y * f)), max(1, int(X * f))
    while h * w > n:
        h, w = (h - 1, w) if h >= w else (h, w - 1)
    y0, x0 = (Y - h) // 2, (X - w) // 2
    return slice(y0, y0 + h), slice(x0, x0 + w)


def make_signal(data: np.ndarray):
    """ElectronDiffraction2D in detector pixels, origin at (ky//2, kx//2)."""
    import pyxem as pxm
    s = pxm.signals.ElectronDiffraction2D(data)
    ky, kx = data.shape[-2:]
    for ax, n in zip(s.axes_manager.signal_axes, (kx, ky)):   # hyperspy order: x, y
        ax.scale, ax.offset, ax.units = 1.0, -float(n // 2), "px"
    for ax in s.axes_manager.navigation_axes:
        ax.scale, ax.offset = 1.0, 0.0
    return s


def centre(s, p: dict):
    """Direct-beam centring as in the notebook: cross-correlation with a disc."""
    half = p["beam_square"] // 2
    shifts = s.get_direct_beam_position(method="cross_correlate", radius_start=p["beam_radius"][0],
                                        radius_finish=p["beam_radius"][1],
                                        half_square_width=half, lazy_output=False,
                                        show_progressbar=False)
    s.center_direct_beam(shifts=shifts, inplace=True, show_progressbar=False)
    return s


# --------------------------------------------------------------------------- VDF
def run_vdf(data: np.ndarray, timer: Timer, p: dict) -> dict:
    from pyxem.generators import VirtualDarkFieldGenerator
    from pyxem.signals import DiffractionVectors2D
    ky, kx = data.shape[-2:]
    s = make_signal(data.astype(np.float32))
    with timer("background"):
        s = s.subtract_diffraction_background("difference of gaussians",
                                              min_sigma=p["dog_sigma"][0],
                                              max_sigma=p["dog_sigma"][1],
                                              inplace=False, show_progressbar=False)
        s = make_signal(np.asarray(s.data, np.float32))
    with timer("centring"):
        s = centre(s, p)
    with timer("peaks"):
        # Diffraction2D.find_peaks -> hyperspy find_peaks_log (blob_log on the
        # max-normalised pattern, centres rounded to whole pixels), then pyxem's
        # centre-of-mass refinement and detector-edge filter. Vectors are (ky, kx)
        # relative to the pattern centre, in pixels (calibration 1).
        vec = s.get_diffraction_vectors(method="laplacian_of_gaussian", get_intensity=False,
                                        show_progressbar=False, **p["log"])
        vec = vec.subpixel_refine(s, method="center-of-mass", square_size=p["com_square"])
        vec.detector_shape = (ky, kx)
        vec = vec.filter_detector_edge(p["edge_exclude"])
        table = []
        for (iy, ix) in np.ndindex(*data.shape[:2]):
            pk = np.asarray(vec.data[iy, ix], float).reshape(-1, 2)[:, :2]
            table.extend((iy, ix, r + ky // 2, c + kx // 2) for r, c in pk)
        table = np.asarray(table, np.float32).reshape(-1, 4)
    with timer("vectors"):
        rel = table[:, 2:4] - np.array([ky // 2, kx // 2], np.float32)   # (gy, gx)
        unique = DiffractionVectors2D(rel).get_unique_vectors(
            distance_threshold=p["dbscan_eps"], method="DBSCAN",
            min_samples=p["dbscan_min_samples"])
        vecs = np.asarray(getattr(unique, "data", unique), float).reshape(-1, 2)
        vecs = vecs[np.hypot(vecs[:, 0], vecs[:, 1]) >= p["min_magnitude"]]
    out = {"vectors": vecs.astype(np.float32), "peaks": table}
    if len(vecs) == 0:
        return _empty(out, data.shape, "no unique vectors")
    with timer("vdf"):
        gen = VirtualDarkFieldGenerator(s, DiffractionVectors2D(vecs))
        vdfs = gen.get_virtual_dark_field_images(radius=p["vdf_radius"])
        out["vdf_images"] = np.asarray(vdfs.data, np.float32)
    with timer("watershed"):
        segs = vdfs.get_vdf_segments(**p["watershed"])
    if segs is None or np.asarray(segs.segments.data).size == 0:
        return _empty(out, data.shape, "no watershed segments")
    with timer("merge"):
        merged = segs.correlate_vdf_segments(**p["merge"])
        maps = np.asarray(merged.segments.data, np.float32).reshape(-1, *data.shape[:2])
        if len(maps):
            ved = merged.get_virtual_electron_diffraction(calibration=1.0, shape=(ky, kx),
                                                          sigma=p["pattern_sigma"])
            # pyxem builds the pattern with column 0 of the vector on the last axis
            # (x, y order) while the vectors it made are (y, x): swap back.
            patterns = np.asarray(ved.data, np.float32).reshape(-1, kx, ky).swapaxes(1, 2)
        else:
            patterns = np.zeros((0, ky, kx), np.float32)
    out.update(maps=maps, patterns=patterns, n_watershed_segments=int(len(segs.segments.data)))
    return out


# --------------------------------------------------------------------------- NMF
def _background_component(loadings: np.ndarray) -> int:
    """Index of the component whose loading covers most of the scan.

    Coverage = fraction of scan pixels above half the loading's own maximum: a
    background/film component is present nearly everywhere, a crystal is local.
    """
    flat = np.nan_to_num(loadings.reshape(len(loadings), -1))
    top = flat.max(axis=1, keepdims=True)
    cover = (flat > 0.5 * np.where(top > 0, top, np.inf)).mean(axis=1)
    return int(np.argmax(cover))


def _scree_suggestion(ratio: np.ndarray) -> int:
    """Elbow of the log scree: farthest point below the chord from the first point."""
    r = np.log(np.clip(ratio[:50], 1e-30, None))
    x = np.arange(len(r))
    if len(r) < 3:
        return len(r)
    chord = r[0] + (r[-1] - r[0]) * x / x[-1]
    return int(np.argmax(chord - r)) + 1


def run_nmf(data: np.ndarray, timer: Timer, p: dict, *, scree: bool) -> dict:
    from hyperspy.signals import Signal2D
    from pyxem.signals.segments import LearningSegment
    ky, kx = data.shape[-2:]
    s = make_signal(data.astype(np.float32))
    with timer("centring"):
        s = centre(s, p)
    yy, xx = np.mgrid[:ky, :kx]
    mask = np.hypot(yy - ky // 2, xx - kx // 2) <= p["beam_mask_radius"]   # True = ignored
    out = {}
    if scree:
        with timer("scree"):
            s.decomposition(normalize_poissonian_noise=True, algorithm="SVD",
                            signal_mask=mask, output_dimension=None, print_info=False)
            ratio = np.asarray(s.get_explained_variance_ratio().data, float)
            out["scree"] = ratio[:100].astype(np.float32)
            out["scree_suggestion"] = _scree_suggestion(ratio)
    with timer("decomposition"):
        s.decomposition(normalize_poissonian_noise=True, algorithm="NMF",
                        output_dimension=p["components"], signal_mask=mask,
                        print_info=False, max_iter=500)
        factors = np.nan_to_num(np.asarray(s.get_decomposition_factors().data, np.float32))
        loadings = np.nan_to_num(np.asarray(s.get_decomposition_loadings().data, np.float32))
        factors = factors.reshape(-1, ky, kx)
        loadings = loadings.reshape(-1, *data.shape[:2])
        drop = _background_component(loadings)
        keep = [i for i in range(len(factors)) if i != drop]
        out.update(factors=factors, loadings=loadings, dropped=[drop])
    with timer("merge"):
        learn = LearningSegment(factors=Signal2D(factors[keep]), loadings=Signal2D(loadings[keep]))
        merged = learn.correlate_learning_segments(**p["merge"])
    with timer("watershed"):
        try:
            segs = merged.separate_learning_segments(min_intensity_threshold=p["min_intensity"],
                                                     **p["watershed"])
            maps = np.asarray(segs.loadings.data, np.float32)
            pats = np.asarray(segs.factors.data, np.float32)
        except Exception as exc:  # pyxem raises (TraitError) when no segment survives
            print(f"[reference] no NMF segment survived: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            maps = np.zeros((0, *data.shape[:2]), np.float32)
            pats = np.zeros((0, ky, kx), np.float32)
        maps = maps.reshape(-1, *data.shape[:2])
        pats = pats.reshape(-1, ky, kx)
    out.update(maps=maps, patterns=pats, n_merged_components=int(len(merged.loadings.data)))
    return out


def _empty(out: dict, shape, why: str) -> dict:
    print(f"[reference] {why}: empty result", file=sys.stderr)
    out.update(maps=np.zeros((0, *shape[:2]), np.float32),
               patterns=np.zeros((0, *shape[2:]), np.float32), note=why)
    return out


# --------------------------------------------------------------------------- main
def versions() -> dict:
    import importlib
    v = {"python": sys.version.split()[0]}
    for name in ("pyxem", "hyperspy", "numpy", "scipy", "skimage", "sklearn"):
        try:
            v[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001
            v[name] = "unavailable"
    return v


def write_result(path: Path, res: dict, attrs: dict) -> None:
    """Write the result store atomically (``PATH.partial`` renamed into place)."""
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    _zarr3.write_group(tmp, {"spedflow": attrs})
    _zarr3.write_array(tmp / "segments" / "maps", res["maps"].astype(np.float32))
    _zarr3.write_array(tmp / "segments" / "patterns", res["patterns"].astype(np.float32))
    for key, name in (("vectors", "vectors"), ("peaks", "peaks"), ("vdf_images", "vdf/images"),
                      ("factors", "nmf/factors"), ("loadings", "nmf/loadings"),
                      ("scree", "scree/explained_variance_ratio")):
        if key in res:
            _zarr3.write_array(tmp / name, np.asarray(res[key]))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path, help="spedflow input store (Zarr v3 group with `data`)")
    ap.add_argument("--method", choices=("vdf", "nmf"), required=True)
    ap.add_argument("--out", type=Path, required=True, help="result store to write")
    ap.add_argument("--json", type=Path, help="write timings / peak RSS / versions here")
    ap.add_argument("--crop", help="scan sub-region Y0:Y1,X0:X1 (default: the whole scan)")
    ap.add_argument("--max-patterns", type=int,
                    help="central crop of the scan with at most this many patterns")
    ap.add_argument("--num-sigma", type=int, default=30,
                    help="blob_log num_sigma (published 30; a later notebook used 10)")
    ap.add_argument("--log-threshold", type=float, default=0.046,
                    help="blob_log threshold on the max-normalised pattern (published 0.046)")
    ap.add_argument("--components", type=int, default=11,
                    help="NMF components (published 11; the SVD scree's elbow is recorded too)")
    ap.add_argument("--no-scree", action="store_true",
                    help="skip the SVD scree of the NMF workflow (the paper computed it)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

    timer = Timer()
    with timer("load"):
        attrs = _zarr3.read_group_attrs(args.store).get("spedflow", {})
        meta = json.loads((args.store / "data" / "zarr.json").read_text())
        shape = tuple(meta["shape"])
        if args.crop and args.max_patterns:
            raise SystemExit("error: give --crop or --max-patterns, not both")
        crop = (parse_crop(args.crop, shape) if args.crop else
                crop_for_max_patterns(shape, args.max_patterns) if args.max_patterns else
                (slice(0, shape[0]), slice(0, shape[1])))
        data = _zarr3.read_array(args.store / "data", nav_slice=crop)
    import pyxem  # noqa: F401  (import time is not part of any stage)

    if args.method == "vdf":
        p = dict(VDF, log=dict(VDF["log"], num_sigma=args.num_sigma,
                                threshold=args.log_threshold))
        res = run_vdf(data, timer, p)
    else:
        p = dict(NMF, components=args.components)
        res = run_nmf(data, timer, p, scree=not args.no_scree)

    n = int(np.prod(data.shape[:2]))
    stage_times = {k: round(v, 4) for k, v in timer.times.items()}
    info = {
        "tool": f"pyxem {pyxem.__version__}", "method": args.method, "versions": versions(),
        "store": str(args.store), "input_shape": list(shape), "detector": list(shape[2:]),
        "crop": [[crop[0].start, crop[0].stop], [crop[1].start, crop[1].stop]],
        "patterns": n, "timings": stage_times,
        "ms_per_pattern": {k: round(1000 * v / n, 3) for k, v in timer.times.items()},
        "total_s": round(sum(v for k, v in timer.times.items()), 3),
        "algorithm_s": round(sum(v for k, v in timer.times.items() if k != "load"), 3),
        "peak_rss_bytes": peak_rss_bytes(), "segments": int(len(res["maps"])),
        "params": p,
    }
    for key in ("n_watershed_segments", "n_merged_components", "dropped", "scree_suggestion",
                "note"):
        if key in res:
            info[key] = res[key]
    if "vectors" in res:
        info["unique_vectors"] = int(len(res["vectors"]))
        info["peaks_found"] = int(len(res["peaks"]))
    result_attrs = {"kind": "result", "method": args.method, "nav_binning": 1,
                    "timings": stage_times, "tool": info["tool"], "params": p,
                    "input": str(args.store), "reference": {k: info[k] for k in info
                                                             if k not in ("params", "timings")}}
    if args.method == "nmf":
        result_attrs["nmf"] = {"components": p["components"], "dropped": res.get("dropped"),
                               "why": "largest scan coverage of the loading (automatic "
                                      "stand-in for the paper's manual choice)",
                               "scree_suggestion": res.get("scree_suggestion")}
    # A crop changes the scan size: record where it sits so evaluation can crop the truth.
    result_attrs["crop"] = info["crop"]
    write_result(args.out, res, json.loads(json.dumps(result_attrs, default=_json)))
    text = json.dumps(info, indent=2, default=_json)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


def _json(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray, tuple)):
        return list(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
