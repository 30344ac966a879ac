"""The demo set as other cameras record it: the noise model's gain, dark level and point spread.

The demo set's counts (``bench_quality.py``'s "demo") are written again as

* ``counts``: as simulated (an electron-counting camera);
* ``ccd_dark``: a CCD whose dark level was not subtracted, 20 units per pixel plus
  Gaussian read-out noise of sigma 3, at 1 unit per count (noise line intercept
  9 - 20 = -11);
* ``spread``: a scintillator camera, each electron spread by a Gaussian of 1 px.

Both workflows run in-process with defaults and are scored with ``spedflow.evaluate``;
each row also gives the noise model's measurements (``resolved.gain``,
``read_variance``, ``log_noise_factors``, NMF's ``dark_level``), the peak count and the
peaks per pattern at scan positions no crystal covers (the beam's own peak included;
noise taken for spots shows here)::

    python benchmarks/bench_cameras.py [--methods vdf nmf] [--cameras counts ccd_dark spread]
                                       [--work DIR] [--out benchmarks/results/cameras.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CAMERAS = ("counts", "ccd_dark", "spread")


def _camera(raw: np.ndarray, name: str, rng) -> np.ndarray:
    from scipy import ndimage
    if name == "counts":
        return raw
    if name == "ccd_dark":
        return (raw + 20.0 + rng.normal(0, 3.0, raw.shape)).astype(np.float32)
    return ndimage.gaussian_filter(raw.astype(np.float32), (0, 0, 1.0, 1.0))


def _store(work: Path, name: str) -> Path:
    """The demo set recorded by camera ``name`` (simulated once into ``work``)."""
    import zarr

    from spedflow.io import create_array
    from spedflow.simulate import simulate
    sys.path.insert(0, str(HERE))
    from bench_quality import SETS
    base = work / "counts.zarr"
    if not base.exists():
        simulate(base, progress=False, **SETS["demo"])
    if name == "counts":
        return base
    out = work / f"{name}.zarr"
    if not out.exists():
        shutil.copytree(base, out)
        g = zarr.open_group(str(out), mode="r+")
        raw, chunks, attrs = g["data"][...], g["data"].chunks, dict(g["data"].attrs)
        data = _camera(raw, name, np.random.default_rng(1))
        del g["data"]
        z = create_array(g, "data", data.shape, data.dtype, chunks=chunks)
        z[...] = data
        z.attrs.update(attrs)
    return out


def main(argv=None) -> int:
    import zarr

    from spedflow.evaluate import evaluate
    sys.path.insert(0, str(HERE))
    from _measure import check_checkout
    from bench_quality import score_fields, segment_fresh
    check_checkout()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", choices=["vdf", "nmf"], default=["vdf", "nmf"])
    ap.add_argument("--cameras", nargs="+", choices=CAMERAS, default=list(CAMERAS))
    ap.add_argument("--work", type=Path, default=HERE / "work" / "cameras")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cameras.json")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for cam in args.cameras:
        store = _store(args.work, cam)
        empty = ~(zarr.open_group(str(store), mode="r")["truth/masks"][...] > 0).any(axis=0)
        for method in args.methods:
            out = args.work / f"{cam}.{method}.zarr"
            t0 = time.perf_counter()
            segment_fresh(store, out, method)
            seconds = time.perf_counter() - t0
            res = zarr.open_group(str(out), mode="r")
            attrs = res.attrs["spedflow"]
            resolved = attrs["resolved"]
            row = {"camera": cam, "method": method, "seconds": round(seconds, 1),
                   **score_fields(evaluate(out, store))}
            if method == "vdf":
                peaks = res["peaks"][...]
                off = empty[peaks[:, 0].astype(int), peaks[:, 1].astype(int)]
                row.update(gain=resolved["gain"], read_variance=resolved["read_variance"],
                           log_noise_factors=resolved["log_noise_factors"],
                           peaks=int(len(peaks)),
                           peaks_per_pattern_off_crystals=round(float(off.sum() / empty.sum()), 2))
            else:
                row.update(dark_level=resolved["dark_level"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    import spedflow
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"spedflow": spedflow.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
