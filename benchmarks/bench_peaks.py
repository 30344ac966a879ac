"""Throughput of the peak finder and of the VDF sums on synthetic SPED chunks.

A 32 x 32 chunk of 128 x 128 patterns, each with 30 Gaussian spots (sigma 1.2 px)
and Poisson noise on a 2-count background, background-subtracted. Reports
patterns/s per core (process CPU time, single BLAS/ndimage thread) and wall time,
for 1, 2 (default) and 3 LoG scales, and for ``vdf_sums`` with 100 vectors.

    python benchmarks/bench_peaks.py [--scan 32] [--k 128] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from spedflow.peaks import PeakParams, log_sigmas, peaks_block, resolve
from spedflow.vdf import vdf_sums


def synthetic_chunk(scan: int, k: int, n_spots: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:k, :k]
    lam = np.full((k, k), 2.0)
    for y, x, a in zip(*rng.uniform(8, k - 8, (2, n_spots)), rng.uniform(300, 3000, n_spots)):
        lam += a / (2 * np.pi * 1.44) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 2.88)
    return (rng.poisson(lam, (scan, scan, k, k)) - 2.0).astype(np.float32)


def timed(fn, repeat):
    best_cpu = best_wall = np.inf
    for _ in range(repeat):
        c, w = time.process_time(), time.perf_counter()
        out = fn()
        best_cpu = min(best_cpu, time.process_time() - c)
        best_wall = min(best_wall, time.perf_counter() - w)
    return out, best_cpu, best_wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=32)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    block = synthetic_chunk(args.scan, args.k)
    n = args.scan * args.scan
    r = 3.0 * args.k / 128  # direct-beam radius of the spedflow simulator at this size
    print(f"chunk {block.shape}, {n} patterns, spot radius {r:.1f} px")
    with threadpool_limits(1):
        for num in (1, 2, 3):
            p = resolve(PeakParams(num_sigma=num), r, detector_shape=(args.k, args.k))
            table, cpu, wall = timed(lambda: peaks_block(block, (0, 0), p), args.repeat)
            sig = ", ".join(f"{s:.2f}" for s in log_sigmas(p.min_sigma, p.max_sigma, num))
            print(f"find peaks, {num} scale(s) [{sig}]: {n / cpu:8.0f} patterns/s/core "
                  f"({cpu / n * 1e3:.3f} ms/pattern CPU, wall {wall / n * 1e3:.3f} ms), "
                  f"{len(table) / n:.1f} peaks/pattern")
        rng = np.random.default_rng(1)
        vectors = rng.uniform(-50 * args.k / 128, 50 * args.k / 128, (100, 2))
        out, cpu, wall = timed(lambda: vdf_sums(block, vectors, r), args.repeat)
        print(f"vdf_sums, 100 vectors: {n / cpu:8.0f} patterns/s/core "
              f"({cpu / n * 1e3:.3f} ms/pattern CPU, wall {wall / n * 1e3:.3f} ms)")


if __name__ == "__main__":
    main()
