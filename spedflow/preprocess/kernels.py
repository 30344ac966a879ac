"""Preprocessing kernels: pure NumPy/SciPy on one block of diffraction patterns.

Every function takes a block whose last two axes are the detector ``(ky, kx)`` and any
number of leading (navigation) axes, and is vectorised over the whole block: no Python
loop per pattern. Nothing here imports dask; the lazy wrappers are in ``lazy.py``.

Conventions
-----------
* Centres are ``(..., 2)`` float64 ``(ky, kx)`` in detector pixels, pixel centres at
  integer coordinates.
* Alignment moves the beam to ``(ky // 2, kx // 2)``.
* Gaussian blurs have periodic ("wrap") boundaries; they equal
  ``scipy.ndimage.gaussian_filter(z, sigma, mode="wrap", truncate=large)`` to float32
  precision. Diffraction patterns are dim at the detector edges, so the wrap only mixes
  faint background rows of opposite edges. The DoG computes them as matrix products
  (the circulant matrix of the periodised Gaussian, one BLAS product per axis over a
  batch of patterns; for the wide background Gaussian, which keeps only a few
  frequencies, its low-rank factors) on detectors up to ``_MATRIX_MAX_SIDE`` px, and
  with FFTs on larger ones; both give the same blurs to float32 rounding (the DoG's
  ``G_low > G_high`` mask can then differ at pixels where the two tie).
* Sub-pixel shifts are bilinear interpolation, equal to
  ``scipy.ndimage.shift(order=1, mode="constant")``: pixels whose source lies outside
  the detector are 0. Not Fourier shifts: a saturated direct beam is far from
  band-limited, and its sinc ringing along the beam's row and column survives the
  background removal as a cross of spurious "spots" in every pattern.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft

__all__ = [
    "bin_nav", "bin_detector", "beam_centres", "beam_profile", "merge_profiles", "radius_from_profile",
    "estimate_beam_radius", "DescanFit", "fit_descan", "centres_for_alignment",
    "shift_patterns", "subtract_background_dog", "shift_and_subtract", "gaussian_blur",
    "beam_saturated", "saturated_radius", "spot_scale", "PROFILE_BIN", "align_whole_pixels",
    "whole_shifts", "fill_boxes", "fill_beyond",
    "bad_pixel_counts", "bad_pixels_from", "find_bad_pixels", "pixels_off_detector",
    "repair_pixels",
]

#: Width of the radial bins of the beam profile, detector pixels.
PROFILE_BIN = 0.25
#: Patterns per batch of the FFT and beam kernels (keeps the working set in cache).
_BATCH = 64
#: Relative size below which a Gaussian transfer function counts as zero.
_TRANSFER_EPS = 1e-7
#: Most refinement steps per pattern of the beam centre (:func:`_refine_window`).
_REFINE_MAX_ITER = 200
#: Largest detector side on which the DoG's Gaussians are matrix products: a dense
#: n x n product costs ~2 n^3 multiply-adds per pattern and axis against ~n^2 log n for
#: an FFT, but runs at the machine's vector speed; measured on 128 x 128 patterns,
#: 0.19 ms per pattern for shift + DoG against 0.28 ms with FFTs (one core).
_MATRIX_MAX_SIDE = 160
#: Patterns per batch of the matrix-product DoG (32 x 128 x 128 float32 = 2 MB:
#: the batch and its two blurs stay in a core's cache).
_MATRIX_BATCH = 32
#: Output samples per block of a banded DoG Gaussian (at least twice its radius;
#: :func:`_circulant_band`).
_DOG_BAND_BLOCK = 24
#: Scale of the Gaussian-noise MAD for the norm of a 2-D residual (Rayleigh median).
_RAYLEIGH_MEDIAN = float(np.sqrt(2 * np.log(2)))


# --------------------------------------------------------------------------- binning

def bin_nav(block: np.ndarray, factor: int) -> np.ndarray:
    """Sum ``factor x factor`` navigation blocks of a 4-D block, keeping counts.

    Parameters
    ----------
    block : (cy, cx, ky, kx) array
        ``cy`` and ``cx`` must be multiples of ``factor``.
    factor : int
        Binning factor in both scan directions.

    Returns
    -------
    (cy // factor, cx // factor, ky, kx) ndarray of float32
        Sums (accumulated in float64).
    """
    cy, cx, ky, kx = block.shape
    f = int(factor)
    b = np.asarray(block).reshape(cy // f, f, cx // f, f, ky, kx)
    return b.sum(axis=(1, 3), dtype=np.float64).astype(np.float32)


def bin_detector(block: np.ndarray, factor: int) -> np.ndarray:
    """Sum ``factor x factor`` detector pixels of every pattern, keeping counts.

    Parameters
    ----------
    block : (..., ky, kx) array
        ``ky`` and ``kx`` must be multiples of ``factor``.
    factor : int

    Returns
    -------
    (..., ky // factor, kx // factor) ndarray of float32
        Sums (accumulated in float64, a pattern at a time).
    """
    block = np.asarray(block)
    *lead, ky, kx = block.shape
    f = int(factor)
    flat = block.reshape(-1, ky // f, f, kx // f, f)
    out = np.empty((flat.shape[0], ky // f, kx // f), np.float32)
    for i in range(flat.shape[0]):  # a float64 temporary of one pattern, not of the block
        out[i] = flat[i].sum(axis=(1, 3), dtype=np.float64)
    return out.reshape(*lead, ky // f, kx // f)


# --------------------------------------------------------------------- Fourier tools

def _gauss_transfer_1d(n: int, sigma: float, real: bool) -> np.ndarray:
    """DFT of the periodised, sampled, normalised Gaussian of width ``sigma``.

    Poisson summation of the continuous transfer function: this is exactly the DFT of
    ``sum_m g(x + m n)`` over the sampled Gaussian ``g``, i.e. what
    ``gaussian_filter(mode="wrap")`` with an untruncated kernel does.
    """
    f = sfft.rfftfreq(n) if real else sfft.fftfreq(n)
    m = np.arange(-3, 4)[:, None]
    h = np.exp(-2 * np.pi ** 2 * sigma ** 2 * (f[None, :] + m) ** 2).sum(0)
    h0 = np.exp(-2 * np.pi ** 2 * sigma ** 2 * m[:, 0] ** 2.0).sum()
    return h / h0


def _gauss_transfer(shape, sigma: float) -> np.ndarray:
    """(ky, kx//2+1) float32 transfer function of a 2-D Gaussian blur."""
    ky, kx = shape
    return (_gauss_transfer_1d(ky, sigma, False)[:, None]
            * _gauss_transfer_1d(kx, sigma, True)[None, :]).astype(np.float32)


def _band(n: int, sigma: float) -> int:
    """Highest frequency index whose Gaussian transfer exceeds ``_TRANSFER_EPS``."""
    if sigma <= 0:
        return n
    fcut = np.sqrt(np.log(1 / _TRANSFER_EPS) / (2 * np.pi ** 2)) / sigma
    return int(np.ceil(fcut * n))


def _lowpass_inverse(spec: np.ndarray, shape, sigma: float) -> np.ndarray:
    """``irfft2(spec * H_sigma)`` for a wide Gaussian, using only the columns it keeps.

    The transfer of a Gaussian with sigma >> 1 px vanishes (< 1e-7) beyond a few
    frequency bins, so the column transform runs on those few ``kx`` bins only and the
    row transform on zero-padded spectra: about half the cost of a full ``irfft2``.
    """
    ky, kx = shape
    mx = _band(kx, sigma)
    if mx + 1 > kx // 8:
        return sfft.irfft2(spec * _gauss_transfer(shape, sigma), s=shape, axes=(-2, -1))
    h = _gauss_transfer(shape, sigma)[:, :mx + 1]
    cols = sfft.ifft(spec[:, :, :mx + 1] * h, axis=-2)
    full = np.zeros(spec.shape, dtype=np.complex64)
    full[:, :, :mx + 1] = cols
    return sfft.irfft(full, n=kx, axis=-1)


def _bilinear_shift(stack: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """``out[p] = in[p - shift]`` by bilinear interpolation, 0 where the source is off the detector.

    Separable: ``in(y - d) = (1 - f) in(y - i) + f in(y - i - 1)`` with ``d = i + f``.
    Each pattern has its own shift, so this loops over patterns, but each step is a
    whole-pattern slice-and-add (microseconds).
    """
    n, ky, kx = stack.shape
    out = np.zeros((n, ky, kx), np.float32)
    tmp = np.zeros((ky, kx), np.float32)
    iy = np.floor(shifts[:, 0]).astype(np.int64)
    ix = np.floor(shifts[:, 1]).astype(np.int64)
    fy = (shifts[:, 0] - iy).astype(np.float32)
    fx = (shifts[:, 1] - ix).astype(np.float32)
    for k in range(n):
        tmp[:] = 0
        for dy, wy in ((iy[k], 1 - fy[k]), (iy[k] + 1, fy[k])):
            if wy == 0 or abs(dy) >= ky:
                continue
            src = stack[k, max(0, -dy):ky - max(0, dy)]
            tmp[max(0, dy):ky - max(0, -dy)] += wy * src
        for dx, wx in ((ix[k], 1 - fx[k]), (ix[k] + 1, fx[k])):
            if wx == 0 or abs(dx) >= kx:
                continue
            out[k, :, max(0, dx):kx - max(0, -dx)] += wx * tmp[:, max(0, -dx):kx - max(0, dx)]
    return out


def _valid_mask(shape, shifts: np.ndarray) -> np.ndarray:
    """(N, ky, 1) and (N, 1, kx) bool: rows/columns whose source ``p - shift`` is on the detector."""
    ky, kx = shape
    eps = 1e-6
    y = np.arange(ky)[None, :]
    x = np.arange(kx)[None, :]
    my = (y >= shifts[:, 0:1] - eps) & (y <= ky - 1 + shifts[:, 0:1] + eps)
    mx = (x >= shifts[:, 1:2] - eps) & (x <= kx - 1 + shifts[:, 1:2] + eps)
    return my[:, :, None], mx[:, None, :]


def _continue_edges(z: np.ndarray, rows_ok: np.ndarray, cols_ok: np.ndarray) -> np.ndarray:
    """``z`` (N, ky, kx) with each invalid row (column) replaced by the nearest valid one
    of its pattern (``rows_ok`` (N, ky, 1), ``cols_ok`` (N, 1, kx) from
    :func:`_valid_mask`); a pattern with no valid row or column is left as it is."""
    def nearest(ok):  # per pattern, the index of the nearest valid entry, for every entry
        idx = np.arange(ok.shape[1])[None]
        first = np.where(ok.any(axis=1), ok.argmax(axis=1), 0)
        last = np.where(ok.any(axis=1), ok.shape[1] - 1 - ok[:, ::-1].argmax(axis=1), ok.shape[1] - 1)
        return np.clip(idx, first[:, None], last[:, None])
    z = np.take_along_axis(z, nearest(rows_ok[:, :, 0])[:, :, None], axis=1)
    return np.take_along_axis(z, nearest(cols_ok[:, 0, :])[:, None, :], axis=2)


def _as_stack(frames) -> tuple[np.ndarray, tuple]:
    a = np.asarray(frames)
    return a.reshape((-1,) + a.shape[-2:]), a.shape[:-2]


def _shifts_to_centre(centres: np.ndarray, shape) -> np.ndarray:
    ky, kx = shape
    c = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    return np.array([ky // 2, kx // 2], dtype=np.float64) - c


def _pipeline(frames, centres, sigma_low, sigma_high, *, matrices: bool | None = None,
              counts=None):
    """Shared body of the shift and DoG kernels: optional shift, optional DoG, one pass
    per batch. ``matrices``: blur by matrix products (None: on detectors up to
    ``_MATRIX_MAX_SIDE`` px), else by FFTs. ``counts = (gain, read_var)``: subtract each
    pattern's ring background first (:meth:`spedflow.peaks.noise.RingModel.background`)."""
    stack, lead = _as_stack(frames)
    shape = stack.shape[-2:]
    out = np.empty(stack.shape, dtype=np.float32)
    shifts = None if centres is None else _shifts_to_centre(centres, shape)
    if shifts is not None and len(shifts) != len(stack):
        raise ValueError(f"centres hold {len(shifts)} patterns, frames {len(stack)}")
    dog = sigma_low is not None
    if matrices is None:
        matrices = max(shape) <= _MATRIX_MAX_SIDE
    if dog and matrices:
        blur = _DoGMatrices(shape, float(sigma_low), float(sigma_high))
    elif dog:
        h_low = _gauss_transfer(shape, sigma_low)
    batch = _MATRIX_BATCH if dog and matrices else _BATCH
    if counts is not None:
        from ..peaks.noise import ring_model
        rings = ring_model(shape)
    for s in range(0, len(stack), batch):
        z = stack[s:s + batch].astype(np.float32, copy=False)
        if shifts is not None:
            z = _bilinear_shift(z, shifts[s:s + batch])
        if not dog:
            out[s:s + batch] = z
            continue
        # rows and columns whose source is beyond the detector's edge (the shift's fill of
        # 0 is a step wherever the background is not 0, a dark level left in the data,
        # which the rings and the DoG carried into the discs)
        valid = None if shifts is None else _valid_mask(shape, shifts[s:s + batch])
        if counts is not None:
            # left out of the ring background (NaN), then at it (0)
            off = None if valid is None else ~np.logical_and(*valid)
            if off is not None and off.any():
                z = np.where(off, np.float32(np.nan), z)
            z = z - rings.image(rings.background(z, counts[0], counts[1]))
            if off is not None:
                z[off] = 0
        elif valid is not None:  # no background model: the edge's pixels continue into
            # the fill, so that it is no step for the DoG below any background level
            z = _continue_edges(z, *valid)
        if matrices:
            g_low, g_high = blur(z)
        else:
            spec = sfft.rfft2(z, axes=(-2, -1))
            g_low = sfft.irfft2(spec * h_low, s=shape, axes=(-2, -1))
            g_high = _lowpass_inverse(spec, shape, sigma_high)
        res = out[s:s + batch]  # written in place: no temporaries of the batch's size
        np.subtract(z, g_high, out=res, dtype=np.float32)
        np.maximum(res, 0, out=res)
        res *= g_low > g_high
        if valid is not None:
            _zero_invalid(res, *valid)
    return out.reshape(lead + shape)


@functools.lru_cache(maxsize=32)
def _wrap_blur_factors(n: int, sigma: float,
                       max_rank: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The n x n circulant matrix ``M`` of the periodised Gaussian (``M @ v`` =
    ``gaussian_filter1d(v, sigma, mode="wrap")``, untruncated) as float32 factors.

    ``M`` is symmetric with eigenvalues the Gaussian's transfer function at the n
    frequencies of the DFT. A wide Gaussian keeps few of them (> ``_TRANSFER_EPS``);
    when they are at most ``max_rank`` (default ``n // 4``), ``M = A @ B.T`` with ``B``
    the (n, r) kept eigenvectors and ``A = B diag(h)``. Otherwise returns ``(M, None)``.
    """
    h = _gauss_transfer_1d(n, sigma, False)
    kernel = np.real(np.fft.ifft(h))  # the periodised, sampled, normalised Gaussian
    i = np.arange(n)
    m = kernel[(i[:, None] - i[None, :]) % n]
    if np.count_nonzero(h > _TRANSFER_EPS * h.max()) <= (n // 4 if max_rank is None else max_rank):
        w, v = np.linalg.eigh(m)
        keep = np.abs(w) > _TRANSFER_EPS * w.max()
        a, b = (v[:, keep] * w[keep]).astype(np.float32), v[:, keep].astype(np.float32)
        a.flags.writeable = b.flags.writeable = False  # shared by every caller (lru_cache)
        return a, b
    out = m.astype(np.float32)
    out.flags.writeable = False
    return out, None


def _band_halfwidth(m: np.ndarray) -> int:
    """Half-width of the band of the circulant matrix ``m`` of a narrow periodic
    Gaussian: the farthest distance at which its weight is at least 2**-24 of the
    largest (float32 resolution; the weights beyond are left out of its products)."""
    n = len(m)
    k = np.abs(m[:, 0])  # k[d]: the weight d samples away (circulant)
    d = np.minimum(np.arange(n), n - np.arange(n))
    return int(d[k > 2.0 ** -24 * k.max()].max())


def _circulant_band(n: int, sigma: float):
    """The periodic Gaussian's matrix (:func:`_wrap_blur_factors`) cut into blocks of
    output samples, for a narrow Gaussian: ``(h, [(o0, o1, L), ...])`` with ``L`` the
    (o1 - o0, o1 - o0 + 2 h) rows ``o0:o1`` over the input samples ``o0 - h : o1 + h``
    (taken round the ends: the input is padded by ``h`` on both sides, periodically).
    Weights below float32 resolution of the largest (2**-24) lie beyond ``h`` and are
    left out. None if the Gaussian is low rank or its band is not narrow."""
    m, factor = _wrap_blur_factors(n, sigma)
    if factor is not None:
        return None
    h = _band_halfwidth(m)
    w = max(_DOG_BAND_BLOCK, 2 * h)
    if w + 2 * h >= n:
        return None
    blocks = []
    for o0 in range(0, n, w):
        o1 = min(n, o0 + w)
        band = np.ascontiguousarray(m[o0:o1][:, np.arange(o0 - h, o1 + h) % n])
        band.flags.writeable = False
        blocks.append((o0, o1, band))
    return h, blocks


class _DoGMatrices:
    """The two periodic Gaussian blurs of the DoG on a batch, as BLAS products.

    ``G = M_y Z M_x^T`` per pattern. A narrow Gaussian runs block by block over its
    band (:func:`_circulant_band`: ~1/3 of the multiply-adds of the whole matrix on
    128 px); a wide one through its low-rank factors (:func:`_wrap_blur_factors`); any
    other as one product with the whole matrix (the x pass of both Gaussians side by
    side).
    """

    def __init__(self, shape, sigma_low: float, sigma_high: float):
        ky, kx = shape
        self.ops = [(_wrap_blur_factors(ky, s), _wrap_blur_factors(kx, s))
                    for s in (sigma_low, sigma_high)]
        self.band = None
        bands = (_circulant_band(ky, sigma_low), _circulant_band(kx, sigma_low))
        if None not in bands:
            self.band = (bands[0], (bands[1][0], [(o0, o1, np.ascontiguousarray(b.T))
                                                  for o0, o1, b in bands[1][1]]))
        # x pass: Z @ M_x^T (dense) or Z @ B_x (low rank), of every Gaussian not banded
        rights = [mx[0].T if mx[1] is None else mx[1]
                  for i, (_, mx) in enumerate(self.ops) if not (i == 0 and self.band)]
        self.widths = np.cumsum([0] + [r.shape[1] for r in rights])
        self.right = np.ascontiguousarray(np.concatenate(rights, axis=1))

    def __call__(self, z: np.ndarray) -> list[np.ndarray]:
        m, ky, kx = z.shape
        flat = z.reshape(m * ky, kx)
        a = (flat @ self.right).reshape(m, ky, -1)
        out = [] if self.band is None else [self._banded(flat, m, ky, kx)]
        for (my, mx), w0, w1 in zip(self.ops[len(out):], self.widths[:-1], self.widths[1:]):
            part = a[:, :, w0:w1]
            if my[1] is None:
                g = np.matmul(my[0], part)
            else:  # A_y (B_y^T part)
                g = np.matmul(my[0], np.matmul(my[1].T, part))
            if mx[1] is not None:  # ... A_x^T
                g = np.matmul(g, mx[0].T)
            out.append(g)
        return out

    def _banded(self, flat, m, ky, kx):
        """The narrow Gaussian: each pass on the periodically padded batch, one product
        per block of output samples."""
        (hy, blocks_y), (hx, blocks_x) = self.band
        zp = np.concatenate([flat[:, kx - hx:], flat, flat[:, :hx]], axis=1)
        a = np.empty((m * ky, kx), np.float32)
        for o0, o1, right in blocks_x:
            np.matmul(zp[:, o0:o1 + 2 * hx], right, out=a[:, o0:o1])
        a = a.reshape(m, ky, kx)
        ap = np.concatenate([a[:, ky - hy:], a, a[:, :hy]], axis=1)
        g = np.empty((m, ky, kx), np.float32)
        for o0, o1, left in blocks_y:
            np.matmul(left, ap[:, o0:o1 + 2 * hy], out=g[:, o0:o1])
        return g


def _zero_invalid(res: np.ndarray, my: np.ndarray, mx: np.ndarray) -> None:
    """Set to 0 the rows and columns of each ``res[i]`` whose source is off the
    detector (``my``, ``mx`` from :func:`_valid_mask`): a few edge strips, so slices,
    not full passes."""
    for i in np.nonzero(~(my.all(axis=(1, 2)) & mx.all(axis=(1, 2))))[0]:
        res[i, ~my[i, :, 0]] = 0
        res[i, :, ~mx[i, 0, :]] = 0


def gaussian_blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of every pattern, periodic boundaries.

    Parameters
    ----------
    frames : (..., ky, kx) array
    sigma : float
        Gaussian width, detector pixels.

    Returns
    -------
    (..., ky, kx) ndarray of float32
        Equals ``scipy.ndimage.gaussian_filter(frame, sigma, mode="wrap")`` with an
        untruncated kernel.
    """
    stack, lead = _as_stack(frames)
    shape = stack.shape[-2:]
    h = _gauss_transfer(shape, sigma)
    out = np.empty(stack.shape, np.float32)
    for s in range(0, len(stack), _BATCH):
        spec = sfft.rfft2(stack[s:s + _BATCH].astype(np.float32, copy=False), axes=(-2, -1))
        out[s:s + _BATCH] = sfft.irfft2(spec * h, s=shape, axes=(-2, -1))
    return out.reshape(lead + shape)


# ------------------------------------------------------------------ shift and DoG

def shift_patterns(frames: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Shift every pattern so that its beam centre moves to ``(ky // 2, kx // 2)``.

    Parameters
    ----------
    frames : (..., ky, kx) array
    centres : (..., 2) array
        Beam centre ``(ky, kx)`` of each pattern, detector pixels (sub-pixel).

    Returns
    -------
    (..., ky, kx) ndarray of float32
        Bilinear sub-pixel shift (``scipy.ndimage.shift(order=1, mode="constant")``);
        pixels whose source lies outside the detector are 0. Integer shifts are exact.
    """
    return _pipeline(frames, centres, None, None)


def align_whole_pixels(frames: np.ndarray, centres: np.ndarray, *, fill: str = "zero"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Shift every pattern by whole pixels so its beam centre is within half a pixel of
    ``(ky // 2, kx // 2)``: no interpolation, so counting noise keeps its statistics.

    Parameters
    ----------
    frames : (n, ky, kx) array
    centres : (n, 2) array
        Beam centres ``(ky, kx)``, detector pixels.
    fill : {"zero", "nan"}
        What the pixels whose source lies off the detector hold: 0, or NaN (to be left
        out of statistics; :func:`fill_beyond` copies the detector's edge into them
        later, so that a peak finder sees no step there).

    Returns
    -------
    aligned : (n, ky, kx) float32
        ``aligned[i, y, x] = frames[i, y - sy, x - sx]`` with ``(sy, sx)`` the rounded
        shift to the centre; where that lies off the detector, 0 (``np.roll`` without
        the wrap) or NaN.
    remainder : (n, 2) float64
        The sub-pixel part of the shift still to apply: a feature at ``p`` in
        ``aligned`` lies at ``p + remainder`` in :func:`shift_patterns`' output.
    """
    stack = np.asarray(frames)
    n, ky, kx = stack.shape
    shifts = _shifts_to_centre(centres, (ky, kx))
    if len(shifts) != n:
        raise ValueError(f"centres hold {len(shifts)} patterns, frames {n}")
    if fill not in ("zero", "nan"):
        raise ValueError(f"fill must be 'zero' or 'nan' (got {fill!r})")
    whole = np.rint(shifts).astype(np.intp)
    boxes = fill_boxes(whole, (ky, kx))
    # one block copy per pattern (its overlap with the shifted frame): 6x faster than
    # a gather of the whole stack through index arrays
    out = np.full((n, ky, kx), np.nan if fill == "nan" else 0.0, np.float32)
    for i, ((sy, sx), (y0, y1, x0, x1)) in enumerate(zip(whole, boxes)):
        if y1 > y0 and x1 > x0:
            out[i, y0:y1, x0:x1] = stack[i, max(-sy, 0):ky + min(-sy, 0), max(-sx, 0):kx + min(-sx, 0)]
        elif fill == "nan":  # shifted off the detector entirely: nothing to keep
            out[i] = 0
    return out, shifts - whole


def whole_shifts(centres: np.ndarray, shape) -> np.ndarray:
    """(n, 2) int: the whole-pixel shifts :func:`align_whole_pixels` applies."""
    return np.rint(_shifts_to_centre(centres, shape)).astype(np.intp)


def fill_boxes(whole: np.ndarray, shape) -> np.ndarray:
    """(n, 4) int ``(y0, y1, x0, x1)``: where patterns shifted by ``whole`` (n, 2) hold
    detector pixels (an empty box for a shift of the detector's size or more)."""
    ky, kx = (int(v) for v in shape)
    w = np.asarray(whole, np.intp).reshape(-1, 2)
    sy, sx = w[:, 0], w[:, 1]
    box = np.column_stack([np.maximum(sy, 0), ky + np.minimum(sy, 0),
                           np.maximum(sx, 0), kx + np.minimum(sx, 0)])
    return np.clip(box, 0, [ky, ky, kx, kx])


def fill_beyond(frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """In place: each pattern's pixels outside its box ``(y0, y1, x0, x1)`` copy the
    nearest pixel inside it (``mode="nearest"``); an empty box leaves the pattern as it
    is. Returns ``frames``."""
    for i, (y0, y1, x0, x1) in enumerate(np.asarray(boxes, np.intp)):
        if y1 <= y0 or x1 <= x0:
            continue
        f = frames[i]
        f[:y0, x0:x1] = f[y0, x0:x1]  # rows first, then whole columns (corners included)
        f[y1:, x0:x1] = f[y1 - 1, x0:x1]
        f[:, :x0] = f[:, x0:x0 + 1]
        f[:, x1:] = f[:, x1 - 1:x1]
    return frames


def subtract_background_dog(frames: np.ndarray, sigma_low: float,
                            sigma_high: float) -> np.ndarray:
    """Difference-of-Gaussians background removal, as in the reference.

    ``result = max(where(G_low > G_high, z, 0) - G_high, 0)`` with ``G_*`` Gaussian
    blurs of ``z`` (periodic boundaries, see the module notes).

    Parameters
    ----------
    frames : (..., ky, kx) array
    sigma_low, sigma_high : float
        Gaussian widths, detector pixels, ``0 < sigma_low < sigma_high``.

    Returns
    -------
    (..., ky, kx) ndarray of float32
    """
    return _pipeline(frames, None, sigma_low, sigma_high)


def shift_and_subtract(frames: np.ndarray, centres: np.ndarray | None, sigma_low: float,
                       sigma_high: float, counts=None) -> np.ndarray:
    """Align and remove the background in one pass over each batch.

    Equals :func:`subtract_background_dog` of the shifted patterns (:func:`shift_patterns`),
    with the pixels whose source lies outside the detector set to 0 afterwards.

    Parameters
    ----------
    frames : (..., ky, kx) array
    centres : (..., 2) array or None
        Beam centres ``(ky, kx)``; None: no shift.
    sigma_low, sigma_high : float
        Gaussian widths, detector pixels.
    counts : (gain, read_var), optional
        Remove each aligned pattern's background about the beam first: the mean of
        each 1-px ring with the spots clipped (:mod:`spedflow.peaks.noise`). The beam,
        its glare and the film's rings are circular about the beam; without this the
        DoG's wide Gaussian spreads the beam over ~2 ``sigma_high`` and zeroes the
        weak spots near it.

    Returns
    -------
    (..., ky, kx) ndarray of float32
    """
    return _pipeline(frames, centres, sigma_low, sigma_high, counts=counts)


# ------------------------------------------------------------------- beam centre

def _gather_windows(stack: np.ndarray, base: np.ndarray, half: int, rows=None):
    """(N, w, w) windows of ``stack`` around integer ``base`` (N, 2), w = 2 half + 1,
    of the patterns ``rows`` (indices into ``stack``; default all of them, in order).

    Returns the windows, their row and column coordinates (N, w) and a (N, w, w) mask
    of the pixels that lie on the detector (outside ones read as 0).
    """
    _, ky, kx = stack.shape
    rows = np.arange(len(base)) if rows is None else np.asarray(rows)
    off = np.arange(-half, half + 1)
    iy = base[:, 0:1] + off[None, :]
    ix = base[:, 1:2] + off[None, :]
    vy = (iy >= 0) & (iy < ky)
    vx = (ix >= 0) & (ix < kx)
    win = stack[rows[:, None, None], np.clip(iy, 0, ky - 1)[:, :, None],
                np.clip(ix, 0, kx - 1)[:, None, :]]
    valid = vy[:, :, None] & vx[:, None, :]
    return np.where(valid, win, 0), iy, ix, valid


def _refine_centres(stack: np.ndarray, centres: np.ndarray, radius: float,
                    n_iter: int = _REFINE_MAX_ITER) -> np.ndarray:
    """Iterated background-subtracted centre of mass in a circular window.

    The window (radius ``radius + 1.5`` px, with a 1 px linear taper so the result
    varies smoothly with the estimate) follows the estimate, so a spot further than
    ``radius + 2`` from the beam never enters it. Weights are ``I - b``, linear in the
    intensity, so a pixel partly covered by the disc counts in proportion to its
    coverage (unbiased sub-pixel centre for anti-aliased discs, flat-topped saturated
    discs and Gaussian spots alike). ``b`` is the lower quartile of the square
    ``(2 ceil(radius + 2.5) + 1)**2`` neighbourhood, more than half of which lies
    outside the disc even when ``radius`` underestimates it by a third.

    A clipped beam can be larger than the window: an 8-bit camera at high dose
    saturates the beam *and its glare* out to several times the spots' radius, which
    is the radius passed in then (``radius_of_frames``). With the plateau filling most
    of the square the weights are 0 or meaningless: on the 8-bit 4e6-dose set 3,868 of
    4,096 centres came out NaN (the descan fitted to the rest was wrong by up to 49 px),
    and a plateau filling ~75 % of it gave centres 0.8-1 px off. Patterns whose
    plateau (the pixels at the pattern's maximum, as a disc) reaches within 1 px of the
    window's edge are refined again with the radius doubled until the window reaches
    past the plateau (at most a quarter of the detector): the clipped plateau is
    centred on the beam like the disc it clips.
    """
    c = _refine_window(stack, centres, radius, n_iter)
    ky, kx = stack.shape[-2:]
    r = max(float(radius), 0.5)
    peak = stack.reshape(len(stack), -1).max(axis=1)
    todo = np.flatnonzero(_plateau_outgrows(stack, centres, r, peak))
    while todo.size and 2 * r <= min(ky, kx) / 4:
        r *= 2  # the largest window reached is kept for what still outgrows it
        c[todo] = _refine_window(stack, centres[todo], r, n_iter, rows=todo)
        todo = todo[_plateau_outgrows(stack, centres[todo], r, peak[todo], rows=todo)]
    return c


#: Fewest pixels at a pattern's maximum that make a clipped plateau (fewer are ties).
_MIN_PLATEAU = 5


def _plateau_outgrows(stack: np.ndarray, centres: np.ndarray, radius: float,
                      peak: np.ndarray, rows=None) -> np.ndarray:
    """Patterns with a clipped plateau that the refinement window of ``radius`` does not
    reach past: at least ``_MIN_PLATEAU`` pixels of the square around ``centres`` are at
    the pattern's maximum ``peak`` (> 0), and the disc of their area comes within 1 px of
    the window's edge (``radius + 1.5``). Dark (all-zero) patterns have no plateau.
    ``rows``: the patterns of ``stack`` that ``centres`` and ``peak`` belong to (default
    all)."""
    ok = np.isfinite(centres).all(1)
    base = np.where(ok[:, None], np.rint(np.nan_to_num(centres)), 0).astype(np.int64)
    win, _, _, _ = _gather_windows(stack, base, int(np.ceil(radius + 2.5)), rows=rows)
    n = np.count_nonzero(win >= peak[:, None, None], axis=(1, 2))
    return ok & (peak > 0) & (n >= _MIN_PLATEAU) & (np.sqrt(n / np.pi) > radius + 0.5)


def _refine_window(stack: np.ndarray, centres: np.ndarray, radius: float,
                   n_iter: int = _REFINE_MAX_ITER, rows=None) -> np.ndarray:
    """:func:`_refine_centres` with a window of fixed ``radius``.

    Each pattern is iterated until its centre moves by less than 1e-4 px (at most
    ``n_iter`` times); the ones that have converged drop out. Most converge in a few
    steps, but where the disc is larger than the window (a clipped beam whose glare
    the spots' radius does not cover) each step moves only ~5 % of the remaining way:
    on the real ASTAR patterns 12 steps stopped 0.34 px short. ``rows``: the patterns
    of ``stack`` that ``centres`` belong to (default all).
    """
    rows = np.arange(len(stack)) if rows is None else np.asarray(rows)
    half = int(np.ceil(radius + 2.5))
    edge = radius + 1.5
    c = np.array(centres, dtype=np.float64, copy=True)
    todo = np.flatnonzero(np.isfinite(c).all(1))
    c[~np.isfinite(c).all(1)] = np.nan
    for _ in range(n_iter):
        if todo.size == 0:
            break
        cur = c[todo]
        base = np.rint(cur).astype(np.int64)
        win, iy, ix, valid = _gather_windows(stack, base, half, rows=rows[todo])
        d = np.sqrt((iy - cur[:, 0:1])[:, :, None] ** 2 + (ix - cur[:, 1:2])[:, None, :] ** 2)
        taper = np.clip(edge + 0.5 - d, 0, 1) * valid
        bg = np.percentile(win.reshape(len(win), -1), 25, axis=1)
        w = taper * (win - bg[:, None, None])
        tot = w.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            new = np.stack([(w.sum(2) * iy).sum(1) / tot,
                            (w.sum(1) * ix).sum(1) / tot], -1)
        new[~(tot > 0)] = np.nan
        c[todo] = new
        moving = np.isfinite(new).all(1) & (np.abs(new - cur).max(axis=1) > 1e-4)
        todo = todo[moving]
    return c


def _provisional_radius(mean_pattern: np.ndarray) -> float:
    """Rough beam radius from a mean pattern (its brightest blob's half-max radius)."""
    mp = np.asarray(mean_pattern, dtype=np.float32)
    sm = gaussian_blur(mp, 1.0)
    peak = np.array(np.unravel_index(np.argmax(sm), sm.shape), dtype=np.float64)
    prof = beam_profile(mp[None], peak[None])
    return radius_from_profile(prof, default=2.0)


def beam_centres(frames: np.ndarray, beam_radius: float | None = None, *,
                 reference: np.ndarray | None = None) -> np.ndarray:
    """Sub-pixel direct-beam centre of every pattern.

    1. Coarse: the maximum of each pattern blurred with a Gaussian of sigma = beam
       radius. At that scale the blurred peak height follows a blob's *integrated*
       intensity, so the direct beam wins over Bragg spots that are brighter per pixel
       but smaller (thick crystals, saturated beams). Done on the pattern binned by
       ``f = round(radius / 1.5)`` (blur ``radius / f``): a pixel's precision is all
       the refinement needs.
    2. Refine: iterated centre of mass of the above-half-maximum part of the disc in a
       circular window of radius ``beam_radius + 1.5`` around the estimate.

    Parameters
    ----------
    frames : (..., ky, kx) array
    beam_radius : float, optional
        Direct-beam radius, detector pixels. None: a provisional radius is measured
        from ``reference`` (or the block's mean pattern); pass the measured radius
        (:func:`estimate_beam_radius`) for the final centres.
    reference : (ky, kx) array, optional
        Mean pattern of the whole data set, used only when ``beam_radius`` is None
        (keeps the result independent of the chunking).

    Returns
    -------
    (..., 2) ndarray of float64
        ``(ky, kx)`` centres, detector pixels; NaN for a pattern with no signal.
    """
    stack, lead = _as_stack(frames)
    stack = stack.astype(np.float32, copy=False)
    if beam_radius is None:
        ref = stack.mean(0) if reference is None else reference
        beam_radius = _provisional_radius(ref)
    r = float(beam_radius)
    # the coarse search needs a pixel or so only (the refinement window reaches
    # r + 1.5 px): on patterns binned by f ~ r / 1.5 (rounded) the blur of width
    # r / f >= 1.1 bins still favours the largest integrated blob, at 1 / f^2 of the cost
    ky, kx = stack.shape[-2:]
    f = max(1, min(int(round(r / 1.5)), ky // 16, kx // 16))
    by, bx = ky // f, kx // f
    coarse = np.empty((len(stack), 2))
    for s in range(0, len(stack), _BATCH):
        part = stack[s:s + _BATCH, :by * f, :bx * f]
        if f > 1:  # strided adds: far faster than a reduction over short axes
            rows = sum(part[:, i::f] for i in range(f))
            part = sum(rows[:, :, j::f] for j in range(f))
        blur = gaussian_blur(part, r / f)
        flat = blur.reshape(len(blur), -1).argmax(1)
        coarse[s:s + _BATCH] = np.stack(np.unravel_index(flat, (by, bx)), -1) * f + (f - 1) / 2
    return _refine_centres(stack, coarse, r).reshape(lead + (2,))


# ----------------------------------------------------------------- beam radius

def beam_profile(frames: np.ndarray, centres: np.ndarray,
                 max_radius: float | None = None) -> np.ndarray:
    """Radial profile partial sums around each pattern's beam centre (``process``).

    Parameters
    ----------
    frames : (..., ky, kx) array
    centres : (..., 2) array
        Beam centres; patterns with a non-finite centre are skipped.
    max_radius : float, optional
        Largest radius profiled, detector pixels. Default ``min(ky, kx) / 4``: a beam
        disc larger than that would leave no room for diffraction spots.

    Returns
    -------
    (3, nbins) ndarray of float64
        Per radial bin of width :data:`PROFILE_BIN`: summed intensity, pixel count,
        summed distance. Merge with :func:`merge_profiles` (addition).
    """
    stack, _ = _as_stack(frames)
    ky, kx = stack.shape[-2:]
    c = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    if max_radius is None:
        max_radius = min(ky, kx) / 4
    nbins = int(np.ceil(max_radius / PROFILE_BIN))
    use = np.flatnonzero(np.isfinite(c).all(1))  # indexed a batch at a time: no copy of the stack
    out = np.zeros((3, nbins))
    if len(use) == 0:
        return out
    half = int(np.ceil(max_radius)) + 1
    for s in range(0, len(use), _BATCH):
        sel = use[s:s + _BATCH]
        cc = c[sel]
        base = np.rint(cc).astype(np.int64)
        win, iy, ix, valid = _gather_windows(stack[sel], base, half)
        d = np.sqrt((iy - cc[:, 0:1])[:, :, None] ** 2 + (ix - cc[:, 1:2])[:, None, :] ** 2)
        b = (d / PROFILE_BIN).astype(np.int64)
        keep = valid & (b < nbins)
        b = b[keep]
        out[0] += np.bincount(b, weights=win[keep].astype(np.float64), minlength=nbins)
        out[1] += np.bincount(b, minlength=nbins)
        out[2] += np.bincount(b, weights=d[keep], minlength=nbins)
    return out


def merge_profiles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Merge two :func:`beam_profile` partials (associative: elementwise sum)."""
    if a.shape[1] < b.shape[1]:
        a, b = b, a
    out = a.copy()
    out[:, :b.shape[1]] += b
    return out


def radius_from_profile(profile: np.ndarray, *, default: float = np.nan) -> float:
    """Half-maximum radius of the beam from a merged radial profile (``finalize``).

    The plateau is the profile's maximum, the background its minimum outside the
    maximum; the radius is where the profile first falls through half-way between
    the two, interpolated linearly between bin mean distances. For a disc this is its
    geometric radius, for a Gaussian spot its half width at half maximum.

    Returns
    -------
    float
        Radius, detector pixels; ``default`` if the profile is empty or flat.
    """
    sums, counts, dsum = profile
    ok = counts > 0
    if ok.sum() < 3:
        return float(default)
    p = sums[ok] / counts[ok]
    r = dsum[ok] / counts[ok]
    i0 = int(np.argmax(p))
    top, bottom = p[i0], p[i0:].min()
    if not top > bottom:
        return float(default)
    level = 0.5 * (top + bottom)
    below = np.nonzero(p[i0:] < level)[0]
    if len(below) == 0:
        return float(default)
    j = i0 + int(below[0])
    frac = (p[j - 1] - level) / (p[j - 1] - p[j])
    return float(r[j - 1] + frac * (r[j] - r[j - 1]))


def beam_saturated(frames: np.ndarray, centres: np.ndarray, *, core: float = 1.5,
                   fraction: float = 0.9) -> bool:
    """Whether the direct beam is clipped: at least ``fraction`` of the pixels within
    ``core`` px of the beam centres hold exactly the largest value of ``frames``.

    Counting noise never leaves the beam's core flat at one value unless the detector
    (or its conversion) clipped it, e.g. an 8-bit camera at 255.
    """
    stack, _ = _as_stack(frames)
    c = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    ok = np.isfinite(c).all(1)
    if not ok.any():
        return False
    top = stack.max()
    ky, kx = stack.shape[-2:]
    yy, xx = np.mgrid[:ky, :kx]
    hits = total = 0
    for i in np.flatnonzero(ok):  # not stack[ok]: a copy of the stack
        f, (cy, cx) = stack[i], c[i]
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= core * core
        hits += int((f[inside] == top).sum())
        total += int(inside.sum())
    return total > 0 and hits >= fraction * total


def saturated_radius(frames: np.ndarray, centres: np.ndarray, *, top: float | None = None
                     ) -> np.ndarray:
    """Radius of the clipped plateau about the beam in every pattern.

    The 1-px rings about each centre (pixels whose distance rounds to ``j``) are
    walked outwards while at least half of a ring's pixels hold ``top`` (rings with
    no pixel are passed over); the plateau ends half a pixel beyond the last such
    ring. A saturated Bragg spot elsewhere fills a small part of its ring and does
    not extend it.

    Parameters
    ----------
    frames : (n, ky, kx) array
    centres : (n, 2) array
        Beam centres ``(ky, kx)``; NaN: no beam (radius 0).
    top : float, optional
        The clipped value; default the largest value of ``frames``.

    Returns
    -------
    (n,) float64
        ``k + 0.5``, ``k`` the last of the leading saturated rings (ring 0: the
        pixel at the centre); 0 where the first ring is not saturated.
    """
    stack, _ = _as_stack(frames)
    c = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    if len(c) != len(stack):
        raise ValueError(f"centres hold {len(c)} patterns, frames {len(stack)}")
    top = stack.max() if top is None else top
    n, ky, kx = stack.shape
    out = np.zeros(n)
    ok = np.flatnonzero(np.isfinite(c).all(1))
    if ok.size == 0:
        return out
    n_rings = int(np.ceil(np.hypot(ky, kx))) + 1
    yy, xx = np.mgrid[:ky, :kx]
    for s in range(0, ok.size, _BATCH):
        i = ok[s:s + _BATCH]
        ring = np.rint(np.hypot(yy[None] - c[i, 0, None, None], xx[None] - c[i, 1, None, None]))
        idx = (np.arange(len(i))[:, None, None] * n_rings + ring.astype(np.intp)).ravel()
        total = np.bincount(idx, minlength=len(i) * n_rings).reshape(len(i), n_rings)
        hot = np.bincount(idx, weights=(stack[i] == top).ravel(),
                          minlength=len(i) * n_rings).reshape(len(i), n_rings)
        bad = (total > 0) & (2 * hot < total)
        stop = np.where(bad.any(1), np.argmax(bad, axis=1), n_rings)  # first unsaturated ring
        # the plateau ends half a pixel beyond the last ring with pixels before that one
        # (a centre between pixels leaves ring 0 empty)
        before = (total > 0) & (np.arange(n_rings)[None, :] < stop[:, None])
        last = n_rings - 1 - np.argmax(before[:, ::-1], axis=1)
        out[i] = np.where(before.any(1), last + 0.5, 0.0)
    return out


def spot_scale(frames: np.ndarray, centres: np.ndarray, exclude: float, *,
               n_patterns: int = 128, per_pattern: int = 5) -> float:
    """Radius of the diffraction spots, from their scale-normalised LoG (Lindeberg).

    Every pattern's response ``-s^2 LoG_s`` at scales ``s = 1 .. 8`` px (steps of
    sqrt(2)); its strongest local maxima farther than ``exclude`` px from the beam
    centre are candidates, each taking the scale where its response peaks
    (interpolated on log s). A disc of radius R peaks at ``s = R / sqrt(2)``, so the
    result is ``sqrt(2)`` times the median scale of the spots. Used where the direct
    beam's own size cannot be measured (a clipped beam), since under precession the
    spots are discs of about the beam's size.

    The spots are the candidates whose response is at least half the 90th percentile
    of all candidates' responses. Patterns on no crystal (holes, film) have maxima
    too: single counts at the smallest scale, weak but many; without that cut they
    outnumber the spots and the median is the smallest scale. (Spots must make at
    least a tenth of the candidates: about one pattern in ten on a crystal.)

    Returns
    -------
    float
        Spot radius, px; NaN if no spot was found.
    """
    from scipy import ndimage
    stack, _ = _as_stack(frames)
    c = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    take = np.linspace(0, len(stack) - 1, min(n_patterns, len(stack))).astype(int)
    scales = 2.0 ** (np.arange(7) / 2.0)
    ky, kx = stack.shape[-2:]
    yy, xx = np.mgrid[:ky, :kx]
    found = []
    for i in take:
        if not np.isfinite(c[i]).all():
            continue
        f = stack[i].astype(np.float32)
        resp = np.stack([-(s * s) * ndimage.gaussian_laplace(f, s, mode="nearest") for s in scales])
        best = resp.max(0)
        peak = (best == ndimage.maximum_filter(best, size=3)) & (best > 0)
        peak &= (yy - c[i, 0]) ** 2 + (xx - c[i, 1]) ** 2 > exclude * exclude
        peak[:2], peak[-2:], peak[:, :2], peak[:, -2:] = False, False, False, False
        py, px = np.nonzero(peak)
        if len(py) == 0:
            continue
        strongest = np.argsort(best[py, px])[::-1][:per_pattern]
        for y, x in zip(py[strongest], px[strongest]):
            col = resp[:, y, x]
            k = int(np.argmax(col))
            t = float(k)
            if 0 < k < len(scales) - 1:  # vertex of a parabola through three scales
                den = col[k - 1] - 2 * col[k] + col[k + 1]
                if den < 0:
                    t += 0.5 * (col[k - 1] - col[k + 1]) / den
            found.append((float(col[k]), 2.0 ** (t / 2.0)))
    if not found:
        return float("nan")
    strength, scale = np.array(found).T
    spots = strength >= 0.5 * np.percentile(strength, 90)
    return float(np.sqrt(2.0) * np.median(scale[spots]))

def estimate_beam_radius(frames: np.ndarray, centres: np.ndarray | None = None,
                         max_radius: float | None = None) -> float:
    """Direct-beam radius of a block (process + finalize of the profile reduction).

    Parameters
    ----------
    frames : (..., ky, kx) array
    centres : (..., 2) array, optional
        Beam centres; None: measured with :func:`beam_centres` (provisional radius).
    max_radius : float, optional
        See :func:`beam_profile`.

    Returns
    -------
    float
        Half-maximum radius, detector pixels (NaN if no beam was found).
    """
    if centres is None:
        centres = beam_centres(frames)
    return radius_from_profile(beam_profile(frames, centres, max_radius))


# ------------------------------------------------------------------ descan model

@dataclass(frozen=True)
class DescanFit:
    """A robust polynomial model of the beam centre over the scan.

    Attributes
    ----------
    fitted : (Y, X, 2) ndarray of float64
        Model centre ``(ky, kx)`` at every scan position, detector pixels.
    coefficients : (n_terms, 2) ndarray
        Coefficients of the monomials ``u**i * v**j`` (``i + j <= order``) of the scan
        coordinates normalised to [-1, 1], in the order of :attr:`terms`.
    terms : tuple of (i, j)
    order : int
    scale : float
        Robust noise scale of the centres (MAD of the residual norms divided by the
        Rayleigh median sqrt(2 ln 2)), pixels.
    residual_rms : float
        RMS residual norm of the inliers, pixels.
    outliers : (Y, X) ndarray of bool
        Positions whose centre was rejected (or was not finite).
    """

    fitted: np.ndarray
    coefficients: np.ndarray
    terms: tuple
    order: int
    scale: float
    residual_rms: float
    outliers: np.ndarray

    @property
    def n_outliers(self) -> int:
        return int(self.outliers.sum())


def _design(shape, order):
    sy, sx = shape
    u = (np.arange(sy) - (sy - 1) / 2) / max(1.0, (sy - 1) / 2)
    v = (np.arange(sx) - (sx - 1) / 2) / max(1.0, (sx - 1) / 2)
    uu, vv = np.meshgrid(u, v, indexing="ij")
    terms = tuple((i, d - i) for d in range(order + 1) for i in range(d, -1, -1))
    a = np.stack([(uu ** i * vv ** j).ravel() for i, j in terms], -1)
    return a, terms


def _wls(a, y, w):
    sw = np.sqrt(w)[:, None]
    coef, *_ = np.linalg.lstsq(a * sw, y * sw, rcond=None)
    return coef


def fit_descan(centres: np.ndarray, order: int = 2, robust: bool = True, *,
               max_iter: int = 50) -> DescanFit:
    """Fit a smooth polynomial of scan position to the measured beam centres.

    Iteratively reweighted least squares on both components together: Huber weights
    (k = 2 scale) from the least-squares start until stable, then Tukey's biweight
    (c = 4.685 scale), which gives zero weight to mis-found centres (vacuum edges,
    thick crystals) so they cannot bend the model. The scale is re-estimated every
    iteration from the median residual norm.

    Parameters
    ----------
    centres : (Y, X, 2) array
        Measured centres ``(ky, kx)``; non-finite entries are ignored.
    order : int, default 2
        Total polynomial degree (1 = plane, 2 = quadratic).
    robust : bool, default True
        False: ordinary least squares.

    Returns
    -------
    DescanFit
    """
    c = np.asarray(centres, dtype=np.float64)
    sy, sx = c.shape[:2]
    a, terms = _design((sy, sx), int(order))
    y = c.reshape(-1, 2)
    finite = np.isfinite(y).all(1)
    if not finite.any():
        raise ValueError("no finite beam centre to fit")
    yf = np.where(finite[:, None], y, 0.0)
    w = finite.astype(np.float64)
    coef = _wls(a, yf, w)
    scale_floor = 1e-3  # pixels: no centre is measured better than this
    scale = 0.0
    if robust:
        for phase in ("huber", "tukey"):
            for _ in range(max_iter):
                r = np.linalg.norm(yf - a @ coef, axis=1)
                scale = max(np.median(r[finite]) / _RAYLEIGH_MEDIAN, scale_floor)
                if phase == "huber":
                    new_w = np.minimum(1.0, 2.0 * scale / np.maximum(r, 1e-300))
                else:
                    u = r / (4.685 * scale)
                    new_w = np.where(u < 1, (1 - u ** 2) ** 2, 0.0)
                new_w = new_w * finite
                if new_w.sum() <= 0:
                    break
                new_coef = _wls(a, yf, new_w)
                done = np.allclose(new_coef, coef, atol=1e-6, rtol=0)
                coef, w = new_coef, new_w
                if done:
                    break
    r = np.linalg.norm(yf - a @ coef, axis=1)
    if not robust:
        scale = max(np.median(r[finite]) / _RAYLEIGH_MEDIAN, 0.0)
    inlier = finite & (w > 0)
    rms = float(np.sqrt(np.mean(r[inlier] ** 2))) if inlier.any() else float("nan")
    return DescanFit(fitted=(a @ coef).reshape(sy, sx, 2), coefficients=coef, terms=terms,
                     order=int(order), scale=float(scale), residual_rms=rms,
                     outliers=(~inlier).reshape(sy, sx))


def centres_for_alignment(measured: np.ndarray, descan: str = "quadratic"):
    """The centres the alignment should use, and the descan fit behind them.

    Parameters
    ----------
    measured : (Y, X, 2) array
        Measured beam centres (NaN where none was found).
    descan : {"none", "plane", "quadratic"}
        "none": each pattern's own centre, non-finite ones replaced by the median
        centre; otherwise the robust polynomial model of :func:`fit_descan`.

    Returns
    -------
    centres : (Y, X, 2) ndarray of float64
    fit : DescanFit or None
    """
    from ._params import DESCAN_MODES
    order = DESCAN_MODES[descan]
    m = np.asarray(measured, dtype=np.float64)
    if order is None:
        finite = np.isfinite(m).all(-1)
        if not finite.any():
            raise ValueError("no finite beam centre")
        med = np.median(m[finite], axis=0)
        return np.where(finite[..., None], m, med), None
    fit = fit_descan(m, order=order)
    return fit.fitted, fit


# ----------------------------------------------------------------- bad pixels

#: A hot pixel is brighter than this many times the brightest of its 8 neighbours, a
#: dead one darker than the darkest divided by it. A diffraction spot or the beam whose
#: pixel-integrated profile is a Gaussian of sigma >= 0.45 px (FWHM ~1 px, the sharpest
#: a detector samples) has its nearest neighbours at >= 1/5.5 of its peak pixel.
BAD_PIXEL_CONTRAST = 8.0
#: ... in at least this fraction of the patterns (of those whose neighbours are all lit,
#: for a dead pixel): a crystal's spot lights its pixels only where the crystal is.
BAD_PIXEL_PERSISTENCE = 0.5
#: ... and in at least this many patterns: with a handful of sparse patterns, counting
#: noise alone leaves some pixel of a 256 x 256 detector the only one lit.
BAD_PIXEL_MIN_EVENTS = 4
#: A dead pixel's darkest neighbour must have collected this much over the sample (in
#: data units, counts for a counting detector): a live pixel at that level reads 0 in
#: every pattern with probability exp(-15) = 3e-7.
DEAD_PIXEL_MIN_SIGNAL = 15.0


def _ring_filter(z: np.ndarray, op, cval: float) -> np.ndarray:
    """``op`` (``np.maximum`` or ``np.minimum``) over each pixel's 8 neighbours in a
    stack (n, ky, kx), pixels off the detector being ``cval``: scipy's
    ``maximum_filter`` / ``minimum_filter`` with a 3 x 3 ring footprint and
    ``mode="constant"`` on finite input (a NaN reaches all 8 neighbours here), as five
    whole-array operations on shifted views (~4x faster on 64 patterns of 128 x 128)."""
    n, ky, kx = z.shape
    p = np.full((n, ky + 2, kx + 2), cval, z.dtype)
    p[:, 1:-1, 1:-1] = z
    sides = op(p[:, :, :-2], p[:, :, 2:])  # left and right neighbours, every padded row
    rows = op(sides, p[:, :, 1:-1])  # three across, every padded row
    out = op(rows[:, :-2], rows[:, 2:])  # the rows above and below
    return op(out, sides[:, 1:-1], out=out)


def bad_pixel_counts(frames: np.ndarray) -> dict:
    """Per-pixel counts of a block of patterns for :func:`bad_pixels_from` (mergeable:
    add the arrays of several blocks).

    Returns ``n`` (patterns), ``sum`` (of each pixel), ``hot`` (patterns in which the
    pixel exceeded :data:`BAD_PIXEL_CONTRAST` times its brightest neighbour), ``lit``
    (patterns in which all its neighbours were above 0) and ``dark`` (of those,
    patterns in which it was below its darkest neighbour over the contrast), each
    (ky, kx) but ``n``.
    """
    stack, _ = _as_stack(frames)
    ky, kx = stack.shape[-2:]
    out = {"n": np.array(0), "sum": np.zeros((ky, kx)), "hot": np.zeros((ky, kx), np.int64),
           "lit": np.zeros((ky, kx), np.int64), "dark": np.zeros((ky, kx), np.int64)}
    for s in range(0, len(stack), _BATCH):
        z = np.asarray(stack[s:s + _BATCH], np.float32)
        hi = _ring_filter(z, np.maximum, -np.inf)
        lo = _ring_filter(z, np.minimum, np.inf)
        out["hot"] += (z > BAD_PIXEL_CONTRAST * np.maximum(hi, 0)).sum(0)
        lit = lo > 0
        out["lit"] += lit.sum(0)
        out["dark"] += (lit & (z * BAD_PIXEL_CONTRAST < lo)).sum(0)
        out["sum"] += z.sum(0, dtype=np.float64)
        out["n"] = out["n"] + len(z)
    return out


def bad_pixels_from(counts: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(hot, dead)``: the (m, 2) ``(ky, kx)`` indices of the detector's hot and dead
    pixels, from the :func:`bad_pixel_counts` of a sample of patterns.

    Hot: beyond the contrast in at least :data:`BAD_PIXEL_PERSISTENCE` of all patterns
    (and :data:`BAD_PIXEL_MIN_EVENTS`), and in the mean pattern. Dead: beyond it in that
    fraction of the patterns whose neighbours are all lit (those at least a tenth of
    all: a pixel in the dark between spots is not judged), and in the mean pattern,
    its darkest neighbour having collected :data:`DEAD_PIXEL_MIN_SIGNAL`. The tests on
    the mean keep counting noise out: at ~1 count per pixel a good pixel reads 0
    where its neighbours read 1 or more in about half the patterns in which they do.
    """
    n = int(counts["n"])
    if n == 0:
        empty = np.zeros((0, 2), np.int64)
        return empty, empty
    mean = (counts["sum"] / n)[None]
    hi = _ring_filter(mean, np.maximum, -np.inf)[0]
    lo = _ring_filter(mean, np.minimum, np.inf)[0]
    mean = mean[0]
    events = np.maximum(BAD_PIXEL_PERSISTENCE * n, BAD_PIXEL_MIN_EVENTS)
    hot = (counts["hot"] >= events) & (mean > BAD_PIXEL_CONTRAST * np.maximum(hi, 0))
    lit = counts["lit"]
    dead = ((lit >= max(1, 0.1 * n)) & (counts["dark"] >= np.maximum(BAD_PIXEL_PERSISTENCE * lit,
                                                                     BAD_PIXEL_MIN_EVENTS))
            & (mean * BAD_PIXEL_CONTRAST < lo) & (lo * n >= DEAD_PIXEL_MIN_SIGNAL) & ~hot)
    return np.argwhere(hot), np.argwhere(dead)


def find_bad_pixels(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hot and dead detector pixels of a sample of patterns (n, ky, kx): see
    :func:`bad_pixels_from`. Use a few hundred patterns or more."""
    return bad_pixels_from(bad_pixel_counts(frames))


def pixels_off_detector(bad, detector_shape) -> np.ndarray:
    """The rows of ``bad`` (m, 2) ``(ky, kx)`` that lie off a detector of this shape."""
    b = np.asarray(bad, dtype=np.int64).reshape(-1, 2)
    return b[(b < 0).any(axis=1) | (b >= np.asarray(detector_shape)[None, :]).any(axis=1)]


def repair_pixels(frames: np.ndarray, bad) -> np.ndarray:
    """``frames`` with each bad pixel replaced by the mean of its good neighbours.

    Parameters
    ----------
    frames : (..., ky, kx) array
    bad : (m, 2) array of int
        ``(ky, kx)`` of the pixels to replace. A pixel none of whose 8 neighbours is
        good is set to 0.

    Returns
    -------
    A copy of ``frames`` (same dtype; integer data rounded to the nearest value).
    """
    z = np.array(frames, copy=True, order="C")  # C order: ``flat`` below is a view of it
    ky, kx = z.shape[-2:]
    b = np.asarray(bad, dtype=np.int64).reshape(-1, 2)
    if len(b) == 0:
        return z
    if len(pixels_off_detector(b, (ky, kx))):
        raise ValueError(f"bad pixels must lie on the {ky} x {kx} detector")
    good = np.ones((ky, kx), bool)
    good[b[:, 0], b[:, 1]] = False
    off = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
    ny, nx = b[:, 0:1] + off[:, 0], b[:, 1:2] + off[:, 1]  # (m, 8)
    on = (ny >= 0) & (ny < ky) & (nx >= 0) & (nx < kx)
    ny, nx = np.clip(ny, 0, ky - 1), np.clip(nx, 0, kx - 1)
    w = (on & good[ny, nx]).astype(np.float64)
    w /= np.maximum(w.sum(1, keepdims=True), 1)
    flat = z.reshape(-1, ky * kx)
    idx = ny * kx + nx
    value = np.zeros((len(flat), len(b)))  # one (patterns, pixels) array, not 8
    for k in range(idx.shape[1]):  # a bad neighbour (weight 0) may hold NaN: left out
        value += np.where(w[:, k] > 0, flat[:, idx[:, k]], 0) * w[:, k]
    if np.issubdtype(z.dtype, np.integer):
        value = np.rint(value)
    flat[:, b[:, 0] * kx + b[:, 1]] = value.astype(z.dtype)
    return z


# ----------------------------------------------------------------- line defects

#: Line defects: detector rows (or columns) whose pixels all collect a constant factor
#: ``g != 1`` of what the pattern there would give (the enlarged pixels along the chip
#: boundaries of a Medipix3 quad, 2-3x; a read-out line of another gain). Each row is
#: compared with the rows beside it in the mean of the sampled patterns, in this many
#: segments along it: the median of the segments' log ratios estimates log g while a
#: spot, the beam or a ring crossing the row spoils only the few segments it lies in.
LINE_SEGMENTS = 16
#: A row is a line defect only if its gain is at least this far from 1 (either way) ...
LINE_MIN_GAIN = 1.2
#: ... and at most this far: beyond lies a dead (or hot) line, not a gain to divide out.
LINE_MAX_GAIN = 8.0
#: ... if at least this fraction of its segments lie beyond half its log gain on its side
#: (a gain holds along the whole row; structure crossing it lights a few segments) ...
LINE_CONSISTENCY = 0.75
#: ... if its log gain is this many standard errors of the median from 0 (the error from
#: the segments' own scatter: no noise model needed; ~2 x 256 rows and columns are tested
#: per detector, z = 5 is one-sided p = 3e-7 each) ...
LINE_Z = 5.0
#: ... with at least this many segments holding signal on both sides ...
LINE_MIN_SEGMENTS = 8
#: ... in a block of at most this many adjacent rows (a Medipix3 quad: 2 per axis) ...
LINE_MAX_WIDTH = 4
#: ... and with the same gain in the mean of every part of the sample (contiguous runs of
#: scan positions): within half its log gain, plus this many of the part's standard
#: errors. A detector's gain is the same in every pattern; a row of spots along a
#: detector row (a lattice row aligned with it) belongs to the crystals of one region.
LINE_PART_Z = 3.0


def _segment_log_ratios(rows: np.ndarray, pred, n_seg: int, block=None) -> np.ndarray:
    """(m, k) rows and their predictions -> (m, n) log(sum row / sum prediction) over
    ``n`` equal segments along the rows; NaN where the prediction is 0 there.
    ``block = (m, a, b)``: the prediction of rows ``a..b`` of ``m`` is the linear
    interpolation between rows ``a - 1`` and ``b + 1``."""
    if block is not None:
        mm, a, b = block
        t = (np.arange(a, b + 1) - (a - 1))[:, None] / (b + 2 - a)
        pred = (1 - t) * mm[a - 1] + t * mm[b + 1]
    k = rows.shape[-1]
    n = max(1, min(n_seg, k))
    edges = np.rint(np.linspace(0, k, n + 1)).astype(np.int64)[:-1]
    a = np.add.reduceat(np.asarray(rows, np.float64), edges, axis=-1)
    b = np.add.reduceat(np.asarray(pred, np.float64), edges, axis=-1)
    out = np.full(a.shape, np.nan)
    ok = b > 0
    # clipped: a row reading 0 where its neighbours are lit is a finite, huge deviation
    out[ok] = np.log(np.clip(a[ok] / b[ok], 1 / 256, 256))
    return out


def _line_test(logr: np.ndarray, floor: float = 0.0):
    """``(log_gain, standard_error, defect)`` per row from its segments' log ratios
    (m, n): the median, its standard error from the segments' scatter (the larger of
    the row's own and ``floor``), and the verdict of the ``LINE_*`` tests."""
    logr = np.atleast_2d(logr)
    ok = np.isfinite(logr)
    n_u = ok.sum(1)
    med = np.zeros(len(logr))
    sd = np.full(len(logr), np.inf)
    frac = np.zeros(len(logr))
    has = n_u > 0
    if has.any():
        l = logr[has]
        m = _row_nanmedian(l)
        sd[has] = 1.4826 * _row_nanmedian(np.abs(l - m[:, None]))
        med[has] = m
        side = ok[has] & (np.sign(np.nan_to_num(l)) == np.sign(m)[:, None]) & \
            (np.abs(np.nan_to_num(l)) >= np.abs(m)[:, None] / 2)
        frac[has] = side.sum(1) / n_u[has]
    se = 1.2533 * np.maximum(sd, floor) / np.sqrt(np.maximum(n_u, 1))  # of a median
    a = np.abs(med)
    defect = ((n_u >= min(LINE_MIN_SEGMENTS, logr.shape[1])) & (a >= np.log(LINE_MIN_GAIN))
              & (a <= np.log(LINE_MAX_GAIN)) & (frac >= LINE_CONSISTENCY) & (a >= LINE_Z * se))
    return med, se, defect


def _row_nanmedian(a: np.ndarray) -> np.ndarray:
    """``np.nanmedian(a, 1)`` of a 2-D array, NaN for rows without a number, and without
    NumPy's warning about them (no ``warnings.catch_warnings``: it is not thread-safe,
    and this runs while a local cluster starts in another thread)."""
    out = np.full(a.shape[0], np.nan)
    some = ~np.isnan(a).all(axis=1)
    if some.any():
        out[some] = np.nanmedian(a[some], 1)
    return out


def _screen_ratios(m: np.ndarray) -> np.ndarray:
    """Segment log ratios (ky - 2, n) of every inner row of ``m`` to the mean of the
    rows beside it."""
    return _segment_log_ratios(m[1:-1], 0.5 * (m[:-2] + m[2:]), LINE_SEGMENTS)


def _noise_floor(m: np.ndarray) -> float:
    """The typical scatter of a row's segment log ratios in ``m``: the median over the
    rows of their own robust scatter. A defect row sees the noise of the rows beside
    it; with a few counts per segment one row's own scatter can come out near 0."""
    if m.shape[0] < 3:
        return 0.0
    l = _screen_ratios(m)
    sd = 1.4826 * _row_nanmedian(np.abs(l - _row_nanmedian(l)[:, None]))
    sd = sd[np.isfinite(sd)]
    return float(np.median(sd)) if len(sd) else 0.0


def _screen(m: np.ndarray, floor: float = 0.0):
    """:func:`_line_test` of every inner row of ``m`` (ky, kx) against the mean of the
    rows beside it; the first and last rows are never flagged."""
    ky = m.shape[0]
    med, se, defect = np.zeros(ky), np.full(ky, np.inf), np.zeros(ky, bool)
    if ky >= 3:
        med[1:-1], se[1:-1], defect[1:-1] = _line_test(_screen_ratios(m), floor)
    return med, se, defect


def _block_gains(m: np.ndarray, a: int, b: int, floor: float = 0.0):
    """:func:`_line_test` of rows ``a..b`` of ``m`` against the linear interpolation
    between rows ``a - 1`` and ``b + 1`` (outside the block)."""
    return _line_test(_segment_log_ratios(m[a:b + 1], None, LINE_SEGMENTS, block=(m, a, b)), floor)


def _explained(m: np.ndarray, lo: int, hi: int, floor: float) -> bool:
    """Whether rows ``lo..hi`` of ``m`` (a block's gains divided out) are each within
    half the least gain, or 3 standard errors, of their neighbours' mean."""
    med, se, _ = _screen(m[lo - 1:hi + 2], floor)
    med, se = med[1:-1], se[1:-1]
    return bool((np.abs(med) <= np.maximum(0.5 * np.log(LINE_MIN_GAIN), 3 * se)).all())


def _confirmed(m: np.ndarray, fixed: np.ndarray, a: int, b: int) -> bool:
    """Whether the rows just outside block ``a..b`` deviate from their neighbours' mean
    as the block's gains make them (a row of gain g makes the rows beside it read
    about 2 / (1 + g) of that mean), so that dividing the gains out (``fixed``) brings
    each closer to it. Rows of spots along a detector row leave dark rows between them
    that look like a line of low gain, but the rows beside those do not deviate."""
    for r in (a - 1, b + 1):
        if r < 1 or r > m.shape[0] - 2:
            continue
        before = _screen(m[r - 1:r + 2])[0][1]
        after = _screen(fixed[r - 1:r + 2])[0][1]
        if not abs(after) < abs(before):
            return False
    return True


def _persists(parts, a: int, b: int, lg: np.ndarray) -> bool:
    """Whether rows ``a..b`` show the log gains ``lg`` in every part of the sample
    (parts with too little signal to measure them say nothing)."""
    for part in parts:
        got, se, _ = _block_gains(part, a, b, _noise_floor(part))
        for g, e, want in zip(got, se, lg):
            if want != 0 and np.isfinite(e) and abs(g - want) > 0.5 * abs(want) + LINE_PART_Z * e:
                return False
    return True


def _row_gains(m: np.ndarray, parts=()) -> np.ndarray:
    """Gain (ky,) of each row of a mean pattern ``m`` (ky, kx): 1 but for line defects;
    ``parts``: mean patterns of parts of the sample (:func:`_persists`)."""
    ky = m.shape[0]
    gains = np.ones(ky)
    floor = _noise_floor(m)
    flagged = _screen(m, floor)[2]
    if not flagged.any():
        return gains
    idx = np.flatnonzero(flagged)
    # the inner rows of a block of like gains read as their neighbours: runs of flagged
    # rows at most LINE_MAX_WIDTH - 2 rows apart are one
    for run in np.split(idx, np.flatnonzero(np.diff(idx) > LINE_MAX_WIDTH - 1) + 1):
        p, q = int(run[0]), int(run[-1])
        lo, hi = max(1, p - 1), min(ky - 2, q + 1)  # rows the model must leave clean
        best = None
        for a in range(max(1, p), min(ky - 2, q) + 1):
            for b in range(a, min(ky - 2, q, a + LINE_MAX_WIDTH - 1) + 1):
                lg, _, ok = _block_gains(m, a, b, floor)
                if not ok.all():  # a block is of defect rows only
                    continue
                fixed = m.copy()
                fixed[a:b + 1] /= np.exp(lg)[:, None]
                score = np.abs(_screen(fixed[lo - 1:hi + 2], floor)[0][1:-1]).sum() + 1e-9 * (b - a)
                if best is None or score < best[0]:
                    best = (score, a, b, lg, fixed)
        # accepted only if a gain per row explains the whole run (structure, a step of
        # illumination or a row of spots, leaves rows beside it deviating) and every
        # part of the sample shows it
        if best is not None:
            _, a, b, lg, fixed = best
            if (_explained(fixed, lo, hi, floor) and _confirmed(m, fixed, a, b)
                    and _persists(parts, a, b, lg)):
                gains[a:b + 1] = np.exp(lg)
    return gains


def line_gains(mean_pattern: np.ndarray, parts=()) -> tuple[np.ndarray, np.ndarray]:
    """``(row_gains (ky,), column_gains (kx,))`` of the detector's line defects, from the
    mean of a sample of patterns (bad pixels repaired): 1 for an ordinary row or column.

    A line defect is a row (column) whose pixels read a constant factor of what the
    rows beside it predict, consistently along its whole length (Medipix3 quad
    detectors without the "cross correction": the chip-boundary pixels are 2-3x as
    large). Every row is screened against the mean of its two neighbours in
    :data:`LINE_SEGMENTS` segments; a run of flagged rows (a defect row flags its
    neighbours too) is explained by the block of at most :data:`LINE_MAX_WIDTH` rows
    whose gains, each measured against the interpolation between the rows outside the
    block, leave no row of the run deviating, and which the mean patterns ``parts`` of
    parts of the sample (contiguous scan positions) each show alike
    (:data:`LINE_PART_Z`). Gains of rows and columns multiply
    (a pixel of both is their product); :func:`flat_field` divides them out.
    """
    def clean(x):
        x = np.asarray(x, np.float64)
        return np.where(np.isfinite(x), x, 0.0)
    m = clean(mean_pattern)
    parts = [clean(p) for p in parts]
    return _row_gains(m, parts), _row_gains(m.T, [p.T for p in parts])


def flat_field(frames: np.ndarray, row_gains, column_gains) -> np.ndarray:
    """``frames`` (..., ky, kx) divided by the gains of :func:`line_gains` (a copy, same
    dtype; integer data rounded to the nearest value)."""
    g = np.outer(np.asarray(row_gains, np.float64), np.asarray(column_gains, np.float64))
    z = np.array(frames, copy=True)
    rows = np.flatnonzero(np.asarray(row_gains) != 1)
    cols = np.flatnonzero(np.asarray(column_gains) != 1)
    if len(rows) == 0 and len(cols) == 0:
        return z
    mask = np.zeros(g.shape, bool)
    mask[rows] = True
    mask[:, cols] = True
    v = z[..., mask].astype(np.float64) / g[mask]
    if np.issubdtype(z.dtype, np.integer):
        v = np.rint(v)
    z[..., mask] = v.astype(z.dtype)
    return z
