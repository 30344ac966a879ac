"""Cost of each stage inside the fused kernel: the kernel stopped after stage k
(buffers hot, one pattern at a time), differences of the best times."""
import os, sys, time
os.environ["NUMBA_NUM_THREADS"] = "1"
import numpy as np
from numba import njit
from threadpoolctl import threadpool_limits
import nbfast as nb
import nbgen as ng
from setup_data import load

@njit(cache=True)
def pass2_stages(frames, shifts, order, starts, j0, j1, f, g, counts, gain, read_var,
                 klow, A, AT, B, BT, idx, w, blas_last, stages, out):
    n, ky, kx = frames.shape
    h = klow.shape[0] - 1
    nr = counts.shape[0]
    X = np.empty((ky, kx), np.float32); T = np.empty((ky, kx), np.float32)
    G = np.empty((ky if blas_last else 1, kx), np.float32)
    xs = np.empty(ky * kx, np.float32); pad = np.empty(kx + 2 * h, np.float32)
    glo = np.empty(kx, np.float32); row = np.empty(kx, np.float32)
    rowok = np.empty(ky, np.bool_); colok = np.empty(kx, np.bool_)
    prof = np.zeros(nr, np.float32)
    xf = X.ravel()
    for i in range(n):
        nb._shift_one(frames[i], shifts[i, 0], shifts[i, 1], X, row)
        if stages >= 2:
            nb._ring_profile(xf, order, starts, counts, gain, read_var, xs, prof)
        if stages >= 3:
            nb._subtract_image(xf, prof, j0, j1, f, g, xf)
        if stages >= 4:
            nb._valid(shifts[i, 0], ky, rowok); nb._valid(shifts[i, 1], kx, colok)
            ng._dog_res_one(X, klow, A, AT, B, BT, rowok, colok, T, G, pad, blas_last)
        if stages >= 5:
            nb._disc_one(xf, idx, w, out[i])
        out[i, 0] = X[3, 3]

d = load(); o = d["ops"]
NV = d["masks"].shape[1]
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
names = ["shift", "+ring profile", "+subtract image", "+DoG/res", "+disc sums"]
best = np.full((2, 5), np.inf)
with threadpool_limits(1):
    for rep in range(reps + 1):
        for bl in (0, 1):
            for st in range(1, 6):
                t0 = time.process_time()
                for fr, sh in zip(d["flat"], d["shifts"]):
                    out = np.empty((len(fr), NV), np.float32)
                    pass2_stages(fr, sh, o["order"], o["starts"], o["j0f"], o["j1f"], o["ff"], o["gf"],
                                 o["counts"], o["gain"], o["read_var"], o["klow"], o["A"], o["AT"], o["B"],
                                 o["BT"], o["idx32"], o["w"], bool(bl), st, out)
                if rep:
                    best[bl, st - 1] = min(best[bl, st - 1], time.process_time() - t0)
n = d["n"]
for bl in (1, 0):
    print("G_high last product:", "BLAS" if bl else "unrolled loop")
    prev = 0
    for k in range(5):
        print(f"  {names[k]:18s} cumulative {1e3*best[bl,k]/n:.4f}  stage {1e3*(best[bl,k]-prev)/n:.4f} ms/pattern")
        prev = best[bl, k]
