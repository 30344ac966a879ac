"""Multi-scale Laplacian-of-Gaussian peak finding on a whole chunk of patterns (NumPy).

The chunk ``(n, ky, kx)`` is filtered in batches of 16 patterns (1 MB, which stays
in cache): a separable Gaussian at every scale (each 1-D pass a few BLAS matrix
products over the batch, one per block of the Gaussian's band), a 5-point discrete
Laplacian and a noise unit (one per pattern, or a model of the data's noise) give the
significance ``Z`` (the maximum over scales of response / unit) and the winning
scale. The batch's candidates are the pixels that can exceed the threshold (a
response above threshold times the pattern's lowest unit; one ``np.flatnonzero``)
whose ``Z`` does and that are local maxima of ``Z`` (their 8 neighbours' values).
``Z`` is looked up at those pixels only, or made for every pixel where candidates are
many. Only the few candidates are then pruned, refined to sub-pixel positions (from
the smoothed values of the peak's scale) and integrated, still batch by batch. There
is no loop over patterns.

Everything after the x pass runs in the transposed ``(n, kx, ky)`` layout;
coordinates are swapped back at the end.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
from scipy import special
from scipy.spatial import cKDTree

from ..errors import InputError, ParameterError
from .. import _jit
from ._params import default_threshold

__all__ = ["find_peaks_log", "log_sigmas", "noise_level", "RadialUnits"]

#: Gaussian kernels are cut at this many sigma (0.05 % of the weight lost).
_TRUNCATE = 3.5
#: Fraction of the pixels above which the candidates' significance is computed for
#: every pixel at once rather than looked up candidate by candidate (each candidate
#: above threshold costs 9 look-ups; measured break-even ~2 %).
_SPARSE_CANDIDATES = 0.02
#: Patterns filtered at a time (16 x 128 x 128 float32 = 1 MB: stays in cache).
_BATCH = 16
#: Noise estimated on every 4th pixel in each direction: ~1000 samples for 128 x 128
#: patterns give the noise level to ~4 %, at 1/16 of the cost of a full median.
_NOISE_STRIDE = 4
#: MAD -> standard deviation of a Gaussian.
_MAD_TO_SIGMA = 1.4826
#: Iterative sigma clipping of the noise sample: cut (a Gaussian cut at 5 sigma
#: keeps its standard deviation to 1e-5) and iterations.
_CLIP = 5.0
_CLIP_ITER = 3
#: Noise floor relative to the pattern's strongest response (dynamic range ~1e4,
#: about 14 bits): only matters when the noise is undefined (MAD = 0, e.g. noise-free
#: simulations or backgrounds clipped to exactly zero over most of the pattern).
_NOISE_FLOOR = 1e-4


def log_sigmas(min_sigma: float, max_sigma: float, num_sigma: int) -> np.ndarray:
    """Geometrically spaced LoG scales, px (one value when ``num_sigma == 1``)."""
    if num_sigma == 1 or min_sigma == max_sigma:
        return np.array([float(max_sigma)])
    return np.geomspace(float(min_sigma), float(max_sigma), int(num_sigma))


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise InputError(f"`frames` must be 3-D (n, ky, kx); got shape {frames.shape}")
    if not (np.issubdtype(frames.dtype, np.floating) or np.issubdtype(frames.dtype, np.integer)):
        raise InputError(f"`frames` must be numeric; got dtype {frames.dtype}")
    if min(frames.shape[1:]) < 3:
        raise InputError(f"`frames` patterns must be at least 3 x 3 px; got {frames.shape[1:]}")
    return frames


@functools.lru_cache(maxsize=32)
def _gauss_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) float32 ``M`` with ``M @ v`` = scipy's ``gaussian_filter1d(v, sigma,
    mode="nearest", truncate=3.5)``: the truncated, normalised kernel, with the weights
    of taps beyond either end folded onto the edge sample."""
    h = int(_TRUNCATE * sigma + 0.5)  # scipy's kernel radius
    t = np.arange(-h, h + 1)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    g /= g.sum()
    m = np.zeros((n, n))
    rows = np.repeat(np.arange(n), len(t))
    cols = np.clip(np.arange(n)[:, None] + t[None, :], 0, n - 1).ravel()
    np.add.at(m, (rows, cols), np.tile(g, n))
    out = m.astype(np.float32)
    out.flags.writeable = False  # shared by every caller (lru_cache)
    return out


