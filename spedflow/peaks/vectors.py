"""Unique diffraction vectors as a mergeable reduction over peak tables.

The reference clusters *all* peaks of the scan at once with DBSCAN, whose memory
grows with the square of the neighbourhood sizes. Here the reduction is

- ``process``: :func:`peak_histogram`, a 2-D histogram of one block's peak
  positions on a grid ``oversample`` times finer than the detector,
- ``merge``: :func:`merge` (``np.add``), associative and commutative,
- ``finalize``: :func:`unique_vectors`, cluster centres found on the histogram.

Memory is one detector-sized histogram per block, whatever the number of peaks.
Vectors are returned relative to the direct beam at ``(ky // 2, kx // 2)``
(docs/DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy import special
from scipy.spatial import cKDTree

from ..config import check_range
from ..errors import InputError, ParameterError

__all__ = ["VectorParams", "resolve", "peak_histogram", "merge", "unique_vectors"]

#: A cluster must exceed the expected background count in its disc by this many
#: Poisson standard deviations (5: with ~1e3 background maxima on a histogram,
#: fewer than 1e-3 false vectors).
_SIGNIFICANCE = 5.0
#: ... or its core alone must be as improbable under the Poisson floor as a
#: 5-sigma Gaussian excess (one-sided tail 2.9e-7), counted exactly.
_FALSE_ALARM = float(special.ndtr(-_SIGNIFICANCE))
#: Radius of the core, in position scatters: the aperture that maximises the
#: signal-to-noise ratio of a 2-D Gaussian cluster on a flat floor (1.585 sigma,
#: 71.5 % of its peaks).
_CORE = 1.585


@dataclass(frozen=True)
class VectorParams:
    """Finding the unique diffraction vectors from the peak-position histogram.

    Attributes
    ----------
    oversample : int
        Histogram bins per detector pixel along each axis. 2: sub-pixel peak
        positions keep their precision (bin width 0.5 px is well below the
        ~0.1-0.3 px scatter of refined positions plus descan residuals) at only
        4x the detector's size.
    cluster_radius : float or None
        Peaks within this distance (px) of a cluster's centre belong to it. None:
        the spot radius ``r``. Two spots closer than one spot radius overlap and
        cannot be imaged separately by VDF discs of that radius anyway, while the
        same reflection from different patterns scatters by far less (sub-pixel
        refinement error, residual descan, small tilts).
    scatter : float or None
        Gaussian width (px) used to smooth the histogram before its local maxima
        are taken. None: in the VDF workflow, measured on the histogram around the
        strongest vectors (:func:`~spedflow.peaks.position_scatter`; 0.3-0.8 px on the
        benchmark sets); elsewhere ``cluster_radius / 2``. Smoothing by more than
        the positions scatter merges the clusters of neighbouring reflections of
        different crystals into one maximum.
    min_patterns : int
        A vector needs at least this many peaks (scan positions) within
        ``cluster_radius``. 10: the smallest crystal worth finding, the same as
        the watershed's smallest segment (``WatershedParams.min_size``); the
        reference's DBSCAN ``min_samples`` was also 10.
    beam_exclusion_radius : float or None
        Vectors shorter than this (px) are the direct beam and dropped. None:
        ``2 r``: a spot disc whose centre is closer than ``2 r`` to the beam
        overlaps the beam disc and its VDF image would be the bright field. (The
        VDF workflow widens it past a clipped glare about the beam: its radius plus
        two spot radii, see :func:`spedflow.workflows._common.beam_scales`.)
    edge_margin : float or None
        Vectors whose absolute position is closer than this to the detector edge
        (px, from the outermost pixel centre) are dropped. None: ``r``, the VDF
        disc radius, so every VDF disc lies on the detector.
    """

    oversample: int = 2
    cluster_radius: float | None = None
    scatter: float | None = None
    min_patterns: int = 10
    beam_exclusion_radius: float | None = None
    edge_margin: float | None = None

    def __post_init__(self):
        check_range("oversample", self.oversample, low=1, high=16, integer=True)
        check_range("cluster_radius", self.cluster_radius, low=0, low_open=True, allow_none=True)
        check_range("scatter", self.scatter, low=0, allow_none=True)
        check_range("min_patterns", self.min_patterns, low=1, integer=True)
        check_range("beam_exclusion_radius", self.beam_exclusion_radius, low=0, allow_none=True)
        check_range("edge_margin", self.edge_margin, low=0, allow_none=True)

    @property
    def resolved(self) -> bool:
        return None not in (self.cluster_radius, self.scatter, self.beam_exclusion_radius,
                            self.edge_margin)


def resolve(params: VectorParams, spot_radius: float | None = None) -> VectorParams:
    """Fill the ``None`` fields of ``params`` from the spot radius ``r`` (px)."""
    if not isinstance(params, VectorParams):
        raise ParameterError(f"`params` must be a VectorParams (got {type(params).__name__})")
    if params.resolved:
        return params
    if None in (params.cluster_radius, params.beam_exclusion_radius, params.edge_margin):
        check_range("spot_radius", spot_radius, low=0, low_open=True)
    cr = params.cluster_radius if params.cluster_radius is not None else float(spot_radius)
    return dataclasses.replace(
        params, cluster_radius=float(cr),
        scatter=float(params.scatter if params.scatter is not None else cr / 2.0),
        beam_exclusion_radius=float(params.beam_exclusion_radius
                                    if params.beam_exclusion_radius is not None
                                    else 2.0 * spot_radius),
        edge_margin=float(params.edge_margin if params.edge_margin is not None else spot_radius))


def _check_shape(detector_shape) -> tuple[int, int]:
    try:
        ky, kx = (int(s) for s in detector_shape)
    except (TypeError, ValueError):
        raise ParameterError(f"`detector_shape` must be (ky, kx) (got {detector_shape!r})") from None
    if ky < 1 or kx < 1:
        raise ParameterError(f"`detector_shape` must be positive (got {detector_shape!r})")
    return ky, kx


def peak_histogram(table: np.ndarray, detector_shape: tuple[int, int], oversample: int = 2,
                   weights: np.ndarray | None = None) -> np.ndarray:
    """Histogram of peak positions (``process`` step of the vector reduction).

    Bin ``(i, j)`` covers detector positions ``[(i - 0.5)/o - 0.5 ... ]``, i.e.
    pixel ``k`` (centre at ``k``) is split into ``o x o`` bins with centres at
    ``k + (b + 0.5)/o - 0.5``; positions outside ``[-0.5, ky - 0.5)`` are ignored.

    Parameters
    ----------
    table : (m, 5) array
        Peak table ``[scan_y, scan_x, ky, kx, intensity]`` (docs/DESIGN.md);
        only the ``ky, kx`` columns (absolute detector px) are used.
    detector_shape : (ky, kx)
    oversample : int
        Bins per pixel along each axis, ``o``.
    weights : (m,) array, optional
        Weight per peak (e.g. ``table[:, 4]``). Default 1: the histogram counts
        peaks, which is what ``min_patterns`` of :func:`unique_vectors` assumes.

    Returns
    -------
    (ky * o, kx * o) float64 array
    """
    ky, kx = _check_shape(detector_shape)
    check_range("oversample", oversample, low=1, high=16, integer=True)
    o = int(oversample)
    table = np.asarray(table)
    if table.ndim != 2 or table.shape[1] < 4:
        raise InputError(f"`table` must be a (m, 5) peak table; got shape {table.shape}")
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(table),):
            raise InputError(f"`weights` (shape {weights.shape}) must have one value per peak "
                             f"({len(table)})")
    by = np.floor((table[:, 2].astype(np.float64) + 0.5) * o)
    bx = np.floor((table[:, 3].astype(np.float64) + 0.5) * o)
    ok = (by >= 0) & (by < ky * o) & (bx >= 0) & (bx < kx * o)
    flat = by[ok].astype(np.intp) * (kx * o) + bx[ok].astype(np.intp)
    w = None if weights is None else weights[ok]
    return np.bincount(flat, weights=w, minlength=ky * o * kx * o).astype(
        np.float64).reshape(ky * o, kx * o)


def merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Merge two partial histograms (``merge`` step): their sum."""
    return np.add(a, b)


