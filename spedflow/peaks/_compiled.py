"""The peak finder's candidate search as one compiled loop per pattern (numba).

Step 2 of :func:`spedflow.peaks.kernels._batch_peaks` with radial noise units (the
counting-noise model, the VDF workflow's default): from the Gaussian-smoothed patterns
of every scale, the LoG response (5-point Laplacian), its significance ``Z = max_s
R_s / unit_s`` and the pixels where ``Z`` exceeds the threshold and none of its 8
neighbours exceeds it. The NumPy code makes each of these a pass over the batch (and
looks candidates up by gathers); here each pattern's ``Z`` is made once, in cache, and
scanned.

The same float32 operations in the same order as the NumPy code (the Laplacian's
terms, ``lo + f (hi - lo)`` for the units, the first scale winning ties), so the
candidates are the same, bit for bit.

Only imported when :func:`spedflow._jit.enabled`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["local_maxima"]


def local_maxima(smooth: np.ndarray, profiles: np.ndarray, j0, j1, f, threshold, border: int):
    """Candidates of one batch: ``(flat, z, scale)`` as ``_batch_peaks`` step 2 has them.

    Parameters
    ----------
    smooth : (S, n, kx, ky) float32
        Gaussian of every pattern at every scale, transposed (``_smooth_batch``).
    profiles : (S, n, R) float32
        Noise unit per scale, pattern and ring (:class:`~spedflow.peaks.kernels.RadialUnits`).
    j0, j1, f : (ky * kx,) arrays
        Rings and weight of each pixel (row-major).
    threshold : float
        Compared with ``Z`` as NumPy would (float32 for a Python float).
    border : int
        ``exclude_border``.

    Returns
    -------
    flat : (m,) intp indices into the (n, kx - 2, ky - 2) interior, ascending
    z : (m,) float32
    scale : (m,) intp
    """
    s, n, kx, ky = smooth.shape
    thr = np.asarray(threshold).astype(np.result_type(np.float32, threshold)).item()
    args = (np.ascontiguousarray(smooth, np.float32), np.ascontiguousarray(profiles, np.float32),
            np.ascontiguousarray(j0, np.int64), np.ascontiguousarray(j1, np.int64),
            np.ascontiguousarray(f, np.float32), float(thr), int(border))
    cap = max(1024, 64 * n)
    while True:
        flat = np.empty(cap, np.int64)
        z = np.empty(cap, np.float32)
        scale = np.empty(cap, np.int64)
        m = _maxima(*args, flat, z, scale)
        if m >= 0:
            return flat[:m].astype(np.intp), z[:m], scale[:m].astype(np.intp)
        cap = n * max(kx - 2, 1) * max(ky - 2, 1)  # every pixel: cannot overflow again


@njit(cache=True, nogil=True, error_model="numpy")
def _maxima(sm, prof, j0, j1, f, thr, b, out_flat, out_z, out_s):
    """Fill the outputs; return their length, or -1 if they are too short.

    Per pattern, without a branch that depends on the data until the last step:
    1. every scale's response, and the "hot" pixels, where some response exceeds the
       threshold times the pattern's lowest unit of that scale (which it must for
       ``Z`` to exceed the threshold), off the border;
    2. the hot pixels and their 8 neighbours (clipped to the interior), listed;
    3. ``Z`` at those, with its unit looked up in the pattern's ring profiles;
    4. of those, the hot pixels with ``Z`` above the threshold (rare) that no
       neighbour exceeds.
    """
    ns, n, kx, ky = sm.shape
    nu, nv = kx - 2, ky - 2
    resp = np.empty((ns, nu, nv), np.float32)
    hot = np.empty((nu, nv), np.uint8)
    row = np.empty((nu, nv), np.uint8)
    todo = np.empty(nu * nv, np.int64)
    zbuf = np.empty(nu * nv, np.float32)
    sbuf = np.empty(nu * nv, np.int64)
    four = np.float32(4.0)
    loose = np.float32(thr * (1 - 1e-5))
    u0, u1 = b - 1, nu - b + 1
    cap = out_flat.shape[0]
    m = 0
    for p in range(n):
        # 1.
        hot[:] = 0
        for i in range(ns):
            g = sm[i, p]
            r = resp[i]
            bound = loose * prof[i, p].min()
            for u in range(nu):
                gu = g[u]
                gc = g[u + 1]
                gd = g[u + 2]
                ru = r[u]
                hu = hot[u]
                for v in range(nv):
                    t = gc[v + 1] * four
                    t -= gu[v + 1]
                    t -= gd[v + 1]
                    t -= gc[v]
                    t -= gc[v + 2]
                    ru[v] = t
                    hu[v] |= np.uint8(t > bound)
        if u1 <= u0:
            continue
        hot[:u0] = 0
        hot[u1:] = 0
        hot[:, :u0] = 0
        hot[:, nv - b + 1:] = 0
        # 2. dilate by 3 x 3 (along v, then along u), then list
        for u in range(nu):
            hu = hot[u]
            ru = row[u]
            for v in range(nv):
                ru[v] = hu[v] | hu[max(v - 1, 0)] | hu[min(v + 1, nv - 1)]
        k = 0
        for u in range(nu):
            ra = row[max(u - 1, 0)]
            rb = row[u]
            rc = row[min(u + 1, nu - 1)]
            base = u * nv
            for v in range(nv):
                todo[k] = base + v
                k += ra[v] | rb[v] | rc[v]
        # 3.
        pr = prof[:, p]
        for q in range(k):
            e = todo[q]
            u = e // nv
            v = e - u * nv
            pix = (v + 1) * kx + u + 1
            lo_j = j0[pix]
            hi_j = j1[pix]
            fp = f[pix]
            z = np.float32(0)
            best = 0
            for i in range(ns):
                lo = pr[i, lo_j]
                unit = lo + fp * (pr[i, hi_j] - lo)
                zi = resp[i, u, v] / unit
                if i == 0:
                    z = zi
                else:
                    best = i if zi > z else best
                    z = max(z, zi)
            zbuf[e] = z
            sbuf[e] = best
        # 4.
        for q in range(k):
            e = todo[q]
            c = zbuf[e]
            if not np.float64(c) > thr:
                continue
            u = e // nv
            v = e - u * nv
            if not hot[u, v]:
                continue
            peak = True
            for uu in range(max(u - 1, 0), min(u + 2, nu)):
                for vv in range(max(v - 1, 0), min(v + 2, nv)):
                    if zbuf[uu * nv + vv] > c:
                        peak = False
            if not peak:
                continue
            if m == cap:
                return -1
            out_flat[m] = p * nu * nv + e
            out_z[m] = c
            out_s[m] = sbuf[e]
            m += 1
    return m