#: Output samples per block of the banded Gaussian products (at least twice the
#: kernel radius): see :func:`_banded_blocks`.
_BAND_BLOCK = 16


def _banded_blocks(n: int, sigmas) -> tuple[int, list]:
    """The Gaussian matrices of ``sigmas`` on ``n`` samples cut into blocks of output
    samples: ``(width, [(i0, i1, o0, o1, B), ...])``, ``B`` the (i1 - i0, S w) float32
    block of every scale's transposed matrix, side by side (scale ``s`` in columns
    ``s w : s w + (o1 - o0)``), that maps input samples ``i0:i1`` to output samples
    ``o0:o1``; ``i0:i1`` is ``o0:o1`` widened by the largest kernel radius, so the
    blocks hold every non-zero weight. Each pass then costs ~``w + 2 h`` multiply-adds
    per sample instead of ``n`` (a dense product over all samples)."""
    h = max(int(_TRUNCATE * float(s) + 0.5) for s in sigmas)  # scipy's kernel radius
    w = max(_BAND_BLOCK, 2 * h)
    if w + 2 * h >= n:  # no band to exploit: one dense block
        w = n
    ms = [_gauss_matrix(n, float(s)) for s in sigmas]
    blocks = []
    for o0 in range(0, n, w):
        o1 = min(n, o0 + w)
        i0, i1 = max(0, o0 - h), min(n, o1 + h)
        m = np.zeros((i1 - i0, len(ms) * w), np.float32)
        for k, g in enumerate(ms):
            m[:, k * w:k * w + o1 - o0] = g[o0:o1, i0:i1].T
        m.flags.writeable = False
        blocks.append((i0, i1, o0, o1, m))
    return w, blocks


def _smoothing_operators(ky: int, kx: int, sigmas) -> tuple:
    """The banded blocks (:func:`_banded_blocks`) of the x pass, all scales together,
    and of each scale's y pass, for :func:`_smooth_batch` (cached)."""
    return _operators(int(ky), int(kx), tuple(float(s) for s in sigmas))


@functools.lru_cache(maxsize=32)
def _operators(ky: int, kx: int, sigmas: tuple) -> tuple:
    return _banded_blocks(kx, sigmas), [_banded_blocks(ky, (s,)) for s in sigmas]


def _smooth_batch(part: np.ndarray, ops) -> np.ndarray:
    """Gaussian of every pattern at every scale: (S, n, kx, ky) float32 (transposed).

    Separable, each 1-D pass a few BLAS matrix products over the whole batch, one per
    block of output samples (:func:`_banded_blocks`): the banded matrix's zeros away
    from the band are skipped, the rest runs at the machine's vector speed (~4x the
    multiply-adds of a direct convolution, but ~4x as fast as
    ``scipy.ndimage.gaussian_filter1d``). The same values, bit for bit, as the product
    with the whole matrix: the skipped terms are exact zeros.
    """
    n, ky, kx = part.shape
    (wx, bx), by = ops
    x = part.reshape(n * ky, kx)
    s = len(by)
    # x pass, all scales: block b of every scale at a[:, b, :]
    a = np.empty((n * ky, len(bx), s * wx), np.float32)
    for b, (i0, i1, o0, o1, m) in enumerate(bx):
        np.matmul(x[:, i0:i1], m, out=a[:, b, :])
    a = a.reshape(n, ky, len(bx), s, wx)
    out = np.empty((s, n * kx, ky), np.float32)
    for k, (wy, blocks) in enumerate(by):
        # scale k's x-smoothed patterns, transposed (one copy), then the y pass
        t = np.empty((n, len(bx), wx, ky), np.float32)
        np.copyto(t, a[:, :, :, k, :].transpose(0, 2, 3, 1))
        t = t.reshape(n, len(bx) * wx, ky)[:, :kx].reshape(n * kx, ky)
        g = out[k]
        for i0, i1, o0, o1, m in blocks:
            np.matmul(t[:, i0:i1], m[:, :o1 - o0], out=g[:, o0:o1])
    return out.reshape(s, n, kx, ky)