def disc_half_width(dy: int, radius: float) -> int:
    """The largest ``w`` with ``dy^2 + w^2 <= radius^2`` (the test of :func:`_disc_offsets`,
    in the same floating point: ``floor(sqrt(r^2 - dy^2))`` can round up past it, e.g.
    ``r = sqrt(26)``, ``dy = 1``); -1 where the row holds no pixel."""
    r2 = radius * radius
    w = int(math.floor(math.sqrt(max(r2 - dy * dy, 0.0))))
    while w >= 0 and dy * dy + w * w > r2:
        w -= 1
    while dy * dy + (w + 1) * (w + 1) <= r2:
        w += 1
    return w


def _disc_offsets(radius: float) -> tuple[np.ndarray, np.ndarray]:
    h = int(math.floor(radius))
    o = np.arange(-h, h + 1)
    oy, ox = np.meshgrid(o, o, indexing="ij")
    inside = oy ** 2 + ox ** 2 <= radius * radius
    return oy[inside], ox[inside]


def _disc_maximum(img: np.ndarray, radius: float) -> np.ndarray:
    """``ndi.maximum_filter(img, footprint=disc, mode="constant")`` for the disc of
    :func:`_disc_offsets`, row by row: the disc is a stack of row segments, the maximum
    over a segment is a 1-D running maximum (O(1) per pixel whatever its width), and
    each row's is shifted into place. O(radius) per pixel instead of O(radius^2): on a
    1024 x 1024 detector's histogram (2048 x 2048 bins, a disc of 35 bins) 25 s -> ~1 s.
    Bins outside the image read as 0 (scipy's ``cval``); ``img`` must be finite."""
    if not radius >= 0:
        raise ParameterError(f"`radius` must be >= 0 (got {radius})")
    img = np.asarray(img, np.float64)
    h = int(math.floor(radius))
    out = None
    width = None
    for dy in range(h + 1):
        w = disc_half_width(dy, radius)
        if w < 0:
            continue
        if w != width:  # the row maximum of this half-width (the same for neighbouring dy)
            row = ndi.maximum_filter1d(img, 2 * w + 1, axis=1, mode="constant")
            width = w
        if out is None:
            out = row.copy()
            continue
        if dy >= img.shape[0]:
            continue
        np.maximum(out[dy:], row[:-dy], out=out[dy:])
        np.maximum(out[:-dy], row[dy:], out=out[:-dy])
    if h >= 1:  # rows beyond the image (cval 0) enter rows within h of its edges
        out[:h] = np.maximum(out[:h], 0)
        out[-h:] = np.maximum(out[-h:], 0)
    return out


