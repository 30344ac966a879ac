"""Virtual dark-field sums of a chunk of patterns: one sparse matrix product (NumPy/SciPy).

All discs (one per diffraction vector) are the columns of one sparse
``(ky * kx, N)`` weight matrix; the VDF values of a chunk are the flattened
patterns times that matrix, a single pass over the data for every vector at once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..config import check_auto_switch, check_range
from ..errors import InputError, ParameterError

__all__ = ["VDFParams", "resolve", "disc_masks", "annulus_mask", "apply_masks", "vdf_sums",
           "annular_sums", "preprocessed_sums", "dose_spread", "dose_varies", "dose_normalised",
           "DOSE_SPREAD"]

#: Sub-samples per pixel along each axis for the area-weighted (sub-pixel) masks:
#: the covered area of each pixel is known to 1/64 of a pixel.
_SUPERSAMPLE = 8


@dataclass(frozen=True)
class VDFParams:
    """Virtual dark-field imaging.

    Attributes
    ----------
    radius : float or None
        Radius of the integration disc at each vector, px. None: the spot radius
        ``r`` (the direct-beam radius): every diffraction spot is an image of the
        same convergence disc, so a disc of ``r`` collects the whole spot and as
        little background as possible.
    subpixel : bool
        Weight each pixel by the fraction of its area inside the disc (True), or
        use the pixels whose centres lie inside (False). True: the sum then does
        not jump when a vector moves by a fraction of a pixel, and the disc area is
        exactly ``pi r^2``.
    normalize : bool or "auto"
        Divide every VDF image by each pattern's dose: its total counts over the
        scan's median total (:func:`dose_spread`). Electrons are counted wherever
        they land, so on a detector that clips nothing the total is the incident
        dose, and a beam current that flickers or decays during the scan (a cold
        field-emission gun) scales every pattern, and the VDF images line by line:
        stripes that break a crystal's threshold mask. "auto" (default): on where the
        totals spread (robust relative standard deviation) beyond their counting noise
        by more than :data:`DOSE_SPREAD` (10 %) and more than that noise itself, the
        detector's gain is known, the beam is seen and not clipped (a clipped beam or
        a beam stop takes the dose out of the total, which then follows the crystals).
    """

    radius: float | None = None
    subpixel: bool = True
    normalize: bool | str = "auto"

    def __post_init__(self):
        check_range("radius", self.radius, low=0, low_open=True, allow_none=True)
        if not isinstance(self.subpixel, bool):
            raise ParameterError(f"`subpixel` must be true or false (got {self.subpixel!r})")
        check_auto_switch("normalize", self.normalize)


def resolve(params: VDFParams, spot_radius: float | None = None) -> VDFParams:
    """Fill ``radius`` from the spot radius (px) if unset."""
    if not isinstance(params, VDFParams):
        raise ParameterError(f"`params` must be a VDFParams (got {type(params).__name__})")
    if params.radius is not None:
        return params
    check_range("spot_radius", spot_radius, low=0, low_open=True)
    return dataclasses.replace(params, radius=float(spot_radius))


#: ``normalize = "auto"`` acts where the patterns' totals spread by more than this
#: (robust relative standard deviation beyond counting noise). A scan whose electrons
#: all reach the detector keeps its totals to counting noise (0.6 % at 30,000 counts),
#: but crystals that scatter past the detector's edge, or a simulator whose spots do
#: not take their counts from the beam, make totals that follow the crystals (2-8 % on
#: another simulator's sets, benchmarks/README.md, session 36), and dividing by those
#: dims the crystals. A beam current that drifts or flickers by 6 % left the
#: segmentation as it was, by 16-55 % it cost crystals: 10 % lies between.
DOSE_SPREAD = 0.10
#: Patterns that got less than this fraction of the median dose (a blanked beam at the
#: start of a line) are scaled up by at most its inverse, not by their own noise.
_MIN_DOSE = 0.2


def dose_spread(totals, gain: float | None = None, read_var: float = 0.0,
                n_pixels: int = 0) -> tuple[np.ndarray, float, float]:
    """Each pattern's dose relative to the scan, and the spread of the doses beyond
    counting noise.

    Parameters
    ----------
    totals : (Y, X) array
        Each pattern's total (data units).
    gain : float, optional
        Data units per detected electron; None: unknown (the spread is then NaN).
    read_var : float
        Read-out variance per pixel, data units squared (a camera's; 0 for a counting
        detector), with ``n_pixels`` pixels per pattern.

    Returns
    -------
    rel : (Y, X) float64
        ``totals / median(totals)``, at least :data:`_MIN_DOSE`; 1 where a total is
        not positive or not finite.
    spread : float
        Robust relative standard deviation of the totals (1.4826 x the median absolute
        deviation of ``rel``) with the counting noise's share removed in quadrature:
        ``sqrt(max(s^2 - (gain / m + n_pixels read_var / m^2), 0))`` for the median
        total ``m``. NaN with fewer than 16 usable totals or without ``gain``.
    noise : float
        The relative counting noise of a total, ``sqrt(gain / m + n_pixels read_var /
        m^2)``: what dividing by the totals adds to every pixel (NaN as ``spread``).
    """
    t = np.asarray(totals, np.float64)
    ok = np.isfinite(t) & (t > 0)
    nan = float("nan")
    if ok.sum() < 16:
        return np.ones(t.shape), nan, nan
    m = float(np.median(t[ok]))
    rel = np.where(ok, t / m, 1.0)
    if gain is None or not np.isfinite(gain) or gain <= 0:
        return np.maximum(rel, _MIN_DOSE), nan, nan
    s = 1.4826 * float(np.median(np.abs(rel[ok] - 1.0)))
    noise = float(gain) / m + n_pixels * float(read_var) / m ** 2
    return np.maximum(rel, _MIN_DOSE), math.sqrt(max(s * s - noise, 0.0)), math.sqrt(noise)


def dose_varies(spread: float, noise: float = 0.0) -> bool:
    """Whether the doses' ``spread`` (:func:`dose_spread`) exceeds both
    :data:`DOSE_SPREAD` and the totals' own counting noise ``noise`` (below it, dividing
    by them adds more noise than it takes out of the dose: a few hundred counts per
    pattern); False where it is not known (NaN)."""
    return bool(np.isfinite(spread) and spread > max(DOSE_SPREAD, noise))


def dose_normalised(normalize, spread: float, noise: float = 0.0, *, clipped: bool,
                    beam_seen: bool) -> bool:
    """``VDFParams.normalize`` resolved: "auto" is on where the doses vary
    (:func:`dose_varies`), the beam is seen and not clipped."""
    if normalize != "auto":
        return bool(normalize)
    return bool(beam_seen and not clipped and dose_varies(spread, noise))


def _check_detector(detector_shape) -> tuple[int, int]:
    from ..peaks.vectors import _check_shape
    return _check_shape(detector_shape)


def check_vectors(vectors) -> np.ndarray:
    """``vectors`` as a finite (N, 2) float64 array, or InputError."""
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim == 1 and v.size == 0:
        v = v.reshape(0, 2)
    if v.ndim != 2 or v.shape[1] != 2:
        raise InputError(f"`vectors` must be (N, 2) (gy, gx) pairs; got shape {v.shape}")
    if not np.isfinite(v).all():
        raise InputError("`vectors` must be finite")
    return v


def _area_inside(centres: np.ndarray, radius_outer: float, radius_inner: float,
                 detector_shape: tuple[int, int], subpixel: bool):
    """Pixel weights of rings ``inner <= d <= outer`` around absolute ``centres``.

    Returns (rows, cols, weights) of the sparse (ky*kx, N) matrix.
    """
    ky, kx = detector_shape
    h = int(math.ceil(radius_outer)) + 1
    off = np.arange(-h, h + 1)
    oy, ox = (a.ravel() for a in np.meshgrid(off, off, indexing="ij"))
    base_y = np.rint(centres[:, 0]).astype(np.intp)
    base_x = np.rint(centres[:, 1]).astype(np.intp)
    py = base_y[:, None] + oy[None, :]  # (N, B) pixel indices
    px = base_x[:, None] + ox[None, :]
    dy = py - centres[:, 0:1]
    dx = px - centres[:, 1:2]
    if subpixel:
        s = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE - 0.5
        sy, sx = (a.ravel() for a in np.meshgrid(s, s, indexing="ij"))
        d2 = (dy[..., None] + sy) ** 2 + (dx[..., None] + sx) ** 2  # (N, B, S*S)
        inside = (d2 <= radius_outer ** 2) & (d2 >= radius_inner ** 2 if radius_inner > 0 else True)
        w = inside.mean(axis=-1)
    else:
        d2 = dy ** 2 + dx ** 2
        w = ((d2 <= radius_outer ** 2) & ((d2 >= radius_inner ** 2) if radius_inner > 0 else True)
             ).astype(np.float64)
    on = (py >= 0) & (py < ky) & (px >= 0) & (px < kx) & (w > 0)
    col = np.broadcast_to(np.arange(len(centres))[:, None], py.shape)
    return (py[on] * kx + px[on]), col[on], w[on]


def disc_masks(vectors, radius: float, detector_shape: tuple[int, int], *,
               subpixel: bool = True) -> sp.csr_matrix:
    """Sparse weights of a disc of ``radius`` at each vector.

    Parameters
    ----------
    vectors : (N, 2) array
        ``(gy, gx)`` relative to the direct beam at ``(ky // 2, kx // 2)``, px.
    radius : float
        Disc radius, px.
    detector_shape : (ky, kx)
    subpixel : bool
        Area-weighted pixels (fraction of the pixel inside the disc, to 1/64)
        instead of pixels whose centres are inside. Parts of a disc off the
        detector are simply missing.

    Returns
    -------
    (ky * kx, N) scipy.sparse.csr_matrix of float32
    """
    ky, kx = _check_detector(detector_shape)
    v = check_vectors(vectors)
    check_range("radius", radius, low=0, low_open=True)
    centres = v + np.array([ky // 2, kx // 2], float)
    rows, cols, w = _area_inside(centres, float(radius), 0.0, (ky, kx), subpixel)
    return sp.csr_matrix((w.astype(np.float32), (rows, cols)), shape=(ky * kx, len(v)))


def annulus_mask(detector_shape: tuple[int, int], inner: float, outer: float, *,
                 subpixel: bool = True) -> sp.csr_matrix:
    """Sparse (ky*kx, 1) weights of the annulus ``inner <= |k - beam| <= outer`` (px)."""
    ky, kx = _check_detector(detector_shape)
    check_range("inner", inner, low=0)
    check_range("outer", outer, low=0, low_open=True)
    if inner >= outer:
        raise ParameterError(f"`inner` ({inner}) must be smaller than `outer` ({outer})")
    centre = np.array([[ky // 2, kx // 2]], float)
    rows, cols, w = _area_inside(centre, float(outer), float(inner), (ky, kx), subpixel)
    return sp.csr_matrix((w.astype(np.float32), (rows, cols)), shape=(ky * kx, 1))


def _check_frames(frames, masks: sp.spmatrix) -> np.ndarray:
    """``frames`` as an array of patterns (..., ky, kx) with as many pixels as ``masks`` rows."""
    frames = np.asarray(frames)
    if frames.ndim < 2:
        raise InputError(f"`frames` must be (..., ky, kx); got shape {frames.shape}")
    p = frames.shape[-2] * frames.shape[-1]
    if masks.shape[0] != p:
        raise InputError(f"masks are for {masks.shape[0]} detector pixels; patterns have {p}")
    return frames


def apply_masks(frames: np.ndarray, masks: sp.spmatrix) -> np.ndarray:
    """Weighted sums of every pattern under every mask: one sparse product.

    Parameters
    ----------
    frames : (..., ky, kx) array
    masks : (ky * kx, N) sparse matrix

    Returns
    -------
    (..., N) float32 array
    """
    frames = _check_frames(frames, masks)
    lead = frames.shape[:-2]
    p = frames.shape[-2] * frames.shape[-1]
    flat = frames.reshape(-1, p).astype(np.float32, copy=False)
    idx, w = _padded_columns(masks)
    if idx.size == 0:
        out = np.zeros((len(flat), masks.shape[1]), np.float32)
    elif idx.size <= p:
        # few pixels per mask (discs): gather them per pattern and weight; no
        # transposed copy of the chunk, which is what a sparse product costs
        out = np.empty((len(flat), idx.shape[0]), np.float32)
        for s in range(0, len(flat), _GATHER_BATCH):
            g = flat[s:s + _GATHER_BATCH, idx.ravel()].reshape(-1, *idx.shape)
            out[s:s + _GATHER_BATCH] = np.einsum("nvk,vk->nv", g, w)
    else:
        out = (masks.T.tocsr() @ flat.T).T  # (n, N); sparse @ dense is the fast direction
    return np.ascontiguousarray(out, dtype=np.float32).reshape(lead + (masks.shape[1],))


#: Patterns per gather in :func:`apply_masks` (bounds the gathered copy).
_GATHER_BATCH = 256

#: Patterns aligned and background-subtracted at a time in :func:`preprocessed_sums`.
_SLAB = 64


def preprocessed_sums(frames: np.ndarray, centres: np.ndarray, masks: sp.spmatrix, *,
                      sigma_low: float, sigma_high: float, counts=None) -> np.ndarray:
    """VDF sums of the aligned, background-subtracted patterns, slab by slab.

    Equals ``apply_masks(shift_and_subtract(frames, centres, sigma_low, sigma_high,
    counts=counts), masks)`` (:func:`spedflow.preprocess.kernels.shift_and_subtract`),
    but the preprocessed patterns only ever exist ``_SLAB`` at a time: no chunk-sized
    float32 array is written and read back (that round trip through memory cost ~30 %
    of pass 2 of the VDF workflow). With ``counts`` and numba, the whole of it runs as
    one compiled loop per pattern instead (:mod:`spedflow._compiled`; equal to
    float32 rounding).

    Parameters
    ----------
    frames : (..., ky, kx) array
    centres : (..., 2) array
        Beam centres ``(ky, kx)`` of each pattern.
    masks : (ky * kx, N) sparse matrix
        From :func:`disc_masks`.
    sigma_low, sigma_high : float
        DoG widths, detector pixels.
    counts : (gain, read_var), optional
        Subtract the ring background first (see ``shift_and_subtract``).

    Returns
    -------
    (..., N) float32 array
    """
    from ..preprocess.kernels import shift_and_subtract
    frames = _check_frames(frames, masks)
    lead, (ky, kx) = frames.shape[:-2], frames.shape[-2:]
    flat = frames.reshape(-1, ky, kx)
    c = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    if len(c) != len(flat):
        raise InputError(f"centres hold {len(c)} patterns, frames {len(flat)}")
    fast = _compiled_pass2(flat, c, masks, sigma_low, sigma_high, counts)
    if fast is not None:
        return fast.reshape(lead + (masks.shape[1],))
    out = np.empty((len(flat), masks.shape[1]), np.float32)
    for s in range(0, len(flat), _SLAB):
        z = shift_and_subtract(flat[s:s + _SLAB], c[s:s + _SLAB], sigma_low, sigma_high,
                               counts=counts)
        out[s:s + _SLAB] = apply_masks(z, masks)
    return out.reshape(lead + (masks.shape[1],))


def _compiled_pass2(flat, centres, masks, sigma_low, sigma_high, counts):
    """:func:`preprocessed_sums` by the compiled kernel (:mod:`spedflow._compiled`), or None
    where it does not apply: numba missing or off (:func:`spedflow._jit.enabled`), no
    ring background (``counts``), a DoG whose Gaussians are not one narrow and one
    wide (low-rank) on this detector, or masks with no pixels."""
    from .._jit import compiled
    if counts is None or masks.nnz == 0:
        return None
    _compiled = compiled("spedflow._compiled")
    if _compiled is None:
        return None
    ops = _compiled.operators(flat.shape[-2:], sigma_low, sigma_high)
    if not ops.ok:
        return None
    from ..preprocess.kernels import _shifts_to_centre
    idx, w = _padded_columns(masks)
    return _compiled.pass2_sums(flat, _shifts_to_centre(centres, flat.shape[-2:]), ops, idx, w,
                                float(counts[0]), float(counts[1]))


def _padded_columns(masks: sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    """Pixel indices and weights of each mask column, zero-padded to equal length.

    Returns (N, K) intp indices and (N, K) float32 weights, K the most pixels of any
    mask; padding points at pixel 0 with weight 0.
    """
    m = sp.csc_matrix(masks)
    m.sum_duplicates()
    counts = np.diff(m.indptr)
    n, k = m.shape[1], int(counts.max()) if m.shape[1] else 0
    idx = np.zeros((n, k), np.intp)
    w = np.zeros((n, k), np.float32)
    slot = np.arange(m.nnz) - np.repeat(m.indptr[:-1], counts)
    col = np.repeat(np.arange(n), counts)
    idx[col, slot] = m.indices
    w[col, slot] = m.data
    return idx, w


def vdf_sums(frames: np.ndarray, vectors, radius: float, *, subpixel: bool = True) -> np.ndarray:
    """Virtual dark-field intensities: the sum of each pattern in a disc at each vector.

    Parameters
    ----------
    frames : (..., ky, kx) array
        Aligned patterns (beam at ``(ky // 2, kx // 2)``).
    vectors : (N, 2) array
        ``(gy, gx)`` relative to the beam, px.
    radius : float
        Disc radius, px.
    subpixel : bool
        Area-weighted disc edge (see :func:`disc_masks`).

    Returns
    -------
    (..., N) float32 array
    """
    frames = np.asarray(frames)
    if frames.ndim < 2:
        raise InputError(f"`frames` must be (..., ky, kx); got shape {frames.shape}")
    masks = disc_masks(vectors, radius, frames.shape[-2:], subpixel=subpixel)
    return apply_masks(frames, masks)


def annular_sums(frames: np.ndarray, inner: float, outer: float, *,
                 subpixel: bool = True) -> np.ndarray:
    """Annular dark-field intensity of each pattern: (..., ky, kx) -> (...) float32."""
    frames = np.asarray(frames)
    if frames.ndim < 2:
        raise InputError(f"`frames` must be (..., ky, kx); got shape {frames.shape}")
    mask = annulus_mask(frames.shape[-2:], inner, outer, subpixel=subpixel)
    return apply_masks(frames, mask)[..., 0]