def _local_max_at(value_at, shape, flat: np.ndarray, centre=None) -> np.ndarray:
    """Which of the pixels ``flat`` (indices into an (n, a, b) array ``z`` flattened) are
    not exceeded by any of their 8 neighbours (edges compared with the pixels that
    exist: ``z >= maximum_filter(z, size=(1, 3, 3), mode="nearest")`` at those pixels).
    ``value_at(idx)`` gives ``z.ravel()[idx]``: ``z`` itself need not exist;
    ``centre``: ``z`` at ``flat``, if known already (not looked up again).

    Only the few candidates above threshold are tested: their 8 neighbours' values,
    instead of four passes over the whole batch.
    """
    _, a, b = shape
    p, rest = np.divmod(flat, a * b)
    u, v = np.divmod(rest, b)
    nb = [(p * a + np.clip(u + du, 0, a - 1)) * b + np.clip(v + dv, 0, b - 1)
          for du in (-1, 0, 1) for dv in (-1, 0, 1) if du or dv]
    centre = value_at(flat) if centre is None else centre
    return (centre >= value_at(np.concatenate(nb)).reshape(8, -1)).all(axis=0)


def _neg_laplacian(g: np.ndarray) -> np.ndarray:
    """Minus the 5-point Laplacian of the interior of ``g``: (n, a, b) -> (n, a-2, b-2).

    Not multiplied by ``sigma^2``: every response is divided by its own noise
    level next, which makes any constant factor irrelevant.
    """
    r = np.multiply(g[:, 1:-1, 1:-1], 4.0)
    r -= g[:, :-2, 1:-1]
    r -= g[:, 2:, 1:-1]
    r -= g[:, 1:-1, :-2]
    r -= g[:, 1:-1, 2:]
    return r


def noise_level(response: np.ndarray, threshold: float) -> np.ndarray:
    """Noise unit of a LoG response per pattern, skew-corrected for ``threshold``.

    The LoG kernel sums to zero, so a flat or slowly varying background gives
    zero response and what remains away from spots is noise. Its standard
    deviation ``s`` and skewness ``g`` are measured on a sub-grid of pixels by
    iterative 5-sigma clipping, starting from the MAD (spot pixels are clipped;
    a 5-sigma cut leaves the tail of the noise, whose skewness matters, intact).
    Counting noise is skewed at low dose, so a Gaussian ``threshold`` would let
    through far more noise peaks than intended; the threshold is moved to the
    quantile with the same tail probability of a gamma (Pearson III)
    distribution of skewness ``g`` (:func:`_skewed_quantile`, ``q``). The
    returned unit is ``s * q / threshold``, so ``R / unit > threshold`` holds
    exactly when ``R`` exceeds the corrected quantile. Floored at ``1e-4`` of the
    pattern's largest response (only matters where the noise is undefined:
    noise-free or all-zero backgrounds).

    Parameters
    ----------
    response : (n, a, b) float array
    threshold : float
        Significance threshold in Gaussian standard deviations.

    Returns
    -------
    (n,) float32
    """
    n = response.shape[0]
    sub = np.ascontiguousarray(response[:, ::_NOISE_STRIDE, ::_NOISE_STRIDE]).reshape(n, -1)
    mag = np.abs(sub)
    sq = sub * sub
    sigma = _MAD_TO_SIGMA * np.median(mag, axis=1).astype(np.float64)
    rms = np.sqrt(np.mean(sq, axis=1, dtype=np.float64))
    sigma = np.where(sigma > 0, sigma, rms)  # MAD = 0 (mostly empty): start from above
    for _ in range(_CLIP_ITER):
        keep = mag <= (_CLIP * sigma)[:, None]
        cnt = np.maximum(np.count_nonzero(keep, axis=1), 1)
        sigma = np.sqrt(np.einsum("ij,ij->i", sq, keep, dtype=np.float64) / cnt)
    keep = mag <= (_CLIP * sigma)[:, None]
    cnt = np.maximum(np.count_nonzero(keep, axis=1), 1)
    mean = np.einsum("ij,ij->i", sub, keep, dtype=np.float64) / cnt
    d = sub - mean[:, None].astype(sub.dtype)
    d *= keep
    d2 = d * d
    m2 = d2.sum(axis=1, dtype=np.float64) / cnt
    m3 = np.einsum("ij,ij->i", d2, d, dtype=np.float64) / cnt
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = np.nan_to_num(m3 / m2 ** 1.5)
    unit = sigma * _skewed_quantile(threshold, skew) / threshold
    flat = response.reshape(n, -1)
    floor = _NOISE_FLOOR * np.maximum(flat.max(axis=1), -flat.min(axis=1))
    out = np.maximum(unit, floor)
    out[out == 0] = np.inf  # an all-zero pattern has no peaks
    return out.astype(np.float32)


