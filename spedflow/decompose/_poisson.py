"""Poisson noise normalisation (Keenan & Kotula 2004) and the central beam mask.

For Poisson counts ``x_ij`` (pattern i, detector pixel j) the variance equals the
mean, so the largest, brightest pixels dominate a least-squares decomposition.
Keenan & Kotula approximate the mean by the rank-one model ``r_i c_j / T``
(``r`` row sums = counts per pattern, ``c`` column sums = counts per detector pixel
over the scan, ``T`` the total) and divide the data by its square root, which
makes the noise (approximately) homoscedastic with unit variance::

    x~_ij = x_ij / (a_i b_j),   a_i = sqrt(r_i / mean(r)),   b_j = sqrt(c_j / N)

``a`` is the relative dose of pattern i (dimensionless, ~1) and ``b**2`` the mean
pattern in counts, so ``a_i b_j = sqrt(r_i c_j / T)``: this is Keenan & Kotula's
``x / sqrt(r c)`` times the constant ``sqrt(T)``, chosen so the noise variance of
the normalised data is 1 (x detector gain), which lets the scree put its noise
floor at the Marchenko-Pastur edge. A decomposition ``x~ = W H`` is undone with
``W * a`` and ``H * b`` (counts).

Edge cases (documented behaviour, tested):

* masked detector pixels (the direct beam) are left out of ``r`` and ``c`` and of
  the normalised matrix (it has only the unmasked columns);
* all-zero patterns (``r_i = 0``) and never-lit pixels (``c_j = 0``) get scale 0:
  their normalised values are 0, never NaN/inf;
* negative values (interpolation ringing after sub-pixel alignment, background
  subtraction overshoot) are not counts: they are clipped to 0 with one
  ``RuntimeWarning`` giving how many there were. NMF needs non-negative data.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from ..config import check_range
from ..errors import InputError, ParameterError
from ..io._store import check_4d

__all__ = ["beam_mask", "edge_mask", "default_beam_mask_radius", "PoissonStats", "poisson_partial",
           "merge_poisson", "poisson_statistics", "scale_factors", "normalise_block",
           "normalised_matrix", "undo_normalisation"]


# --------------------------------------------------------------------------- beam mask
def default_beam_mask_radius(beam_radius: float) -> float:
    """Mask radius (detector pixels) derived from the measured direct-beam disc radius.

    ``max(2 * beam_radius, beam_radius + 2)``: beyond the disc edge a saturated
    direct beam keeps a halo from the detector point-spread (phosphor + lens
    coupling, 1-2 px) and from residual misalignment (<= 1 px after alignment), so
    at least 2 px are added; for wide (precessed, large-aperture) discs the halo
    and blooming scale with the disc, hence 2x. First-order Bragg spots lie far
    outside (e.g. 12 mrad vs a 1 mrad convergence semi-angle for MgO at 200 kV).
    """
    check_range("beam_radius", beam_radius, low=0, low_open=True)
    return float(max(2.0 * beam_radius, beam_radius + 2.0))


def beam_mask(shape: tuple[int, int], radius: float | None = None, *,
              beam_radius: float | None = None) -> np.ndarray:
    """Boolean mask of the central disc, True = excluded from the decomposition.

    Parameters
    ----------
    shape : (ky, kx)
        Detector shape; the beam is at ``(ky // 2, kx // 2)`` (aligned data).
    radius : float, optional
        Mask radius in detector pixels (pixels with centre distance <= radius).
    beam_radius : float, optional
        Measured direct-beam disc radius; used when ``radius`` is None through
        :func:`default_beam_mask_radius`.

    Returns
    -------
    (ky, kx) ndarray of bool
    """
    if len(tuple(shape)) != 2:
        raise ParameterError(f"`shape` must be (ky, kx) (got {shape!r})")
    ky, kx = (int(s) for s in shape)
    if ky < 1 or kx < 1:
        raise ParameterError(f"`shape` must be positive (got {shape!r})")
    if radius is None:
        if beam_radius is None:
            raise ParameterError("`beam_mask` needs `radius` or `beam_radius` (got neither)")
        radius = default_beam_mask_radius(beam_radius)
    check_range("radius", radius, low=0)
    yy, xx = np.ogrid[:ky, :kx]
    return (yy - ky // 2) ** 2 + (xx - kx // 2) ** 2 <= radius ** 2


#: Largest fraction of patterns in which a detector row (or column) may lie off the
#: detector after alignment and still be decomposed (:func:`edge_mask`; a corner pixel
#: may then be missing from up to twice as many).
EDGE_FRACTION = 0.01


def edge_mask(shape: tuple[int, int], centres, max_fraction: float = EDGE_FRACTION) -> np.ndarray:
    """Boolean mask of the detector's edge bands, True = excluded from the decomposition:
    the rows and columns whose source lies off the detector, once every pattern's beam
    centre is moved to ``(ky // 2, kx // 2)``, in more than ``max_fraction`` of the patterns.

    Alignment fills those pixels with 0 (``preprocess.shift_patterns``). Where the beam
    moves across the scan (descan) or sits off the detector centre, that band of zeros
    grows and shrinks from pattern to pattern; NMF, which must fit every pixel, then
    spends components on the band (a factor bright along one detector edge, its loading
    a smooth ramp over the scan) and the watershed cuts "crystals" out of the ramp. A
    pixel missing from a few patterns only (an outlying centre) costs the fit little.

    The band follows the centres the patterns are aligned on: with the fitted descan
    (the default) a smooth map; with ``preprocess.descan = "none"`` (and in live mode)
    each pattern's measured centre, where more than ``max_fraction`` of outliers a few
    pixels off widen the band by as much.

    Parameters
    ----------
    shape : (ky, kx)
    centres : (..., 2) array
        The beam centres the patterns are aligned on (detector pixels).
    max_fraction : float
        See above; 0 excludes every pixel that any pattern lacks.

    Returns
    -------
    (ky, kx) ndarray of bool
        A frame: whole rows and columns (those off the detector in more than
        ``max_fraction`` of the patterns, counting rows and columns separately).
    """
    ky, kx = (int(s) for s in shape)
    c = np.asarray(centres, np.float64).reshape(-1, 2)
    check_range("max_fraction", max_fraction, low=0, high=1)
    out = np.zeros((ky, kx), bool)
    if not len(c):
        return out
    bad = []
    for axis, n in enumerate((ky, kx)):
        # the bilinear shift by s = n // 2 - centre reads rows y - floor(s) and, unless s
        # is whole, y - floor(s) - 1: row y is complete for ceil(s) <= y <= floor(s) + n - 1
        s = n // 2 - c[:, axis]
        s = s[np.isfinite(s)]
        lo = np.clip(np.ceil(s), 0, n).astype(np.intp)                 # rows below are missing
        hi = np.clip(np.floor(s) + n - 1, -1, n - 1).astype(np.intp)   # rows above are missing
        # missing[y] = #(lo > y) + #(hi < y)
        below = len(s) - np.cumsum(np.bincount(lo, minlength=n + 1))[:n]
        above = np.cumsum(np.bincount(hi + 1, minlength=n + 1))[:n]
        missing = (below + above) / max(len(s), 1)
        bad.append(missing > max_fraction)
    out[bad[0], :] = True
    out[:, bad[1]] = True
    return out


def _check_mask(mask, det_shape) -> np.ndarray:
    if mask is None:
        return np.zeros(det_shape, bool)
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise ParameterError(f"`mask` must be boolean (got dtype {mask.dtype})")
    if mask.shape != tuple(det_shape):
        raise ParameterError(f"`mask` (shape {mask.shape}) must have the detector shape {tuple(det_shape)}")
    if mask.all():
        raise ParameterError("`mask` excludes every detector pixel")
    return mask


def _check_data(data):
    check_4d(data, "`data`")
    if hasattr(data, "chunks") and (len(data.chunks[2]) > 1 or len(data.chunks[3]) > 1):
        raise InputError(f"`data` chunks must hold whole patterns (got chunks {data.chunksize})")


# ------------------------------------------------------------------ statistics (reduction)
class PoissonStats(NamedTuple):
    """Row/column sums of the (clipped, masked) data.

    row_sums : (scan_y, scan_x) float64, counts per pattern over unmasked pixels.
    col_sums : (ky, kx) float64, counts per detector pixel over the scan (0 where masked).
    n_negative : int, number of negative values that were clipped to 0.
    unit : float, data units per detector count (the camera's gain; default 1: the
        data are counts). The sums are in data units; :func:`scale_factors` takes the
        unit out, so that the normalised matrix has unit noise variance in any units.
    """

    row_sums: np.ndarray
    col_sums: np.ndarray
    n_negative: int
    unit: float = 1.0


def poisson_partial(block: np.ndarray, mask: np.ndarray | None = None) -> PoissonStats:
    """Process step of the reduction: statistics of one chunk of whole patterns.

    Parameters
    ----------
    block : (cy, cx, ky, kx) ndarray
    mask : (ky, kx) bool, True = excluded.

    Returns
    -------
    PoissonStats with ``row_sums`` (cy, cx) and ``col_sums`` (ky, kx).
    """
    b = np.asarray(block, dtype=np.float64)
    neg = b < 0
    n_neg = int(neg.sum())
    if n_neg:
        b = np.where(neg, 0.0, b)
    if mask is not None:
        b = np.where(mask, 0.0, b)
    return PoissonStats(b.sum(axis=(2, 3)), b.sum(axis=(0, 1)), n_neg)


def merge_poisson(a: PoissonStats, b: PoissonStats, *, axis: int = 0) -> PoissonStats:
    """Merge step: add column sums and negatives, join row sums along ``axis``."""
    return PoissonStats(np.concatenate([a.row_sums, b.row_sums], axis=axis),
                        a.col_sums + b.col_sums, a.n_negative + b.n_negative)


def poisson_statistics(data, mask: np.ndarray | None = None) -> PoissonStats:
    """Row and column sums for Poisson normalisation, in one pass over the data.

    Each chunk is reduced by :func:`poisson_partial`; column sums and negative
    counts are merged by (tree) addition, row sums are assembled in place. This
    computes (it is a reduction returning small arrays).

    Parameters
    ----------
    data : (scan_y, scan_x, ky, kx) dask.array.Array or ndarray
        Patterns, whole patterns per chunk, non-negative counts (negatives are
        clipped to 0 with a RuntimeWarning).
    mask : (ky, kx) bool ndarray, optional
        True for excluded detector pixels (e.g. :func:`beam_mask`).

    Returns
    -------
    PoissonStats
        ``row_sums`` (scan_y, scan_x), ``col_sums`` (ky, kx), ``n_negative``.
    """
    _check_data(data)
    mask = _check_mask(mask, data.shape[2:])
    if isinstance(data, np.ndarray):
        stats = poisson_partial(data, mask)
    else:
        import dask
        import dask.array as da

        def rows(block, mask):
            return poisson_partial(block, mask).row_sums

        def cols(block, mask):
            p = poisson_partial(block, mask)
            return np.concatenate([p.col_sums.ravel(), [p.n_negative]])[None, None]

        ky, kx = data.shape[2:]
        r = data.map_blocks(rows, mask, drop_axis=(2, 3), dtype=np.float64,
                            meta=np.empty((0, 0), np.float64))
        c = da.map_blocks(cols, data, mask, drop_axis=3,
                          chunks=(tuple(1 for _ in data.chunks[0]), tuple(1 for _ in data.chunks[1]),
                                  (ky * kx + 1,)),
                          dtype=np.float64, meta=np.empty((0, 0, 0), np.float64)).sum(axis=(0, 1))
        r, c = dask.compute(r, c)
        stats = PoissonStats(r, c[:-1].reshape(ky, kx), int(round(c[-1])))
    if stats.n_negative:
        warnings.warn(f"data has {stats.n_negative} negative values; clipped to 0 for the "
                      "Poisson normalisation and NMF", RuntimeWarning, stacklevel=2)
    return stats


# ------------------------------------------------------------------ normalisation
def scale_factors(stats: PoissonStats) -> tuple[np.ndarray, np.ndarray]:
    """Row and column scales ``a`` (scan_y, scan_x) and ``b`` (ky, kx) (see module doc).

    ``a = sqrt(r / mean(r))`` (dimensionless), ``b = sqrt(c u / N)`` (sqrt counts
    times the data units ``u`` per count, ``stats.unit``): a reading ``x = u n`` of
    ``n`` counts is normalised to ``n / (a sqrt(c / (u N)))``, counts over the square
    root of their expected number, whatever the camera's units. (Without ``u`` the
    normalised matrix of a camera giving 1000 units per count has noise variance 1000,
    and the NMF's start, whose zeros are filled with the matrix's mean, is another.)
    Zero sums give zero scales.
    """
    r = np.asarray(stats.row_sums, np.float64)
    c = np.asarray(stats.col_sums, np.float64)
    mean_r = r.mean()
    a = np.sqrt(r / mean_r) if mean_r > 0 else np.zeros_like(r)
    unit = float(stats.unit)
    if not (unit > 0 and np.isfinite(unit)):
        raise ParameterError(f"`stats.unit` (data units per count) must be positive and finite "
                             f"(got {unit!r})")
    b = np.sqrt(c * unit / r.size)
    return a, b


def _safe_inverse(s):
    out = np.zeros_like(s, dtype=np.float64)
    np.divide(1.0, s, out=out, where=s > 0)
    return out


def normalise_block(block: np.ndarray, a: np.ndarray, b: np.ndarray,
                    keep: np.ndarray) -> np.ndarray:
    """Kernel: normalised, masked patterns of one chunk.

    Parameters
    ----------
    block : (cy, cx, ky, kx) ndarray
    a : (cy, cx) or broadcastable row scales; b : (ky, kx) column scales.
    keep : (ky, kx) bool, the unmasked pixels (P of them).

    Returns
    -------
    (cy, cx, P) float32: ``max(x, 0) / (a b)`` with 0 where ``a b == 0``.
    """
    block = np.asarray(block)
    cy, cx = block.shape[:2]
    # a flat-index take and in-place arithmetic: 3-8x faster than a boolean gather
    # followed by three temporaries, with the same float32 result
    x = np.take(block.reshape(cy * cx, keep.size), np.flatnonzero(keep), axis=1).astype(np.float32, copy=False)
    np.maximum(x, 0, out=x)
    x *= _safe_inverse(np.asarray(a, np.float64).reshape(cy * cx, 1)).astype(np.float32)
    x *= _safe_inverse(np.asarray(b, np.float64)[keep]).astype(np.float32)
    return x.reshape(cy, cx, x.shape[1])


def normalised_matrix(data, stats: PoissonStats, mask: np.ndarray | None = None):
    """The Poisson-normalised, masked data matrix, lazily.

    Parameters
    ----------
    data : (scan_y, scan_x, ky, kx) dask.array.Array (whole patterns per chunk) or ndarray
    stats : PoissonStats from :func:`poisson_statistics` (same mask).
    mask : (ky, kx) bool, True = excluded.

    Returns
    -------
    (N, P) dask.array.Array of float32 (ndarray for ndarray input)
        ``N = scan_y * scan_x`` patterns in raster order, ``P`` unmasked pixels,
        chunked by rows (whole scan rows per chunk), all columns in one chunk.
    """
    _check_data(data)
    mask = _check_mask(mask, data.shape[2:])
    if stats.row_sums.shape != data.shape[:2] or stats.col_sums.shape != data.shape[2:]:
        raise ParameterError(f"`stats` (rows {stats.row_sums.shape}, columns {stats.col_sums.shape}) "
                             f"do not match `data` (shape {data.shape})")
    a, b = scale_factors(stats)
    keep = ~mask
    n_pix = int(keep.sum())
    sy, sx = data.shape[:2]
    if isinstance(data, np.ndarray):
        return normalise_block(data, a, b, keep).reshape(sy * sx, n_pix)
    import dask.array as da
    a_d = da.from_array(a, chunks=data.chunks[:2])
    m = da.map_blocks(normalise_block, data, a_d[..., None, None], b=b, keep=keep,
                      drop_axis=3, chunks=(data.chunks[0], data.chunks[1], (n_pix,)),
                      dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))
    return m.reshape(sy * sx, n_pix)


def undo_normalisation(factors: np.ndarray, loadings: np.ndarray, stats: PoissonStats,
                       mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Back to counts and to image shapes: ``H * b`` and ``W * a``.

    The scale ambiguity of ``W H`` is fixed so that every loading map has maximum 1:
    a factor is then the component's diffraction pattern in counts where the
    component is fully present.

    Parameters
    ----------
    factors : (E, P) ndarray, from the normalised matrix.
    loadings : (N, E) ndarray, N = scan_y * scan_x.
    stats, mask : as given to :func:`normalised_matrix`.

    Returns
    -------
    factors : (E, ky, kx) float32, counts (0 on masked pixels).
    loadings : (E, scan_y, scan_x) float32, max 1 per component (0 for a null one).
    """
    a, b = scale_factors(stats)
    mask = _check_mask(mask, b.shape)
    keep = ~mask
    factors = np.asarray(factors, np.float64)
    loadings = np.asarray(loadings, np.float64)
    E = factors.shape[0]
    if factors.shape != (E, int(keep.sum())) or loadings.shape != (a.size, E):
        raise ParameterError(f"`factors` {factors.shape} / `loadings` {loadings.shape} do not match "
                             f"E x {int(keep.sum())} pixels and {a.size} patterns")
    w = loadings * a.reshape(-1, 1)
    h = factors * b[keep][None]
    peak = w.max(axis=0)
    scale = np.where(peak > 0, peak, 1.0)
    w = w / scale
    h = h * scale[:, None]
    out_f = np.zeros((E,) + b.shape, np.float32)
    out_f[:, keep] = h
    return out_f, w.T.reshape((E,) + a.shape).astype(np.float32)
