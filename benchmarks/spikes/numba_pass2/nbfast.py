"""Numba spike, optimised version: pass 2 of the VDF workflow
(spedflow.vdf.kernels.preprocessed_sums) as one fused per-pattern kernel, and its
pieces as separate kernels for timing.

Single-threaded. Inner loops index 1-D views with the loop counter only (numba's
negative-index wraparound otherwise blocks vectorisation).

* shift: bit-identical to preprocess.kernels._bilinear_shift (same float32 ops, order).
* ring background: pixels gathered into ring order once per pattern, each ring's sums
  vectorised (fastmath reassociation: float32 rounding differs from scipy's sequential
  CSR sums); bounds in float64 / float32 as the NumPy code.
* G_low (sigma 1.49): direct separable periodic 17-tap convolution (the band of
  _circulant_band; weights beyond it < 2**-24 of the largest, left out there too).
* G_high (sigma 11.9): its rank-19 factors, G = A (B^T Z B) A^T, by np.dot (BLAS sgemm)
  per pattern (variant "blas") or the last product as a vectorised loop per row
  (variant "loop", one full buffer less).
* disc sums: padded (N, K) gathers, vectorised reductions.
"""
import math

import numpy as np
from numba import njit

FM = {"reassoc", "nsz", "contract"}  # only where a sum order / FMA is free to change
FM_NC = {"reassoc", "nsz"}


# ------------------------------------------------------------------ shift
@njit(cache=True, error_model="numpy")
def _shift_one(src, sy, sx, out, row):
    """Bilinear shift of one pattern, exactly preprocess.kernels._bilinear_shift."""
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
    # x ranges: out[x] += w * row[x - d] for x in [max(0, d), kx - max(0, -d))
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


@njit(cache=True)
def shift_chunk(frames, shifts, out):
    n, ky, kx = frames.shape
    row = np.empty(kx, np.float32)
    for i in range(n):
        _shift_one(frames[i], shifts[i, 0], shifts[i, 1], out[i], row)


# ------------------------------------------------------------------ ring background
@njit(cache=True, fastmath=FM_NC, error_model="numpy")
def _seg_sum(v):
    acc = np.float32(0)
    for k in range(v.shape[0]):
        acc += v[k]
    return acc


@njit(cache=True, fastmath=FM_NC, error_model="numpy")
def _seg_clip_sum(v, bound):
    """(sum, count) of the v[k] <= bound (float32, branch-free so it vectorises)."""
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
    """The largest float32 <= b (float64): ``v <= b`` in float64 equals ``v <= it`` in
    float32 for every float32 v (NumPy's first clip compares in float64)."""
    c = np.float32(b)
    if np.float64(c) > b:
        c = np.nextafter(c, np.float32(-np.inf))
    return c


@njit(cache=True, error_model="numpy")
def _ring_profile(xflat, order, starts, counts, gain, read_var, xs, prof):
    """RingModel.background of one aligned pattern (flat float32) into prof."""
    P = order.shape[0]
    for k in range(P):
        xs[k] = xflat[order[k]]
    nr = counts.shape[0]
    g32 = np.float32(gain)
    rv32 = np.float32(read_var)
    c32 = np.float32(4.0)
    for j in range(nr):
        seg = xs[starts[j]:starts[j + 1]]
        m64 = np.float64(_seg_sum(seg)) / np.float64(counts[j])
        b64 = m64 + 4.0 * math.sqrt(gain * max(m64, 0.0) + read_var) + gain
        s, c = _seg_clip_sum(seg, _f32_floor(b64))
        m = s / max(c, np.float32(1))
        b32 = m + c32 * np.sqrt(g32 * max(m, np.float32(0)) + rv32) + g32
        s, c = _seg_clip_sum(seg, b32)
        prof[j] = s / max(c, np.float32(1))


@njit(cache=True, error_model="numpy")
def _subtract_image(xflat, prof, j0, j1, f, g, out):
    for p in range(xflat.shape[0]):
        out[p] = xflat[p] - (prof[j0[p]] * g[p] + prof[j1[p]] * f[p])


