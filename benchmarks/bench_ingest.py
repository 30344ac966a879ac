"""Ingest benchmark: .npy sources of several sizes -> Zarr v3 input stores.

For each size, writes a .npy of simulated-like diffraction patterns (uint16, 128 x 128,
Poisson counts on a direct beam and a few Bragg discs, i.e. realistically compressible),
drops it from the page cache (``posix_fadvise DONTNEED``, so ingest reads the disk),
runs ``spedflow.io.ingest`` in a subprocess while sampling the resident memory of the
process tree, and records wall time, throughput and peak RSS. Results go to
``benchmarks/results/ingest.json``; the big files are deleted afterwards.

    python benchmarks/bench_ingest.py [--sizes 0.25 1 4.3] [--workdir benchmarks/work]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
K = 128  # detector pixels
DTYPE = np.dtype("<u2")


def _templates(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` mean patterns (K, K): direct beam + background + a few orientations of spots."""
    yy, xx = np.mgrid[:K, :K] - K // 2
    r2 = yy**2 + xx**2
    base = 0.3 + 400.0 * np.exp(-r2 / (2 * 3.0**2)) + 2.0 * np.exp(-np.sqrt(r2) / 20.0)
    out = np.empty((n, K, K), np.float32)
    for t in range(n):
        pat = base.copy()
        a0 = rng.uniform(0, np.pi)
        for ring, g in ((1, 22.0), (2, 31.0), (3, 44.0)):
            for m in range(6 if ring != 2 else 4):
                ang = a0 + m * 2 * np.pi / (6 if ring != 2 else 4)
                cy, cx = g * np.sin(ang), g * np.cos(ang)
                pat += 60.0 / ring * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.5**2))
        out[t] = pat
    return out


def make_source(path: Path, gbytes: float, seed: int = 0) -> tuple[int, ...]:
    """Write a (sy, sx, K, K) uint16 .npy of about ``gbytes`` GB, band by band."""
    n = max(1, int(gbytes * 1e9 / (K * K * DTYPE.itemsize)))
    sy = max(1, int(round(math.sqrt(n))))
    sx = max(1, n // sy)
    shape = (sy, sx, K, K)
    rng = np.random.default_rng(seed)
    temps = _templates(16, rng)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=DTYPE, shape=shape)
    for y in range(sy):  # one scan row at a time: bounded memory
        which = rng.integers(0, len(temps), sx)
        mm[y] = np.minimum(rng.poisson(temps[which]), np.iinfo(DTYPE).max)
    mm.flush()
    del mm
    _drop_from_cache(path)
    return shape


def _drop_from_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_ingest(src: Path, dest: Path, interval: float = 0.05) -> dict:
    """Ingest in a child process; wall time and peak RSS of the whole process tree."""
    code = ("import sys; from spedflow.io import ingest; "
            "ingest(sys.argv[1], sys.argv[2], overwrite=True, progress=False)")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, str(src), str(dest)])
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(interval)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"ingest of {src} failed with exit code {proc.returncode}")
    return {"wall_s": wall, "peak_rss_bytes": peak}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1.0, 4.3], help="source sizes in GB")
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "ingest.json")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args(argv)

    from spedflow._version import __version__
    from spedflow.io import TARGET_CHUNK_BYTES, store_info

    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for gb in args.sizes:
        src = args.workdir / f"src_{gb:g}GB.npy"
        dest = args.workdir / f"src_{gb:g}GB.zarr"
        t0 = time.perf_counter()
        shape = make_source(src, gb)
        gen = time.perf_counter() - t0
        nbytes = math.prod(shape) * DTYPE.itemsize
        load_before = os.getloadavg()[0]
        try:
            res = run_ingest(src, dest)
            info = store_info(dest)["data"]
        finally:
            if not args.keep:
                src.unlink(missing_ok=True)
                shutil.rmtree(dest, ignore_errors=True)
        rows.append({"size_gb": nbytes / 1e9, "shape": list(shape), "dtype": DTYPE.str,
                     "chunks": info["chunks"], "n_chunks": info["n_chunks"],
                     "wall_s": round(res["wall_s"], 2), "mb_per_s": round(nbytes / 1e6 / res["wall_s"], 1),
                     "peak_rss_mb": round(res["peak_rss_bytes"] / 1e6, 1),
                     "stored_gb": round(info["stored_bytes"] / 1e9, 3),
                     "compression_ratio": round(info["ratio"], 2), "generate_s": round(gen, 1),
                     # other work on the machine competes for the cores: record it
                     "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]})
        print(f"{rows[-1]['size_gb']:.2f} GB done: {rows[-1]['mb_per_s']} MB/s", file=sys.stderr)

    result = {"benchmark": "ingest .npy -> zarr v3 (blosc zstd bitshuffle + crc32c)",
              "spedflow": __version__, "python": platform.python_version(),
              "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
              "chunk_target_bytes": TARGET_CHUNK_BYTES, "scheduler": "dask threaded (default)",
              "source_cache": "dropped with posix_fadvise(DONTNEED) before each run",
              "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'size GB':>8} {'shape':>22} {'wall s':>8} {'MB/s':>8} {'peak RSS MB':>12} {'ratio':>6}")
    for r in rows:
        print(f"{r['size_gb']:8.2f} {str(tuple(r['shape'])):>22} {r['wall_s']:8.2f} {r['mb_per_s']:8.1f} "
              f"{r['peak_rss_mb']:12.1f} {r['compression_ratio']:6.2f}")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
