"""Pass 1's heaviest steps as compiled loops per pattern (numba): the peak finder's
candidate search, and the ring background of the counting-noise model (which pass 2,
:mod:`spedflow.vdf._compiled`, uses too).

Candidate search.
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

Ring background (:func:`ring_residual`): each ring's mean, clipped twice at the Poisson
bound, subtracted as :class:`~spedflow.peaks.noise.RingModel` does; the ring sums in
another order (vectorised), so equal to float32 rounding, and exactly on counts.

Only imported when :func:`spedflow._jit.enabled`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit

__all__ = ["local_maxima", "ring_tables", "ring_residual"]

#: fastmath flags where only a sum's order may change (no FMA contraction elsewhere)
_REASSOC = {"reassoc", "nsz"}


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


# ----------------------------------------------------------- ring background
@njit(cache=True, fastmath=_REASSOC, error_model="numpy")
def _seg_sum(v):
    acc = np.float32(0)
    for k in range(v.shape[0]):
        acc += v[k]
    return acc


@njit(cache=True, fastmath=_REASSOC, error_model="numpy")
def _seg_clip_sum(v, bound):
    """(sum, count) of the ``v[k] <= bound`` (branch-free, so it vectorises)."""
    acc = np.float32(0)
    cnt = np.float32(0)
    for k in range(v.shape[0]):
        t = v[k]
        kf = np.float32(t <= bound)
        acc += t * kf
        cnt += kf
    return acc, cnt


@njit(cache=True)
def _f32_floor(b):
    """The largest float32 <= ``b`` (float64): ``v <= b`` in float64 equals
    ``v <= it`` in float32 for every float32 ``v`` (NumPy's first clip compares the
    float32 pixels with a float64 bound)."""
    c = np.float32(b)
    if np.float64(c) > b:
        c = np.nextafter(c, np.float32(-np.inf))
    return c


@njit(cache=True, error_model="numpy")
def _ring_profile(xflat, order, starts, counts, gain, read_var, xs, prof):
    """``RingModel.background`` of one aligned pattern into ``prof``: the mean of each
    ring, then twice the mean of its pixels below the Poisson clip (the first bound
    in float64, the second in float32, as NumPy's promotion has them)."""
    for k in range(order.shape[0]):
        xs[k] = xflat[order[k]]
    g32 = np.float32(gain)
    rv32 = np.float32(read_var)
    c32 = np.float32(4.0)
    for j in range(counts.shape[0]):
        seg = xs[starts[j]:starts[j + 1]]
        m64 = np.float64(_seg_sum(seg)) / np.float64(counts[j])
        b64 = m64 + 4.0 * math.sqrt(gain * max(m64, 0.0) + read_var) + gain
        s, c = _seg_clip_sum(seg, _f32_floor(b64))
        m = s / max(c, np.float32(1))
        b32 = m + c32 * np.sqrt(g32 * max(m, np.float32(0)) + rv32) + g32
        s, c = _seg_clip_sum(seg, b32)
        prof[j] = s / max(c, np.float32(1))


@njit(cache=True, error_model="numpy")
def _subtract_rings(xflat, prof, j0, j1, f, g):
    """In place: minus ``RingModel.image(prof)`` (linear in radius between rings)."""
    for p in range(xflat.shape[0]):
        xflat[p] = xflat[p] - (prof[j0[p]] * g[p] + prof[j1[p]] * f[p])


@functools.lru_cache(maxsize=32)
def ring_tables(shape, offset=(0.0, 0.0)) -> tuple:
    """The ring model of :func:`spedflow.peaks.noise.ring_model` as the compiled kernels
    take it: ``(order, starts, counts, j0, j1, f, g)``, with ``order`` the pixels sorted
    by ring (stably: each ring's pixels in row-major order) and ring ``j`` at
    ``order[starts[j]:starts[j + 1]]``."""
    from .noise import ring_model
    rings = ring_model(tuple(int(s) for s in shape), tuple(float(o) for o in offset))
    ring = rings.ring.ravel()
    order = np.argsort(ring, kind="stable").astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(np.bincount(ring, minlength=rings.n_rings))])
    out = (order, starts.astype(np.int64), np.array(rings.counts, np.int64),
           np.array(rings.j0, np.int64), np.array(rings.j1, np.int64),
           np.array(rings.f, np.float32), np.array(rings._g, np.float32))  # copies
    for a in out:
        a.flags.writeable = False  # shared by every caller (lru_cache)
    return out


def ring_residual(frames: np.ndarray, gain: float, read_var: float, offset=(0.0, 0.0)):
    """``(background, residual)`` of ``(n, ky, kx)`` aligned patterns, as
    :meth:`RingModel.background <spedflow.peaks.noise.RingModel.background>` and
    ``frames - RingModel.image(background)`` give them (the ring sums in another
    order: equal to float32 rounding)."""
    frames = np.ascontiguousarray(frames, np.float32)
    order, starts, counts, j0, j1, f, g = ring_tables(frames.shape[1:], offset)
    residual = frames.copy()
    background = np.empty((len(frames), len(counts)), np.float32)
    if len(frames):
        _ring_chunk(residual, order, starts, counts, j0, j1, f, g, float(gain),
                    float(read_var), background)
    return background, residual


@njit(cache=True, nogil=True, error_model="numpy")
def _ring_chunk(x, order, starts, counts, j0, j1, f, g, gain, read_var, background):
    """In place per pattern: the ring background into ``background``, subtracted."""
    n, ky, kx = x.shape
    xs = np.empty(ky * kx, np.float32)
    for i in range(n):
        xf = x[i].ravel()
        _ring_profile(xf, order, starts, counts, gain, read_var, xs, background[i])
        _subtract_rings(xf, background[i], j0, j1, f, g)