@njit(cache=True)
def ring_subtract_chunk(x, order, starts, j0, j1, f, g, counts, gain, read_var, out):
    """out = x - RingModel.image(RingModel.background(x)) for each pattern."""
    n, ky, kx = x.shape
    nr = counts.shape[0]
    xs = np.empty(ky * kx, np.float32)
    prof = np.empty(nr, np.float32)
    for i in range(n):
        xf = x[i].ravel()
        _ring_profile(xf, order, starts, counts, gain, read_var, xs, prof)
        _subtract_image(xf, prof, j0, j1, f, g, out[i].ravel())


# ------------------------------------------------------------------ DoG + result
@njit(cache=True, error_model="numpy")
def _xpass(zrow, klow, pad, trow):
    kx = zrow.shape[0]
    h = klow.shape[0] - 1
    pad[:h] = zrow[kx - h:]
    pad[h:h + kx] = zrow
    pad[h + kx:] = zrow[:h]
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
def _res_row(T, y, klow, zrow, ghrow, rowok, colok, glo):
    """Row y of the result, in place in zrow: max(z - G_high, 0) * (G_low > G_high)."""
    ky, kx = T.shape
    h = klow.shape[0] - 1
    k0 = klow[0]
    t = T[y]
    for x in range(kx):
        glo[x] = k0 * t[x]
    for d in range(1, h + 1):
        kd = klow[d]
        ya = y - d
        if ya < 0:
            ya += ky
        yb = y + d
        if yb >= ky:
            yb -= ky
        a = T[ya]
        b = T[yb]
        for x in range(kx):
            glo[x] += kd * (a[x] + b[x])
    if rowok:
        for x in range(kx):
            v = zrow[x] - ghrow[x]
            zrow[x] = v if (v > 0 and glo[x] > ghrow[x] and colok[x]) else np.float32(0)
    else:
        zrow[:] = 0


@njit(cache=True, error_model="numpy")
def _ghigh_row(AT_col_y, D, out):
    """out = sum_r A[y, r] D[r] (A[y] given as a length-R vector)."""
    R, kx = D.shape
    out[:] = 0
    for r in range(R):
        a = AT_col_y[r]
        d = D[r]
        for x in range(kx):
            out[x] += a * d[x]


@njit(cache=True, error_model="numpy")
def _dog_res_one(z, klow, A, AT, B, BT, rowok, colok, T, G, pad, glo, blas_last):
    """In place: z (ky, kx) -> the DoG result with invalid rows / columns zeroed.
    G: (ky, kx) buffer for G_high if blas_last, else unused (row by row)."""
    ky, kx = z.shape
    for y in range(ky):
        _xpass(z[y], klow, pad, T[y])
    U = np.dot(BT, z)     # (R, kx) = B^T Z
    C = np.dot(U, B)      # (R, R)
    D = np.dot(C, AT)     # (R, kx) = C A^T
    if blas_last:
        np.dot(A, D, G)   # (ky, kx) = A D
        for y in range(ky):
            _res_row(T, y, klow, z[y], G[y], rowok[y], colok, glo)
    else:
        gh = G[0]
        for y in range(ky):
            _ghigh_row(A[y], D, gh)
            _res_row(T, y, klow, z[y], gh, rowok[y], colok, glo)


@njit(cache=True)
def _valid(shift, n, ok):
    eps = 1e-6
    for y in range(n):
        ok[y] = (y >= shift - eps) and (y <= n - 1 + shift + eps)


@njit(cache=True)
def dog_chunk(z, shifts, klow, A, AT, B, BT, blas_last, out):
    n, ky, kx = z.shape
    h = klow.shape[0] - 1
    T = np.empty((ky, kx), np.float32)
    G = np.empty((ky, kx), np.float32)
    pad = np.empty(kx + 2 * h, np.float32)
    glo = np.empty(kx, np.float32)
    rowok = np.empty(ky, np.bool_)
    colok = np.empty(kx, np.bool_)
    for i in range(n):
        _valid(shifts[i, 0], ky, rowok)
        _valid(shifts[i, 1], kx, colok)
        out[i] = z[i]
        _dog_res_one(out[i], klow, A, AT, B, BT, rowok, colok, T, G, pad, glo, blas_last)


