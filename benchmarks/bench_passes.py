"""CPU cost per pattern of the VDF workflow's per-chunk kernels, one core, on real chunks.

The two passes over the data and the watershed, each timed on what the workflow gives
it: a simulated store (``spedflow simulate``, written once into ``--work``), the
parameters the workflow resolves for it, and the vectors, fitted beam centres and VDF
images of one in-process run of ``spedflow segment`` on it.

- pass 1: ``workflows.vdf._beam_peaks_block`` on every chunk of the store (beam centres,
  ring background, counting-noise LoG peaks; chunks full of crystals cost more);
- pass 2: ``vdf.kernels.preprocessed_sums`` on every chunk (shift, ring background,
  DoG, disc sums at every vector);
- watershed: ``segment.watershed_image`` on each of the first ``--images`` VDF images.

Prints ms per pattern (or per image) of process CPU time, best of ``--repeat``, with
BLAS held to one thread (reading the chunks is not included), and writes JSON with
``--json``.

    python benchmarks/bench_passes.py [--scan 64] [--detector 128] [--repeat 3]
                                      [--images-from RESULT.zarr] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _best_cpu(fn, repeat: int) -> float:
    fn()  # warm-up: caches of operators and ring models
    best = np.inf
    for _ in range(repeat):
        c = time.process_time()
        fn()
        best = min(best, time.process_time() - c)
    return best


def main(argv=None) -> dict:
    sys.path.insert(0, str(HERE))
    from _measure import check_checkout
    check_checkout()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=64)
    ap.add_argument("--detector", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--images", type=int, default=40, help="VDF images to segment")
    ap.add_argument("--images-from", type=Path, default=None,
                    help="segment the VDF images of this result instead (e.g. a 256 x 256 run's)")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "passes")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import zarr
    from threadpoolctl import threadpool_limits

    import spedflow
    from spedflow._heap import reusing_heap
    from spedflow.api import segment
    from spedflow.segment import watershed_image
    from spedflow.simulate import simulate
    from spedflow.vdf.kernels import disc_masks, preprocessed_sums
    from spedflow.workflows import vdf as W

    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / f"sim_{args.scan}x{args.scan}_{args.detector}.zarr"
    if not store.exists():
        simulate(store, scan=args.scan, detector=args.detector, seed=0, progress=False)
    result = args.work / f"{store.stem}_vdf.zarr"
    segment(store, out=result, method="vdf", overwrite=True, local=True, progress=False)

    res = zarr.open_group(str(result), mode="r")
    resolved = res.attrs["spedflow"]["resolved"]
    prep, peaks = resolved["preprocess"], resolved["peaks"]
    data = zarr.open_group(str(store), mode="r")["data"]
    cy, cx = data.chunks[:2]
    ny, nx, ky, kx = data.shape
    # every chunk (crystal-rich and empty ones cost differently), read once
    corners = [(y, x) for y in range(0, ny, cy) for x in range(0, nx, cx)]
    blocks = [np.asarray(data[y:y + cy, x:x + cx]) for y, x in corners]
    n = ny * nx

    # pass 1 as the workflow calls it (its keyword arguments rebuilt from the run)
    from spedflow.peaks import PeakParams
    from spedflow.preprocess import PreprocessParams
    from spedflow.workflows._common import prepare_run
    plan = prepare_run(store, args.work / "unused.zarr", overwrite=True)
    pp = PreprocessParams(**{k: prep[k] for k in ("nav_binning", "align", "descan", "beam_radius",
                                                  "dog_sigma_low", "dog_sigma_high")})
    pk = PeakParams(**peaks)
    counts = None if resolved["gain"] is None else (resolved["gain"], resolved["read_variance"])
    if counts is not None and resolved.get("log_noise_factors"):
        counts += (tuple(resolved["log_noise_factors"]),)
    kw = W.pass1_kwargs(plan, pp, pk, counts, None)
    vectors = np.asarray(res["vectors"][:], np.float64)
    fitted = np.asarray(res["beam/fitted"][:], np.float64)
    masks = disc_masks(vectors, resolved["vdf"]["radius"], (ky, kx),
                       subpixel=resolved["vdf"]["subpixel"])
    source = res if args.images_from is None else zarr.open_group(str(args.images_from), mode="r")
    images = np.asarray(source["vdf/images"][:args.images])

    def pass1():
        for (y, x), b in zip(corners, blocks):
            W._beam_peaks_block(b, (y, x), **kw)

    def pass2():
        for (y, x), b in zip(corners, blocks):
            c = fitted[y:y + b.shape[0], x:x + b.shape[1]]
            preprocessed_sums(b, c, masks, sigma_low=pp.dog_sigma_low,
                              sigma_high=pp.dog_sigma_high, counts=counts)

    with threadpool_limits(1), reusing_heap():
        pass1 = _best_cpu(pass1, args.repeat)
        pass2 = _best_cpu(pass2, args.repeat)
        ws = _best_cpu(lambda: [watershed_image(im) for im in images], args.repeat)
    out = {"spedflow": spedflow.__version__, "store": str(store), "chunks": [cy, cx, ky, kx],
           "n_chunks": len(blocks), "patterns": n,
           "vectors": int(len(vectors)), "repeat": args.repeat,
           "pass1_ms_per_pattern": round(pass1 / n * 1e3, 4),
           "pass2_ms_per_pattern": round(pass2 / n * 1e3, 4),
           "watershed_ms_per_image": round(ws / len(images) * 1e3, 3),
           "image_shape": list(images.shape[1:]), "images": int(len(images))}
    print(f"pass 1 (beam, ring background, peaks): {out['pass1_ms_per_pattern']:.3f} ms/pattern "
          f"({1e3 / out['pass1_ms_per_pattern']:.0f} patterns/s per core)")
    print(f"pass 2 (shift, DoG, {len(vectors)} discs):      {out['pass2_ms_per_pattern']:.3f} ms/pattern "
          f"({1e3 / out['pass2_ms_per_pattern']:.0f} patterns/s per core)")
    print(f"watershed ({images.shape[1]} x {images.shape[2]}):        "
          f"{out['watershed_ms_per_image']:.1f} ms/image")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
