"""Counting-noise model of aligned diffraction patterns: the peak finder's threshold.

A pixel of a counting detector records ``z = g N`` with ``N`` Poisson counts and ``g``
the detector's data units per count (1 for an electron-counting camera; a CCD adds
a read-out variance ``v``, and a camera whose dark level ``o`` was not subtracted reads
``o`` more: its variance ``g (z - o) + v`` is the line ``g z + v`` with a negative
``v``, see :func:`count_scale`). Away from the spots, the mean ``b`` of an aligned pattern
is a function of the distance from the beam: the beam's tails, the glare, the
amorphous film's rings and the thermal diffuse background are all circular about
it. So per pattern, the background is the mean of each 1-px ring about
``(ky // 2, kx // 2)``, the bright outliers (spots) clipped at a Poisson bound.

The LoG response ``R = w * (z - b)`` of the residual then has, at a pixel where the
background is ``b``, mean 0, variance ``S2 (g b + v)`` and third cumulant ``S3 g^2 b``
(``S2``, ``S3``: the sums of the squared and cubed LoG weights). Its tail is that of
a gamma distribution of this skewness (:func:`spedflow.peaks.kernels._skewed_quantile`),
so each ring gets its own noise unit. This is what a single noise level per pattern
cannot give: next to the beam, where the background is tens of counts, and in the
dark outer rings, where it is a few hundredths of a count and a lone count is not a
spot, the same threshold then means the same false-alarm rate.

Nothing here imports dask.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.sparse as sp
from scipy import ndimage

from .. import _jit
from ..errors import InputError
from . import kernels as _k

__all__ = ["RingModel", "ring_model", "count_scale", "log_noise_factors", "noise_units", "log_moments",
           "find_peaks_counting", "aligned_counting_peaks", "ring_offset_bins",
           "counting_peaks_by_slab"]

#: Clipping of the ring means: pixels above ``b + CLIP * sqrt(g b + v) + g`` are spots.
#: The ``+ g`` (one count) keeps lone counts in the mean where ``b`` is tiny, so the
#: mean of a sparse ring is not driven to zero by clipping all its counts.
_CLIP = 4.0
_CLIP_ITER = 2
#: About the most pixel pairs :func:`count_scale` takes from one block (a strided
#: sample of detector pixels).
_PAIRS_PER_BLOCK = 1 << 19
#: :func:`count_scale`: the darkest readings, whose variance bounds a dark level's
#: negative intercept, are the pixel triples in this lowest fraction of the instrument.
_DARK_QUANTILE = 0.05
#: ... and they show a dark level when they vary less than this fraction of what counts
#: of their mean would (counting detectors: about 1; a CCD's dark pixels: read-out noise) ...
_DARK_DISPERSION = 0.5
#: :func:`count_scale` leaves out the pixel triples whose squared difference exceeds
#: this many times the variance of the current line (crystal edges, the beam's jitter).
_TRIM = 9.0

#: :func:`log_noise_factors`: neighbouring-pattern pairs taken from one block (strided) ...
_FACTOR_PAIRS_PER_BLOCK = 64
#: ... fewest pairs to measure a factor on ...
_MIN_FACTOR_PAIRS = 16
#: ... and the least factor taken for a correlation of the noise (below: the gain's error).
_CORRELATED = 1.5
#: Patterns whose ring background is measured at a time (:meth:`RingModel.background`).
_BACKGROUND_BATCH = 32
#: Backgrounds at which :func:`noise_units` evaluates the gamma quantile (log-spaced;
#: interpolated in between to < 1e-3 relative).
_QUANTILE_GRID = 128


class RingModel:
    """The 1-px rings about ``(ky // 2, kx // 2)``, moved by ``offset`` (px), of a
    detector of ``shape``.

    Ring ``j`` holds the pixels whose distance from the centre rounds to ``j``.
    Profiles (one value per ring) become images by linear interpolation in radius.
    """

    def __init__(self, shape, offset=(0.0, 0.0)):
        ky, kx = (int(s) for s in shape)
        oy, ox = (float(o) for o in offset)
        yy, xx = np.meshgrid(np.arange(ky) - ky // 2 - oy, np.arange(kx) - kx // 2 - ox,
                             indexing="ij")
        r = np.hypot(yy, xx).ravel()
        self.shape = (ky, kx)
        self.ring = np.rint(r).astype(np.intp)
        self.n_rings = int(self.ring.max()) + 1
        self.counts = np.maximum(np.bincount(self.ring, minlength=self.n_rings), 1)
        # ring sums of a (P, m) stack as one sparse product
        self._sum = sp.csr_matrix((np.ones(r.size, np.float32), (self.ring, np.arange(r.size))),
                                  shape=(self.n_rings, r.size))
        # linear interpolation between rings: each pixel between rings j0 and j1, with
        # weight f on j1 (:meth:`image`; :class:`~spedflow.peaks.kernels.RadialUnits`
        # looks units up through these)
        j0 = np.minimum(np.floor(r).astype(np.intp), max(self.n_rings - 2, 0))
        j1 = np.minimum(j0 + 1, self.n_rings - 1)
        f = np.clip(r - j0, 0, 1).astype(np.float32)
        self.j0, self.j1, self.f = j0, j1, f
        self._g = 1 - f  # weight of ring j0

    def background(self, frames: np.ndarray, gain: float, read_var: float) -> np.ndarray:
        """Per pattern and ring, the mean of the pixels below the Poisson clip.

        Parameters
        ----------
        frames : (n, ky, kx) float array, aligned (beam at the centre). NaN marks a
            pixel beyond the detector's edge (a pattern aligned into a NaN fill): it is
            left out, and a ring with no other pixel takes the nearest ring's mean
            (inwards, else outwards).
        gain, read_var : float
            Data units per count and read-out variance (:func:`count_scale`).

        Returns
        -------
        (n, n_rings) float32
        """
        frames = np.asarray(frames, np.float32)
        out = np.empty((len(frames), self.n_rings), np.float32)
        # a few patterns at a time: the (P, n) transposed copy the sparse products need
        # costs 1.6x as much per pattern at n = 64 as at 32 (rows 64 kB apart in memory
        # compete for the same cache sets); each pattern's means are its own
        for s in range(0, len(frames), _BACKGROUND_BATCH):
            part = frames[s:s + _BACKGROUND_BATCH]
            x = np.ascontiguousarray(part.reshape(len(part), -1).T)  # (P, n)
            on = ~np.isnan(x)
            if on.all():
                mean = (self._sum @ x) / self.counts[:, None]
            else:
                x = np.where(on, x, np.float32(0))
                n_on = self._sum @ on.astype(np.float32)
                mean = (self._sum @ x) / np.maximum(n_on, 1)
            for _ in range(_CLIP_ITER):
                var = np.maximum(gain * np.maximum(mean, 0) + read_var, 0)
                bound = mean + _CLIP * np.sqrt(var) + gain
                keep = ((x <= bound[self.ring]) & on).astype(np.float32)
                mean = (self._sum @ (x * keep)) / np.maximum(self._sum @ keep, 1)
            if not on.all():
                mean = _fill_empty(np.where(n_on > 0, mean, np.nan))
            out[s:s + len(part)] = mean.T
        return out

    def image(self, profile: np.ndarray) -> np.ndarray:
        """(n, n_rings) profiles -> (n, ky, kx) images, linear in radius between the rings
        (two gathers per pixel: half the time of a dense (rings, pixels) product)."""
        p = np.asarray(profile, np.float32).reshape(-1, self.n_rings)
        out = p.take(self.j0, axis=1)
        out *= self._g
        hi = p.take(self.j1, axis=1)
        hi *= self.f
        out += hi
        return out.reshape((-1,) + self.shape)


@functools.lru_cache(maxsize=32)
def ring_model(shape, offset=(0.0, 0.0)) -> RingModel:
    """The cached :class:`RingModel` of a detector shape, about the centre moved by
    ``offset`` (px)."""
    return RingModel(tuple(int(s) for s in shape), tuple(float(o) for o in offset))


@functools.lru_cache(maxsize=32)
def log_moments(ky: int, kx: int, sigma: float) -> tuple[float, float]:
    """``(S2, S3)``: sums of the squared and cubed weights of the finder's LoG at
    ``sigma`` (:func:`_log_weights`)."""
    w = _log_weights(ky, kx, sigma)
    return float((w ** 2).sum()), float((w ** 3).sum())


@functools.lru_cache(maxsize=32)
def _log_weights(ky: int, kx: int, sigma: float) -> np.ndarray:
    """The weights of the finder's LoG at ``sigma`` (its Gaussian matrices and 5-point
    Laplacian, applied to a unit count at ``(ky // 2, kx // 2)``): float64, transposed
    as :func:`~spedflow.peaks.kernels._smooth_batch` leaves it, (kx - 2, ky - 2)."""
    delta = np.zeros((1, ky, kx), np.float32)
    delta[0, ky // 2, kx // 2] = 1
    w = _k._neg_laplacian(_k._smooth_batch(delta, _k._smoothing_operators(ky, kx, [sigma]))[0])
    return w[0].astype(np.float64)


def noise_units(background: np.ndarray, gain: float, read_var: float, sigmas, threshold: float,
                shape, rings=None, factors=()) -> np.ndarray:
    """Noise unit of the LoG response per scale, pattern and ring.

    ``R / unit > threshold`` holds exactly when ``R`` exceeds the gamma quantile, with
    the tail probability of ``threshold`` Gaussian sigmas, of counting noise on the
    ring's background (see the module notes). The background is floored at one count
    per ring (``g / pixels``): an empty ring's rate is not known to be lower.
    ``factors`` (one per scale, or empty: all 1) are for a detector whose point spread
    correlates neighbouring pixels' noise (:func:`log_noise_factors`): the LoG, which
    sums over many pixels, sees counts of ``factor`` times the pixels' gain (the point
    spread shares each electron among pixels, the LoG gathers it again), so the
    factor multiplies the response's variance and its square the third cumulant.

    Returns
    -------
    (S, n, n_rings) float32
    """
    rings = ring_model(shape) if rings is None else rings
    # a negative read_var is a dark level left in the data (:func:`count_scale`): the
    # counts are the background above it, and the read-out variance is not known apart
    # from it (taken as 0: the variance line is the same, the skewness the larger)
    b = np.maximum(np.asarray(background, np.float64) + min(read_var, 0.0) / gain,
                   gain / rings.counts[None, :])
    read_var = max(read_var, 0.0)
    # the gamma quantile is a smooth function of log b: evaluated on a grid of
    # backgrounds spanning this batch and interpolated (the exact one per ring and
    # pattern costs as much as the LoG itself)
    grid = np.geomspace(b.min(), max(b.max(), 1.0001 * b.min()), _QUANTILE_GRID)
    out = np.empty((len(sigmas),) + b.shape, np.float32)
    factors = tuple(factors) or (1.0,) * len(sigmas)
    for i, s in enumerate(sigmas):
        s2, s3 = log_moments(shape[0], shape[1], float(s))
        f = float(factors[i])  # the LoG sees counts f times the pixels' gain (see above)
        s2, s3 = s2 * f, s3 * f * f
        var_grid = s2 * (gain * grid + read_var)
        q = _k._skewed_quantile(threshold, s3 * gain * gain * grid / var_grid ** 1.5)
        q_at = np.interp(np.log(b), np.log(grid), q)
        out[i] = np.sqrt(s2 * (gain * b + read_var)) * q_at / threshold
    return out


def count_scale(blocks, *, gain: float | None = None, return_error: bool = False) -> tuple:
    """Data units per count ``g`` and read-out variance ``v`` of a detector, from blocks
    of its raw patterns ``(sy, sx, ky, kx)``.

    The same detector pixel at neighbouring scan positions sees nearly the same mean
    (crystals span many probe positions, the descan moves the beam by a small fraction
    of a pixel per step), so half the squared difference ``d`` of two readings
    estimates the pixel's variance ``g mu + v`` at its mean ``mu``. ``mu`` is not
    known, only the pair's mean ``m``, which carries read-out and counting noise of
    its own: a least-squares line of ``d`` on ``m`` is then flattened (regression
    dilution). On a CCD with a read-out sigma of 3 counts and mostly dark pixels it
    gave 0.01-0.02 data units per count for 1, and the peak finder, told that bright
    pixels are nearly noiseless, found twice as many peaks, half of them noise.
    Instead the line is an instrumental-variable fit: the reading ``z`` of the same
    pixel at the next scan position along the row measures ``mu`` with noise
    independent of the pair's, so ``g = cov(d, z) / cov(m, z)`` is not flattened.
    Weights (``1 / (g z + v + g^2)^2``, the variance of ``d``) and the trimming of
    triples more than ~3 sigma off the current line (crystal edges, the beam's
    jitter) use ``z`` too, and the fit is repeated until it settles. Pixels at the
    data's largest value (a clipped camera) and the brightest 1 % (the beam's core,
    where jitter dominates) are left out.

    A camera whose dark level ``o`` was not subtracted (a CCD or the optical camera of
    a precession system reading a few tens of units with no electron) has variance
    ``g (z - o) + v``: a line with intercept ``v - g o``, negative when the dark level
    outweighs the read-out noise. Clamped at 0, the line was tilted to meet the dark
    pixels (gain 1.28 for 1 on a simulated CCD with a dark level of 20 and read-out
    sigma 3). The intercept may be negative, down to what the darkest readings
    themselves show: the triples whose instrument lies in its lowest 5 % (selected on
    ``z``, so their ``m`` and ``d`` carry no selection bias) have mean ``m_0`` and
    variance ``d_0``, and when ``d_0 < g m_0 / 2`` (they vary less than counts would:
    a dark level) the line cannot pass below them, ``v >= d_0 - g m_0``. On a counting
    detector the bound is 0, as before. The test takes the gain as known: a gain
    overestimated twice or more (a scene of uniform counts, with no spread of
    brightness to fit a slope on, gave 12 units per count for 1) makes counts look like
    a dark level; the level it implies, ``-v / g``, is below ``m_0`` (the darkest
    readings' mean), which harms nothing where those are dark.

    The gain is only as good as the spread of the pixels' means: a camera whose pixels
    are all at its dark level but for the beam (left out, above) has none, and the fit
    is a guess (3.6 units per count for 1.5 on an 8-bit camera of that kind).
    ``return_error`` adds the fit's relative standard error (the instrumental-variable
    estimator's, linearised): 0.045 or less on every simulated detector with spots or
    a beam tail to fit, 0.6-1.7 on the two without. A ``gain`` given (the camera's
    known units per count) is held, and only the intercept is fitted: the darkest
    readings fix it well, with or without a spread of brighter ones.

    Returns
    -------
    (gain, read_var) floats; ``gain > 0``; ``read_var`` the variance of a reading of 0
    (the line's intercept): the read-out variance, less ``gain`` times a dark level left
    in the data, so it may be negative. A sample with fewer than 100 non-zero pixel
    triples gives ``(1, 0)``: counts. With ``return_error``, ``(gain, read_var,
    relative standard error of gain)`` (0 where nothing was fitted).
    """
    m_all, d_all, z_all = [], [], []
    n_triples, top, brightest = 0, None, 0.0
    for block in blocks:
        a = np.asarray(block)
        if a.ndim == 4 and a.shape[1] < 3:
            a = a.swapaxes(0, 1)  # a scan (or chunk) under 3 columns wide: along its columns
        if a.ndim != 4 or a.shape[1] < 3:
            continue
        top = float(a.max())
        brightest = max(brightest, top)
        # a strided sample of detector pixels bounds the time and memory
        step = int(np.ceil(np.sqrt(a[:, 2:].size / _PAIRS_PER_BLOCK)))
        a = a[:, :, ::step, ::step].astype(np.float64)
        # the pair at x, x + 1; the instrument the reading at x + 2
        q, p, z = a[:, :-2].ravel(), a[:, 1:-1].ravel(), a[:, 2:].ravel()
        ok = (p < top) & (q < top) & (z < top)
        n_triples += ok.size
        m_all.append(((p + q) / 2)[ok])
        d_all.append(((p - q) ** 2 / 2)[ok])
        z_all.append(z[ok])
    if n_triples >= 100 and brightest <= 0:  # nothing but zeros: no scale to measure
        return (1.0, 0.0, 0.0) if return_error else (1.0, 0.0)
    if n_triples >= 100 and sum(len(m) for m in m_all) == 0:
        raise InputError(f"every neighbouring reading sampled is at the data's largest value "
                         f"({top:.6g}): constant or saturated data show no counting noise")
    if not m_all or sum(len(m) for m in m_all) < 100:
        raise InputError("too few patterns to measure the detector's counting noise "
                         "(need three neighbouring scan positions in a row or column)")
    m, d, z = np.concatenate(m_all), np.concatenate(d_all), np.concatenate(z_all)
    if np.count_nonzero(m > 0) < 100:  # (nearly) empty sample: no scale to measure
        return (1.0, 0.0, 0.0) if return_error else (1.0, 0.0)
    cap = np.quantile(z, 0.99)  # the beam's core: its jitter, not noise, dominates
    low = z <= cap
    dark = z <= np.quantile(z, _DARK_QUANTILE)  # the darkest readings (see above)
    m0, d0 = float(m[dark].mean()), float(d[dark].mean())

    def floor(g):  # the lowest intercept the darkest readings allow
        return d0 - g * m0 if d0 < _DARK_DISPERSION * g * m0 else 0.0

    fixed = gain
    gain, read_var = _iv_line(m, d, z, low, floor, fixed)
    if return_error:
        error = 0.0 if fixed is not None else _iv_relative_error(m, d, z, low, gain, read_var)
        return gain, read_var + 0.0, error
    return gain, read_var + 0.0  # (no -0.0)


def _trimmed(d, z, low, gain, read_var):
    """The line ``gain z + read_var`` (floored at 0) plus ``gain^2``, the variance of
    ``d`` it predicts, and which triples of ``low`` it keeps (``d`` within ``_TRIM``
    times it)."""
    level = np.maximum(gain * z + read_var, 0.0) + gain * gain
    return level, (d <= _TRIM * level) & low


def _iv_relative_error(m, d, z, low, gain, read_var) -> float:
    """Relative standard error of :func:`_iv_line`'s gain: on its last fit's triples and
    weights, ``sqrt(sum w^2 e^2 zc^2) / |sum w mc zc|`` over the gain (``e`` the
    residuals of ``d``; ``mc``, ``zc`` centred), the linearised IV estimator's."""
    level, keep = _trimmed(d, z, low, gain, read_var)
    if np.count_nonzero(keep) < 100:
        return float("inf")
    w = 1.0 / level[keep] ** 2
    mk, dk, zk = m[keep], d[keep], z[keep]
    sw = w.sum()
    zc = zk - (w * zk).sum() / sw
    den = abs(float((w * (mk - (w * mk).sum() / sw) * zc).sum()))
    e = dk - gain * mk - read_var
    return float(np.sqrt((w * w * e * e * zc * zc).sum())) / den / gain if den > 0 else float("inf")


def _iv_line(m, d, z, low, floor, fixed=None) -> tuple[float, float]:
    """:func:`count_scale`'s weighted, trimmed instrumental-variable line of ``d`` on ``m``
    (instrument ``z``; triples ``low``), its intercept at least ``floor(gain)``; with
    ``fixed``, the line of that slope (its intercept only: the weighted mean of
    ``d - fixed m``, trimmed and bounded the same way)."""
    # start from the untrimmed, unweighted fit, an overestimate of both (structure adds
    # to every difference), so the first cuts are loose and the fit shrinks onto the
    # noise (a start at v = 0 cut the dark pixels' differences hard where z is low and
    # ran away to a steep line)
    mz = z[low] - z[low].mean()
    den = float((m[low] - m[low].mean()) @ mz)
    gain = float((d[low] - d[low].mean()) @ mz) / den if den > 0 else 0.0
    if not gain > 0:  # no usable spread of the mean: the plain ratio
        gain = float(d[low].sum() / max(np.abs(m[low]).sum(), 1e-12))
    gain = max(gain, 1e-6) if fixed is None else float(fixed)
    read_var = max(float(d[low].mean() - gain * m[low].mean()), floor(gain))
    for _ in range(50):
        level, keep = _trimmed(d, z, low, gain, read_var)
        if np.count_nonzero(keep) < 100:
            break
        w = 1.0 / level[keep] ** 2
        mk, dk, zk = m[keep], d[keep], z[keep]
        sw = w.sum()
        mz, dz = (w * zk).sum() / sw, (w * dk).sum() / sw
        zc = zk - mz
        den = float((w * (mk - (w * mk).sum() / sw) * zc).sum())
        if fixed is not None:
            g_new = gain
        elif not den > 0:  # no spread of the mean to fit a slope on
            break
        else:
            g_new = float((w * (dk - dz) * zc).sum()) / den
        v_new = dz - g_new * float((w * mk).sum() / sw)
        g_new = max(g_new, 1e-6)
        v_new = max(float(v_new), floor(g_new))
        done = (abs(g_new - gain) <= 1e-4 * gain
                and abs(v_new - read_var) <= 1e-4 * (abs(read_var) + gain))
        gain, read_var = g_new, v_new
        if done:
            break
    return gain, read_var


def log_noise_factors(blocks, sigmas, gain: float, read_var: float) -> tuple[float, ...]:
    """Per LoG scale, how many times the finder's LoG response of the detector's noise
    varies more than independent pixels of the measured variance make it vary.

    :func:`count_scale` measures each pixel's variance, and :func:`noise_units` sums
    it over the LoG's weights as if neighbouring pixels' noise were independent. A
    detector whose point spread shares each electron among neighbouring pixels (a
    scintillator or phosphor screen read by a camera, as in precession systems; charge
    sharing) correlates it: each pixel varies less than counts of its mean would (the
    measured gain is the true one times the sum of the squared point spread), while the
    LoG, which sums over many pixels, sees nearly the electrons' own noise. With a
    Gaussian point spread of 1 px the LoG noise's variance was 1.9 (scale 1 px) to 6.6
    (2 px) times the independent-pixel sum, and the finder found 62 peaks per pattern
    where the crystals are not, against 3 without the spread.

    Measured, as the gain, from the same pixel at neighbouring scan positions: the
    difference of two neighbouring patterns holds their noise and (nearly) no
    structure, so its LoG response ``R`` has variance ``2 V``, with ``V`` the
    independent-pixel prediction (the squared weights over the variance image
    ``g m + v`` of the pair's mean ``m``). Per pair, ``sum R^2 / sum 2 V`` away from the
    beam's core (its jitter) and the edges; the factor is the median over pairs
    (crystal edges between two positions spoil a few). On independent pixels it is
    0.93-1.06 (the gain fit's error; 27 of 28 simulated sets of three simulators; 0.64 on
    scaled 8-bit counts, whose low end the line misses), and the
    changing intensities of bent grains gave 1.32 at a LoG of 3 px, so a factor under
    ``_CORRELATED`` (1.5) is taken as 1; a point spread of 0.7-2 px gives 2-9 at 2 px.

    Returns
    -------
    tuple of float, one per scale; empty when all are 1 (or too few pairs to tell).
    """
    sigmas = [float(s) for s in sigmas]
    ratios = [[] for _ in sigmas]
    for block in blocks:
        a = np.asarray(block)
        if a.ndim == 4 and a.shape[1] < 2:
            a = a.swapaxes(0, 1)
        if a.ndim != 4 or a.shape[1] < 2 or a.size == 0:
            continue
        ky, kx = a.shape[2:]
        # a strided sample of the pairs (x - 1, x) along the rows, gathered one by one
        pairs = np.arange(a.shape[0] * (a.shape[1] - 1))
        iy, ix = np.divmod(pairs[::max(1, len(pairs) // _FACTOR_PAIRS_PER_BLOCK)], a.shape[1] - 1)
        p, q = a[iy, ix + 1].astype(np.float32), a[iy, ix].astype(np.float32)
        m = (p + q) / 2
        mean = m.mean(axis=0)
        core = mean >= np.quantile(mean, 0.99)  # the beam's core: its jitter, not noise
        var = np.maximum(gain * m + read_var, 0)
        ops = _k._smoothing_operators(ky, kx, sigmas)
        resp = _k._smooth_batch(p - q, ops)  # (S, n, kx, ky), transposed
        for i, s in enumerate(sigmas):
            r = _k._neg_laplacian(resp[i]).transpose(0, 2, 1)  # (n, ky - 2, kx - 2)
            w2, h = _squared_log_kernel(ky, kx, s)
            if h < 1:  # a detector too small for the LoG's support
                continue
            ok = ~ndimage.binary_dilation(core, np.ones((3, 3), bool), iterations=h)[1:-1, 1:-1]
            ok[:h] = ok[-h:] = False
            ok[:, :h] = ok[:, -h:] = False
            if ok.sum() < 64:
                continue
            num = (r[:, ok].astype(np.float64) ** 2).sum(axis=1)
            den = 2 * _summed_variance(var, w2, ok)
            ratios[i].extend((num[den > 0] / den[den > 0]).tolist())
    if min(len(r) for r in ratios) < _MIN_FACTOR_PAIRS:
        return ()
    factors = tuple(float(np.median(r)) for r in ratios)
    if max(factors) < _CORRELATED:
        return ()
    return tuple(f if f >= _CORRELATED else 1.0 for f in factors)


@functools.lru_cache(maxsize=16)
def _squared_log_kernel(ky: int, kx: int, sigma: float) -> tuple[np.ndarray, int]:
    """The squared weights of the finder's LoG at ``sigma`` (:func:`_log_weights`),
    cropped to where they are not negligible, and that crop's half-width."""
    w = _log_weights(ky, kx, sigma).T ** 2  # (ky - 2, kx - 2), centred on (ky // 2 - 1, kx // 2 - 1)
    h = int(min(np.ceil(4 * sigma) + 1, ky // 2 - 2, kx // 2 - 2))
    cy, cx = ky // 2 - 1, kx // 2 - 1
    return w[cy - h:cy + h + 1, cx - h:cx + h + 1], h


def _summed_variance(var: np.ndarray, w2: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Per image of ``var`` (n, ky, kx), the sum over the interior pixels ``ok``
    (ky - 2, kx - 2) of ``var`` convolved with ``w2`` (odd-sized, zero outside the
    detector): the independent-pixel variance of the LoG response summed over ``ok``.

    The sum is linear in ``var``, so it is one weighted sum per image: each pixel's
    variance counts with the sum of the kernel's weights that reach ``ok`` from it
    (``ok`` correlated with ``w2``), which is computed once, not one convolution per
    image (equal to rounding; ``tests/test_noise.py`` compares with the convolutions).
    """
    inside = np.zeros(var.shape[1:], np.float64)
    inside[1:-1, 1:-1] = ok
    weight = ndimage.correlate(inside, np.asarray(w2, np.float64), mode="constant", cval=0.0)
    return var.reshape(len(var), -1).astype(np.float64) @ weight.ravel()


def _fill_empty(mean: np.ndarray) -> np.ndarray:
    """(rings, n) means with NaN for empty rings: each takes the nearest ring's value
    inwards (smaller index), else outwards."""
    out = np.array(mean, np.float32)
    for col in out.T:
        ok = np.flatnonzero(~np.isnan(col))
        if len(ok) and len(ok) < len(col):
            idx = np.searchsorted(ok, np.arange(len(col)), side="right") - 1
            col[:] = col[ok[np.maximum(idx, 0)]]  # inwards; before the first: the first
    return out


def find_peaks_counting(frames: np.ndarray, sigmas, *, threshold: float, exclude_border: int,
                        gain: float, read_var: float, offset=(0.0, 0.0), boxes=None,
                        factors=()) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~spedflow.peaks.kernels.find_peaks_log` with the counting-noise threshold.

    Parameters
    ----------
    frames : (n, ky, kx) array
        Patterns aligned by whole pixels (:func:`~spedflow.preprocess.kernels.align_whole_pixels`):
        interpolation would correlate neighbouring pixels' noise.
    sigmas, threshold, exclude_border
        As for ``find_peaks_log``.
    gain, read_var : float
        :func:`count_scale`.
    factors : sequence of float, optional
        Per scale, the LoG noise's variance over that of independent pixels
        (:func:`log_noise_factors`; empty: 1).
    boxes : (n, 4) int array, optional
        ``(y0, y1, x0, x1)``: where each pattern holds detector pixels (the rest, NaN,
        lies beyond the detector's edge after alignment). The ring background is then
        measured on the detector's pixels only, and the residual beyond the box copies
        its edge (no step for the LoG to take for spots).

    Returns
    -------
    table : (m, 5) float32
        ``find_peaks_log``'s table, found in and measured on the residual.
    residual : (n, ky, kx) float32
        The patterns minus their ring background (:meth:`RingModel.background`).
    """
    frames = np.asarray(frames, np.float32)
    shape = frames.shape[1:]
    rings = ring_model(shape, offset)
    fast = _jit.compiled("spedflow._compiled")
    if fast is not None:  # one compiled loop per pattern
        background, residual = fast.ring_residual(frames, gain, read_var, offset)
    else:
        background = rings.background(frames, gain, read_var)
        residual = frames - rings.image(background)
    if boxes is not None:
        from ..preprocess.kernels import fill_beyond
        fill_beyond(residual, boxes)
    # radial units: the finder looks them up at its candidates (or, where candidates are
    # many, makes them for one batch at a time), never as unit images of the whole slab
    units = _k.RadialUnits(noise_units(background, gain, read_var, sigmas, threshold, shape, rings,
                                       factors),
                           rings.j0, rings.j1, rings.f, shape)
    table = _k.find_peaks_log(residual, sigmas, threshold=threshold,
                              exclude_border=exclude_border, units=units)
    return table, residual


def _offset_bins(rest, m: int) -> np.ndarray:
    """Which of the m x m ring centres (offsets of j / m px, |j| <= m // 2) lies nearest
    the beam of each pattern aligned by whole pixels (the beam at the centre minus
    ``rest``); m = 1: the centre pixel for all."""
    h = m // 2
    step = np.clip(np.rint(-np.asarray(rest) * m), -h, h).astype(np.intp)
    return (step[:, 0] + h) * m + step[:, 1] + h


def ring_offset_bins(centres, shape, m: int = 1) -> np.ndarray:
    """:func:`_offset_bins` of patterns with beam centres ``centres`` (n, 2)
    (``PeakParams.ring_centres`` = m): patterns of one bin share their ring model
    (batch them together)."""
    from ..preprocess.kernels import _shifts_to_centre
    shifts = _shifts_to_centre(centres, shape)
    return _offset_bins(shifts - np.rint(shifts), int(m))


def counting_peaks_by_slab(frames, centres, params, counts, slab: int = 64):
    """:func:`aligned_counting_peaks` of ``(n, ky, kx)`` patterns, ``slab`` at a time,
    the patterns of one ring model (:func:`ring_offset_bins`) together: yields
    ``(idx, table, residual)`` with ``table[:, 0]`` indices into ``frames`` and
    ``residual`` the residuals of ``frames[idx]``. The VDF workflow's pass 1 and
    :func:`spedflow.peaks.lazy.find_peaks_counting` both go through here, so their
    batches, and hence their tables, are the same."""
    frames = np.asarray(frames)
    centres = np.asarray(centres, np.float64).reshape(-1, 2)
    key = ring_offset_bins(centres, frames.shape[-2:], params.ring_centres)
    for k in np.unique(key):
        same = np.flatnonzero(key == k)
        for s in range(0, len(same), slab):
            idx = same[s:s + slab]
            t, residual = aligned_counting_peaks(frames[idx], centres[idx], params, counts)
            t[:, 0] = idx[t[:, 0].astype(np.intp)]
            yield idx, t, residual


def aligned_counting_peaks(frames, centres, params, counts) -> tuple[np.ndarray, np.ndarray]:
    """:func:`find_peaks_counting` of raw ``(n, ky, kx)`` patterns aligned by ``centres``
    by whole pixels, the rings drawn about the centre pixel or (``params.ring_centres``
    = 3) about each beam's sub-pixel offset to a third of a pixel
    (:func:`ring_offset_bins`; the VDF workflow's pass 1, through
    :func:`counting_peaks_by_slab`): the table, with positions in the frame of the patterns
    shifted to ``centres`` sub-pixel (as :func:`~spedflow.preprocess.kernels.shift_patterns`
    would), and the residuals it was found in. A detector edge the alignment shifts into
    a pattern is treated as the frame's own edge: the ring background leaves out the
    pixels beyond it, the residual there copies the edge, and no peak is kept there
    (:func:`~spedflow.peaks.kernels.drop_fill_edge`). ``params``: resolved
    :class:`~spedflow.peaks.PeakParams`; ``counts``: ``(gain, read_var)``, or
    ``(gain, read_var, factors)`` (:func:`log_noise_factors`)."""
    from ..preprocess.kernels import align_whole_pixels, fill_boxes, whole_shifts
    # beyond a detector edge shifted into the patterns: NaN, left out of the ring
    # background, then the residual's edge copied (a zero fill's step would be a line
    # of peaks, and a copy of the raw edge would bias the rings it crosses); the caller
    # drops peaks in the fill
    whole, rest = align_whole_pixels(frames, centres, fill="nan")
    boxes = fill_boxes(whole_shifts(centres, frames.shape[1:]), frames.shape[1:])
    sig = _k.log_sigmas(params.min_sigma, params.max_sigma, params.num_sigma)
    # the beam lies at the centre minus ``rest``: with params.ring_centres = 3 the rings
    # are drawn about it to a third of a pixel (rings about the centre pixel leave a
    # dipole on the glare's steep flank that the finder takes for spots)
    m = int(params.ring_centres)
    key = _offset_bins(rest, m)
    tables, residual = [], np.empty_like(whole)
    for k in np.unique(key):
        idx = np.flatnonzero(key == k)
        off = ((k // m - m // 2) / m, (k % m - m // 2) / m)
        t, residual[idx] = find_peaks_counting(whole[idx], sig, threshold=params.threshold,
                                               exclude_border=params.exclude_border,
                                               gain=counts[0], read_var=counts[1], offset=off,
                                               factors=counts[2] if len(counts) > 2 else (),
                                               boxes=boxes[idx])
        t[:, 0] = idx[t[:, 0].astype(np.intp)]
        tables.append(t)
    t = _k.sorted_table(tables)
    t[:, 1:3] += rest[t[:, 0].astype(np.intp)]
    return _k.drop_fill_edge(t, centres, frames.shape[1:], 0.0), residual  # none in the fill
