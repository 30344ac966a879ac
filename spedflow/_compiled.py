"""Compiled kernels (numba): the per-pattern loops of both passes of the VDF workflow.

The NumPy kernels they stand for are the reference (``SPEDFLOW_JIT=0`` runs them;
``tests/test_compiled.py`` compares each pair). Each kernel here keeps a pattern in
cache from its first step to its last, where NumPy makes every step a pass through
memory. All of them live in this one file on purpose: numba's on-disk cache
(``cache=True``) checks only the source file of the function it loads, so a kernel
calling one from another file would keep running the other's old code after an edit.

Pass 1
    - :func:`local_maxima`: the peak finder's candidate search (step 2 of
      :func:`spedflow.peaks.kernels._batch_peaks` with radial noise units): LoG response
      (5-point Laplacian of the smoothed patterns), its significance ``Z = max_s R_s /
      unit_s`` and the pixels where ``Z`` exceeds the threshold and no neighbour exceeds
      it. The same float32 operations in the same order as the NumPy code (the
      Laplacian's terms, ``lo + f (hi - lo)`` for the units, the first scale winning
      ties, NaN as ``np.maximum`` and ``>=`` treat it), so the same candidates bit for bit.
    - :func:`ring_residual`: the ring background of the counting-noise model
      (:class:`~spedflow.peaks.noise.RingModel`): each ring's mean, clipped twice at the
      Poisson bound, subtracted; the ring sums in another order (vectorised), so equal to
      float32 rounding, and exactly on counts.

Pass 2
    :func:`pass2_sums`: the whole of :func:`spedflow.vdf.kernels.preprocessed_sums` with
    ``counts`` (the workflow's default): bilinear shift to the centre (bit for bit), ring
    background, DoG (``max(z - G_high, 0)`` where ``G_low > G_high``; ``G_low`` a direct
    periodic convolution with the taps above 2**-24 of the largest, which the NumPy
    band products leave out too, ``G_high`` its low-rank factors ``A (B^T Z B) A^T`` by
    BLAS as in NumPy), rows and columns shifted in from off the detector zeroed, disc
    sums (the padded gathers of :func:`spedflow.vdf.kernels._padded_columns`). Equal to
    float32 rounding; a pixel where ``G_low`` and ``G_high`` tie to rounding can fall on
    the other side of the DoG's mask.

Only imported through :func:`spedflow._jit.compiled`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit

from ._jit import announce_compile

__all__ = ["local_maxima", "ring_tables", "ring_residual", "Operators", "operators",
           "pass2_sums"]


# ======================================================================= pass 1
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
        announce_compile(_maxima)
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
                    z = zi if (zi > z or zi != zi) else z  # np.maximum: NaN wins
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
                    if not c >= zbuf[uu * nv + vv]:  # as NumPy: a NaN neighbour blocks
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
    """(sum, count) of the values that are not NaN (pixels beyond the detector's edge in
    patterns aligned into a NaN fill; branch-free, so it vectorises)."""
    acc = np.float32(0)
    cnt = np.float32(0)
    for k in range(v.shape[0]):
        t = v[k]
        ok = t == t
        acc += t if ok else np.float32(0)
        cnt += np.float32(ok)
    return acc, cnt


@njit(cache=True, fastmath=_REASSOC, error_model="numpy")
def _seg_clip_sum(v, bound):
    """(sum, count) of the ``v[k] <= bound`` (NaN never is; branch-free, so it vectorises)."""
    acc = np.float32(0)
    cnt = np.float32(0)
    for k in range(v.shape[0]):
        t = v[k]
        ok = t <= bound
        acc += t if ok else np.float32(0)
        cnt += np.float32(ok)
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
    empty = False
    for j in range(counts.shape[0]):
        seg = xs[starts[j]:starts[j + 1]]
        s, c = _seg_sum(seg)
        if c == 0:  # every pixel of the ring beyond the detector: from its neighbours below
            prof[j] = np.nan
            empty = True
            continue
        m64 = np.float64(s) / np.float64(c)
        b64 = m64 + 4.0 * math.sqrt(max(gain * max(m64, 0.0) + read_var, 0.0)) + gain
        s, c = _seg_clip_sum(seg, _f32_floor(b64))
        m = s / max(c, np.float32(1))
        b32 = m + c32 * np.sqrt(max(g32 * max(m, np.float32(0)) + rv32, np.float32(0))) + g32
        s, c = _seg_clip_sum(seg, b32)
        prof[j] = s / max(c, np.float32(1))
    if empty:
        _fill_empty_rings(prof)


@njit(cache=True)
def _fill_empty_rings(prof):
    """NaN entries of a ring profile take the nearest ring's value inwards, else outwards."""
    last = np.float32(np.nan)
    for j in range(prof.shape[0]):
        if prof[j] == prof[j]:
            last = prof[j]
        else:
            prof[j] = last
    nxt = np.float32(np.nan)
    for j in range(prof.shape[0] - 1, -1, -1):
        if prof[j] == prof[j]:
            nxt = prof[j]
        else:
            prof[j] = nxt


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
    from .peaks.noise import ring_model
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
        announce_compile(_ring_chunk)
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