def _gather(hist, cy, cx, oy, ox, fill: float):
    """``hist`` at the offsets ``(oy, ox)`` about each ``(cy, cx)``: (rows, columns,
    inside the histogram, values), one row per centre; ``fill`` beyond the edge."""
    yy = cy[:, None] + oy[None, :]
    xx = cx[:, None] + ox[None, :]
    inside = (yy >= 0) & (yy < hist.shape[0]) & (xx >= 0) & (xx < hist.shape[1])
    vals = np.where(inside, hist[np.clip(yy, 0, hist.shape[0] - 1),
                                 np.clip(xx, 0, hist.shape[1] - 1)], fill)
    return yy, xx, inside, vals


def _annulus_floor(hist: np.ndarray, cy, cx, rb: float) -> np.ndarray:
    """Per-bin background of ``hist`` around each (cy, cx), from an annulus.

    Mean of the annulus bins 2-4 cluster radii out, leaving out bins above
    ``median + 5 sqrt(median) + 2`` (a neighbouring cluster), so that for a
    Poisson floor the estimate is unbiased.
    """
    h = int(math.ceil(4 * rb))
    o = np.arange(-h, h + 1)
    oy, ox = (a.ravel() for a in np.meshgrid(o, o, indexing="ij"))
    d2 = oy ** 2 + ox ** 2
    ring = (d2 >= (2 * rb) ** 2) & (d2 <= (4 * rb) ** 2)
    _, _, inside, vals = _gather(hist, cy, cx, oy[ring], ox[ring], np.nan)
    med = np.nanmedian(vals, axis=1)
    ok = inside & (vals <= (med + 5.0 * np.sqrt(med) + 2.0)[:, None])
    return np.where(ok, vals, 0.0).sum(axis=1) / np.maximum(ok.sum(axis=1), 1)


