"""Throughput of the preprocessing kernels on one 32x32 chunk of 128x128 patterns.

Run: ``python benchmarks/bench_preprocess.py [--repeat 3] [--size 128]``.
Prints patterns/s (single thread, best of ``repeat``; wall and process CPU time) for each kernel. The numbers
depend on the machine and on its load; the lead's target for shift + DoG is well
under 0.4 ms per pattern per core.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from spedflow.preprocess import kernels


def _best(fn, repeat):
    """Best wall time and best CPU time of this process (robust to a loaded machine)."""
    fn()  # warm-up (FFT plans)
    wall = cpu = np.inf
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - t)
        cpu = min(cpu, time.process_time() - c)
    return wall, cpu


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", type=int, default=128, help="detector size (pixels)")
    ap.add_argument("--chunk", type=int, default=32, help="chunk is chunk x chunk patterns")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    k, n = args.size, args.chunk
    yy, xx = np.indices((k, k))
    centres = k / 2 + rng.normal(0, 1.5, (n, n, 2))
    radius = k / 32
    # Poisson patterns: direct beam disc on a weak background
    beam = ((yy - k / 2) ** 2 + (xx - k / 2) ** 2 <= radius ** 2) * 200.0
    data = rng.poisson(beam + 2.0, (n, n, k, k)).astype(np.float32)
    lo, hi = 0.5 * radius, 4 * radius

    cases = {
        "bin_nav x2": lambda: kernels.bin_nav(data, 2),
        "beam_centres": lambda: kernels.beam_centres(data, radius),
        "beam_profile": lambda: kernels.beam_profile(data, centres),
        "shift_patterns": lambda: kernels.shift_patterns(data, centres),
        "subtract_background_dog": lambda: kernels.subtract_background_dog(data, lo, hi),
        "shift_and_subtract (fused)": lambda: kernels.shift_and_subtract(data, centres, lo, hi),
    }
    print(f"{n}x{n} chunk of {k}x{k} float32 patterns, sigma_low={lo:g}, sigma_high={hi:g}")
    for name, fn in cases.items():
        wall, cpu = (t / (n * n) for t in _best(fn, args.repeat))
        print(f"{name:28s} {1 / wall:8.0f} patterns/s wall ({wall * 1e3:6.3f} ms/pattern), "
              f"CPU {cpu * 1e3:6.3f} ms/pattern")


if __name__ == "__main__":
    main()