# ------------------------------------------------------------------ disc sums
@njit(cache=True, fastmath=FM, error_model="numpy")
def _disc_one(res_flat, idx, w, out):
    nv, K = idx.shape
    for v in range(nv):
        iv = idx[v]
        wv = w[v]
        acc = np.float32(0)
        for k in range(K):
            acc += res_flat[iv[k]] * wv[k]
        out[v] = acc


@njit(cache=True)
def disc_chunk(res, idx, w, out):
    n = res.shape[0]
    for i in range(n):
        _disc_one(res[i].ravel(), idx, w, out[i])


# ------------------------------------------------------------------ fused
@njit(cache=True)
def pass2_chunk(frames, shifts, order, starts, j0, j1, f, g, counts, gain, read_var,
                klow, A, AT, B, BT, idx, w, blas_last, out):
    """The whole of pass 2 for one chunk (n, ky, kx) uint16 -> out (n, N) float32: per
    pattern shift -> ring background -> subtract -> DoG -> zero invalid -> disc sums.
    Per-pattern buffers: X (the pattern, in place throughout), T (x-blurred), and G
    (G_high) if blas_last, plus one ring-ordered copy for the background."""
    n, ky, kx = frames.shape
    h = klow.shape[0] - 1
    nr = counts.shape[0]
    X = np.empty((ky, kx), np.float32)
    T = np.empty((ky, kx), np.float32)
    G = np.empty((ky if blas_last else 1, kx), np.float32)
    xs = np.empty(ky * kx, np.float32)
    pad = np.empty(kx + 2 * h, np.float32)
    glo = np.empty(kx, np.float32)
    row = np.empty(kx, np.float32)
    rowok = np.empty(ky, np.bool_)
    colok = np.empty(kx, np.bool_)
    prof = np.empty(nr, np.float32)
    xf = X.ravel()
    for i in range(n):
        _shift_one(frames[i], shifts[i, 0], shifts[i, 1], X, row)
        _ring_profile(xf, order, starts, counts, gain, read_var, xs, prof)
        _subtract_image(xf, prof, j0, j1, f, g, xf)
        _valid(shifts[i, 0], ky, rowok)
        _valid(shifts[i, 1], kx, colok)
        _dog_res_one(X, klow, A, AT, B, BT, rowok, colok, T, G, pad, glo, blas_last)
        _disc_one(xf, idx, w, out[i])


# ------------------------------------------------------------------ ring image in ring order
@njit(cache=True, error_model="numpy")
def _seg_image(xs_seg, j0_seg, g_seg, f_seg, j, pa, pb, pc, zs_seg):
    """zs = xs - (prof[j0] g + prof[j0 + 1] f) on ring j's pixels, whose j0 is j - 1
    or j (prof[j - 1], prof[j], prof[j + 1] = pa, pb, pc): selects, no gathers."""
    for k in range(xs_seg.shape[0]):
        sel = j0_seg[k] == j
        a = pb if sel else pa
        b = pc if sel else pb
        zs_seg[k] = xs_seg[k] - (a * g_seg[k] + b * f_seg[k])


@njit(cache=True, error_model="numpy")
def _ring_subtract_sorted(xflat, order, starts, counts, gain, read_var, xs, prof,
                          j0s, gs, fs, zs):
    """In place: xflat -= ring image of its ring background. The image is formed in ring
    order (vectorised) and scattered back; the same float32 operations as
    _subtract_image."""
    _ring_profile(xflat, order, starts, counts, gain, read_var, xs, prof)
    nr = counts.shape[0]
    for j in range(nr):
        a, b = starts[j], starts[j + 1]
        pa = prof[j - 1] if j > 0 else np.float32(0)
        pc = prof[j + 1] if j + 1 < nr else np.float32(0)
        _seg_image(xs[a:b], j0s[a:b], gs[a:b], fs[a:b], np.uint32(j), pa, prof[j], pc, zs[a:b])
    for k in range(order.shape[0]):
        xflat[order[k]] = zs[k]