def _skewed_quantile(z: float, skew: np.ndarray) -> np.ndarray:
    """Upper quantile, in standard deviations, of a Pearson type III (shifted gamma)
    distribution of skewness ``skew`` with the tail probability of ``z`` Gaussian sigmas.

    Sums of counting noise are gamma-like; the gamma with the measured skewness
    models their upper tail far better than a Gaussian (or Cornish-Fisher) does at
    low dose. ``skew <= 0`` (or tiny) gives ``z`` itself.
    """
    skew = np.asarray(skew, np.float64)
    out = np.full(skew.shape, float(z))
    pos = skew > 1e-3
    if pos.any():
        k = 4.0 / skew[pos] ** 2
        # gamma.isf(norm.sf(z), k) without scipy.stats' per-call overhead
        out[pos] = (special.gammainccinv(k, special.ndtr(-z)) - k) / np.sqrt(k)
    return out


def find_peaks_log(frames: np.ndarray, sigmas: Sequence[float], *,
                   threshold: float | None = None, exclude_border: int = 1,
                   min_separation: float | None = None,
                   units: np.ndarray | None = None) -> np.ndarray:
    """Find diffraction spots in a stack of patterns by multi-scale LoG.

    For each scale ``s`` the response is ``R_s = -Laplacian(G_s * I)``
    (positive on bright spots; the Laplacian is the 5-point stencil on the
    Gaussian-smoothed pattern). Each ``R_s`` is divided by its noise unit in
    that pattern (:func:`noise_level`), giving a significance ``Z_s``; this
    normalises the scales against each other by their noise rather than by
    blob_log's ``s^2`` (a constant factor per scale, so it drops out), and makes
    the threshold independent of the intensity scale. ``Z = max_s Z_s``. A peak
    is a pixel with ``Z``
    above ``threshold`` that is a maximum of ``Z`` over its 3 x 3 neighbourhood
    (and hence over scales); of two peaks closer than ``min_separation`` the
    weaker is dropped.

    Positions are refined by a 3-point Gaussian (log-parabola) fit along each
    axis of ``G_s * I`` at the peak's scale, exact for a Gaussian spot on a flat
    background (falls back to a parabola where the smoothed values are not
    positive). The intensity is the sum of the (background-subtracted) pattern
    over the pixels whose centres lie within ``sqrt(2) * max(sigmas)`` (the spot
    radius) of the refined position, in data units.

    Parameters
    ----------
    frames : (n, ky, kx) float array
        Background-subtracted patterns (float32 preferred; others are converted).
    sigmas : sequence of float
        LoG scales, px (see :func:`log_sigmas`).
    threshold : float, optional
        Significance threshold in noise units. Default:
        :func:`~spedflow.peaks.default_threshold` for this pattern size and number
        of scales (about 0.01 false peaks per pattern of pure Gaussian noise).
    exclude_border : int
        Peaks whose integer position is closer than this to the edge are
        dropped, px (at least 1).
    min_separation : float, optional
        Non-maximum suppression distance, px. Default ``sqrt(2) * max(sigmas)``:
        two maxima within one spot radius are one spot.
    units : (S, n, ky, kx) float array or :class:`RadialUnits`, optional
        Noise unit of the response at every scale and pixel (a noise model of the
        data, e.g. :func:`spedflow.peaks.noise.noise_units`), used instead of
        :func:`noise_level`'s one value per pattern and scale.

    Returns
    -------
    (m, 5) float32 array
        Columns ``[pattern_index, ky, kx, intensity, sigma]``: index into
        ``frames``, sub-pixel position (px), integrated intensity (data units)
        and the LoG scale of the strongest response (px). Sorted by pattern,
        then ``ky``, then ``kx``.
    """
    frames = _check_frames(frames)
    sig = np.atleast_1d(np.asarray(sigmas, dtype=float))
    if sig.ndim != 1 or len(sig) == 0 or not np.all(np.isfinite(sig)) or np.any(sig < 0.5):
        raise ParameterError(f"`sigmas` must be a non-empty list of scales >= 0.5 px (got {sigmas!r})")
    n, ky, kx = frames.shape
    if threshold is None:
        threshold = default_threshold(ky, kx, len(sig))
    if isinstance(threshold, bool) or not (isinstance(threshold, (int, float, np.floating))
                                           and threshold > 0):
        raise ParameterError(f"`threshold` must be a positive number (got {threshold!r})")
    if int(exclude_border) != exclude_border or exclude_border < 1:
        raise ParameterError(f"`exclude_border` must be a whole number >= 1 (got {exclude_border!r})")
    b = int(exclude_border)
    if min_separation is None:
        min_separation = math.sqrt(2.0) * float(sig.max())
    empty = np.zeros((0, 5), np.float32)
    if n == 0 or ky - 2 * b < 1 or kx - 2 * b < 1:
        return empty
    f = frames.astype(np.float32, copy=False)

    ops = _smoothing_operators(ky, kx, sig)
    rho = math.sqrt(2.0) * float(sig.max())
    if units is not None and np.shape(units) != (len(sig), n, ky, kx):
        raise InputError(f"`units` must have shape {(len(sig), n, ky, kx)} (got {np.shape(units)})")
    tables = [_batch_peaks(f[s0:s0 + _BATCH], s0, ops, sig, threshold, b, min_separation, rho,
                           _units_of_batch(units, s0, s0 + _BATCH))
              for s0 in range(0, n, _BATCH)]
    return sorted_table(tables)


