"""Out-of-core NMF vs scikit-learn's in-memory NMF on the same normalised matrix.

Synthetic SPED-like data (crystal spot patterns x disc-shaped loadings, a radial
halo, Poisson noise) are written to a Zarr v3 store, read back as a dask array,
Poisson-normalised with the beam masked, and factorised by spedflow's HALS NMF
(threaded scheduler, streaming row chunks) and by sklearn's NMF (init nndsvda,
solver cd) with the same number of components. Reports both Frobenius losses,
their ratio (target <= 1.02) and wall times (target: spedflow <= sklearn).

    python benchmarks/bench_nmf_quality.py [--scan 64] [--det 64] [--components 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import zarr
from sklearn.decomposition import NMF

from spedflow.decompose import (beam_mask, choose_n_components, nmf, normalised_matrix,
                                poisson_statistics, scree)
from spedflow.io import create_array, nav_chunks


def synth(scan, det, n_crystals, seed=0, counts=60.0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:det, :det]
    c = det // 2
    halo = 3.0 * np.exp(-np.hypot(yy - c, xx - c) / (det / 10))
    beam = 200.0 * (np.hypot(yy - c, xx - c) <= 2)
    pats = []
    for _ in range(n_crystals):
        p = np.zeros((det, det))
        g1 = rng.uniform(6, det / 5) * np.array([np.cos(a := rng.uniform(0, np.pi)), np.sin(a)])
        g2 = rng.uniform(6, det / 5) * np.array([np.cos(a + 1.2), np.sin(a + 1.2)])
        for i in range(-3, 4):
            for j in range(-3, 4):
                gy, gx = i * g1 + j * g2
                if (i or j) and abs(gy) < c - 3 and abs(gx) < c - 3:
                    p += rng.uniform(0.3, 1.0) * np.exp(-((yy - c - gy) ** 2 + (xx - c - gx) ** 2) / 2.0)
        pats.append(p * counts / max(p.max(), 1e-9))
    Y, X = np.mgrid[:scan, :scan]
    data = np.empty((scan, scan, det, det), np.float32)
    loads = []
    for _ in range(n_crystals):
        cy, cx, r = rng.uniform(0, scan, 2).tolist() + [rng.uniform(scan / 12, scan / 5)]
        loads.append(np.clip((r - np.hypot(Y - cy, X - cx)) / 2, 0, 1))
    loads = np.array(loads)
    thick = loads.sum(0)
    for y in range(scan):                     # row by row to bound memory
        mean = np.einsum("cx,cij->xij", loads[:, y], pats) + halo * (0.3 + thick[y])[:, None, None] + beam
        data[y] = rng.poisson(mean)
    return data


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=64)
    ap.add_argument("--det", type=int, default=64)
    ap.add_argument("--crystals", type=int, default=8)
    ap.add_argument("--components", type=int, default=None, help="default: from the scree")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "nmf_quality.json"))
    args = ap.parse_args()

    data = synth(args.scan, args.det, args.crystals)
    with tempfile.TemporaryDirectory() as tmp, dask.config.set(scheduler="threads"):
        g = zarr.open_group(f"{tmp}/in.zarr", mode="w")
        chunks = nav_chunks(data.shape, data.dtype, target_bytes=2 * 2**20)
        arr = create_array(g, "data", data.shape, data.dtype, chunks)
        arr[...] = data
        d = da.from_zarr(arr)
        mask = beam_mask((args.det, args.det), beam_radius=2.0)

        t0 = time.perf_counter()
        stats = poisson_statistics(d, mask)
        m = normalised_matrix(d, stats, mask)
        # as the NMF workflow does when the matrix fits in memory: hold it there, in
        # large chunks, instead of re-reading and re-normalising it on every pass
        rows = max(1, int(128 * 2**20 // (4 * m.shape[1])))
        m = m.astype(np.float32).rechunk({0: rows}).persist()
        t_norm = time.perf_counter() - t0
        t0 = time.perf_counter()
        sc = scree(m, 30)
        t_scree = time.perf_counter() - t0
        e_auto, reason = choose_n_components(sc.explained_variance_ratio, noise_edge=sc.noise_edge)
        e = args.components or e_auto

        t0 = time.perf_counter()
        h, w, info = nmf(m, e)
        t_ours = time.perf_counter() - t0

        x = m.compute().astype(np.float32)
    t0 = time.perf_counter()
    sk = NMF(e, init="nndsvda", solver="cd", max_iter=1000, tol=1e-4)
    wsk = sk.fit_transform(x)
    t_sk = time.perf_counter() - t0
    x64 = x.astype(np.float64)
    loss_ours = float(np.sum((x64 - w @ h) ** 2))
    loss_sk = float(np.sum((x64 - wsk.astype(np.float64) @ sk.components_.astype(np.float64)) ** 2))
    res = {
        "data_shape": list(data.shape), "matrix_shape": list(x.shape), "chunks": list(chunks),
        "n_crystals": args.crystals, "n_components": e, "auto_n_components": e_auto,
        "auto_reason": reason,
        "loss_spedflow": loss_ours, "loss_sklearn": loss_sk, "loss_ratio": loss_ours / loss_sk,
        "seconds_spedflow_nmf": t_ours, "seconds_sklearn_nmf": t_sk,
        "seconds_normalise_stats": t_norm, "seconds_scree": t_scree,
        "epochs_spedflow": info["n_epochs"], "converged_spedflow": info["converged"],
        "iterations_sklearn": int(sk.n_iter_),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