def _disc_counts(hist, cy, cx, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Sum of ``hist`` over the disc of ``radius`` (bins) about each ``(cy, cx)``;
    bins beyond the histogram's edge count 0. Returns (counts, bins inside)."""
    _, _, inside, vals = _gather(hist, cy, cx, *_disc_offsets(radius), 0.0)
    return vals.sum(axis=1), inside.sum(axis=1)


def _core_radius(scatter_bins: float) -> float:
    return max(_CORE * scatter_bins, 1.0)


def _core_significant(hist, cy, cx, per_bin, scatter_bins) -> np.ndarray:
    """Whether the peaks in each cluster's core (a disc of :data:`_CORE` position
    scatters, at least one bin, about its maximum ``(cy, cx)``) are too many for the
    Poisson floor of ``per_bin`` per bin: P(N >= count) <= :data:`_FALSE_ALARM`.

    A weak reflection (a small or thin crystal's) holds few peaks, tightly clustered;
    over the whole disc of ``cluster_radius`` (the spot radius, several scatters)
    the floor's fluctuation hides them, in its core they stand out."""
    count, n_bins = _disc_counts(hist, cy, cx, _core_radius(scatter_bins))
    expected = np.maximum(per_bin * n_bins, 1e-300)
    # P(N >= count) = P(N > count - 1); a floor of 0 makes any peak significant
    tail = special.pdtrc(np.maximum(np.round(count) - 1, 0), expected)
    return (count >= 1) & (tail <= _FALSE_ALARM)


def _resolved(smooth, cy, cx, floor, rb: float) -> np.ndarray:
    """Whether each maximum ``(cy, cx)`` of ``smooth`` is resolved from what overshadows
    it (the highest bin of ``smooth`` within ``rb`` of it, on a stronger cluster or its
    flank): along the straight path there, ``smooth`` falls to at most halfway between
    the maximum's height and ``floor`` (per bin), the half-maximum criterion of two
    resolved peaks. A ridge of peaks (a reflection moving across a bent crystal) stays
    above it; the gap between two clusters falls below it."""
    out = np.ones(len(cy), bool)
    oy, ox = _disc_offsets(rb)
    for i, (y, x) in enumerate(zip(cy, cx)):
        yy, xx = y + oy, x + ox
        ok = (yy >= 0) & (yy < smooth.shape[0]) & (xx >= 0) & (xx < smooth.shape[1])
        k = np.argmax(smooth[yy[ok], xx[ok]])
        ty, tx = yy[ok][k], xx[ok][k]
        t = np.linspace(0.0, 1.0, int(np.ceil(np.hypot(ty - y, tx - x))) + 1)
        py = np.rint(y + t * (ty - y)).astype(np.intp)
        px = np.rint(x + t * (tx - x)).astype(np.intp)
        height = smooth[y, x]
        out[i] = smooth[py, px].min() - floor[i] <= 0.5 * (height - floor[i])
    return out


def unique_vectors(hist: np.ndarray, *, detector_shape: tuple[int, int],
                   oversample: int | None = None, params: VectorParams | None = None,
                   beam_radius: float | None = None, cluster_radius: float | None = None,
                   scatter: float | None = None, min_patterns: int | None = None,
                   beam_exclusion_radius: float | None = None,
                   edge_margin: float | None = None, return_support: bool = False):
    """Unique diffraction vectors from a merged peak histogram (``finalize`` step).

    The histogram is smoothed by a Gaussian of the expected position ``scatter``;
    its local maxima (within ``cluster_radius``; and within two scatters, at least
    1 px, when resolved from the stronger cluster on whose flank they lie and
    significant in their core, :func:`_resolved`) whose disc of
    ``cluster_radius`` in the *unsmoothed* histogram holds at least
    ``min_patterns`` peaks more than the local floor of randomly placed peaks
    (trimmed mean of an annulus 2-4 cluster radii out), and either 5 Poisson
    standard deviations above it or a core (1.585 scatters about the maximum) as
    improbable under the floor's Poisson law (:func:`_core_significant`), are
    clusters. A cluster's centre is the weighted mean of the bin
    centres within ``cluster_radius`` of the maximum (sub-pixel). Of two centres
    closer than ``cluster_radius`` the weaker is dropped. Finally the direct beam
    (``|g| < beam_exclusion_radius``) and vectors within ``edge_margin`` of the
    detector edge are removed.

    Parameters
    ----------
    hist : (ky * o, kx * o) array
        Sum of :func:`peak_histogram` over all blocks.
    detector_shape : (ky, kx)
    oversample : int, optional
        Bins per pixel ``o``; inferred from ``hist.shape`` when not given.
    params : VectorParams, optional
        Supplies every value not given explicitly (unset fields resolved from
        ``beam_radius``). Explicit keyword arguments win.
    beam_radius : float, optional
        Spot (direct-beam) radius ``r``, px, to resolve ``params``.
    cluster_radius, scatter, min_patterns, beam_exclusion_radius, edge_margin
        See :class:`VectorParams`; px, px, peaks, px, px.
    return_support : bool
        Also return the number of peaks (histogram weight) of each vector.

    Returns
    -------
    (N, 2) float64 array
        ``(gy, gx)`` relative to the direct beam at ``(ky // 2, kx // 2)``, px,
        strongest cluster first.
    (N,) float64 array
        Only with ``return_support``: peaks in each vector's disc above the
        local floor of randomly placed peaks.
    """
    ky, kx = _check_shape(detector_shape)
    hist = np.asarray(hist, dtype=np.float64)
    if hist.ndim != 2:
        raise InputError(f"`hist` must be 2-D; got shape {hist.shape}")
    if oversample is not None:
        check_range("oversample", oversample, low=1, high=16, integer=True)
    o = int(hist.shape[0] // ky if oversample is None else oversample)
    if o < 1 or hist.shape != (ky * o, kx * o):
        raise InputError(f"`hist` (shape {hist.shape}) does not match detector {(ky, kx)} "
                         f"with oversample {o}")
    p = params if params is not None else VectorParams()
    if not isinstance(p, VectorParams):
        raise ParameterError(f"`params` must be a VectorParams (got {type(p).__name__})")
    explicit = dict(cluster_radius=cluster_radius, scatter=scatter, min_patterns=min_patterns,
                    beam_exclusion_radius=beam_exclusion_radius, edge_margin=edge_margin)
    p = dataclasses.replace(p, **{k: v for k, v in explicit.items() if v is not None})
    if not p.resolved:
        if beam_radius is None:
            missing = [k for k in ("cluster_radius", "beam_exclusion_radius", "edge_margin")
                       if getattr(p, k) is None]
            if missing:
                raise ParameterError(f"`{missing[0]}` is unset: give it or `beam_radius`")
        p = resolve(p, beam_radius)
    empty = np.zeros((0, 2))
    if not np.isfinite(hist).all() or (hist < 0).any():
        raise InputError("`hist` must hold finite, non-negative counts")

    rb = p.cluster_radius * o  # cluster radius in bins
    smooth = ndi.gaussian_filter(hist, p.scatter * o, mode="constant") if p.scatter > 0 else hist
    oy, ox = _disc_offsets(rb)
    # Local maxima within cluster_radius, as clusters. A weak cluster one to two cluster
    # radii from a strong one (a weak crystal's reflection beside a strong crystal's)
    # lies on the strong one's flank and is no maximum within that: maxima within
    # twice the positions' scatter (closer clusters blur into one anyway) are added as
    # "shadowed" candidates when their core holds at least half of min_patterns peaks
    # (a cluster of min_patterns peaks puts 71.5 % in it; noise bumps do not come
    # near), and they must pass the exact core test and be resolved from what
    # overshadows them (:func:`_resolved`). Centres closer than cluster_radius are
    # still merged below.
    primary = (smooth == _disc_maximum(smooth, rb)) & (smooth > 0)
    cy, cx = np.nonzero(primary)
    shadowed = np.zeros(len(cy), bool)
    rm = max(2.0 * p.scatter, 1.0) * o
    if rm < rb:
        sy, sx = np.nonzero((smooth == _disc_maximum(smooth, rm)) & (smooth > 0) & ~primary)
        enough = _disc_counts(hist, sy, sx, _core_radius(p.scatter * o))[0] >= 0.5 * p.min_patterns
        cy, cx = np.concatenate([cy, sy[enough]]), np.concatenate([cx, sx[enough]])
        shadowed = np.concatenate([shadowed, np.ones(int(enough.sum()), bool)])
    if len(cy) == 0:
        return (empty, np.zeros(0)) if return_support else empty

    # support and weighted centre over the disc of cluster_radius in the raw histogram
    yy, xx, inside, w = _gather(hist, cy, cx, oy, ox, 0.0)
    support = w.sum(axis=1)
    # Peaks at random positions (noise, film, diffuse residue) give the histogram a
    # smooth floor whose fluctuations have local maxima too: a cluster must stand
    # min_patterns above the floor expected in its disc and be significant against
    # it (Poisson, 5 sigma). The floor is the mean of an annulus 2-4 cluster radii
    # out, without its top quarter of bins (neighbouring clusters).
    per_bin = _annulus_floor(hist, cy, cx, rb)
    floor = per_bin * len(oy)
    excess = support - floor
    core = _core_significant(hist, cy, cx, per_bin, p.scatter * o)
    disc = ~shadowed & (excess >= _SIGNIFICANCE * np.sqrt(floor))
    keep = (excess >= p.min_patterns) & (core | disc)
    check = np.flatnonzero(shadowed & keep)
    keep[check] = _resolved(smooth, cy[check], cx[check], per_bin[check], rb)
    cy, cx, w, yy, xx = cy[keep], cx[keep], w[keep], yy[keep], xx[keep]
    support, per_bin = excess[keep], per_bin[keep]
    if len(cy) == 0:
        return (empty, np.zeros(0)) if return_support else empty
    w = np.clip(w - per_bin[:, None], 0.0, None) * inside[keep]  # centroid of the excess
    wsum = np.maximum(w.sum(axis=1), 1e-300)
    by = (w * yy).sum(axis=1) / wsum
    bx = (w * xx).sum(axis=1) / wsum
    pos = np.column_stack([(by + 0.5) / o - 0.5, (bx + 0.5) / o - 0.5])  # absolute px

    # one centre per cluster: drop the weaker of two closer than cluster_radius
    strength = smooth[cy, cx]
    keep = np.ones(len(pos), bool)
    if len(pos) > 1:
        pairs = cKDTree(pos).query_pairs(p.cluster_radius, output_type="ndarray")
        if len(pairs):
            i, j = pairs[:, 0], pairs[:, 1]
            weaker = np.where((strength[i] < strength[j]) | ((strength[i] == strength[j]) & (i > j)), i, j)
            keep[weaker] = False
    # direct beam and detector edge
    g = pos - np.array([ky // 2, kx // 2], float)
    keep &= np.hypot(g[:, 0], g[:, 1]) >= p.beam_exclusion_radius
    m = p.edge_margin
    keep &= ((pos[:, 0] >= m) & (pos[:, 0] <= ky - 1 - m)
             & (pos[:, 1] >= m) & (pos[:, 1] <= kx - 1 - m))
    g, support = g[keep], support[keep]
    order = np.lexsort((g[:, 1], g[:, 0], -support))
    g, support = g[order], support[order]
    return (g, support) if return_support else g
