"""Pass 2 of the VDF workflow as one compiled loop per pattern (numba).

:func:`spedflow.vdf.kernels.preprocessed_sums` with ``counts`` given (the workflow's
default, counting noise) does, per pattern: bilinear shift to the centre, ring
background (each 1-px ring's mean with the spots clipped) subtracted, DoG
(``max(z - G_high, 0)`` where ``G_low > G_high``), rows and columns shifted in from
off the detector zeroed, and the disc sums at every vector. The NumPy code does each
step over a batch of patterns, each a pass through memory; here each pattern stays in
cache from the first step to the last (3-4x faster, ``benchmarks/spikes/numba_pass2``).

The same operations in the same float32 / float64 precision as the NumPy kernels:

- shift: bit for bit;
- ring background: the ring sums in another order (float32 rounding);
- ``G_low``: a direct periodic convolution with the taps above 2**-24 of the largest
  (the NumPy code's band products leave out the same taps); ``G_high``: its low-rank
  factors ``A (B^T Z B) A^T`` by BLAS, as the NumPy code;
- disc sums: the padded gathers of :func:`spedflow.vdf.kernels._padded_columns`.

So the sums agree to float32 rounding; a pixel where ``G_low`` and ``G_high`` tie to
rounding can fall on the other side of the DoG's mask.

Only imported when :func:`spedflow._jit.enabled`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit

from ..peaks._compiled import _REASSOC, _ring_profile, _subtract_rings, ring_tables

__all__ = ["Operators", "operators", "pass2_sums"]

#: Input dtypes compiled for as they are; any other is converted to float32 first
#: (each dtype is one more specialisation to compile).
_NATIVE = (np.uint8, np.uint16, np.float32)


class Operators:
    """Detector- and parameter-dependent constants of the compiled pass 2."""

    def __init__(self, shape, sigma_low: float, sigma_high: float):
        from ..preprocess.kernels import _wrap_blur_factors
        ky, kx = shape
        self.shape = (ky, kx)
        self.order, self.starts, self.counts, self.j0, self.j1, self.f, self.g = \
            ring_tables((ky, kx))
        self.klow_y = _half_kernel(_wrap_blur_factors(ky, sigma_low), ky)
        self.klow_x = _half_kernel(_wrap_blur_factors(kx, sigma_low), kx)
        ay, by = _wrap_blur_factors(ky, sigma_high)
        ax, bx = _wrap_blur_factors(kx, sigma_high)
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
    m, low_rank = factors
    if low_rank is not None:
        return None
    k = np.abs(m[:, 0].astype(np.float64))
    d = np.minimum(np.arange(n), n - np.arange(n))
    h = int(d[k > 2.0 ** -24 * k.max()].max())
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
    if frames.dtype.type not in _NATIVE:
        frames = frames.astype(np.float32)
    frames = np.ascontiguousarray(frames)
    out = np.empty((len(frames), len(idx)), np.float32)
    if len(frames) == 0:
        return out
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
            zrow[x] = v if (v > 0 and glo[x] > ghrow[x] and colok[x]) else np.float32(0)
    else:
        zrow[:] = 0


@njit(cache=True)
def _valid(shift, n, ok):
    """Rows (or columns) whose source ``i - shift`` lies on the detector
    (``preprocess.kernels._valid_mask``)."""
    eps = 1e-6
    for i in range(n):
        ok[i] = (i >= shift - eps) and (i <= n - 1 + shift + eps)


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
        _ring_profile(zf, order, starts, counts, gain, read_var, xs, prof)
        _subtract_rings(zf, prof, j0, j1, f, g)
        _valid(shifts[i, 0], ky, rowok)
        _valid(shifts[i, 1], kx, colok)
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