def _units_of_batch(units, s0: int, s1: int):
    if units is None:
        return None
    if isinstance(units, RadialUnits):
        return units.batch(s0, s1)
    return units[:, s0:s1]


def sorted_table(tables) -> np.ndarray:
    """Peak tables ``(m, 5)`` as one float32 table sorted by pattern, then ``ky``, then
    ``kx`` (the order :func:`find_peaks_log` returns); ``(0, 5)`` for none."""
    if not len(tables):
        return np.zeros((0, 5), np.float32)
    out = np.concatenate(tables).astype(np.float32, copy=False)
    return out[np.lexsort((out[:, 2], out[:, 1], out[:, 0]))]


#: With patterns aligned into a zero fill, peaks nearer than this many times the largest
#: LoG scale to a detector edge that the alignment shifted into the pattern are dropped:
#: the step from the edge's level to 0 has a scale-normalised LoG that peaks at
#: B / sqrt(2 pi e) = 0.24 B one scale inside it (B the step's height), falling to
#: 3 exp(-4.5) / sqrt(2 pi) = 1.3 % of B at three scales.
FILL_EDGE_SCALES = 3.0


def drop_fill_edge(table: np.ndarray, centres: np.ndarray, shape, margin: float) -> np.ndarray:
    """The rows of a peak table of aligned patterns that lie on the detector, at least
    ``margin`` px inside each of its edges that the alignment shifted into the pattern.

    Aligning a pattern whose beam is off the detector centre shifts one or two of the
    detector's edges into the pattern and fills what lies beyond them. A zero fill
    makes a step from the edge's level to 0 and a line of LoG maxima along it (on a
    Merlin file with the beam 100 px off centre, 14 % of all peaks and 5 false
    vectors): ``margin = FILL_EDGE_SCALES * max_sigma`` then. A fill by copies of the
    edge (:func:`~spedflow.preprocess.kernels.fill_beyond`, the counting-noise finder's)
    has no step, but the copies can hold maxima: ``margin = 0`` keeps the peaks on the
    detector only. Edges that the shift moved out of the pattern are left to the
    finder's ``exclude_border``.

    Parameters
    ----------
    table : (m, >=3) array
        ``[pattern_index, ky, kx, ...]`` in the aligned frame of each pattern.
    centres : (n, 2) array
        The beam centre each pattern was aligned by (moved to ``(ky // 2, kx // 2)``).
    shape : (ky, kx)
    margin : float
        Distance in px from the centre of the edge's pixels (the detector's pixels span
        ``-0.5 .. ky - 0.5``: a peak within half a pixel of the edge pixel's centre is
        on the detector at ``margin = 0``).

    Returns
    -------
    The kept rows of ``table``, in order.
    """
    table = np.asarray(table)
    if len(table) == 0:
        return table
    c = np.asarray(centres, np.float64).reshape(-1, 2)[table[:, 0].astype(np.intp)]
    return table[clear_of_fill(table[:, 1:3], c, shape, margin)]


