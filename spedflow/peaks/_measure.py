"""Measurements on the merged products of the peak pass: spot size, ring contrast."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..errors import ParameterError

__all__ = ["spot_radius", "ring_contrast", "drop_ring_vectors", "position_scatter",
           "vector_scatter"]


def spot_radius(mean_pattern: np.ndarray, vectors: np.ndarray, beam_radius: float,
                n_max: int = 30) -> tuple[float, float]:
    """The size of the diffraction spots, measured on the mean background-subtracted pattern.

    The half-width at half-maximum of the azimuthal profile around the strongest
    vectors (their neighbours lie farther than the beam radius in any pattern we
    can segment). Returns ``(hwhm, radius)``, where ``radius = 1.5 hwhm`` clipped to
    [1, beam_radius]: a disc of 1.5 HWHM collects ~80 % of a Gaussian spot and all
    of a flat disc-shaped one (HWHM = its radius), and no spot is larger than the
    direct beam it is an image of.
    """
    from ..preprocess import kernels as pk
    ky, kx = mean_pattern.shape
    v = np.asarray(vectors, float)[:n_max] + [ky // 2, kx // 2]
    if len(v) == 0:
        return beam_radius, beam_radius
    # each spot scaled to its own peak, so bright and faint spots weigh alike
    iy = np.clip(np.rint(v[:, 0]).astype(int), 0, ky - 1)
    ix = np.clip(np.rint(v[:, 1]).astype(int), 0, kx - 1)
    peak = np.array([mean_pattern[max(0, y - 1):y + 2, max(0, x - 1):x + 2].max() for y, x in zip(iy, ix)])
    ok = peak > 0
    v, peak = v[ok], peak[ok]
    if len(v) == 0:
        return beam_radius, beam_radius
    frames = mean_pattern.astype(np.float32)[None] / peak[:, None, None].astype(np.float32)
    prof = pk.beam_profile(frames, v, max(2.0, 1.5 * beam_radius))
    hwhm = pk.radius_from_profile(prof, default=np.nan)
    if not np.isfinite(hwhm):
        return beam_radius, beam_radius
    return float(hwhm), float(np.clip(1.5 * hwhm, 1.0, beam_radius))


def _nearest_bin(points, detector_shape, o: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (row, column) of the histogram bin nearest each point (..., 2) given
    relative to the beam at ``(ky // 2, kx // 2)``, px, with ``o`` bins per pixel
    (the inverse of :func:`~spedflow.peaks.unique_vectors`' bin-to-position map)."""
    ky, kx = detector_shape
    c = (np.asarray(points, float) + [ky // 2, kx // 2]) * o + (o - 1) / 2
    return np.rint(c[..., 0]).astype(int), np.rint(c[..., 1]).astype(int)


#: Quantile of the disc counts around a vector's ring taken as the ring's level, and the
#: standard-normal deviate of that quantile (for the Poisson correction back to the mean).
_RING_QUANTILE, _RING_Z = 0.2, 0.8416


def disc_sum_filter(img: np.ndarray, radius: float) -> np.ndarray:
    """The sum over the disc ``dy^2 + dx^2 <= radius^2`` about every pixel: equals
    ``ndimage.correlate(img, disc, mode="constant", cval=0)``, row by row. The disc is a
    stack of row segments and a segment's sum is a difference of the row's cumulative
    sums: O(radius) per pixel, not O(radius^2) (a 1024 x 1024 detector's histogram,
    2048 x 2048 bins and a disc of 35: 8.7 s -> ~1 s). ``img`` must be finite (a NaN
    spreads along its row's cumulative sum)."""
    from .vectors import disc_half_width
    if not radius >= 0:
        raise ParameterError(f"`radius` must be >= 0 (got {radius})")
    img = np.asarray(img, np.float64)
    ny, nx = img.shape
    h = int(np.floor(radius))
    # cumulative sums along rows padded with h zeros each side (and a leading 0): the
    # sum over columns x - w .. x + w is cum[x + h + w + 1] - cum[x + h - w]
    cum = np.zeros((ny, nx + 2 * h + 1))
    np.cumsum(img, axis=1, out=cum[:, h + 1:h + 1 + nx])
    cum[:, h + 1 + nx:] = cum[:, h + nx:h + 1 + nx]
    out = np.zeros((ny, nx))
    for dy in range(h + 1):
        w = disc_half_width(dy, radius)
        if w < 0:
            continue
        row = cum[:, h + w + 1:h + w + 1 + nx] - cum[:, h - w:h - w + nx]
        if dy == 0:
            out += row
        elif dy < ny:
            out[:-dy] += row[dy:]
            out[dy:] += row[:-dy]
    return out


def ring_contrast(hist: np.ndarray, vectors: np.ndarray, *, oversample: int, radius: float,
                  n_angles: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Peaks supporting each vector, and the level of the same count along its ring.

    A diffraction vector of a crystal is a local cluster of peak positions. A
    circularly symmetric feature (the amorphous film's ring, a polycrystalline
    ring) scatters peaks all along its radius, and noise clusters on it can pass a
    local test. This counts the peaks within ``radius`` of each vector (``support``)
    and the same count at ``n_angles`` positions on the circle of the same ``|g|``.

    The ring's level is the 20 % quantile ``q`` of those counts, corrected for counting
    noise to ``q + 0.84 sqrt(q)`` (the mean of a Poisson count whose 20 % quantile is
    ``q``). Not the median: in a polycrystal of one phase, the spots of many crystals
    share each ``|g|`` and can cover more than half of the ring; the ring of a smooth
    (amorphous) background is populated at every angle, the gaps between spots are
    not. A ring is taken as smooth only where at least 80 % of it carries peaks.

    Parameters
    ----------
    hist : (ky * o, kx * o) merged peak histogram; vectors : (N, 2) relative to the beam.
    radius : float or (N,) floats
        The discs' radius (px), one for all or one per vector.
    n_angles : int, optional
        Positions on each ring; default one per histogram bin of arc (at least 64).

    Returns
    -------
    support, ring : (N,) float arrays
    """
    hist = np.asarray(hist, float)
    o = int(oversample)
    ky, kx = hist.shape[0] // o, hist.shape[1] // o
    v = np.asarray(vectors, float).reshape(-1, 2)
    if len(v) == 0:
        return np.zeros(0), np.zeros(0)
    radii = np.broadcast_to(np.asarray(radius, float), (len(v),))
    g = np.hypot(v[:, 0], v[:, 1])
    n = n_angles if n_angles is not None else max(64, int(np.ceil(2 * np.pi * g.max() * o)))
    ang = np.arctan2(v[:, 0], v[:, 1])[:, None] + np.linspace(0, 2 * np.pi, n, endpoint=False)[None]
    ring_pts = np.stack([g[:, None] * np.sin(ang), g[:, None] * np.cos(ang)], -1)
    support, q = np.zeros(len(v)), np.zeros(len(v))
    for r in np.unique(radii):  # one disc filter per radius
        rr = int(np.ceil(r * o))
        # the count in the disc about every bin (zeros beyond the histogram; a margin of
        # rr bins, so that discs centred off the histogram still count what they reach)
        sums = disc_sum_filter(np.pad(hist, rr), r * o)

        def counts(points):  # points (..., 2) relative to the beam, px
            iy, ix = _nearest_bin(points, (ky, kx), o)
            iy, ix = iy + rr, ix + rr
            ny, nx = sums.shape
            ok = (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
            return np.where(ok, sums[np.clip(iy, 0, ny - 1), np.clip(ix, 0, nx - 1)], 0.0)

        at = radii == r
        support[at] = counts(v[at])
        q[at] = np.quantile(counts(ring_pts[at]), _RING_QUANTILE, axis=1)
    ring = q + _RING_Z * np.sqrt(q)
    return support, ring


def drop_ring_vectors(hist, vectors, *, oversample: int, radius: float, min_patterns: int):
    """Keep the vectors that stand out of their ring: ``support - ring >= max(min_patterns,
    5 sqrt(ring))`` (the same Poisson test as against the local floor, with the
    azimuthal floor instead). Returns ``(kept vectors, keep mask)``.

    The counts are taken in discs of ``radius`` (the clustering radius), and a vector
    that does not stand out so, on a ring where at least half the vectors (within
    ``radius`` in ``|g|``) do not either, is tested again in a disc of 3 times its own
    peaks' scatter (:func:`vector_scatter`; 99 % of a 2-D Gaussian), at least 1 px: discs as
    wide as a spot join the spots that crystals of one phase share at one ``|g|``
    (twelve spots 6 px apart on the ring of |g| = 11.5 px of a 64 px detector) into a
    ring as even as a film's. A film ring's noise cluster, whose peaks spread over the
    whole disc, keeps the full width in both tests; a cluster of about ``min_patterns``
    peaks as tight as a reflection's on a film ring may pass the second where it failed
    the first.
    """
    o = int(oversample)

    def stands_out(discs):
        support, ring = ring_contrast(hist, vectors, oversample=o, radius=discs)
        return (support - ring) >= np.maximum(min_patterns, 5.0 * np.sqrt(ring))

    keep = stands_out(radius)
    # a ring that its own spots made even: most of the vectors at its |g| fail together
    g = np.hypot(*np.asarray(vectors, float).reshape(-1, 2).T)
    crowded = np.array([not k and np.mean(~keep[np.abs(g - gi) <= radius]) >= 0.5
                        for gi, k in zip(g, keep)], bool)
    if crowded.any():
        s = vector_scatter(hist, vectors, oversample=o, radius=radius)
        own = np.where(np.isfinite(s), np.clip(3.0 * s, 1.0, radius), radius)
        own = np.minimum(np.ceil(own * o) / o, radius)  # whole bins: a few disc filters
        keep |= crowded & stands_out(own)
    return np.asarray(vectors)[keep], keep


def vector_scatter(hist: np.ndarray, vectors: np.ndarray, *, oversample: int,
                   radius: float) -> np.ndarray:
    """Standard deviation (px, per axis) of the peak positions about each vector, from
    the histogram's bins within ``radius`` of it: the weighted median distance from
    their weighted centre over ``sqrt(2 ln 2)`` (the median radius of a 2-D Gaussian).
    The median, not the second moment: the stray peaks of a film ring or another
    reflection inside the disc, a few at up to ``radius``, would inflate the moment of a
    tight spot several times over. NaN where the disc is empty."""
    o = int(oversample)
    out = np.full(len(np.asarray(vectors).reshape(-1, 2)), np.nan)
    for i, y, x, w in _disc_windows(hist, vectors, o, radius):
        d = np.hypot(y - (w * y).sum() / w.sum(), x - (w * x).sum() / w.sum())
        order = np.argsort(d, kind="stable")
        cum = np.cumsum(w[order])
        out[i] = d[order][np.searchsorted(cum, cum[-1] / 2)] / np.sqrt(2 * np.log(2)) / o
    return out


def _disc_windows(hist, vectors, oversample: int, radius: float):
    """``(i, y, x, w)`` for each vector ``i`` whose disc of ``radius`` (px) holds
    histogram weight: the bins' coordinates and weights."""
    hist = np.asarray(hist, float)
    o = int(oversample)
    ky, kx = hist.shape[0] // o, hist.shape[1] // o
    v = np.asarray(vectors, float).reshape(-1, 2)
    rr = int(np.ceil(radius * o))
    dy, dx = np.mgrid[-rr:rr + 1, -rr:rr + 1]
    inside = (dy ** 2 + dx ** 2) <= (radius * o) ** 2
    for i, (cy, cx) in enumerate(zip(*_nearest_bin(v, (ky, kx), o))):
        y, x = cy + dy, cx + dx
        ok = inside & (y >= 0) & (y < hist.shape[0]) & (x >= 0) & (x < hist.shape[1])
        w = hist[y[ok], x[ok]]
        if w.sum() > 0:
            yield i, y[ok], x[ok], w


def position_scatter(hist: np.ndarray, vectors: np.ndarray, *, oversample: int, radius: float,
                     n_max: int = 20) -> float:
    """Standard deviation (px, per axis) of the peak positions that make up a vector.

    Measured on the merged peak histogram around the ``n_max`` first (strongest)
    ``vectors``: the second moment, about their weighted centre, of the histogram's
    bins within ``radius`` of each vector (``E[r^2] = 2 sigma^2`` for a 2-D Gaussian);
    the median over the vectors, clipped to [half a bin, ``radius / 2``]. The positions of one
    reflection scatter by the finder's error and the residual descan, far less than
    the spot's size on well-exposed data; smoothing the histogram by the spot's
    size instead merges the clusters of neighbouring reflections of different
    crystals into one maximum. NaN without vectors.
    """
    o = int(oversample)
    var = []
    for _, y, x, w in _disc_windows(hist, np.asarray(vectors, float).reshape(-1, 2)[:n_max], o,
                                    radius):
        my, mx = (w * y).sum() / w.sum(), (w * x).sum() / w.sum()
        var.append((w * ((y - my) ** 2 + (x - mx) ** 2)).sum() / w.sum() / 2)
    if not var:
        return float("nan")
    sigma = float(np.sqrt(np.median(var))) / o
    return float(np.clip(sigma, 0.5 / o, radius / 2))