# ======================================================================= pass 2
#: Input dtypes compiled for as they are (native byte order); any other is converted to
#: float32 first (each dtype is one more specialisation to compile).
_NATIVE = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


class Operators:
    """Detector- and parameter-dependent constants of the compiled pass 2."""

    def __init__(self, shape, sigma_low: float, sigma_high: float):
        from .preprocess.kernels import _wrap_blur_factors
        ky, kx = shape
        self.order, self.starts, self.counts, self.j0, self.j1, self.f, self.g = \
            ring_tables((ky, kx))
        self.klow_y = _half_kernel(_wrap_blur_factors(ky, sigma_low), ky)
        self.klow_x = _half_kernel(_wrap_blur_factors(kx, sigma_low), kx)
        # G_high through its low-rank factors: products of rank r cost ~2 r n^2, the
        # whole matrix's 2 n^3 (NumPy keeps the whole matrix above r = n / 4; a beam of
        # 1.5 px radius gives r ~ n / 3, and the whole pass fell back to NumPy there)
        ay, by = _wrap_blur_factors(ky, sigma_high, ky // 2)
        ax, bx = _wrap_blur_factors(kx, sigma_high, kx // 2)
        self.ok = (self.klow_y is not None and self.klow_x is not None
                   and by is not None and bx is not None)
        if self.ok:
            self.ay = np.ascontiguousarray(ay, np.float32)
            self.byt = np.ascontiguousarray(by.T, np.float32)
            self.bx = np.ascontiguousarray(bx, np.float32)
            self.axt = np.ascontiguousarray(ax.T, np.float32)


def _half_kernel(factors, n: int):
    """Taps ``k[0..h]`` of a narrow periodic Gaussian (its circulant matrix's first
    column, taps below 2**-24 of the largest left out), or None if it is low rank
    (a wide one) or its band does not fit the detector."""
    from .preprocess.kernels import _band_halfwidth
    m, low_rank = factors
    if low_rank is not None:
        return None
    h = _band_halfwidth(m)  # the taps NumPy's band products keep
    if 2 * h + 1 > n:
        return None
    return np.ascontiguousarray(m[:h + 1, 0], np.float32)


@functools.lru_cache(maxsize=16)
def operators(shape, sigma_low: float, sigma_high: float) -> Operators:
    """The cached :class:`Operators` (``.ok`` False: this case runs in NumPy)."""
    return Operators(tuple(int(s) for s in shape), float(sigma_low), float(sigma_high))


def pass2_sums(frames: np.ndarray, shifts: np.ndarray, ops: Operators, idx: np.ndarray,
               w: np.ndarray, gain: float, read_var: float) -> np.ndarray:
    """VDF sums (n, N) float32 of ``frames`` (n, ky, kx) shifted by ``shifts`` (n, 2)
    (``centre - beam``), with the padded disc columns ``idx``, ``w`` (N, K)."""
    if frames.dtype not in _NATIVE:  # e.g. '>u2' (a Merlin file), int32, float64
        frames = frames.astype(np.float32)
    frames = np.ascontiguousarray(frames)
    if not frames.flags.writeable:
        # a chunk dask moved from another worker is read-only, a type numba compiles
        # separately (~4 s on a worker, in the middle of the pass); a copy is ~3 ms
        frames = frames.copy()
    out = np.empty((len(frames), len(idx)), np.float32)
    if len(frames) == 0:
        return out
    announce_compile(_pass2_chunk)
    _pass2_chunk(frames, np.ascontiguousarray(shifts, np.float64), ops.order, ops.starts,
                 ops.j0, ops.j1, ops.f, ops.g, ops.counts, float(gain), float(read_var),
                 ops.klow_y, ops.klow_x, ops.ay, ops.byt, ops.bx, ops.axt,
                 np.ascontiguousarray(idx, np.int64), np.ascontiguousarray(w, np.float32), out)
    return out


# ----------------------------------------------------------------------- shift
@njit(cache=True, error_model="numpy")
def _shift_one(src, sy, sx, out, row):
    """``out = src`` moved by ``(sy, sx)``, bilinear, 0 where the source is off the
    detector: ``preprocess.kernels._bilinear_shift``, the same float32 operations in
    the same order (rows first, then columns)."""
    ky, kx = src.shape
    iy = int(math.floor(sy))
    ix = int(math.floor(sx))
    fy = np.float32(sy - iy)
    fx = np.float32(sx - ix)
    wy0 = np.float32(1.0) - fy
    wx0 = np.float32(1.0) - fx
    uy0 = wy0 != 0 and abs(iy) < ky
    uy1 = fy != 0 and abs(iy + 1) < ky
    ux0 = wx0 != 0 and abs(ix) < kx
    ux1 = fx != 0 and abs(ix + 1) < kx
    a0, b0 = max(0, ix), kx - max(0, -ix)
    a1, b1 = max(0, ix + 1), kx - max(0, -(ix + 1))
    for y in range(ky):
        s0 = y - iy
        s1 = y - iy - 1
        ok0 = uy0 and 0 <= s0 < ky
        ok1 = uy1 and 0 <= s1 < ky
        if ok0 and ok1:
            r0 = src[s0]
            r1 = src[s1]
            for x in range(kx):
                row[x] = wy0 * np.float32(r0[x]) + fy * np.float32(r1[x])
        elif ok0:
            r0 = src[s0]
            for x in range(kx):
                row[x] = wy0 * np.float32(r0[x])
        elif ok1:
            r1 = src[s1]
            for x in range(kx):
                row[x] = fy * np.float32(r1[x])
        else:
            row[:] = 0
        o = out[y]
        o[:] = 0
        if ux0 and b0 > a0:
            dst = o[a0:b0]
            sr = row[a0 - ix:b0 - ix]
            for x in range(b0 - a0):
                dst[x] = wx0 * sr[x]
        if ux1 and b1 > a1:
            dst = o[a1:b1]
            sr = row[a1 - ix - 1:b1 - ix - 1]
            for x in range(b1 - a1):
                dst[x] += fx * sr[x]


# ------------------------------------------------------------------------ DoG
@njit(cache=True, error_model="numpy")
def _xpass(zrow, klow, pad, trow):
    """``trow`` = periodic convolution of ``zrow`` with the symmetric taps ``klow``."""
    kx = zrow.shape[0]
    h = klow.shape[0] - 1
    for x in range(h):
        pad[x] = zrow[kx - h + x]
        pad[h + kx + x] = zrow[x]
    pad[h:h + kx] = zrow
    c = pad[h:h + kx]
    k0 = klow[0]
    for x in range(kx):
        trow[x] = k0 * c[x]
    for d in range(1, h + 1):
        kd = klow[d]
        lo = pad[h - d:h - d + kx]
        hi = pad[h + d:h + d + kx]
        for x in range(kx):
            trow[x] += kd * (lo[x] + hi[x])


@njit(cache=True, error_model="numpy")
def _result_row(t, y, klow, zrow, ghrow, rowok, colok, glo):
    """Row ``y`` of the DoG result, in place in ``zrow``: ``G_low`` of the row from
    the x-blurred rows ``t``, then ``max(z - G_high, 0)`` where ``G_low > G_high`` and
    the pixel's source is on the detector, else 0."""
    ky, kx = t.shape
    h = klow.shape[0] - 1
    k0 = klow[0]
    ty = t[y]
    for x in range(kx):
        glo[x] = k0 * ty[x]
    for d in range(1, h + 1):
        kd = klow[d]
        ya = y - d
        if ya < 0:
            ya += ky
        yb = y + d
        if yb >= ky:
            yb -= ky
        a = t[ya]
        b = t[yb]
        for x in range(kx):
            glo[x] += kd * (a[x] + b[x])
    if rowok:
        for x in range(kx):
            v = zrow[x] - ghrow[x]
            if not colok[x]:
                v = np.float32(0)
            elif v != v:
                pass  # NaN stays NaN, as NumPy's max(v, 0) * mask keeps it
            elif not (v > 0 and glo[x] > ghrow[x]):
                v = np.float32(0)
            zrow[x] = v
    else:
        zrow[:] = 0


@njit(cache=True)
def _valid(shift, n, ok):
    """Rows (or columns) whose source ``i - shift`` lies on the detector
    (``preprocess.kernels._valid_mask``)."""
    eps = 1e-6
    for i in range(n):
        ok[i] = (i >= shift - eps) and (i <= n - 1 + shift + eps)


@njit(cache=True, nogil=True)
def _set_invalid(z, rowok, colok, value):
    """In place: ``value`` in the rows and columns of ``z`` not ``rowok`` / ``colok``."""
    ky, kx = z.shape
    for y in range(ky):
        if not rowok[y]:
            z[y, :] = value
    for x in range(kx):
        if not colok[x]:
            z[:, x] = value


# ---------------------------------------------------------------------- fused
@njit(cache=True, nogil=True, error_model="numpy")
def _pass2_chunk(frames, shifts, order, starts, j0, j1, f, g, counts, gain, read_var,
                 klow_y, klow_x, ay, byt, bx, axt, idx, w, out):
    """Per pattern: shift -> ring background -> DoG -> invalid rows / columns zeroed ->
    disc sums. Buffers: the pattern (in place throughout), its x-blur, ``G_high`` and
    one ring-ordered copy."""
    n, ky, kx = frames.shape
    hx = klow_x.shape[0] - 1
    z = np.empty((ky, kx), np.float32)
    t = np.empty((ky, kx), np.float32)
    gh = np.empty((ky, kx), np.float32)
    xs = np.empty(ky * kx, np.float32)
    pad = np.empty(kx + 2 * hx, np.float32)
    glo = np.empty(kx, np.float32)
    row = np.empty(kx, np.float32)
    rowok = np.empty(ky, np.bool_)
    colok = np.empty(kx, np.bool_)
    prof = np.empty(counts.shape[0], np.float32)
    zf = z.ravel()
    nv, nk = idx.shape
    for i in range(n):
        _shift_one(frames[i], shifts[i, 0], shifts[i, 1], z, row)
        _valid(shifts[i, 0], ky, rowok)
        _valid(shifts[i, 1], kx, colok)
        # beyond the detector's edge: left out of the ring background (NaN), then at it
        # (0): the shift's fill of 0 is a step wherever the background is not 0 (a dark
        # level left in the data), which the rings and the DoG carried into the discs
        _set_invalid(z, rowok, colok, np.float32(np.nan))
        _ring_profile(zf, order, starts, counts, gain, read_var, xs, prof)
        _subtract_rings(zf, prof, j0, j1, f, g)
        _set_invalid(z, rowok, colok, np.float32(0))
        for y in range(ky):
            _xpass(z[y], klow_x, pad, t[y])
        # G_high = A_y (B_y^T Z B_x) A_x^T, low rank
        np.dot(ay, np.dot(np.dot(np.dot(byt, z), bx), axt), gh)
        for y in range(ky):
            _result_row(t, y, klow_y, z[y], gh[y], rowok[y], colok, glo)
        o = out[i]
        for v in range(nv):
            o[v] = _disc(zf, idx[v], w[v], nk)


@njit(cache=True, fastmath=_REASSOC, error_model="numpy")
def _disc(zf, iv, wv, nk):
    acc = np.float32(0)
    for k in range(nk):
        acc += zf[iv[k]] * wv[k]
    return acc