def clear_of_fill(positions: np.ndarray, centres: np.ndarray, shape, margin: float) -> np.ndarray:
    """The rule of :func:`drop_fill_edge` as a mask: ``positions`` (m, 2) ``(ky, kx)`` in
    patterns aligned by ``centres`` (m, 2), one per position."""
    ky, kx = (int(v) for v in shape)
    shift = np.array([ky // 2, kx // 2], np.float64) - np.asarray(centres, np.float64)  # aligned = raw + shift
    raw = np.asarray(positions, np.float64) - shift
    whole = np.rint(shift)  # the fill's width (the bilinear shift fills up to one more pixel)
    keep = np.ones(len(raw), bool)
    least = float(margin) - 0.5
    for a, n in enumerate((ky, kx)):
        keep &= (whole[:, a] < 1) | (raw[:, a] >= least)  # the low edge moved in
        keep &= (whole[:, a] > -1) | (raw[:, a] <= n - 1 - least)  # the high edge moved in
    return keep


class RadialUnits:
    """Noise units of the LoG response that depend on the distance from the beam only:
    per scale and pattern a profile over rings, made a value per pixel by linear
    interpolation between two rings (the counting-noise model,
    :mod:`spedflow.peaks.noise`). Passed to :func:`find_peaks_log` as ``units``
    instead of full unit images: the finder looks them up at its candidates, or (many
    candidates) makes them for the interior of a batch, never for a whole chunk.

    Parameters
    ----------
    profiles : (S, n, R) float array
        Unit per scale, pattern and ring.
    j0, j1 : (ky * kx,) int arrays
        The two rings each pixel (row-major) interpolates between.
    f : (ky * kx,) float array in [0, 1]
        Weight of ring ``j1``.
    shape : (ky, kx)
    """

    def __init__(self, profiles, j0, j1, f, shape):
        self.profiles = np.asarray(profiles, np.float32)
        self.j0, self.j1 = np.asarray(j0, np.intp), np.asarray(j1, np.intp)
        self.f = np.asarray(f, np.float32)
        self.detector = tuple(int(k) for k in shape)
        self._interior = None  # (j0, j1, f) of the interior in the finder's layout

    @property
    def shape(self) -> tuple:
        """``(S, n, ky, kx)``, the shape of the unit images this stands for."""
        return self.profiles.shape[:2] + self.detector

    def images(self) -> np.ndarray:
        """The (S, n, ky, kx) unit images (for checks; the finder never makes them)."""
        return np.stack([self._over(i, self.j0, self.j1, self.f)
                         for i in range(len(self.profiles))]).reshape(self.shape)

    def _over(self, i: int, j0, j1, f) -> np.ndarray:
        """Scale ``i``'s units of every pattern at the pixels whose rings and weights
        are ``j0``, ``j1``, ``f``: (n, pixels), as :meth:`at` gives them."""
        prof = self.profiles[i]
        lo = prof.take(j0, axis=1)
        out = prof.take(j1, axis=1)
        out -= lo
        out *= f
        out += lo
        return out

    def batch(self, s0: int, s1: int) -> "RadialUnits":
        out = RadialUnits(self.profiles[:, s0:s1], self.j0, self.j1, self.f, self.detector)
        out._interior = self._interior
        return out

    def floor(self, i: int) -> np.ndarray:
        """(n,) lower bound of scale ``i``'s unit over each pattern."""
        return self.profiles[i].min(axis=1)

    def at(self, i: int, p, y, x) -> np.ndarray:
        pix = y * self.detector[1] + x
        prof = self.profiles[i]
        row = p * prof.shape[1]
        prof = prof.ravel()  # flat gathers: ~3x faster than 2-D fancy indexing
        lo = prof.take(row + self.j0.take(pix))
        return lo + self.f.take(pix) * (prof.take(row + self.j1.take(pix)) - lo)

    def interior(self, i: int) -> np.ndarray:
        """Scale ``i``'s units at every interior pixel, in the finder's transposed layout
        (n, kx - 2, ky - 2): the values :meth:`at` gives there."""
        if self._interior is None:
            ky, kx = self.detector
            pix = ((np.arange(1, ky - 1)[None, :] * kx) + np.arange(1, kx - 1)[:, None]).ravel()
            self._interior = (self.j0[pix], self.j1[pix], self.f[pix])
        out = self._over(i, *self._interior)
        return out.reshape(len(out), self.detector[1] - 2, self.detector[0] - 2)


class _PatternUnits:
    """One noise unit per scale and pattern (:func:`noise_level`)."""

    def __init__(self, levels):
        self.levels = levels

    def floor(self, i):
        return self.levels[i]

    def at(self, i, p, y, x):
        return self.levels[i][p]

    def interior(self, i):
        return self.levels[i][:, None, None]


class _ImageUnits:
    """Unit images ``(S, n, ky, kx)`` given by the caller."""

    def __init__(self, units):
        self.units = np.asarray(units, np.float32)

    def floor(self, i):
        return self.units[i][:, 1:-1, 1:-1].min(axis=(1, 2))

    def at(self, i, p, y, x):
        return self.units[i][p, y, x]

    def interior(self, i):
        return self.units[i][:, 1:-1, 1:-1].transpose(0, 2, 1)


def _batch_peaks(part, s0, ops, sig, threshold, b, min_separation, rho, units=None) -> np.ndarray:
    """Peak table ``(m, 5)`` float64 of one batch of patterns (pattern index + ``s0``)."""
    ky, kx = part.shape[1:]
    # 1. the Gaussian of every scale; the LoG response of the interior (transposed
    # layout: index (kx - 2, ky - 2), full-array pixel (v + 1, u + 1) at index (u, v))
    smooth = _smooth_batch(part, ops)
    nu, nv = kx - 2, ky - 2
    # 2. candidates: local maxima of the significance above threshold
    fast = _jit.compiled("spedflow._compiled") if isinstance(units, RadialUnits) else None
    if fast is not None:
        # compiled, one pattern at a time: the same candidates (spedflow._compiled)
        flat, zc, scale_idx = fast.local_maxima(smooth, units.profiles, units.j0, units.j1,
                                                units.f, threshold, b)
    else:
        flat, zc, scale_idx = _candidates(smooth, units, threshold, b)
    if len(flat) == 0:
        return np.zeros((0, 5))
    p, rest = np.divmod(flat, nu * nv)
    u, v = np.divmod(rest, nv)

    # 3. non-maximum suppression within min_separation (same pattern only)
    if len(p) > 1 and min_separation > 0:
        gap = 4.0 * (ky + kx + min_separation)
        pts = np.column_stack([p * gap, u, v]).astype(np.float64)
        pairs = cKDTree(pts).query_pairs(min_separation, output_type="ndarray")
        if len(pairs):
            i, j = pairs[:, 0], pairs[:, 1]
            weaker = np.where((zc[i] < zc[j]) | ((zc[i] == zc[j]) & (i > j)), i, j)
            keep = np.ones(len(p), bool)
            keep[weaker] = False
            p, u, v, scale_idx = p[keep], u[keep], v[keep], scale_idx[keep]

    # 4. sub-pixel refinement on the smoothed pattern of the peak's scale (full-array
    # indices x = u + 1, y = v + 1; the smoothed patterns are in the transposed layout)
    x, y = u + 1, v + 1
    pos_y, pos_x = y.astype(np.float64), x.astype(np.float64)
    for i, g in enumerate(smooth):
        k = np.nonzero(scale_idx == i)[0]
        pk, xk, yk = p[k], x[k], y[k]
        c = g[pk, xk, yk]
        pos_y[k] += _vertex(g[pk, xk, yk - 1], c, g[pk, xk, yk + 1])
        pos_x[k] += _vertex(g[pk, xk - 1, yk], c, g[pk, xk + 1, yk])

    # 5. intensity: sum over the spot disc around the refined position
    intensity = _disc_sums(part, p, pos_y, pos_x, rho)
    return np.column_stack([p + s0, pos_y, pos_x, intensity, sig[scale_idx]])


def _candidates(smooth, units, threshold, b):
    """Step 2 of :func:`_batch_peaks`: the pixels of the interior (flat indices into
    (n, kx - 2, ky - 2), ascending) whose significance ``Z = max_s R_s / unit_s`` exceeds
    ``threshold`` and is not exceeded by any of its 8 neighbours, away from the border
    ``b``; returns ``(flat, Z there, index of the scale that gives it)``.

    ``Z`` is evaluated at the candidates and their neighbours only, or as whole arrays
    where candidates are many. ``units``: None (one per pattern, :func:`noise_level`),
    :class:`RadialUnits`, or (S, n, ky, kx) unit images.
    """
    resp = [_neg_laplacian(g) for g in smooth]
    if units is None:
        units = _PatternUnits([noise_level(r, threshold) for r in resp])
    elif not isinstance(units, RadialUnits):
        units = _ImageUnits(units)
    n, nu, nv = resp[0].shape

    def significance(flat):
        """Z and the index of the scale that gives it at ``flat`` (indices into R_s)."""
        p, rest = np.divmod(flat, nu * nv)
        u, v = np.divmod(rest, nv)
        z = best = None
        for i, r in enumerate(resp):
            zi = r.ravel()[flat] / units.at(i, p, v + 1, u + 1)
            if i == 0:
                z, best = zi, np.zeros(len(flat), np.intp)
            else:
                best = np.where(zi > z, i, best)
                z = np.maximum(z, zi)
        return z, best

    # pixels above threshold at some scale (R_s above threshold times the
    # lowest unit of the pattern is necessary for that, and a cheap pass), away from the
    # border, then the local maxima of Z (and hence over scales) among them
    cand = None
    for i, r in enumerate(resp):
        bound = (threshold * (1 - 1e-5)) * units.floor(i).astype(np.float32)
        above = r > bound[:, None, None]
        cand = above if cand is None else np.logical_or(cand, above, out=cand)
    if b > 1:
        cand[:, :b - 1] = False
        cand[:, nu - (b - 1):] = False
        cand[:, :, :b - 1] = False
        cand[:, :, nv - (b - 1):] = False
    flat = np.flatnonzero(cand)  # one pass; 3-D np.nonzero is ~10x slower
    if len(flat) > _SPARSE_CANDIDATES * cand.size:
        # patterns full of spots: Z of every pixel (the same values, as whole arrays)
        # costs less than looking up candidates and their neighbours one by one
        z = best = None
        for i, r in enumerate(resp):
            zi = r / units.interior(i)
            if i == 0:
                z, best = zi, np.zeros(zi.shape, np.int8)
            else:
                up = (zi > z).view(np.int8)  # best = where(zi > z, i, best), without a
                best += up * (np.int8(i) - best)  # boolean-mask assignment (~20x slower)
                np.maximum(z, zi, out=z)
        zc, scale_idx = z.ravel()[flat], best.ravel()[flat].astype(np.intp)
        value_at = z.ravel().take
    else:
        zc, scale_idx = significance(flat)

        def value_at(k):
            return significance(k)[0]
    keep = zc > threshold
    flat, zc, scale_idx = flat[keep], zc[keep], scale_idx[keep]
    peak = _local_max_at(value_at, (n, nu, nv), flat, centre=zc)
    return flat[peak], zc[peak], scale_idx[peak]


def _vertex(fm, f0, fp) -> np.ndarray:
    """Offset (in [-1, 1]) of the vertex of a Gaussian (else parabola) through 3 samples."""
    fm = np.asarray(fm, np.float64)
    fp = np.asarray(fp, np.float64)
    pos = (fm > 0) & (f0 > 0) & (fp > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lm = np.where(pos, np.log(np.where(pos, fm, 1.0)), fm)
        l0 = np.where(pos, np.log(np.where(pos, f0, 1.0)), f0)
        lp = np.where(pos, np.log(np.where(pos, fp, 1.0)), fp)
        den = lm - 2.0 * l0 + lp
        d = np.where(den < 0, 0.5 * (lm - lp) / den, 0.0)
    return np.clip(np.nan_to_num(d), -1.0, 1.0)


def _disc_sums(frames: np.ndarray, idx, cy, cx, radius: float) -> np.ndarray:
    """Sum of ``frames[idx]`` over pixels with centres within ``radius`` of (cy, cx)."""
    h = int(math.ceil(radius)) + 1
    off = np.arange(-h, h + 1)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    oy, ox = oy.ravel(), ox.ravel()
    y0 = np.rint(cy).astype(np.intp)
    x0 = np.rint(cx).astype(np.intp)
    yy = y0[:, None] + oy[None, :]
    xx = x0[:, None] + ox[None, :]
    _, ky, kx = frames.shape
    inside = (yy >= 0) & (yy < ky) & (xx >= 0) & (xx < kx)
    inside &= (yy - cy[:, None]) ** 2 + (xx - cx[:, None]) ** 2 <= radius * radius
    vals = frames[idx[:, None], np.clip(yy, 0, ky - 1), np.clip(xx, 0, kx - 1)]
    return np.where(inside, vals, 0.0).sum(axis=1)
